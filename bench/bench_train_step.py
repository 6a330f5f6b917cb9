"""One full GRPO step (rollout + update) of the Qwen2.5-1.5B architecture with random weights on one GPU.

Measures what train.py does in one step, on one rank: seconds split into rollout and update, generated
tokens/s, and peak GPU memory of each phase, then prints the analytic estimate of bench/bench_memory.py for
the same scenario beside it. Random weights never close a tag, so every row generates exactly its turn budget:
a worst case for length. The tokenizer is the embedded SmolLM2 one padded with dummy tokens up to Qwen2.5's
vocabulary (151,936), so the head and the logits have their real size.

    python bench/bench_train_step.py                       # GPU: 4 prompts x G=8 = 32 rows, 512 new tokens each
    python bench/bench_train_step.py --rows 8 --new-tokens 64 --layers 2     # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_memory  # noqa: E402
from bench_rollout import TINY, smol_tokenizer  # noqa: E402

import kr1  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

QWEN15 = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}  # Qwen2.5-1.5B-Instruct's config.json


def qwen_like_tokenizer(vocab: int):
    tok = smol_tokenizer()  # the embedded ChatML tokenizer (or $KR1_TOKENIZER)
    tok.add_tokens(
        [f"xtra{i}" for i in range(vocab - len(tok))]
    )  # no '<'/'>': never a tag, never special
    return tok


def build_models(arch: dict, device, world: int, beta: float):
    """The policy (fp32 master weights, FSDP2) and, with beta > 0, the frozen reference (bf16 on GPU)."""
    cuda = device.type == "cuda"
    mesh = train.init_device_mesh(device.type, (world,))
    attn = (
        "flash_attention_2"
        if cuda and rollout.importlib.util.find_spec("flash_attn")
        else "kr1_sdpa"
    )  # load_model

    def build(dtype):
        torch.manual_seed(0)
        with torch.device(device):
            return Qwen2ForCausalLM._from_config(
                Qwen2Config(**arch), dtype=dtype, attn_implementation=attn
            )

    model = train.shard_model(
        build(torch.float32), mesh, cuda, train=True, vocab=arch["vocab_size"]
    )
    ref = None
    if beta > 0:
        ref = train.shard_model(
            build(torch.bfloat16 if cuda else torch.float32).requires_grad_(False).eval(),
            mesh,
            cuda,
            train=False,
            vocab=arch["vocab_size"],
        )
    return model, ref


def results(
    a,
    model,
    tok,
    questions,
    rec: dict,
    wall: float,
    rows: int,
    world: int,
    chunk: int,
    static: float,
    cuda: bool,
) -> dict:
    """The step's seconds and peak memory beside bench_memory.py's estimate (28 layers only)."""
    n_params = sum(p.numel() for p in model.parameters())
    prompt_len = len(
        rollout.prompt_ids(tok, rollout.prompt_messages(questions[0]["question"], "agent"))
    )
    est = bench_memory.totals(
        bench_memory.memory(
            bench_memory.MODELS["Qwen2.5-1.5B-Instruct"],
            argparse.Namespace(
                ranks=world,
                micro_batch=a.micro_batch,
                prompt_tokens=prompt_len,
                response_tokens=a.new_tokens,
                logprob_chunk=chunk,
                allowance=0.0,
                ref="bf16" if a.beta > 0 else "none",
                ref_root="resharded",
            ),
            rows,
        )
    )
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world": world,
        "layers": a.layers,
        "params": n_params,
        "rows": rows,
        "prompt_tokens": prompt_len,
        "new_tokens": a.new_tokens,
        "micro_batch": a.micro_batch,
        "beta": a.beta,
        "step_s": round(wall, 2),
        "rollout_s": rec["rollout_s"],
        "update_s": rec["update_s"],
        "rollout_tokens_per_s": rec["rollout_tokens_per_s"],
        "peak_gib": rec["peak_mem_gb"],
        "static_gib_before_step": round(static, 2),
        "estimate_gib": {k: round(v / 2**30, 2) for k, v in est.items()}
        if a.layers == 28
        else None,
        "commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip()
        or None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts in the step (G rows each)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="override prompts x G")
    p.add_argument(
        "--new-tokens", type=int, default=512, help="tokens generated per row (the turn budget)"
    )
    p.add_argument("--layers", type=int, default=28, help="decoder layers (28 = the real model)")
    p.add_argument(
        "--tiny", action="store_true", help="a 2-layer 64-wide Qwen2 (CPU rehearsal, no estimate)"
    )
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--beta", type=float, default=0.04, help="> 0 also builds and runs the reference model"
    )
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    rank, world, device = train.init_distributed()
    cuda = device.type == "cuda"
    a.layers = 2 if a.tiny else a.layers
    base = {**QWEN15, **(TINY if a.tiny else {}), "num_hidden_layers": a.layers}
    tok = qwen_like_tokenizer(base["vocab_size"])
    arch = {**base, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    rows = a.rows or a.prompts * a.group_size
    group = a.group_size if rows % a.group_size == 0 else rows
    cfg = train.Config(
        group_size=group,
        prompts_per_step=rows // group,
        max_turns=1,
        max_turn_tokens=a.new_tokens,
        max_total_tokens=a.new_tokens + 8,
        micro_batch=a.micro_batch,
        beta=a.beta,
        lr=1e-6,
        steps=1,
        warmup_steps=1,
    )
    model, ref = build_models(arch, device, world, a.beta)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=cuda)
    questions = [
        {"question": f"Which river flows through city number {i} of the list?", "answers": ["x"]}
        for i in range(cfg.prompts_per_step)
    ]
    no_search = kr1.RecordingSearch(lambda qs: [[] for _ in qs])
    run = train.Run(
        cfg=cfg,
        model=model,
        ref=ref,
        tokenizer=tok,
        optimizer=optimizer,
        rows=questions,
        search=no_search,
        out=Path("unused"),
        start=0,
        early_save=0,
    )
    if cuda:
        torch.cuda.synchronize()
    static = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    train.grpo_step(run, questions[:1], 0)  # warm-up (kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rec = train.grpo_step(run, questions, 1)
    wall = time.perf_counter() - t0
    res = results(a, model, tok, questions, rec, wall, rows, world, cfg.logprob_chunk, static, cuda)
    if rank == 0:
        print(json.dumps(res, indent=1))
        print(
            f"\none step: {wall:.1f} s = rollout {rec['rollout_s']:.1f} s ({rec['rollout_tokens_per_s']:.0f} "
            f"generated tokens/s) + update {rec['update_s']:.1f} s; peak {rec['peak_mem_gb']:.2f} GiB"
            + (
                f" vs estimate {max(res['estimate_gib'].values()):.2f} GiB (without the allowance)"
                if res["estimate_gib"]
                else ""
            )
        )
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    train.dist.destroy_process_group()


if __name__ == "__main__":
    main()
