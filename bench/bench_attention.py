"""Decode attention over a ragged KV cache: rollout.kr1_sdpa (load_model's attention) against HF's sdpa.

Random bf16 queries/keys/values in the shapes of Qwen2.5-1.5B (12 query heads over 2 KV heads) and 7B (28 over 4),
head dim 128, a cache of S columns per row with a ragged mask (row i sees its first S - 3 i columns): a decode
step (L = 1) and an observation chunk (L = 256). Per case: the largest difference from HF's output, milliseconds
per call and the memory a call allocates beyond its inputs (HF's repeat_kv copies the keys and values h / kv
times; kr1_sdpa packs the query heads instead). On CPU kr1_sdpa keeps its CPU routes, so the packed path
(rollout.gqa_sdpa, what CUDA runs) is also timed on its own.

    python bench/bench_attention.py                          # CUDA: batch 64, S = 2048 (~10 s)
    python bench/bench_attention.py --device cpu --tiny      # CPU rehearsal (gpu_all.sh --dry-run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rollout as R  # noqa: E402

SHAPES = {"Qwen2.5-1.5B": (12, 2), "Qwen2.5-7B": (28, 4)}  # (query heads, KV heads), head dim 128


def inputs(b: int, heads: int, kv: int, n: int, s: int, d: int, dev, dtype):
    """(b, heads, L, d) queries, (b, kv, S, d) keys and values, (b, 1, L, S) ragged causal mask."""
    g = torch.Generator(dev).manual_seed(0)
    q = torch.randn(b, heads, n, d, generator=g, device=dev, dtype=dtype)
    k, v = torch.randn(2, b, kv, s, d, generator=g, device=dev, dtype=dtype)
    lens = s - n - 3 * torch.arange(b, device=dev) % (s - n)  # (b,) cached columns each row sees
    col = torch.arange(s, device=dev)
    prefix = col < lens[:, None]  # (b, S)
    own = (col >= s - n) & (
        col - (s - n) <= torch.arange(n, device=dev)[:, None, None]
    )  # (L, 1, S) causal chunk
    return q, k, v, (prefix[None] | own).transpose(0, 1)[:, None]  # (b, 1, L, S)


def measure(fn, dev, reps: int) -> tuple[torch.Tensor, float, float]:
    """(output, ms per call, MiB allocated beyond what was allocated before the call)."""
    out = fn()  # warm-up
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return out, (time.perf_counter() - t) / reps * 1e3, extra


def case(name: str, heads: int, kv: int, n: int, a, dev, dtype) -> dict:
    q, k, v, mask = inputs(a.batch, heads, kv, n, a.cache, 128 if not a.tiny else 16, dev, dtype)
    module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True)
    want, hf_ms, hf_mib = measure(
        lambda: R.sdpa_attention_forward(module, q, k, v, mask)[0], dev, a.reps
    )
    got, ours_ms, ours_mib = measure(lambda: R.kr1_sdpa(module, q, k, v, mask)[0], dev, a.reps)
    packed, packed_ms, _ = measure(lambda: R.gqa_sdpa(q, k, v, mask), dev, a.reps)
    return {
        "model": name,
        "L": n,
        "batch": a.batch,
        "cache": a.cache,
        "hf_ms": round(hf_ms, 3),
        "kr1_ms": round(ours_ms, 3),
        "packed_ms": round(packed_ms, 3),
        "hf_extra_mib": round(hf_mib, 1),
        "kr1_extra_mib": round(ours_mib, 1),
        "kv_mib": round(2 * k.numel() * k.element_size() / 2**20, 1),
        "max_diff": max(
            (got.float() - want.float()).abs().max().item(),
            (packed.float() - want.float()).abs().max().item(),
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tiny", action="store_true", help="4 query heads over 2, head dim 16, batch 2, S 64"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache", type=int, default=2048, help="cached columns S")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = {"tiny": (4, 2)} if a.tiny else SHAPES
    if a.tiny:
        a.batch, a.cache, a.reps = 2, 64, 2
    chunk = min(256, a.cache // 4)
    rows = [
        case(name, h, kv, n, a, dev, dtype) for name, (h, kv) in shapes.items() for n in (1, chunk)
    ]
    for r in rows:
        print(
            f"{r['model']:>13} L={r['L']:<3} b={r['batch']} S={r['cache']}: HF {r['hf_ms']:.3f} ms "
            f"(+{r['hf_extra_mib']} MiB), kr1_sdpa {r['kr1_ms']:.3f} ms (+{r['kr1_extra_mib']} MiB), packed "
            f"{r['packed_ms']:.3f} ms; KV {r['kv_mib']} MiB; max diff {r['max_diff']:.2e}"
        )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    ok = all(r["max_diff"] <= tol for r in rows)
    if a.out:
        Path(a.out).write_text(
            json.dumps({"device": str(dev), "torch": torch.__version__, "rows": rows}, indent=1)
        )
    d = rows[0]
    print(
        f"attention {'same numbers' if ok else 'DIFFERENT numbers'} as HF sdpa (tol {tol}); decode "
        f"{d['model']}: kr1_sdpa {d['kr1_ms']:.3f} ms vs HF {d['hf_ms']:.3f} ms"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
