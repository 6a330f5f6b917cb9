"""GRPO training of a search-while-reasoning policy: rollouts on every rank, FSDP2, activation checkpointing.

    python train.py --preset offline                      # SmolLM2-135M on data/qa.jsonl + embedded corpus, CPU-sized
    torchrun --nproc_per_node=2 train.py --preset offline --steps 4
    torchrun --nproc_per_node=8 train.py --index runs/index-wiki18 --out runs/qwen1.5b   # the original 1.5B recipe
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-7B-Instruct --index runs/index-wiki18 \
        --prompts-per-step 16 --out runs/qwen7b                                             # 7B on 8x40 GB
    python train.py --resume runs/kr1                      # continue exactly where the last checkpoint stopped

One step: every rank takes its share of the step's prompts, unshards its FSDP parameters once, generates G
trajectories per prompt with rollout.py (searching retrieval.py's mmap-loaded index), reshards, scores them
(grpo.reward), turns rewards into group advantages, and runs the GRPO loss over micro-batches with chunked
log-probs and per-layer activation checkpointing. Parameters are fp32 and sharded (the optimizer's master copy);
on GPU they are gathered in bf16 for compute and gradients are reduce-scattered in fp32. Logs: one JSON line per
step in OUT/log.jsonl; checkpoints: OUT/checkpoints/step_N/{hf/, state/, trainer.json} and OUT/latest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

import grpo
import retrieval
import rollout

HERE = Path(__file__).resolve().parent


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what: defaults follow the original Knowledge-R1 1.5B recipe (TRL GRPO, 2WikiMultihopQA, BM25 over wiki-18)
    model: str | None = opt("Qwen/Qwen2.5-1.5B-Instruct", "HF id or local dir; 'default' = embedded SmolLM2-135M")
    dataset: str = opt("hzy/kr1_2wiki", "HF dataset id (fields problem, golden_answers) or local JSONL")
    split: str = opt("train", "dataset split (HF datasets only)")
    index: str | None = opt(None, "index dir from `retrieval.py build` (default: embedded Wikipedia summaries)")
    out: str = opt("runs/kr1", "run directory: log.jsonl, checkpoints/, latest")
    # rollout
    group_size: int = opt(8, "G, trajectories per prompt")
    prompts_per_step: int = opt(32, "prompts per optimizer step over all ranks (divisible by world size)")
    temperature: float = opt(1.0, "sampling temperature (also used for training log-probs)")
    top_k_passages: int = opt(3, "BM25 passages per search")
    max_turns: int = opt(4, "searches before the forced final answer")
    max_turn_tokens: int = opt(512, "generated tokens per assistant turn")
    max_total_tokens: int = opt(2048, "tokens after the prompt (generated + retrieved)")
    # loss (see grpo.py for each choice against the paper)
    beta: float = opt(0.04, "k3 KL coefficient to the reference model; 0 loads no reference (TRL's default then)")
    clip_low: float = opt(0.2, "PPO clip epsilon below 1")
    clip_high: float = opt(0.2, "clip epsilon above 1 (0.28 = DAPO clip-higher)")
    agg: str = opt("seq", "loss aggregation: seq (GRPO paper, TRL), token (DAPO), const (Dr. GRPO)")
    scale_std: bool = opt(True, "divide advantages by the group std (False = Dr. GRPO)")
    acc: str = opt("em", "accuracy reward: em or f1")
    w_fmt: float = opt(1.0, "weight of the format reward (+1/-1); accuracy has weight 1")
    # optimisation
    steps: int = opt(200, "optimizer steps")
    lr: float = opt(1e-6, "peak learning rate (AdamW)")
    warmup_steps: int = opt(10, "linear warmup steps, then cosine decay to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm")
    micro_batch: int = opt(4, "trajectories per forward/backward")
    logprob_chunk: int = opt(1024, "tokens per chunk of the (tokens x vocab) log-prob computation")
    seed: int = opt(0, "seed for data order and sampling")
    # bookkeeping
    save_every: int = opt(50, "checkpoint every N steps (and at the end); 0 = only at the end")
    resume: str | None = opt(None, "run dir or checkpoint dir to resume from")
    wandb: bool = opt(False, "also log to Weights & Biases (needs `pip install wandb`)")
    preset: str | None = opt(None, "'offline': SmolLM2 + data/qa.jsonl + embedded corpus, CPU-sized")


PRESETS = {
    "offline": dict(model="default", dataset=str(HERE / "data" / "qa.jsonl"), index=None, out="runs/offline",
                    group_size=4, prompts_per_step=4, max_turns=2, max_turn_tokens=160, max_total_tokens=640,
                    beta=0.0, steps=30, lr=2e-6, warmup_steps=3, micro_batch=4, save_every=10),
}


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default: {f.default})")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("preset") not in (None, *PRESETS):
        p.error(f"--preset must be one of {list(PRESETS)}, got {args['preset']!r}")
    cfg = Config(**{**PRESETS.get(args.get("preset"), {}), **args})  # explicit flags beat the preset
    if cfg.agg not in ("seq", "token", "const") or cfg.acc not in ("em", "f1"):
        p.error("--agg must be seq|token|const and --acc em|f1")
    if min(cfg.group_size, cfg.prompts_per_step, cfg.micro_batch, cfg.steps) < 1 or cfg.group_size < 2:
        p.error("--group-size must be >= 2; --prompts-per-step, --micro-batch, --steps >= 1")
    return cfg


# ----------------------------------------------------------------------------- setup
def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` becomes a world of one (same code path)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def load_questions(cfg: Config) -> list[dict]:
    """Local JSONL (question/answers or problem/golden_answers) or an HF dataset id."""
    if Path(cfg.dataset).suffix == ".jsonl" or Path(cfg.dataset).exists():
        return retrieval.read_qa(cfg.dataset)
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
    except Exception as e:  # offline hub, typo'd id: say which and what to do instead
        raise SystemExit(f"train.py: error: could not load dataset {cfg.dataset!r} (split {cfg.split!r}) from the "
                         f"Hugging Face hub: {type(e).__name__}: {str(e)[:200]}\n  offline? use --dataset FILE.jsonl "
                         "or --preset offline") from None
    return [{"question": r.get("question", r.get("problem")),
             "answers": list(r.get("answers", r.get("golden_answers")))} for r in ds]


def shard_model(model: torch.nn.Module, mesh, cuda: bool, train: bool) -> torch.nn.Module:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, head)."""
    mp = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    if train:  # recompute each layer in backward: activations kept per layer = its input only
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.kr1_logprobs = types.MethodType(grpo.token_logprobs, model)
    register_fsdp_forward_method(model, "kr1_logprobs")  # FSDP gathers the root's params around this call too
    return model


