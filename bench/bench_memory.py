"""Analytic per-GPU memory of one train.py GRPO step (Qwen2.5-1.5B / 7B-Instruct on 8x40 GB and 8x80 GB A100s).

No GPU needed: every number is arithmetic on the public config.json of each model and on what train.py holds at
four moments of a step, in GiB per rank. All are estimates (see bench/RESULTS_memory.md for the assumptions):
  rollout      fp32 shards (grads None after zero_grad(set_to_none)) + AdamW + reference, ALL policy units
               unsharded in bf16 (train.Unsharded), the padded KV cache, one layer's forward transient;
  logits       update, chunked log-probs: shards + grads, policy root (embeddings + head) gathered, head grad,
               checkpointed layer inputs, one logits chunk (chunk x vocab fp32, 4 live copies);
  layer bwd    update, a decoder layer's backward: two layers gathered (current + prefetch), its recompute
               working set (SDPA memory-efficient kernel: no T x T scores), its grads being reduce-scattered;
  root RS      end of backward: the root's bf16 grads and their fp32 reduce-scatter copy.
Each moment adds a CUDA context / NCCL / allocator-fragmentation allowance (--allowance).

    python bench/bench_memory.py                                  # the original recipe: 32 prompts x G=8 / 8 ranks
    python bench/bench_memory.py --prompts-per-step 16 --json     # numbers as JSON
    python bench/bench_memory.py --ref fp32 --ref-root gathered  # what an fp32, never-resharded reference costs
    python bench/bench_memory.py --check     # measure one real-size layer's saved activations on CPU (~30 s)
"""

from __future__ import annotations

import argparse
import json

GiB = 2**30
MODELS = {  # from each model's public config.json (head_dim = hidden / heads = 128 for both)
    "Qwen2.5-1.5B-Instruct": {"hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "inter": 8960,
                              "vocab": 151936, "tied": True},
    "Qwen2.5-7B-Instruct": {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "inter": 18944,
                            "vocab": 152064, "tied": False},
}
GPUS = {"8x A100 40 GB": 39.5, "8x A100 80 GB": 79.2}  # GiB as CUDA reports them (nvidia-smi: 40960 / 81920 MiB)
MOMENTS = ("rollout", "logits", "layer bwd", "root RS")


def param_counts(m: dict) -> dict:
    H, F, kvd = m["hidden"], m["inter"], m["kv_heads"] * m["hidden"] // m["heads"]
    layer = 2 * H * H + 2 * H * kvd + H + 2 * kvd + 3 * H * F + 2 * H  # q,o + k,v + qkv biases + MLP + 2 RMSNorms
    embed = m["vocab"] * H
    root = embed * (1 if m["tied"] else 2) + H  # embeddings (+ untied lm_head) + final norm: FSDP's root unit
    return {"layer": layer, "embed": embed, "root": root, "total": m["layers"] * layer + root, "kvd": kvd}


def memory(m: dict, a, n: int, slots: int | None = None) -> list[tuple[str, dict]]:
    """(label, {moment: bytes}) rows for one rank holding n trajectories; slots = KV time axis (default prompt+resp)."""
    c = param_counts(m)
    H, L, F, V, kvd = m["hidden"], m["layers"], m["inter"], m["vocab"], c["kvd"]
    shard = c["total"] / a.ranks  # parameters per rank
    S = slots or a.prompt_tokens + a.response_tokens
    tok = min(a.micro_batch, n) * (a.prompt_tokens + a.response_tokens)  # tokens per micro-batch
    ref_bytes = {"fp32": 4, "bf16": 2, "none": 0}[a.ref]
    at = lambda v, *ks: {k: v for k in (ks or MOMENTS)}  # bytes held at these moments
    upd = MOMENTS[1:]
    return [
        ("fp32 params (sharded, the optimizer's master)", at(4 * shard)),
        ("fp32 grads (sharded; None during rollout)", at(4 * shard, *upd)),
        ("AdamW exp_avg + exp_avg_sq (2x fp32, sharded)", at(8 * shard)),
        (f"reference model ({a.ref}, sharded)", at(ref_bytes * shard)),
        ("reference root left gathered after its no-grad forward (bf16)",
         at(2 * c["root"] * (a.ref != "none" and a.ref_root == "gathered"))),
        ("policy, all units unsharded for generation (bf16)", at(2 * c["total"], "rollout")),
        (f"KV cache: {n} rows x {S} slots x {L} layers x K,V x {kvd} x bf16", at(n * S * L * 2 * kvd * 2, "rollout")),
        # widest of: the MLP of a rows x prompt-tokens prefill (3 x inter live), or, in a multi-token (observation)
        # step, one layer's K,V concatenated (old + new) and repeated to all heads for SDPA (HF's masked path)
        ("rollout multi-token step (prompt prefill / observation chunk), one layer",
         at(max(n * a.prompt_tokens * (3 * F + 4 * H) * 2, n * S * 4 * (kvd + H)), "rollout")),
        ("policy root gathered: embeddings + head (bf16)", at(2 * c["root"], "logits", "layer bwd")),
        ("root grads unsharded (bf16): head in backward, + embeddings at the end",
         {"logits": 2 * c["embed"], "layer bwd": 2 * c["embed"], "root RS": 2 * c["root"]}),
        ("decoder layers gathered (bf16): 1 at the head, 2 in backward",
         {"logits": 2 * c["layer"], "layer bwd": 4 * c["layer"]}),
        (f"checkpointed activations: ({L} layer inputs + 4) x {tok} tokens x hidden x bf16",
         at((L + 4) * tok * H * 2, "logits", "layer bwd")),
        (f"logits chunk: {a.logprob_chunk} x {V} x fp32 x 4 live copies", at(a.logprob_chunk * V * 16, "logits")),
        # saved per token: 2 fp32 RMSNorm inputs (4H), q/k/v/rope/repeated k,v/attn/out (~8H + 3kvd), 4 MLP tensors
        # (4F, F = intermediate), plus the gradients in flight (~2F + 4H)
        ("one layer's recompute working set (estimate)", at(tok * (16 * H + 3 * kvd + 6 * F) * 2, "layer bwd")),
        ("reduce-scatter of one layer: bf16 grads + fp32 copy", at(6 * c["layer"], "layer bwd")),
        ("reduce-scatter of the root: fp32 copy + its output shard", at(4 * c["root"] * (1 + 1 / a.ranks), "root RS")),
        ("allowance: CUDA context, NCCL, fragmentation", at(a.allowance * GiB)),
    ]


