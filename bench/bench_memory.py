"""Per-GPU memory of one train.py GRPO step, by arithmetic or (--trace) by tracing the real step on fake tensors.

No GPU needed: every number is arithmetic on the public config.json of each model and on what train.py holds at
four moments of a step, in GiB per rank. All are estimates (see bench/RESULTS_memory.md for the assumptions):
  rollout      fp32 shards (grads None after zero_grad(set_to_none)) + AdamW + reference, ALL policy units
               unsharded in bf16 (train.unsharded), the padded KV cache, one layer's forward transient;
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

--trace runs one real train.py step instead of arithmetic: the model built from its config alone (no weights, no
GPU) under PyTorch's FakeTensorMode on the CPU device, FSDP2 over a fake process group of --world ranks, every
tensor counted by torch.distributed._tools' MemTracker (load) and FSDPMemTracker (rollout, update). Peak per rank:
  load     train.load_sharded: each rank builds the fp32 policy on the meta device, shards it (one FSDP2 unit per
           decoder layer + the root), allocates its shards and receives one whole tensor at a time from rank 0
           (which alone reads the checkpoint, into host RAM); then the bf16 reference likewise;
  rollout  fp32 shards + AdamW states (primed by one step) + reference shards, every unit gathered in bf16
           (train.unsharded), the rollout's KV cache (rows x prompt+response slots, bf16, as rollout.RaggedCache),
           one decode step at full width and one chunk forward (rows x --prompt-tokens new tokens) through
           rollout.CacheStep;
  update   --trace-micro-batches micro-batches of the GRPO update: the reference's and the policy's log-probs by
           grpo.token_logprobs (chunked head, activation checkpointing), grpo.grpo_loss, backward, then gradient
           clipping and AdamW (foreach=False: foreach/fused kernels are over-counted under fake tensors).
Not traced: allocator fragmentation and cached blocks, the CUDA context, NCCL buffers, cuBLAS workspaces, host RAM.

    python bench/bench_memory.py --trace --model qwen2.5-7b --world 8    # ~35 s of CPU, 0.4 GiB of RAM
    python bench/bench_memory.py --trace --model qwen2.5-1.5b --world 8
    python bench/bench_memory.py --trace --model qwen3-1.7b --world 8     # Qwen3 (q/k norms, 8 KV heads)
    python bench/bench_memory.py --trace --model path/to/folder --world 2  # any local folder with a config.json
    python bench/bench_memory.py --trace --model path/to/tiny --real       # the same step on real tensors (small!)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(
    0, str(ROOT)
)  # this checkout's train.py / grpo.py / rollout.py, not an installed copy

GiB = 2**30
MODELS = {  # from each model's public config.json (head_dim = hidden / heads = 128 for both)
    "Qwen2.5-1.5B-Instruct": {
        "hidden": 1536,
        "layers": 28,
        "heads": 12,
        "kv_heads": 2,
        "inter": 8960,
        "vocab": 151936,
        "tied": True,
    },
    "Qwen2.5-7B-Instruct": {
        "hidden": 3584,
        "layers": 28,
        "heads": 28,
        "kv_heads": 4,
        "inter": 18944,
        "vocab": 152064,
        "tied": False,
    },
}
GPUS = {
    "8x A100 40 GB": 39.5,
    "8x A100 80 GB": 79.2,
}  # GiB as CUDA reports them (nvidia-smi: 40960 / 81920 MiB)
MOMENTS = ("rollout", "logits", "layer bwd", "root RS")


def param_counts(m: dict) -> dict:
    H, F, kvd = m["hidden"], m["inter"], m["kv_heads"] * m["hidden"] // m["heads"]
    layer = (
        2 * H * H + 2 * H * kvd + H + 2 * kvd + 3 * H * F + 2 * H
    )  # q,o + k,v + qkv biases + MLP + 2 RMSNorms
    embed = m["vocab"] * H
    root = (
        embed * (1 if m["tied"] else 2) + H
    )  # embeddings (+ untied lm_head) + final norm: FSDP's root unit
    return {
        "layer": layer,
        "embed": embed,
        "root": root,
        "total": m["layers"] * layer + root,
        "kvd": kvd,
    }


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
        (
            "reference root left gathered after its no-grad forward (bf16)",
            at(2 * c["root"] * (a.ref != "none" and a.ref_root == "gathered")),
        ),
        ("policy, all units unsharded for generation (bf16)", at(2 * c["total"], "rollout")),
        (
            f"KV cache: {n} rows x {S} slots x {L} layers x K,V x {kvd} x bf16",
            at(n * S * L * 2 * kvd * 2, "rollout"),
        ),
        # widest of: the MLP of a rows x prompt-tokens prefill (3 x inter live), or, in a multi-token (observation)
        # step, one layer's K,V concatenated (old + new) and repeated to all heads for SDPA (HF's masked path)
        (
            "rollout multi-token step (prompt prefill / observation chunk), one layer",
            at(max(n * a.prompt_tokens * (3 * F + 4 * H) * 2, n * S * 4 * (kvd + H)), "rollout"),
        ),
        (
            "policy root gathered: embeddings + head (bf16)",
            at(2 * c["root"], "logits", "layer bwd"),
        ),
        (
            "root grads unsharded (bf16): head in backward, + embeddings at the end",
            {"logits": 2 * c["embed"], "layer bwd": 2 * c["embed"], "root RS": 2 * c["root"]},
        ),
        (
            "decoder layers gathered (bf16): 1 at the head, 2 in backward",
            {"logits": 2 * c["layer"], "layer bwd": 4 * c["layer"]},
        ),
        (
            f"checkpointed activations: ({L} layer inputs + 4) x {tok} tokens x hidden x bf16",
            at((L + 4) * tok * H * 2, "logits", "layer bwd"),
        ),
        (
            f"logits chunk: {a.logprob_chunk} x {V} x fp32 x 4 live copies",
            at(a.logprob_chunk * V * 16, "logits"),
        ),
        # saved per token: 2 fp32 RMSNorm inputs (4H), q/k/v/rope/repeated k,v/attn/out (~8H + 3kvd), 4 MLP tensors
        # (4F, F = intermediate), plus the gradients in flight (~2F + 4H)
        (
            "one layer's recompute working set (estimate)",
            at(tok * (16 * H + 3 * kvd + 6 * F) * 2, "layer bwd"),
        ),
        ("reduce-scatter of one layer: bf16 grads + fp32 copy", at(6 * c["layer"], "layer bwd")),
        (
            "reduce-scatter of the root: fp32 copy + its output shard",
            at(4 * c["root"] * (1 + 1 / a.ranks), "root RS"),
        ),
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
    V, B, C = (
        m["vocab"],
        2,
        8192,
    )  # config_kr1.yaml: per_device_train_batch_size 2, max_completion_length 8192
    return [
        ("ZeRO-3 model states, 16 B/param (bf16 param + grad, fp32 master + Adam) / 7", 16 * P / 7),
        ("reference model, bf16 ZeRO-3 / 7", 2 * P / 7),
        (
            "full bf16 gather on every rank to push weights to vLLM (ds3_gather_for_generation)",
            2 * P,
        ),
        (f"logits B x C x V = {B} x {C} x {V}, fp32 (one copy; bf16 is half)", B * C * V * 4),
        (
            f"same at this scenario's micro-batch: {a.micro_batch} x {a.response_tokens + 1} x {V}, fp32",
            a.micro_batch * (a.response_tokens + 1) * V * 4,
        ),
        (
            "vLLM GPU: 0.7 x 39.5 GiB (gpu_memory_utilization) - bf16 weights = KV pool",
            0.7 * 39.5 * GiB - 2 * P,
        ),
    ]


def check_layer(name: str, T: int = 320) -> tuple[float, float]:
    """Bytes/token autograd saves in one real-size bf16 decoder layer on CPU (activations only: tensors with a T axis,
    not the T x T mask, not the layer input) vs the saved part of the formula (16H + 3kvd + 6F less 4H + 2F grads)."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    m = MODELS[
        name
    ]  # below: (1, T, H) input, (1, T) positions, (1, 1, T, T) explicit mask as with padded rows
    cfg = Qwen2Config(
        hidden_size=m["hidden"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        intermediate_size=m["inter"],
        num_hidden_layers=1,
        attn_implementation="sdpa",
    )
    layer = Qwen2DecoderLayer(cfg, 0).to(torch.bfloat16)
    x, pos = (
        torch.randn(1, T, m["hidden"], dtype=torch.bfloat16, requires_grad=True),
        torch.arange(T)[None],
    )
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    seen: dict[int, int] = {}

    def pack(t):  # T = 320 is no weight dimension of either model, so weights never match
        if T in t.shape and t.shape[-2:] != (T, T) and t.data_ptr() != x.data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(
            x,
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=Qwen2RotaryEmbedding(cfg)(x, pos),
        )
    H, F, kvd = m["hidden"], m["inter"], param_counts(m)["kvd"]
    return sum(seen.values()) / T, (12 * H + 3 * kvd + 4 * F) * 2


# ------------------------------------------------------------------------------------------------- --trace
ALIASES = {"qwen2.5-1.5b": "Qwen2.5-1.5B-Instruct", "qwen2.5-7b": "Qwen2.5-7B-Instruct"}
CONFIGS = {  # --trace only (the estimate beside it assumes Qwen2's layer): a public config.json's fields
    "qwen3-1.7b": (
        "Qwen3-1.7B",
        "qwen3",
        dict(
            hidden_size=2048,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=6144,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
    ),
}


def model_config(spec: str):
    """(label, transformers config) of a MODELS alias (config.json embedded here) or a local folder's config.json."""
    from transformers import AutoConfig, Qwen2Config

    if spec.lower() in CONFIGS:
        name, kind, fields = CONFIGS[spec.lower()]
        return name, AutoConfig.for_model(kind, **fields)
    if spec.lower() in ALIASES:
        name = ALIASES[spec.lower()]
        m = MODELS[name]
        return name, Qwen2Config(
            hidden_size=m["hidden"],
            num_hidden_layers=m["layers"],
            num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"],
            intermediate_size=m["inter"],
            vocab_size=m["vocab"],
            tie_word_embeddings=m["tied"],
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        )
    if not (Path(spec) / "config.json").is_file():
        known = sorted([*ALIASES, *CONFIGS])
        raise SystemExit(
            f"bench_memory.py: error: --model {spec!r}: not one of {known} nor a local folder with a "
            "config.json (nothing is downloaded)"
        )
    return Path(spec).name, AutoConfig.from_pretrained(spec, local_files_only=True)


def estimate_model(c) -> dict:
    """The MODELS-style dict of any decoder config, for the arithmetic estimate beside the trace."""
    return {
        "hidden": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "inter": c.intermediate_size,
        "vocab": c.vocab_size,
        "tied": bool(c.tie_word_embeddings),
    }


def skeleton(c, dtype):
    """The causal LM of config c on the meta device (no memory), as from_pretrained first builds it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            c, dtype=dtype, attn_implementation="sdpa"
        )  # CUDA's w/o flash-attn


def gib_snapshot(tracker) -> dict:
    """{category: GiB} of a tracker's peak snapshot on the CPU device (which stands for the rank's GPU)."""
    import torch

    snap = tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    return {getattr(k, "value", k): v / GiB for k, v in snap.items() if v}


def trace_load(c, mesh, with_ref: bool):
    """train.load_sharded on one rank: the fp32 policy built on the meta device and sharded (train.shard_model: one
    FSDP2 unit per decoder layer + the root, bf16 compute / fp32 reduce), its shards allocated, then each tensor
    received whole from rank 0 in turn and its shard kept (set_model_state_dict broadcast_from_rank0: one tensor
    at a time); the bf16 reference likewise. Returns (policy, reference or None, peak GiB by category)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    import train

    def load(model, train_: bool):
        model = train.shard_model(model, mesh, cuda=True, train=train_, vocab=c.vocab_size)
        model.to_empty(device="cpu")  # this rank's shards (the CPU device stands for its GPU)
        for p in model.parameters():
            torch.empty(
                p.shape, dtype=p.dtype
            )  # the whole tensor as broadcast, freed once its shard is copied
        return model

    with MemTracker() as mt:  # counts every tensor created inside
        model = load(skeleton(c, torch.float32), True)
        ref = (
            load(skeleton(c, torch.bfloat16).requires_grad_(False).eval(), False)
            if with_ref
            else None
        )
    return model, ref, gib_snapshot(mt)


def primed_adamw(model):
    """train.main's AdamW (foreach=False, see the docstring) after one step on zero gradients: its exp_avg and
    exp_avg_sq exist, as in every step after the first."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)  # DTensor shard (numel / world,) fp32
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def cache_forward(model, cache, rows: int, width: int, new: int):
    """One rollout forward over a full rollout.RaggedCache, as rollout.forward runs it: a decode step (new = 1,
    every row) or a chunk of `new` real tokens per row, `width` cached columns shown; last-position logits only."""
    import rollout

    step = rollout.CacheStep(
        cache,
        feeds=[[0] * new] * rows,
        cached=[width] * rows,
        rows=list(range(rows)),
        decode=new == 1,
        pad=0,
        dev="cpu",
    )
    return model(
        input_ids=step.input_ids,
        attention_mask=step.attention_mask,
        position_ids=step.position_ids,
        past_key_values=step,
        use_cache=True,
        logits_to_keep=1,
    ).logits  # (b, 1, V)


def trace_rollout(model, ref, opt, c, rows: int, slots: int, chunk: int) -> dict:
    """train.rollout_and_score's memory: all units gathered (train.unsharded), the full KV cache, a chunk forward of
    `chunk` new tokens per row and a decode step at full width. Peak GiB by category."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    import rollout
    import train

    kvh, hd = (
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )
    fmt = FSDPMemTracker(model, opt)
    fmt.track_inputs(tuple(ref.parameters()) + tuple(ref.buffers()) if ref is not None else ())
    model.eval()
    with fmt, torch.no_grad(), train.unsharded(model):
        # label the gathered weights now, as the tracker's pre-forward hook would (it runs one unit at a time)
        for unit in [m for m in model.modules() if isinstance(m, FSDPModule)]:
            for p in unit._get_fsdp_state()._fsdp_param_group.fsdp_params:
                fmt._update_and_maybe_create_winfos(p.unsharded_param, _FSDPRefType.UNSHARDED_PARAM)
        cache = rollout.RaggedCache()
        for bufs in (cache.k, cache.v):  # per layer (b, kv_heads, slots, head_dim) bf16
            bufs += [
                torch.zeros(rows, kvh, slots, hd, dtype=torch.bfloat16)
                for _ in range(c.num_hidden_layers)
            ]
        for width, new in ((slots - chunk, chunk), (slots - 1, 1)):
            fmt.reset_mod_stats()  # one root forward per tracked iteration; the peak is kept
            cache_forward(model.lm, cache, rows, width, new)
        del cache
    return gib_snapshot(fmt)


def micro_batch(b: int, T: int, vocab: int) -> dict:
    """train.pad_batch's tensors for b rows of T tokens, every target a loss token (the worst case for the head)."""
    import torch

    mask = torch.ones(
        b, T - 1, dtype=torch.bool
    )  # (b, T-1) bool, not pad_batch's float: .bool() returns it as is
    mask.nonzero_memo = b * (
        T - 1
    )  # token_logprobs' mask indexing: the count a fake tensor cannot know
    attn = torch.ones(b, T, dtype=torch.long)  # (b, T)
    attn[1:, -1] = (
        0  # padded rows with a mask, HF's (b, 1, T, T): train.py's rows run unmasked, so an upper bound
    )
    return {
        "ids": torch.randint(0, vocab, (b, T)),
        "attn": attn,
        "mask": mask,
        "old": torch.zeros(b, T - 1),
        "adv": torch.ones(b),
    }  # (b, T), (b, T-1), (b, T-1), (b,)


def trace_update(model, ref, opt, c, a, world: int) -> dict:
    """train.grpo_update + train.optimizer_step, for a.trace_micro_batches micro-batches of
    a.micro_batch rows x (prompt + response) tokens. Peak GiB by category."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    import grpo

    fmt = FSDPMemTracker(model, opt)
    fmt.track_inputs(tuple(ref.parameters()) + tuple(ref.buffers()) if ref is not None else ())
    T, chunk, beta = (
        a.prompt_tokens + a.response_tokens,
        a.logprob_chunk,
        0.04 if ref is not None else 0.0,
    )
    model.train()
    with fmt:
        for _ in range(a.trace_micro_batches):
            fmt.reset_mod_stats()  # one root forward per micro-batch; the tracker's peak is kept
            b = micro_batch(a.micro_batch, T, c.vocab_size)
            ref_logp = None
            if ref is not None:
                with torch.no_grad():
                    ref_logp = ref(b["ids"], b["attn"], 1.0, chunk, loss_mask=b["mask"])  # (b, T-1)
            logp, ent = model(
                b["ids"], b["attn"], 1.0, chunk, with_entropy=True, loss_mask=b["mask"]
            )  # (b, T-1)
            loss, _ = grpo.grpo_loss(
                logp,
                b["old"],
                b["adv"],
                b["mask"],
                ref_logp=ref_logp,
                beta=beta,
                normaliser=float(a.micro_batch * world),
                entropy=ent,
            )
            (loss * world).backward()
            del b, ref_logp, logp, ent, loss
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return gib_snapshot(fmt)


@contextlib.contextmanager
def fake_world(world: int, fake: bool):
    """A fake process group of `world` ranks (this process is rank 0; collectives move nothing) and its 1-D CPU
    mesh, inside FakeTensorMode (fake=True: no tensor holds memory) or on real tensors (fake=False: small configs)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import _sharding_prop
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("--trace needs its own (fake) process group; one is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    # a ShapeEnv only so that a mask's preset nonzero count (micro_batch) is honoured; every shape stays static
    mode = (
        FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
        if fake
        else contextlib.nullcontext()
    )
    # DTensor derives each op's global output shape by running it on global-size tensors under the active fake
    # mode: ours would count them (a whole parameter at a time); on real tensors it makes a fresh mode, so here too
    fresh = mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *args: None)
    try:
        mesh = init_device_mesh("cpu", (world,))  # real: its rank lookup is data-dependent
        with mode, fresh, warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # transformers: gradient_checkpointing_enable is renamed
            yield mesh
    finally:
        dist.destroy_process_group()


def trace(c, a, fake: bool = True) -> dict:
    """Per-rank peaks (GiB, by category) of load, rollout and update: one train.py step at world size a.ranks."""
    t0, rows = time.perf_counter(), a.prompts_per_step * a.group_size // a.ranks
    with fake_world(a.ranks, fake) as mesh:
        model, ref, load = trace_load(c, mesh, a.ref != "none")
        opt = primed_adamw(model)
        roll = trace_rollout(
            model, ref, opt, c, rows, a.prompt_tokens + a.response_tokens, a.prompt_tokens
        )
        upd = trace_update(model, ref, opt, c, a, a.ranks)
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "load": load,
        "rollout": roll,
        "update": upd,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": use.ru_utime + use.ru_stime,
        "max_rss_gib": use.ru_maxrss * 1024 / GiB,
    }


