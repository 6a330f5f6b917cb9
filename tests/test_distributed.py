"""train.py across processes beyond tests/test_train.py: two "nodes" of one machine (two torchrun agents, one rank
each, a c10d rendezvous on localhost, a $KR1_CACHE each), and --dist-timeout against a rank 0 that is slow alone.

    python -m pytest -q tests/test_distributed.py
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_train import ROOT, common_flags, free_port, torchrun

FLAGS = [
    "--group-size",
    "2",
    "--prompts-per-step",
    "2",
    "--max-turns",
    "1",
    "--max-turn-tokens",
    "12",
    "--max-total-tokens",
    "32",
    "--micro-batch",
    "2",
    "--warmup-steps",
    "1",
    "--lr",
    "1e-3",
    "--beta",
    "0.04",
    "--save-every",
    "1",
]


def two_nodes(d: Path, out: Path, steps: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """Both agents of one job, started together; each node's own cache dir is d/cache-node{0,1}."""
    endpoint, procs = f"127.0.0.1:{free_port()}", []
    for node in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "KR1_CACHE": str(d / f"cache-node{node}"),
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            out.name,
            "--rdzv-conf",
            f"is_host={node == 0}",
            str(ROOT / "train.py"),
            "--model",
            str(d / "policy"),
            "--dataset",
            str(d / "qa.jsonl"),
            "--index",
            str(d / "corpus.jsonl"),
            *FLAGS,
            "--steps",
            str(steps),
            "--out",
            str(out),
            *extra,
        ]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, **pipes))
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for r in done:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return done


def test_two_nodes_train_then_resume(tiny_policy, tmp_path):
    """Two steps on two nodes, then a resume for a third: the log has steps 1..3, each node built the corpus's index
    into its own cache (--index FILE.jsonl: built once per cache), and the checkpoints hold both ranks' RNG."""
    d, out = tmp_path, tmp_path / "run"
    for name in ("policy", "qa.jsonl", "corpus.jsonl"):
        (d / name).symlink_to(tiny_policy / name)
    two_nodes(d, out, 2)
    two_nodes(d, out, 3, "--resume", str(out))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and not any(r["skipped"] for r in log)
    assert (out / "latest").read_text().strip() == "checkpoints/step_000003"
    for node in (0, 1):
        assert len(list((d / f"cache-node{node}" / "index").glob("corpus-*/*"))) > 0, (
            node
        )  # its own build
    assert sorted(p.name for p in (out / "checkpoints" / "step_000002").glob("rng_rank*")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]


SLOW = """import os, sys, time
import rollout, train
load, merged = rollout.load_model, rollout.merged
def slow(f):
    def call(*args, **kwargs):
        if not kwargs.get("meta"):
            time.sleep(float(os.environ["KR1_TEST_SLOW"]))
        return f(*args, **kwargs)
    return call
if os.environ["RANK"] == "0":  # rank 0 alone: reading the model (not the meta skeleton), merging LoRA into hf/
    rollout.load_model, rollout.merged = slow(load), slow(merged)
sys.exit(train.main(sys.argv[1:]))
"""


def test_dist_timeout_spares_rank0_alone(tiny_policy, tmp_path, monkeypatch):
    """--dist-timeout 0.25 (15 s) bounds a stalled collective, not rank 0 reading the model or writing the merged
    hf/ folder: rank 0 takes 25 s over each while rank 1 waits, and the job completes."""
    (tmp_path / "slow.py").write_text(SLOW)
    monkeypatch.setenv("KR1_TEST_SLOW", "25")
    flags = [
        *common_flags(tiny_policy),
        "--beta",
        "0",
        "--lora-rank",
        "4",
        "--steps",
        "1",
        "--dist-timeout",
        "0.25",
    ]
    t0 = time.time()
    torchrun(*flags, "--out", str(tmp_path / "run"), script=tmp_path / "slow.py", timeout=300)
    assert time.time() - t0 > 50  # both sleeps ran
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and (
        tmp_path / "run" / "checkpoints" / "step_000001" / "hf"
    ).is_dir()