class Unsharded:
    """Gather every FSDP unit once for the whole generation instead of once per token (decode is ~1 token/step)."""

    def __init__(self, model):
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for m in self.units:
            m.unshard()
            m.set_reshard_after_forward(False)

    def __exit__(self, *exc):
        for m in self.units:
            m.reshard()
            m.set_reshard_after_forward(True)


def lr_lambda(cfg: Config):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def step_prompts(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices for a step: a fresh seeded permutation each epoch; the data position is the step number."""
    out, pos = [], step * per_step
    while len(out) < per_step:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        take = min(per_step - len(out), n - i)
        out += perm[i : i + take]
        pos += take
    return out


# ----------------------------------------------------------------------------- one step
def pad_batch(trajs: list[rollout.Trajectory], device) -> dict[str, torch.Tensor]:
    """Right-pad trajectories; targets are ids[1:], so the loss mask and old log-probs shift by one."""
    T = max(len(t.ids) for t in trajs)
    ids = torch.zeros(len(trajs), T, dtype=torch.long)  # (B, T)
    attn = torch.zeros(len(trajs), T, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(trajs), T, dtype=torch.float32)  # (B, T)
    old = torch.zeros(len(trajs), T, dtype=torch.float32)  # (B, T)
    for i, t in enumerate(trajs):
        n = len(t.ids)
        ids[i, :n], attn[i, :n] = torch.tensor(t.ids), 1
        mask[i, :n], old[i, :n] = torch.tensor(t.mask, dtype=torch.float32), torch.tensor(t.logprobs)
    return {k: v.to(device) for k, v in dict(ids=ids, attn=attn, mask=mask[:, 1:], old=old[:, 1:]).items()}


def train_step(model, ref, tok, optimizer, scheduler, cfg: Config, rows: list[dict], search, step: int) -> dict:
    """Rollout -> rewards -> advantages -> GRPO loss -> optimizer step. `rows`: this rank's prompts."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), next(model.parameters()).device
    rcfg = rollout.RolloutConfig(max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens,
                                 max_total_tokens=cfg.max_total_tokens, temperature=cfg.temperature)
    questions = [r["question"] for r in rows for _ in range(cfg.group_size)]  # G consecutive copies per prompt
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # resume-exact sampling
    t0 = time.perf_counter()
    model.eval()  # HF skips checkpointing and keeps the KV cache in eval mode
    with torch.no_grad(), Unsharded(model):
        trajs = rollout.rollout(model, tok, questions, search, rcfg, generator=gen)
    t_rollout = time.perf_counter() - t0

    golds = [r["answers"] for r in rows for _ in range(cfg.group_size)]
    scores = [grpo.reward(t.answer, t.responses, g, w_fmt=cfg.w_fmt, acc=cfg.acc) for t, g in zip(trajs, golds)]
    adv = grpo.group_advantages([s["reward"] for s in scores], cfg.group_size, cfg.scale_std).to(device)  # (B,)

    # global normaliser: every rank and micro-batch divides by the same count, so the summed gradient is exact
    n_tok = torch.tensor(float(sum(sum(t.mask[1:]) for t in trajs)), device=device)
    dist.all_reduce(n_tok)
    normaliser = {"token": n_tok.item(), "seq": float(len(trajs) * world),
                  "const": float(cfg.max_total_tokens * len(trajs) * world)}[cfg.agg]
    t1 = time.perf_counter()
    model.train()
    per_tok = ("kl", "clip_frac", "entropy", "ratio_mean")  # token-weighted means over the whole step
    sums = dict.fromkeys(("loss", *per_tok), torch.zeros((), dtype=torch.float64, device=device))
    ratio_max, ratio_min = torch.zeros((), device=device), torch.full((), 9.0, device=device)
    for s in range(0, len(trajs), cfg.micro_batch):
        b = pad_batch(trajs[s : s + cfg.micro_batch], device)
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = ref.kr1_logprobs(b["ids"], b["attn"], cfg.temperature, cfg.logprob_chunk)  # (b, T-1)
        logp, ent = model.kr1_logprobs(b["ids"], b["attn"], cfg.temperature, cfg.logprob_chunk, with_entropy=True)
        loss, m = grpo.grpo_loss(logp, b["old"], adv[s : s + cfg.micro_batch], b["mask"], ref_logp=ref_logp,
                                 beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.agg,
                                 normaliser=normaliser, entropy=ent)
        (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already globally normalised
        sums["loss"] = sums["loss"] + loss.detach()  # tensors, not .item(): no host sync per micro-batch
        for k in per_tok:
            sums[k] = sums[k] + m[k] * m["n_tokens"]
        ratio_max, ratio_min = torch.maximum(ratio_max, m["ratio_max"]), torch.minimum(ratio_min, m["ratio_min"])

    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    counts = {"reward": sum(x["reward"] for x in scores), "accuracy": sum(x["accuracy"] for x in scores),
              "format": sum(x["format"] for x in scores), "searches": sum(len(t.queries) for t in trajs),
              "response_tokens": sum(sum(t.mask) for t in trajs), "adv_sq": (adv**2).sum().item(), "n": len(trajs)}
    keys = [*sums, *counts]
    totals = torch.stack([*sums.values(), *(torch.tensor(float(v), dtype=torch.float64, device=device)
                                            for v in counts.values())])
    dist.all_reduce(totals)  # one collective for every scalar of the step
    tot = dict(zip(keys, totals.tolist(), strict=True))
    extremes = torch.stack([ratio_max, -ratio_min])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    finite = math.isfinite(tot["loss"]) and math.isfinite(grad_norm.item())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    t_update = time.perf_counter() - t1
    n, ntok = tot["n"], max(n_tok.item(), 1.0)
    rec = {"step": step + 1, "loss": tot["loss"], **{k: tot[k] / n for k in ("reward", "accuracy", "format",
                                                                             "searches", "response_tokens")},
           **{k: tot[k] / ntok for k in per_tok}, "ratio_max": extremes[0].item(), "ratio_min": -extremes[1].item(),
           "adv_std": math.sqrt(tot["adv_sq"] / n), "grad_norm": grad_norm.item(), "lr": lr, "skipped": not finite,
           "rollout_s": round(t_rollout, 3), "update_s": round(t_update, 3),
           "rollout_tokens_per_s": round(tot["response_tokens"] / world / t_rollout, 1),
           "peak_mem_gb": round(peak_memory_gib(device), 3)}
    return rec


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, model, tok, optimizer, scheduler, cfg: Config, step: int) -> Path:
    """Write OUT/checkpoints/step_N atomically: a `.tmp` dir renamed into place, then OUT/latest updated."""
    rank = dist.get_rank()
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))  # sharded: each rank writes its part
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:  # a plain Hugging Face folder: from_pretrained / kr1.py --model
        model.save_pretrained(tmp / "hf", state_dict=full)
        tok.save_pretrained(tmp / "hf")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                      "config": dataclasses.asdict(cfg)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (out / "latest.tmp").write_text(str(final.relative_to(out)))
        os.replace(out / "latest.tmp", out / "latest")  # atomic pointer swap
    dist.barrier()
    return final


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "trainer.json").is_file():
        raise SystemExit(f"train.py: error: --resume {path}: no checkpoint there (expected trainer.json or latest)")
    return p


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> int:
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads((ckpt / "trainer.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng))
    return meta["step"]


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        if cfg.prompts_per_step % world:
            raise SystemExit(f"train.py: error: --prompts-per-step {cfg.prompts_per_step} is not divisible by "
                             f"the world size {world}")
        rows = load_questions(cfg)
        index = retrieval.open_index(cfg.index)  # each rank mmap-loads the same files: the OS shares the pages
        search = lambda qs: index.search(qs, k=cfg.top_k_passages)
        spec = None if cfg.model in (None, "default") else cfg.model
        cuda = device.type == "cuda"
        mesh = init_device_mesh(device.type, (world,))
        model, tok = rollout.load_model(spec, dtype=torch.float32, device=device)  # fp32 = the optimizer's master
        model = shard_model(model, mesh, cuda, train=True)
        ref = None
        if cfg.beta > 0:  # frozen copy, sharded the same way, no optimizer state; bf16 on GPU (it computes in bf16)
            ref, _ = rollout.load_model(spec, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
            ref = shard_model(ref.requires_grad_(False).eval(), mesh, cuda, train=False)
            ref.set_reshard_after_forward(True)  # FSDP2 keeps the root gathered for a backward that never comes
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.99), fused=cuda)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        out = Path(cfg.out)
        start = load_checkpoint(resolve_checkpoint(cfg.resume), model, optimizer, scheduler) if cfg.resume else 0
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if cfg.wandb and rank == 0:
            import wandb

            wandb.init(project="knowledge-r1", config=dataclasses.asdict(cfg))
        per_rank = cfg.prompts_per_step // world
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="grpo", disable=rank != 0)
        for step in bar:
            idx = step_prompts(len(rows), step, cfg.prompts_per_step, cfg.seed)[rank * per_rank : (rank + 1) * per_rank]
            rec = train_step(model, ref, tok, optimizer, scheduler, cfg, [rows[i] for i in idx], search, step)
            if rank == 0:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}",
                                fmt=f"{rec['format']:.2f}", tok_s=rec["rollout_tokens_per_s"])
                if rec["skipped"]:
                    tqdm.write(f"step {step + 1}: non-finite loss or gradient norm; update skipped")
                if cfg.wandb:
                    wandb.log(rec, step=step + 1)
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(out, model, tok, optimizer, scheduler, cfg, step + 1)
        return 0
    except (retrieval.RetrievalError, rollout.ModelLoadError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
