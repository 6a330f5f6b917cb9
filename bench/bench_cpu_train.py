"""CPU training-step speed: where the update's time goes for SmolLM2-135M, each variant against the old path.

One forward + backward of the GRPO log-prob path (`grpo.token_logprobs`) over the same 4 trajectories (~560-700
tokens, ~90 loss tokens each, like 2Wiki agent rollouts). Baseline = the path before the learning-run work:
one padded micro-batch of 4, the LM head over every position, full fine-tuning, wrapped in FSDP2 (a world of one).
Variants change one thing at a time; the ratio column is baseline seconds / variant seconds, measured in this run.
Also a decode step (batch 16, 600 cached tokens) in fp32 vs bf16 autocast vs bf16 weights.

    python bench/bench_cpu_train.py                 # ~10 min on 2 cores
    python bench/bench_cpu_train.py --repeats 1     # ~4 min
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import grpo
import rollout
import train

LENS = (700, 640, 600, 560)


def batch(rows: list[int], masked: bool):
    """Right-padded rows (run unmasked, as train.pad_batch's), or left-padded ones (`masked`: the masked kernel, as
    every padded micro-batch ran before train.py's rows went unmasked)."""
    torch.manual_seed(0)
    seqs = [torch.randint(100, 40000, (LENS[i],)) for i in rows]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # (b, T)
    attn, mask = torch.zeros(len(rows), T), torch.zeros(len(rows), T - 1)  # (b, T), (b, T-1)
    for j, s in enumerate(seqs):
        at = slice(T - len(s), T) if masked else slice(0, len(s))
        ids[j, at], attn[j, at] = s, 1
        mask[j, at.stop - 96 : at.stop - 6] = 1  # the sampled tokens sit among prompt and passages
    return ids, attn.long(), mask


def fwd_bwd(
    model, micro: int, head_at_loss: bool, bf16: bool = False, masked: bool = False
) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(LENS), micro):
        ids, attn, mask = batch(list(range(s, min(s + micro, len(LENS)))), masked)
        with rollout.bf16_autocast("cpu", bf16):
            lp = model(
                ids, attn if masked else None, loss_mask=mask if head_at_loss else None
            )  # (b, T-1)
        grpo.grpo_loss(lp, lp.detach(), torch.ones(len(ids)), mask, agg="token")[0].backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def fresh(lora: bool = False, fsdp: bool = False):
    """train.LogProbs over the embedded model (LoRA: the preset's rank 8), FSDP2-wrapped as train.shard_model does."""
    lm, _ = rollout.load_model(None)
    if lora:
        rollout.add_lora(lm, 8, train.Config.lora_alpha, train.Config.lora_targets)
    model = train.LogProbs(lm)
    if fsdp:
        mesh = init_device_mesh("cpu", (1,))
        for layer in lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model.train()


def decode_ms(model, bf16: bool) -> float:
    ids = torch.randint(100, 40000, (16, 600))
    with torch.no_grad(), rollout.bf16_autocast("cpu", bf16):
        cache = model(input_ids=ids, use_cache=True).past_key_values
        t0 = time.perf_counter()
        for _ in range(5):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t0) / 5 * 1e3


def main(repeats: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    dist.init_process_group("gloo", rank=0, world_size=1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, AVX512-BF16: "
        f"{torch.cpu._is_avx512_bf16_supported()}; 4 trajectories of {LENS} tokens, forward + backward"
    )
    rows = [
        (
            "FSDP2 world of 1, padded micro-batch 4 (masked), head everywhere, full FT (baseline)",
            lambda: fwd_bwd(fresh(fsdp=True), 4, False, masked=True),
        ),
        ("plain module, same", lambda: fwd_bwd(fresh(), 4, False, masked=True)),
        ("plain, micro-batch 1 (no pad: SDPA's causal kernel)", lambda: fwd_bwd(fresh(), 1, False)),
        ("plain, micro-batch 1, head at loss tokens only", lambda: fwd_bwd(fresh(), 1, True)),
        ("  + LoRA rank 8 (the preset)", lambda: fwd_bwd(fresh(lora=True), 1, True)),
        ("  + bf16 autocast", lambda: fwd_bwd(fresh(lora=True), 1, True, bf16=True)),
        (
            "LoRA, head at loss, micro-batch 4 masked (train.py at d243c41)",
            lambda: fwd_bwd(fresh(lora=True), 4, True, masked=True),
        ),
        (
            "  + right-padded rows unmasked (train.py now)",
            lambda: fwd_bwd(fresh(lora=True), 4, True),
        ),
    ]
    base = None
    print(f"| variant | seconds (fastest of {repeats}) | speed-up vs baseline |\n|---|---:|---:|")
    for name, f in rows:
        f()  # warm-up: first-call allocations and oneDNN primitive creation
        sec = min(f() for _ in range(repeats))
        base = base or sec
        print(f"| {name} | {sec:.2f} | {base / sec:.2f}x |", flush=True)
    model = fresh().lm.eval()
    fp32, auto = decode_ms(model, False), decode_ms(model, True)
    bf = decode_ms(rollout.load_model(None, dtype=torch.bfloat16)[0], False)
    print(
        f"decode step, batch 16, 600 cached: fp32 {fp32:.0f} ms | bf16 autocast {auto:.0f} ms ({fp32 / auto:.2f}x) "
        f"| bf16 weights {bf:.0f} ms ({fp32 / bf:.2f}x)"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per row after one warm-up; the fastest counts",
    )
    main(ap.parse_args().repeats)