NAMES = {
    "Inputs": "reference shards + batch",
    "Activation": "activations",
    "Temp": "backward temporaries",
    "OptState": "AdamW states",
}  # FSDPMemTracker's kinds, as the table shows them


def kinds(snap: dict, u: float) -> str:
    return ", ".join(
        f"{NAMES.get(k, k.lower())} {v * u:.2f}" for k, v in snap.items() if k != "Total"
    )


def print_trace(a) -> dict:
    """--trace: the traced peaks beside the arithmetic estimate of the same scenario, then the summary line."""
    if a.ref == "fp32":
        raise SystemExit(
            "bench_memory.py: error: --trace follows train.py, whose reference is bf16 (or none: beta 0)"
        )
    name, c = model_config(a.model)
    res = trace(c, a, fake=not a.real)
    m, n, alw = estimate_model(c), res["rows"], a.allowance
    est = totals(memory(m, a, n))
    P = param_counts(m)["total"]
    W = (
        m["vocab"] * m["hidden"]
    )  # load: the shards and the largest tensor (embeddings) received whole: fp32, then bf16
    load = (
        max(4 * P / a.ranks + 4 * W, 6 * P / a.ranks + 2 * W)
        if a.ref != "none"
        else 4 * P / a.ranks + 4 * W
    )
    est = {
        "load": load / GiB,
        "rollout": est["rollout"] / GiB,
        "update": max(est[k] for k in MOMENTS[1:]) / GiB,
    }
    peak = {k: res[k].get("Total", 0.0) for k in ("rollout", "update", "load")}
    unit, u = (
        ("MiB", 1024) if max(peak.values()) < 1 else ("GiB", 1)
    )  # a small config's table in MiB
    out = {"model": name, "traced_gib": peak, "estimate_gib": est, "trace": res}
    print(
        json.dumps(out, indent=1)
        if a.json
        else "\n".join(
            [
                f"### {name}: {P / 1e9:.2f}B params, world {a.ranks}, {n} trajectories/rank, {a.prompt_tokens}+"
                f"{a.response_tokens} tokens, micro-batch {a.micro_batch} "
                f"({a.trace_micro_batches} traced), log-prob chunk {a.logprob_chunk}, "
                f"reference {a.ref}; {'real' if a.real else 'fake'} tensors on the CPU device\n",
                f"| phase ({unit} per rank) | traced | estimate | estimate with its allowance | traced at the peak |",
                "|---|---:|---:|---:|---|",
                *[
                    f"| {k} | **{peak[k] * u:.2f}** | {(est[k] - alw * (k != 'load')) * u:.2f} | "
                    f"{(est[k] + alw * (k == 'load')) * u:.2f} | {kinds(res[k], u) if k != 'load' else 'all tensors'} |"
                    for k in ("load", "rollout", "update")
                ],
                f"\nTraced in {res['seconds']:.0f} s ({res['cpu_seconds']:.0f} s of CPU), "
                f"{res['max_rss_gib']:.2f} GiB of host RAM at most. The trace counts tensors only: "
                "allocator fragmentation and cached blocks, the CUDA context, NCCL buffers and cuBLAS "
                f"workspaces are left out (the estimate's --allowance, {alw} GiB, stands for them); "
                "so is rank 0's host RAM (it alone reads the whole checkpoint).",
            ]
        )
    )
    print(
        f"traced peak GiB/rank: rollout {peak['rollout']:.2f}, update {peak['update']:.2f}, load {peak['load']:.2f}"
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--prompts-per-step", type=int, default=32, help="prompts per step over all ranks"
    )
    p.add_argument("--group-size", type=int, default=8, help="G, trajectories per prompt")
    p.add_argument("--ranks", "--world", type=int, default=8, help="GPUs (FSDP world size)")
    p.add_argument("--micro-batch", type=int, default=4, help="trajectories per forward/backward")
    p.add_argument("--prompt-tokens", type=int, default=600, help="prompt incl. system prompt")
    p.add_argument(
        "--response-tokens", type=int, default=2048, help="tokens after the prompt incl. passages"
    )
    p.add_argument(
        "--logprob-chunk",
        type=int,
        default=1024,
        help="tokens per chunk of the (tokens x vocab) logits",
    )
    p.add_argument(
        "--allowance", type=float, default=2.5, help="GiB for CUDA context, NCCL, fragmentation"
    )
    p.add_argument(
        "--ref",
        choices=("fp32", "bf16", "none"),
        default="bf16",
        help="reference storage (none: beta 0)",
    )
    p.add_argument(
        "--ref-root",
        choices=("gathered", "resharded"),
        default="resharded",
        help="resharded: train.py (sets reshard_after_forward on the ref root); gathered: without that",
    )
    p.add_argument(
        "--json", action="store_true", help="print the numbers as JSON instead of tables"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="measure one layer's saved activations on CPU (~1 GB RAM)",
    )
    p.add_argument(
        "--trace", action="store_true", help="trace one real step under FakeTensorMode (see above)"
    )
    p.add_argument(
        "--model",
        default="qwen2.5-7b",
        help=f"--trace: {', '.join([*ALIASES, *CONFIGS])} or a local config folder",
    )
    p.add_argument(
        "--trace-micro-batches",
        type=int,
        default=2,
        help="--trace: micro-batches of the update traced "
        "(the 2nd on has the fp32 grads from its start; later ones repeat it)",
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="--trace on real tensors (a check of the fake trace; small "
        "configs only: it allocates what it counts)",
    )
    a = p.parse_args(argv)
    if a.trace:
        return print_trace(a)
    if a.check:
        for name in MODELS:
            got, want = check_layer(name)
            print(
                f"{name}: autograd saves {got / 1024:.1f} KiB/token in one layer; modelled {want / 1024:.1f}"
            )
        return {}
    n = a.prompts_per_step * a.group_size // a.ranks
    per_step = lambda k: k // a.group_size * a.ranks  # trajectories/rank -> --prompts-per-step
    out, lines = {"args": vars(a), "trajectories_per_rank": n, "models": {}}, []
    fit = [
        "\n### Fit (peak = max over the four moments)\n",
        (
            "| model | GPUs | peak GiB | fits | KV slots/row that fit | largest trajectories/rank (whole groups) "
            "| --prompts-per-step |"
        ),
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for name, m in MODELS.items():
        c, rows = param_counts(m), memory(m, a, n)
        tot = totals(rows)
        peak = max(tot.values()) / GiB
        res = out["models"][name] = {
            "params": c["total"],
            "peak_gib": {k: v / GiB for k, v in tot.items()},
            "rows": {lbl: {k: v / GiB for k, v in r.items()} for lbl, r in rows},
            "fits": {},
        }
        lines += [
            (
                f"\n### {name}: {c['total'] / 1e9:.2f}B params; {a.ranks} ranks, {n} trajectories/rank, "
                f"micro-batch {a.micro_batch}, {a.prompt_tokens}+{a.response_tokens} tokens (GiB per GPU)\n"
            ),
            "| component | " + " | ".join(MOMENTS) + " |",
            "|---|" + "---:|" * len(MOMENTS),
        ]
        lines += [
            f"| {lbl} | "
            + " | ".join(f"{r[k] / GiB:.2f}" if r.get(k) else "" for k in MOMENTS)
            + " |"
            for lbl, r in rows
        ]
        lines.append(
            "| **total** | " + " | ".join(f"**{tot[k] / GiB:.2f}**" for k in MOMENTS) + " |"
        )
        for gpu, cap in GPUS.items():
            f = res["fits"][gpu] = {
                "capacity_gib": cap,
                "fits": peak <= cap,
                "largest_n": largest_n(m, a, cap),
                "largest_n_groups": largest_n(m, a, cap, a.group_size),  # whole groups of G
                "kv_slots_per_row_max": largest_slots(m, a, n, cap) if peak <= cap else 0,
            }
            fit.append(
                f"| {name} | {gpu} ({cap} GiB) | {peak:.2f} | {'yes' if f['fits'] else '**no**'} | "
                f"{f['kv_slots_per_row_max'] or '-'} | {f['largest_n']} ({f['largest_n_groups']}) | "
                f"{per_step(f['largest_n_groups'])} |"
            )
    orig = original_7b(a)
    out["original_7b_gib"] = {lbl: v / GiB for lbl, v in orig}
    lines += fit + [
        (
            "\n### Original recipe, Qwen2.5-7B (TRL + vLLM + DeepSpeed ZeRO-3; 7 training GPUs + 1 vLLM "
            "GPU), estimates\n"
        ),
        "| component | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {lbl} | {v / GiB:.2f} |" for lbl, v in orig]
    print(json.dumps(out, indent=1) if a.json else "\n".join(lines).lstrip())
    return out


if __name__ == "__main__":
    main()
