"""bench/gpu_all.sh: its stage limits add up to under 10 minutes, a missing input stops it before any stage runs,
and --dry-run rehearses every stage on CPU.

    python -m pytest -q tests/test_gpu_all.py       # ~50 s of CPU (seven Python processes, each imports torch)
"""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_all.sh"
STAGES = ["setup", "attention", "rollout", "step", "index", "before", "learn", "after", "plot"]


def test_stage_limits_fit_ten_minutes():
    """Every stage has a hard limit no smaller than its expected time, and the limits add up to under 9 minutes
    (the header promises 10: the rest is what runs between stages)."""
    found = re.findall(r"^\s*(?:stage|eval_em) (\w+) (\d+) (\d+)", SCRIPT.read_text(), re.M)
    assert [name for name, _, _ in found] == STAGES
    assert all(int(expect) <= int(limit) for _, limit, expect in found)
    assert sum(int(limit) for _, limit, _ in found) <= 9 * 60 - 10


def test_missing_inputs_stop_it_before_any_stage(tmp_path):
    """A --data folder without the prepared files: exit 2 before any stage, one line per missing file naming it."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    r = subprocess.run(
        ["bash", str(SCRIPT), "--data", str(tmp_path), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    lines = r.stderr.strip().splitlines()
    assert [line.split()[3] for line in lines[:3]] == [
        f"{tmp_path}/{f}.jsonl" for f in ("test", "train", "corpus")
    ]
    assert all(line.startswith("gpu_all.sh: error: missing ") for line in lines)


@pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "2wiki" / "corpus.jsonl").is_file(),
    reason="needs ../shared/data/2wiki",
)
def test_dry_run_runs_every_stage(tmp_path):
    """The same stages on CPU with tiny sizes (2-layer random Qwen2s, a few tokens, one GRPO step): each ends ok
    and the summary screen lists them all with their result lines."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "KR1_TOKENIZER": ""}
    data = ROOT.parent / "shared" / "data" / "2wiki"
    flags = (
        [] if importlib.util.find_spec("matplotlib") else ["--skip-missing"]
    )  # the `bench` extra draws the plot
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--data", str(data), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = [line.split() for line in (out / "SUMMARY.txt").read_text().splitlines()[1:]]
    plot = "skipped" if flags else "ok"
    assert [row[:2] for row in rows] == [[s, "ok"] for s in STAGES[:-1]] + [["plot", plot]], (
        r.stdout[-4000:]
    )
    screen = r.stdout[r.stdout.index("Knowledge-R1 GPU day one") :]
    assert "same numbers as HF sdpa" in screen and "one step:" in screen and "em: " in screen
    assert (out / "eval-after.jsonl").read_text().count("\n") == 2 and (
        out / "curves.png"
    ).is_file() == (plot == "ok")