def totals(rows) -> dict:
    return {k: sum(r.get(k, 0) for _, r in rows) for k in MOMENTS}


def largest_n(m: dict, a, cap_gib: float, step: int = 1) -> int:
    """Largest trajectories per rank (a multiple of `step`) whose peak fits in cap_gib; 0 if none."""
    best, n = 0, step
    while n <= 1024 and max(totals(memory(m, a, n)).values()) <= cap_gib * GiB:
        best, n = n, n + step
    return best


def largest_slots(m: dict, a, n: int, cap_gib: float) -> int:
    """How far the padded cache's time axis may grow (slots per row) before the rollout moment stops fitting."""
    S = 0
    while totals(memory(m, a, n, S + 64))["rollout"] <= cap_gib * GiB and S < 1 << 17:
        S += 64
    return S


def original_7b(a) -> list[tuple[str, float]]:
    """The original TRL + DeepSpeed ZeRO-3 recipe for 7B, per training GPU (7 of 8; the 8th runs vLLM). Estimates."""
    m, P = MODELS["Qwen2.5-7B-Instruct"], param_counts(MODELS["Qwen2.5-7B-Instruct"])["total"]
    V, B, C = m["vocab"], 2, 8192  # config_kr1.yaml: per_device_train_batch_size 2, max_completion_length 8192
    return [
        ("ZeRO-3 model states, 16 B/param (bf16 param + grad, fp32 master + Adam) / 7", 16 * P / 7),
        ("reference model, bf16 ZeRO-3 / 7", 2 * P / 7),
        ("full bf16 gather on every rank to push weights to vLLM (ds3_gather_for_generation)", 2 * P),
        (f"logits B x C x V = {B} x {C} x {V}, fp32 (one copy; bf16 is half)", B * C * V * 4),
        (f"same at this scenario's micro-batch: {a.micro_batch} x {a.response_tokens + 1} x {V}, fp32",
         a.micro_batch * (a.response_tokens + 1) * V * 4),
        ("vLLM GPU: 0.7 x 39.5 GiB (gpu_memory_utilization) - bf16 weights = KV pool", 0.7 * 39.5 * GiB - 2 * P),
    ]


