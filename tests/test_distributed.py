"""train.py across processes beyond tests/test_train.py: two "nodes" of one machine (two torchrun agents, one rank
each, a c10d rendezvous on localhost, a $KR1_CACHE each).

    python -m pytest -q tests/test_distributed.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import ROOT, free_port

FLAGS = ["--group-size", "2", "--prompts-per-step", "2", "--max-turns", "1", "--max-turn-tokens", "12",
         "--max-total-tokens", "32", "--micro-batch", "2", "--warmup-steps", "1", "--lr", "1e-3", "--beta", "0.04",
         "--save-every", "1"]


def two_nodes(d: Path, out: Path, steps: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """Both agents of one job, started together; each node's own cache dir is d/cache-node{0,1}."""
    endpoint, procs = f"127.0.0.1:{free_port()}", []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KR1_CACHE": str(d / f"cache-node{node}")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", out.name,
               "--rdzv-conf", f"is_host={node == 0}", str(ROOT / "train.py"), "--model", str(d / "policy"),
               "--dataset", str(d / "qa.jsonl"), "--index", str(d / "corpus.jsonl"), *FLAGS, "--steps", str(steps),
               "--out", str(out), *extra]
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
        assert len(list((d / f"cache-node{node}" / "index").glob("corpus-*/*"))) > 0, node  # its own build
    assert sorted(p.name for p in (out / "checkpoints" / "step_000002").glob("rng_rank*")) == [
        "rng_rank0.pt", "rng_rank1.pt"]

