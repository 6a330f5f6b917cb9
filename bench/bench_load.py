"""Peak host memory per rank of train.py's model load on 2 gloo ranks (CPU): train.load_sharded (rank 0 reads the
checkpoint, every rank builds the model on the meta device and receives its shards) against the load it replaced
(every rank reads the whole model, then shards it), the policy and the reference (--beta > 0) as train.py builds them.

    python bench/bench_load.py                      # the embedded SmolLM2-135M, LoRA r 8, reference on (~1 min)
    python bench/bench_load.py --model DIR --lora-rank 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(path: str, model: str | None, lora_rank: int, out: Path) -> None:
    """One rank (under torchrun): peak RSS after the imports, then after building the policy and the reference."""
    import torch

    import rollout
    import train

    rank, world, device = train.init_distributed()
    cfg = train.Config(model=model or "default", lora_rank=lora_rank, beta=0.04)
    before = rss_mib()
    if path == "sharded":
        train.build_models(cfg, device, world)
    else:  # the replaced load: every rank holds the whole fp32 model before sharding it, twice
        mesh = train.init_device_mesh("cpu", (world,))
        policy, tok = rollout.load_model(model, dtype=torch.float32)
        if lora_rank:
            rollout.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        train.shard_model(policy, mesh, False, True, len(tok))
        train.shard_model(
            rollout.load_model(model)[0].requires_grad_(False), mesh, False, False, len(tok)
        )
    torch.distributed.barrier()
    (out / f"{path}-rank{rank}.json").write_text(json.dumps({"before": before, "after": rss_mib()}))
    os._exit(0)  # no interpreter teardown (gloo's threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.lora_rank, Path(a.out))
    out = Path(tempfile.mkdtemp())
    for path in ("whole", "sharded"):  # separate jobs: a peak RSS only grows
        extra = ["--model", a.model] if a.model else []
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                "--master_port=29611",
                __file__,
                "--worker",
                path,
                "--out",
                str(out),
                "--lora-rank",
                str(a.lora_rank),
                *extra,
            ],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
        )
    got = {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}
    print(
        f"peak RSS per rank (MiB), 2 gloo ranks, model {a.model or 'embedded SmolLM2-135M'}, LoRA r {a.lora_rank}, "
        "policy + reference:\n"
        "| rank | after imports | every rank reads the whole model | train.load_sharded | ratio |\n"
        "|---|---:|---:|---:|---:|"
    )
    for r in (0, 1):
        w, s = got[f"whole-rank{r}"], got[f"sharded-rank{r}"]
        print(
            f"| {r} | {s['before']:.0f} | {w['after']:.0f} | {s['after']:.0f} | {s['after'] / w['after']:.2f} |"
        )


if __name__ == "__main__":
    main()