def check_layer(name: str, T: int = 320) -> tuple[float, float]:
    """Bytes/token autograd saves in one real-size bf16 decoder layer on CPU (activations only: tensors with a T axis,
    not the T x T mask, not the layer input) vs the saved part of the formula (16H + 3kvd + 6F less 4H + 2F grads)."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    m = MODELS[name]  # below: (1, T, H) input, (1, T) positions, (1, 1, T, T) explicit mask as with padded rows
    cfg = Qwen2Config(hidden_size=m["hidden"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                      intermediate_size=m["inter"], num_hidden_layers=1, attn_implementation="sdpa")
    layer = Qwen2DecoderLayer(cfg, 0).to(torch.bfloat16)
    x, pos = torch.randn(1, T, m["hidden"], dtype=torch.bfloat16, requires_grad=True), torch.arange(T)[None]
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    seen: dict[int, int] = {}

    def pack(t):  # T = 320 is no weight dimension of either model, so weights never match
        if T in t.shape and t.shape[-2:] != (T, T) and t.data_ptr() != x.data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask, position_ids=pos, position_embeddings=Qwen2RotaryEmbedding(cfg)(x, pos))
    H, F, kvd = m["hidden"], m["inter"], param_counts(m)["kvd"]
    return sum(seen.values()) / T, (12 * H + 3 * kvd + 4 * F) * 2


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per step over all ranks")
    p.add_argument("--group-size", type=int, default=8, help="G, trajectories per prompt")
    p.add_argument("--ranks", type=int, default=8, help="GPUs (FSDP world size)")
    p.add_argument("--micro-batch", type=int, default=4, help="trajectories per forward/backward")
    p.add_argument("--prompt-tokens", type=int, default=600, help="prompt incl. system prompt")
    p.add_argument("--response-tokens", type=int, default=2048, help="tokens after the prompt incl. passages")
    p.add_argument("--logprob-chunk", type=int, default=1024, help="tokens per chunk of the (tokens x vocab) logits")
    p.add_argument("--allowance", type=float, default=2.5, help="GiB for CUDA context, NCCL, fragmentation")
    p.add_argument("--ref", choices=("fp32", "bf16", "none"), default="bf16", help="reference storage (none: beta 0)")
    p.add_argument("--ref-root", choices=("gathered", "resharded"), default="resharded",
                   help="resharded: train.py (sets reshard_after_forward on the ref root); gathered: without that")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    p.add_argument("--check", action="store_true", help="measure one layer's saved activations on CPU (~1 GB RAM)")
    a = p.parse_args(argv)
    if a.check:
        for name in MODELS:
            got, want = check_layer(name)
            print(f"{name}: autograd saves {got / 1024:.1f} KiB/token in one layer; modelled {want / 1024:.1f}")
        return {}
    n = a.prompts_per_step * a.group_size // a.ranks
    per_step = lambda k: k // a.group_size * a.ranks  # trajectories/rank -> --prompts-per-step
    out, lines = {"args": vars(a), "trajectories_per_rank": n, "models": {}}, []
    fit = ["\n### Fit (peak = max over the four moments)\n",
           ("| model | GPUs | peak GiB | fits | KV slots/row that fit | largest trajectories/rank (whole groups) "
            "| --prompts-per-step |"),
           "|---|---|---:|---|---:|---:|---:|"]
    for name, m in MODELS.items():
        c, rows = param_counts(m), memory(m, a, n)
        tot = totals(rows)
        peak = max(tot.values()) / GiB
        res = out["models"][name] = {"params": c["total"], "peak_gib": {k: v / GiB for k, v in tot.items()},
                                     "rows": {lbl: {k: v / GiB for k, v in r.items()} for lbl, r in rows}, "fits": {}}
        lines += [(f"\n### {name}: {c['total'] / 1e9:.2f}B params; {a.ranks} ranks, {n} trajectories/rank, "
                   f"micro-batch {a.micro_batch}, {a.prompt_tokens}+{a.response_tokens} tokens (GiB per GPU)\n"),
                  "| component | " + " | ".join(MOMENTS) + " |", "|---|" + "---:|" * len(MOMENTS)]
        lines += [f"| {lbl} | " + " | ".join(f"{r[k] / GiB:.2f}" if r.get(k) else "" for k in MOMENTS) + " |"
                  for lbl, r in rows]
        lines.append("| **total** | " + " | ".join(f"**{tot[k] / GiB:.2f}**" for k in MOMENTS) + " |")
        for gpu, cap in GPUS.items():
            f = res["fits"][gpu] = {"capacity_gib": cap, "fits": peak <= cap, "largest_n": largest_n(m, a, cap),
                                    "largest_n_groups": largest_n(m, a, cap, a.group_size),  # whole groups of G
                                    "kv_slots_per_row_max": largest_slots(m, a, n, cap) if peak <= cap else 0}
            fit.append(f"| {name} | {gpu} ({cap} GiB) | {peak:.2f} | {'yes' if f['fits'] else '**no**'} | "
                       f"{f['kv_slots_per_row_max'] or '-'} | {f['largest_n']} ({f['largest_n_groups']}) | "
                       f"{per_step(f['largest_n_groups'])} |")
    orig = original_7b(a)
    out["original_7b_gib"] = {lbl: v / GiB for lbl, v in orig}
    lines += fit + [("\n### Original recipe, Qwen2.5-7B (TRL + vLLM + DeepSpeed ZeRO-3; 7 training GPUs + 1 vLLM "
                     "GPU), estimates\n"), "| component | GiB |", "|---|---:|"]
    lines += [f"| {lbl} | {v / GiB:.2f} |" for lbl, v in orig]
    print(json.dumps(out, indent=1) if a.json else "\n".join(lines).lstrip())
    return out


if __name__ == "__main__":
    main()
