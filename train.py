r"""GRPO training of a search-while-reasoning policy: rollouts on every rank, FSDP2, activation checkpointing.

    python train.py --preset offline                      # SmolLM2-135M on data/qa.jsonl + embedded corpus, CPU-sized
    torchrun --nproc_per_node=2 train.py --preset offline --steps 4
    torchrun --nproc_per_node=8 train.py --index runs/index-wiki18 --out runs/qwen1.5b   # the original 1.5B recipe
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen2.5-7B-Instruct --index runs/index-wiki18 \
        --prompts-per-step 16 --out runs/qwen7b                                             # 7B on 8x40 GB
    python train.py --resume runs/kr1                      # continue exactly where the last checkpoint stopped
    python train.py --preset smollm2-2wiki                 # the shipped adapter: LoRA, SFT warm-start, GRPO + mixing

One GRPO step: each rank rolls out G trajectories for each of its prompts (rollout.py, searching retrieval.py's index),
scores them (grpo.reward) and runs the GRPO loss over micro-batches; optional: SFT warm-start, expert mixing, LoRA.
Logs: OUT/log.jsonl; checkpoints: OUT/checkpoints/step_N/{hf/ (LoRA: the last only), adapter/ (LoRA), state/,
trainer.json} and OUT/latest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dsd  # FSDP2 module/optimizer <-> (full or sharded) state dicts
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import grpo
import kr1
import retrieval
import rollout

HERE = Path(__file__).resolve().parent
# the project's own questions: the embedded corpus answers them
QA_FILE = HERE / "data" / "qa.jsonl"
# grpo_loss metrics, logged as token-weighted step means
PER_TOKEN = ("kl", "clip_frac", "entropy", "ratio_mean")


def opt(default, text: str, shown: str | None = None):
    """A Config field and its --help text; `shown`: how --help names the default (else the value itself)."""
    return field(default=default, metadata={"help": text, "shown": shown})


@dataclass
class Config:
    # what: defaults follow the original Knowledge-R1 1.5B recipe (TRL GRPO, 2WikiMultihopQA, BM25 over wiki-18)
    model: str | None = opt(
        "Qwen/Qwen2.5-1.5B-Instruct", "HF id or local dir; 'default' = embedded SmolLM2-135M"
    )
    dataset: str = opt(
        "hzy/kr1_2wiki", "HF dataset id (fields problem, golden_answers) or local JSONL"
    )
    split: str = opt("train", "dataset split (HF datasets only)")
    index: str | None = opt(
        None,
        "index dir from `retrieval.py build`, or a corpus FILE.jsonl (indexed once)",
        shown="the embedded Wikipedia summaries",
    )
    out: str = opt("runs/kr1", "run directory: log.jsonl, checkpoints/, latest")
    # rollout
    group_size: int = opt(8, "G, trajectories per prompt")
    prompts_per_step: int = opt(
        32, "prompts per optimizer step over all ranks (divisible by world size)"
    )
    temperature: float = opt(1.0, "sampling temperature (also used for training log-probs)")
    top_k_passages: int = opt(3, "BM25 passages per search")
    max_turns: int = opt(4, "searches before the forced final answer")
    max_turn_tokens: int = opt(512, "generated tokens per assistant turn")
    max_total_tokens: int = opt(2048, "tokens after the prompt (generated + retrieved)")
    search_lag: int = opt(
        0,
        "searches in a background thread while the other rows decode, joined exactly N decode "
        "steps later (reproducible, so --resume stays exact; pays with a big index); 0 = rows wait",
    )
    # warm-start (expert trajectories: rollout.expert_trajectory)
    sft_steps: int = opt(
        0, "SFT steps on expert trajectories before GRPO (0 = none); they count as steps 1..N"
    )
    sft_batch: int = opt(8, "expert trajectories per SFT step (divisible by world size)")
    sft_lr: float = opt(3e-4, "SFT learning rate (constant; GRPO then warms up from 0 to --lr)")
    sft_probe_every: int = opt(
        0, "during SFT, roll out and score --prompts-per-step prompts every N steps (0 = off)"
    )
    expert_mix: bool = opt(
        False, "David-GRPO: a group with no correct sample gets the expert trajectory as its last"
    )
    update: bool = opt(
        True, "--no-update: the control arm (same prompts and seeds, scored; no weight changes)"
    )
    # parameters
    lora_rank: int = opt(
        0, "LoRA rank on --lora-targets (0 = full fine-tuning); saved in PEFT format (adapter/)"
    )
    lora_alpha: float = opt(16.0, "LoRA alpha: the update is (alpha / rank) * B @ A")
    lora_targets: str = opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "Linear names to adapt"
    )
    bf16: bool = opt(
        False,
        "CPU: bf16 autocast where the CPU has AVX512-BF16 (fp32 master weights); pays on some CPUs",
    )
    grad_ckpt: bool = opt(
        True, "activation checkpointing per decoder layer (saves memory, costs a re-forward)"
    )
    # loss (see grpo.py for each choice against the paper; clip and agg default to the paper's, as grpo_loss's do)
    beta: float = opt(
        0.04, "k3 KL coefficient to the reference model; 0 loads no reference (TRL's default then)"
    )
    clip_low: float = opt(0.2, "PPO clip epsilon below 1")
    clip_high: float = opt(0.2, "clip epsilon above 1 (0.28 = DAPO clip-higher)")
    agg: str = opt("seq", "loss aggregation: seq (GRPO paper, TRL), token (DAPO), const (Dr. GRPO)")
    scale_std: bool = opt(True, "divide advantages by the group std (False = Dr. GRPO)")
    acc: str = opt("em", "accuracy reward: em or f1")
    w_fmt: float = opt(1.0, "weight of the format reward (+1/-1); accuracy has weight 1")
    w_support: float = opt(
        0.0,
        "weight of the support reward: recall of the gold supporting_titles among passages read",
    )
    # optimisation
    steps: int = opt(200, "GRPO optimizer steps (after --sft-steps)")
    lr: float = opt(1e-6, "peak learning rate (AdamW)")
    warmup_steps: int = opt(10, "linear warmup steps, then cosine decay to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm")
    micro_batch: int = opt(4, "trajectories per forward/backward")
    logprob_chunk: int = opt(1024, "tokens per chunk of the (tokens x vocab) log-prob computation")
    seed: int = opt(0, "seed for data order and sampling")
    dist_timeout: float = opt(
        0.0,
        "minutes a collective may stall before the job fails (0 = torch's default: 10 NCCL, "
        "30 gloo); the others wait for rank 0 reading the model or writing hf/ up to a day",
    )
    # bookkeeping
    save_every: int = opt(
        50,
        "checkpoint every N steps and at the end (0 = only at the end); also after the "
        "first step if --out has no checkpoint yet, so that a run killed early can --resume",
    )
    keep_last: int = opt(
        0,
        "after each checkpoint, delete all but the newest N step_* folders (never the one "
        "OUT/latest names); 0 = keep all",
    )
    save_hf: bool = opt(
        False,
        "LoRA: write the merged model (hf/) in every checkpoint, not only the run's last "
        "(full fine-tuning always writes it)",
    )
    resume: str | None = opt(None, "run dir or checkpoint dir to resume from")
    wandb: bool = opt(False, "also log to Weights & Biases (needs `pip install wandb`)")
    preset: str | None = opt(
        None,
        "'offline': a quick CPU run (SmolLM2, data/qa.jsonl); 'smollm2-2wiki': the shipped "
        "adapter's recipe; 'warmstart-qa' then 'grpo-2wiki': watch GRPO learn (see README)",
    )


# SmolLM2 + LoRA on a small CPU
SMOL = dict(
    model="default",
    lora_rank=8,
    lora_alpha=16.0,
    max_turns=2,
    max_turn_tokens=64,
    max_total_tokens=768,
    top_k_passages=2,
    beta=0.0,
    agg="token",
    grad_ckpt=False,
    group_size=4,
    prompts_per_step=4,
    sft_batch=4,
    sft_lr=5e-4,
)
QA = dict(SMOL, dataset=str(QA_FILE), index=None)  # the project's own questions, embedded corpus
# from data/prepare_2wiki.py
WIKI = dict(SMOL, dataset="runs/2wiki/train.jsonl", index="runs/2wiki/corpus.jsonl")
PRESETS = {  # what each is for: --preset's help; their runs and times: BENCHMARKS.md
    "offline": dict(
        QA,
        out="runs/offline",
        sft_steps=20,
        sft_probe_every=10,
        steps=6,
        lr=2e-4,
        warmup_steps=1,
        temperature=0.7,
        micro_batch=1,
        save_every=10,
    ),
    "smollm2-2wiki": dict(
        WIKI,
        out="runs/smollm2-2wiki",
        sft_steps=40,
        sft_probe_every=20,
        expert_mix=True,
        steps=28,
        lr=5e-5,
        warmup_steps=3,
        micro_batch=1,
        save_every=8,
    ),
    # bench/grpo_gain.sh: grpo-2wiki resumes from warmstart-qa (SFT, no 2Wiki), GRPO alone; --no-update: control arm
    "warmstart-qa": dict(
        QA, out="runs/grpo-gain/start", sft_steps=40, steps=0, micro_batch=4, save_every=0
    ),
    "grpo-2wiki": dict(
        WIKI,
        out="runs/grpo-gain/trained",
        sft_steps=40,
        steps=40,
        lr=5e-4,
        warmup_steps=3,
        temperature=0.7,
        acc="f1",
        w_fmt=0.5,
        micro_batch=4,
        save_every=5,
    ),
}


# the least each count may be (--steps 0: a warm-start only run)
LEAST = dict(group_size=2, prompts_per_step=1, micro_batch=1, sft_batch=1, steps=0, sft_steps=0)
LEAST.update(lora_rank=0, sft_probe_every=0, search_lag=0, keep_last=0, dist_timeout=0)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # every rank parses the same flags: rank 0 alone says what is wrong
    if os.environ.get("RANK", "0") != "0":
        p.error = lambda message: sys.exit(2)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        shown = f.metadata["shown"] or f.default
        # argparse formats help with %
        text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        if f.type == "bool":  # default None: argparse appends no default of its own
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, help=text)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("preset") not in (None, *PRESETS):
        p.error(f"--preset must be one of {list(PRESETS)}, got {args['preset']!r}")
    # explicit flags beat the preset
    cfg = Config(**{**PRESETS.get(args.get("preset"), {}), **args})
    if cfg.agg not in ("seq", "token", "const") or cfg.acc not in ("em", "f1"):
        p.error("--agg must be seq|token|const and --acc em|f1")
    for name, least in LEAST.items():
        if getattr(cfg, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, not {getattr(cfg, name)}")
    if cfg.steps + cfg.sft_steps < 1:
        p.error("nothing to train: --steps and --sft-steps are both 0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The job: flags, process group, questions, index, models, the checkpoint to resume, then the loop. Any failure
    ends it in one line per rank (fail); the exit code says which kind."""
    cfg = parse_args(argv)
    rank, world, device = init_distributed(cfg.dist_timeout)
    try:
        if cfg.prompts_per_step % world or cfg.sft_batch % world:
            raise SystemExit(
                f"train.py: error: --prompts-per-step {cfg.prompts_per_step} and --sft-batch "
                f"{cfg.sft_batch} must be divisible by the world size {world}"
            )
        # before the models: a bad path fails at once
        ckpt = resolve_checkpoint(cfg.resume) if cfg.resume else None
        out = Path(cfg.out)
        # --out has no checkpoint yet: save after this run's first step
        fresh = not (out / "latest").is_file()
        rows = load_questions(cfg)
        # each rank mmap-loads the same files: the OS shares the pages
        index = retrieval.open_index(cfg.index)
        warning = corpus_warning(cfg, len(index))
        if warning and rank == 0:
            print(warning, file=sys.stderr)
        # it remembers each hit's title: the support reward compares titles
        search = kr1.RecordingSearch(lambda qs: index.search(qs, k=cfg.top_k_passages))
        model, ref, tokenizer, optimizer = build_models(cfg, device, world)
        start = load_checkpoint(ckpt, model, optimizer, cfg=cfg) if ckpt else 0
        early = start + 1 if fresh else 0
        run = Run(
            cfg=cfg,
            model=model,
            ref=ref,
            tokenizer=tokenizer,
            optimizer=optimizer,
            rows=rows,
            search=search,
            out=out,
            start=start,
            early_save=early,
        )
        if rank == 0:
            start_log(run)
        train_loop(run)
        return 0
    except (Exception, SystemExit) as e:
        return fail(e, rank, world, Path(cfg.out))
    finally:
        stop_heartbeat()
        dist.destroy_process_group()


@dataclass
class Run:
    """What the step loop works with: the models, the questions, the search, where to write, where it starts."""

    cfg: Config
    model: LogProbs
    ref: LogProbs | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    rows: list[dict]
    search: kr1.RecordingSearch
    out: Path
    start: int  # steps already done (the resumed checkpoint's)
    # the step after which to save although no other rule says so (0 = none): see main
    early_save: int


def train_loop(run: Run) -> None:
    """The steps from run.start: SFT, then GRPO; each logged on rank 0 and checkpointed when save_due says so."""
    cfg = run.cfg
    rank = dist.get_rank()
    total = cfg.sft_steps + cfg.steps
    bar = tqdm(
        range(run.start, total),
        initial=run.start,
        total=total,
        desc="train",
        unit="step",
        disable=rank != 0,
    )
    progress = Progress(bar)
    for step in bar:
        rec = one_step(run, step, progress)
        if rank == 0:
            log_step(run, rec, progress)
        if save_due(cfg, step + 1, run.early_save):
            # LoRA: the merged model at the end only
            hf = not cfg.lora_rank or cfg.save_hf or step + 1 == total
            save_checkpoint(run, step + 1, hf=hf)


def one_step(run: Run, step: int, progress: Progress) -> dict:
    """Step `step` on this rank's prompts: a warm-start (SFT) step, then GRPO steps; its log record."""
    take_step = sft_step if step < run.cfg.sft_steps else grpo_step
    return take_step(run, step_rows(run.cfg, run.rows, step), step, progress)


def save_due(cfg: Config, done: int, early: int) -> bool:
    """Whether to checkpoint after `done` steps: every --save-every, at the end of SFT and of the run, at `early`."""
    periodic = cfg.save_every > 0 and done % cfg.save_every == 0
    return periodic or done in (cfg.sft_steps + cfg.steps, cfg.sft_steps, early)


# ------------------------------------------- one step: rollout, rewards, loss, update, log record
def sft_step(run: Run, rows: list[dict], step: int, progress: Progress | None = None) -> dict:
    """A warm-start step: the masked NLL (grpo.sft_loss) of the expert trajectories of `rows` (this rank's share)."""
    cfg, model, world = run.cfg, run.model, dist.get_world_size()
    device = next(model.parameters()).device
    trajs, scores, t_rollout = [], [], 0.0
    if cfg.sft_probe_every and step % cfg.sft_probe_every == 0:
        # sampled to log rewards: this rank's share of --prompts-per-step
        probe = rows[: cfg.prompts_per_step // world]
        trajs, scores, t_rollout = rollout_and_score(
            model, run.tokenizer, cfg, rows=probe, search=run.search, step=step, progress=progress
        )
    t1 = time.perf_counter()
    model.train()
    experts = [expert(cfg, run.tokenizer, r, run.search) for r in rows]
    sums = StepSums.zeros(experts, device)
    if progress:
        progress.start_update(math.ceil(len(experts) / cfg.micro_batch))
    for s in range(0, len(experts), cfg.micro_batch):
        b = pad_batch(experts[s : s + cfg.micro_batch], device)
        with rollout.bf16_autocast(device, cfg.bf16):
            logp = model(b["ids"], chunk_size=cfg.logprob_chunk, loss_mask=b["mask"])  # (b, T-1)
        loss = grpo.sft_loss(logp, b["mask"], normaliser=sums.n_tok)
        (loss * world).backward()  # as in grpo_update
        if progress:
            progress.micro_batch()
        sums.loss = sums.loss + loss.detach()
    outcome = optimizer_step(model, run.optimizer, cfg, step, sums.loss)
    timing = Timing(t_rollout, time.perf_counter() - t1, sampled=sum(sum(t.mask) for t in trajs))
    return log_record(cfg, step, step_metrics(trajs, scores, sums), outcome, timing)


def grpo_step(run: Run, rows: list[dict], step: int, progress: Progress | None = None) -> dict:
    """On this rank's prompts: rollout, rewards (expert mixing), group advantages, loss, update (unless --no-update)."""
    cfg, model = run.cfg, run.model
    trajs, scores, t_rollout = rollout_and_score(
        model, run.tokenizer, cfg, rows=rows, search=run.search, step=step, progress=progress
    )
    t1, device = time.perf_counter(), next(model.parameters()).device
    model.train()
    # logged metrics stay on-policy; the loss sees the mix
    batch, batch_scores = list(trajs), list(scores)
    if cfg.expert_mix:
        mixed = mix_experts(cfg, run.tokenizer, rows, run.search, batch, batch_scores)
    else:
        mixed = 0
    rewards = [s["reward"] for s in batch_scores]
    adv = grpo.group_advantages(rewards, cfg.group_size, cfg.scale_std)  # (B,)
    if cfg.update:
        if progress:
            progress.start_update(math.ceil(len(batch) / cfg.micro_batch))
        on_micro_batch = progress.micro_batch if progress else None
        sums = grpo_update(
            model, run.ref, cfg, batch, adv.to(device), on_micro_batch=on_micro_batch
        )
    else:  # the control arm
        sums = StepSums.zeros(batch, device)
    sums.grpo, sums.adv_sq, sums.expert_rows = True, (adv.double() ** 2).sum().item(), mixed
    outcome = optimizer_step(model, run.optimizer, cfg, step, sums.loss, update=cfg.update)
    timing = Timing(t_rollout, time.perf_counter() - t1, sampled=sum(sum(t.mask) for t in trajs))
    return log_record(cfg, step, step_metrics(trajs, scores, sums), outcome, timing)


def rollout_and_score(
    model: LogProbs,
    tokenizer,
    cfg: Config,
    rows: list[dict],
    search,
    step: int,
    *,
    progress: Progress | None = None,
):
    """G sampled trajectories per prompt (consecutive) and their reward dicts; the rollout's seconds."""
    rcfg = rollout.RolloutConfig(
        max_turns=cfg.max_turns,
        max_turn_tokens=cfg.max_turn_tokens,
        max_total_tokens=cfg.max_total_tokens,
        temperature=cfg.temperature,
        search_lag=cfg.search_lag,
    )
    device = next(model.parameters()).device
    group = [r for r in rows for _ in range(cfg.group_size)]  # G consecutive copies per prompt
    # resumable
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.get_rank())
    t0 = time.perf_counter()
    model.eval()  # HF skips checkpointing and keeps the KV cache in eval mode
    on_progress = progress.on_rollout(len(group)) if progress else None
    questions = [r["question"] for r in group]
    with torch.no_grad(), unsharded(model), rollout.bf16_autocast(device, cfg.bf16):
        trajs = rollout.rollout(
            model.lm,
            tokenizer,
            questions,
            search=search,
            cfg=rcfg,
            generator=gen,
            on_progress=on_progress,
        )
    scores = [score(cfg, t, r, search) for t, r in zip(trajs, group)]
    return trajs, scores, time.perf_counter() - t0


def score(cfg: Config, traj: rollout.Trajectory, row: dict, search: kr1.RecordingSearch) -> dict:
    read = [search.named(ids) for ids in traj.doc_ids]
    support = grpo.support_recall(row.get("supporting_titles"), read) or 0.0
    return grpo.reward(
        traj, row["answers"], w_fmt=cfg.w_fmt, acc=cfg.acc, w_support=cfg.w_support, support=support
    )


def expert(cfg: Config, tokenizer, row: dict, search) -> rollout.Trajectory:
    """The gold trajectory of one question: search its supporting titles (else the question), answer the gold."""
    return rollout.expert_trajectory(
        tokenizer,
        row["question"],
        row["answers"][0],
        row.get("supporting_titles") or [row["question"]],
        search,
        cfg.max_turns,
    )


def mix_experts(cfg: Config, tokenizer, rows: list[dict], search, trajs: list, scores: list) -> int:
    """David-GRPO: in a group where no sample is correct, the last sample becomes the expert trajectory, so the
    group has a reward spread and the right answer a positive advantage. In place; returns how many rows."""
    G = cfg.group_size
    wrong = [
        p
        for p in range(len(rows))
        if not any(s["accuracy"] > 0 for s in scores[p * G : (p + 1) * G])
    ]
    for p in wrong:
        trajs[p * G + G - 1] = t = expert(cfg, tokenizer, rows[p], search)
        scores[p * G + G - 1] = score(cfg, t, rows[p], search)
    return len(wrong)


@dataclass
class StepSums:
    """What one step adds up on this rank, as tensors (no host sync per micro-batch) until step_metrics sums them
    over ranks. The GRPO loss's metrics are real only where it ran (`loss_ran`: not SFT, not the control arm)."""

    n_tok: torch.Tensor  # the loss tokens of all ranks: the token mean's denominator
    loss: torch.Tensor  # this rank's share of the step's loss
    per_token: torch.Tensor  # (len(PER_TOKEN),) each grpo_loss metric x its tokens
    extremes: torch.Tensor  # (3,) ratio max, -ratio min, largest engine-trainer gap: all ranks
    drift: torch.Tensor  # (3,) |trainer - engine| log-prob sum, tokens over 0.1, tokens compared
    loss_ran: bool = False
    grpo: bool = False  # a GRPO step (advantages exist), not a warm-start one
    adv_sq: float = 0.0  # GRPO: the squared advantages' sum
    expert_rows: int = 0  # David-GRPO: groups given the expert trajectory

    @classmethod
    def zeros(cls, trajs: list, device) -> StepSums:
        """Zero sums for `trajs` (this rank's rows), and n_tok: a collective."""
        n_tok = torch.tensor(float(sum(sum(t.mask[1:]) for t in trajs)), device=device)
        dist.all_reduce(n_tok)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(n_tok, zeros(), zeros(len(PER_TOKEN)), zeros(3), zeros(3))


def grpo_update(
    model,
    ref,
    cfg: Config,
    trajs: list,
    adv: torch.Tensor,
    *,
    on_micro_batch: Callable[[], None] | None = None,
) -> StepSums:
    """Accumulate the GRPO loss over micro-batches (backward only; the caller steps) and its metrics' sums;
    `on_micro_batch()` after each."""
    world, device = dist.get_world_size(), adv.device
    sums = StepSums.zeros(trajs, device)
    sums.loss_ran = True
    normaliser = {
        "token": sums.n_tok.item(),
        "seq": float(len(trajs) * world),
        "const": float(cfg.max_total_tokens * len(trajs) * world),
    }[cfg.agg]
    extremes = torch.tensor([0.0, -9.0, 0.0], device=device)  # as StepSums.extremes
    # like lengths share a micro-batch: less padding
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].ids))
    for s in range(0, len(trajs), cfg.micro_batch):
        idx = order[s : s + cfg.micro_batch]
        b = pad_batch([trajs[i] for i in idx], device)
        is_exp = torch.tensor([trajs[i].expert for i in idx], device=device)[:, None]  # (b, 1)
        loss, m, logp = micro_batch_loss(model, ref, cfg, b, is_exp, adv[idx], normaliser)
        if s == 0:
            # before any backward: the trainer's log-probs of the sampled tokens against the engine's
            sums.drift, extremes[2] = engine_drift(logp.detach(), b["old"], b["mask"] * ~is_exp)
        # FSDP averages gradients over ranks; the loss is already globally normalised
        (loss * world).backward()
        if on_micro_batch is not None:
            on_micro_batch()
        sums.loss = sums.loss + loss.detach()
        sums.per_token = sums.per_token + torch.stack([m[k] * m["n_tokens"] for k in PER_TOKEN])
        extremes[:2] = torch.maximum(extremes[:2], torch.stack([m["ratio_max"], -m["ratio_min"]]))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    sums.extremes = extremes
    return sums


def micro_batch_loss(model, ref, cfg: Config, b: dict, is_exp, adv, normaliser: float):
    """One micro-batch's GRPO loss (forward only), its metrics and the trainer's log-probs (b, T-1)."""
    # no attention mask: the rows are right-padded and run unmasked
    kw = dict(temperature=cfg.temperature, chunk_size=cfg.logprob_chunk, loss_mask=b["mask"])
    with rollout.bf16_autocast(b["ids"].device, cfg.bf16):
        with torch.no_grad():
            ref_logp = None if ref is None else ref(b["ids"], **kw)  # (b, T-1)
        logp, ent = model(b["ids"], with_entropy=True, **kw)  # (b, T-1) each
    # expert rows were never sampled: their old log-probs are the current ones (ratio 1)
    old = torch.where(is_exp, logp.detach(), b["old"])  # (b, T-1)
    loss, m = grpo.grpo_loss(
        logp,
        old,
        adv,
        b["mask"],
        ref_logp=ref_logp,
        beta=cfg.beta,
        agg=cfg.agg,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        normaliser=normaliser,
        entropy=ent,
    )
    return loss, m, logp


def engine_drift(
    logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the engine's sampling log-probs (PPO's old ones) are from the trainer's over the `mask` tokens: the
    sums of StepSums.drift, and the largest |logp - old|."""
    diff = (logp - old).abs() * mask  # (b, T-1)
    sums = torch.stack([diff.sum(), (diff > 0.1).sum(), mask.sum()]).double()  # (3,)
    return sums, diff.max()


def pad_batch(trajs: list[rollout.Trajectory], device) -> dict[str, torch.Tensor]:
    """Right-pad trajectories (they run unmasked); targets are ids[1:], so the loss mask and old log-probs shift."""
    # (B, T)
    pad = lambda rows, dtype: torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r, dtype=dtype) for r in rows], batch_first=True
    ).to(device)
    return {
        "ids": pad([t.ids for t in trajs], torch.long),  # (B, T)
        "mask": pad([t.mask for t in trajs], torch.float32)[:, 1:],  # (B, T-1)
        "old": pad([t.logprobs for t in trajs], torch.float32)[:, 1:],  # (B, T-1)
    }


def optimizer_step(
    model, optimizer, cfg: Config, step: int, loss, update: bool = True
) -> StepOutcome:
    """Clip the gradient norm and step AdamW at this step's learning rate, unless `update` is off or a rank saw a
    non-finite loss or norm (then every rank skips); the gradients are zeroed either way."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    finite, lr = all_finite(grad_norm, loss), lr_at(cfg, step)
    if finite and update:
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm.item(), finite, lr)


class StepOutcome(NamedTuple):
    grad_norm: float
    stepped: bool  # False: the step was skipped (a non-finite loss or gradient norm on some rank)
    lr: float


class Timing(NamedTuple):
    rollout_s: float
    update_s: float  # the loss, backward and optimizer step
    sampled: int  # tokens this rank sampled


def all_finite(*xs: torch.Tensor) -> bool:
    """Whether every rank's tensors are finite: all ranks skip a step or none (one stepping alone drifts the shards)."""
    ok = torch.stack([torch.isfinite(x).all() for x in xs]).all().float()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def log_record(cfg: Config, step: int, metrics: dict, outcome: StepOutcome, timing: Timing) -> dict:
    """One line of log.jsonl: the step, its metrics (step_metrics), the optimizer's outcome, timings, memory."""
    rec = {
        "step": step + 1,
        "phase": "sft" if step < cfg.sft_steps else "grpo",
        **metrics,
        "grad_norm": outcome.grad_norm,
        "lr": outcome.lr,
        "skipped": not outcome.stepped,
        "rollout_s": round(timing.rollout_s, 3),
        "update_s": round(timing.update_s, 3),
        "peak_mem_gb": round(peak_memory_gib(), 3),
    }
    if timing.sampled:
        rec["rollout_tokens_per_s"] = round(timing.sampled / timing.rollout_s, 1)
    return rec


def step_metrics(trajs: list, scores: list, sums: StepSums) -> dict:
    """Sum over ranks in one collective, then the loss, the token-weighted loss metrics, and per-trajectory means of
    every reward key (whatever grpo.reward returns), searches, response tokens, all tokens and the advantage spread."""
    reward_keys = list(scores[0]) if scores else []
    per_traj = {
        **{k: sum(s[k] for s in scores) for k in reward_keys},
        "searches": sum(len(t.queries) for t in trajs),
        "response_tokens": sum(sum(t.mask) for t in trajs),
        "tokens": sum(len(t.ids) for t in trajs),
        "adv_sq": sums.adv_sq,
    }
    device = sums.loss.device
    counts = torch.tensor(
        [*per_traj.values(), sums.expert_rows], dtype=torch.float64, device=device
    )
    local = torch.cat([sums.loss.reshape(1), sums.per_token, sums.drift, counts])
    dist.all_reduce(local)
    loss, per_token, drift, totals = local.split([1, len(PER_TOKEN), 3, len(counts)])
    diff_sum, diff_over, diff_n = drift.tolist()
    rec = {"loss": loss.item()}
    if sums.loss_ran:
        rec.update(zip(PER_TOKEN, (per_token / max(sums.n_tok.item(), 1.0)).tolist()))
    if trajs:  # every rank has as many
        rows = len(trajs) * dist.get_world_size()
        rec.update({k: v / rows for k, v in zip(per_traj, totals.tolist())})
        rec["expert_rows"] = totals[-1].item()
    adv_sq = rec.pop("adv_sq", 0.0)
    if sums.grpo:
        rec["adv_std"] = math.sqrt(adv_sq)
    if diff_n > 0:  # engine vs trainer on the sampled tokens of each rank's first micro-batch
        rec.update(logp_diff_mean=diff_sum / diff_n, logp_diff_max=sums.extremes[2].item())
        rec["logp_diff_over_0.1"] = diff_over / diff_n
    if sums.loss_ran:
        rec.update(ratio_max=sums.extremes[0].item(), ratio_min=-sums.extremes[1].item())
    return rec


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch (this rank's device); on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Progress:
    """Rank 0's bar inside a step, so that a long one visibly moves: the rollout's finished rows and tokens, then
    the update's micro-batches, after the last step's metrics. Redrawn on a new phase, else at most once a second."""

    bar: tqdm
    metrics: str = ""  # the last step's postfix: loss, reward, accuracy, format, phase
    phase: str = ""  # what the postfix shows now: "rollout", "update" or "" (the metrics alone)
    drawn: float = 0.0  # time.monotonic() of the last redraw
    micro_done: int = 0  # the update's micro-batches done
    micro_total: int = 0  # and in all

    def show(self, phase: str, text: str) -> None:
        now = time.monotonic()
        if self.bar.disable or (phase == self.phase and now - self.drawn < 1.0):
            return
        self.phase = phase
        self.drawn = now
        shown = f"{phase} {text}"
        self.bar.set_postfix_str(f"{self.metrics} | {shown}" if self.metrics else shown)

    def on_rollout(self, rows: int) -> Callable[[int, int], None] | None:
        """rollout.rollout's on_progress over `rows` rows; None where there is no bar (ranks other than 0)."""
        if self.bar.disable:
            return None
        return lambda done, tokens: self.show("rollout", f"{done}/{rows} rows, {tokens} tokens")

    def start_update(self, micro_batches: int) -> None:
        self.micro_done = 0
        self.micro_total = micro_batches
        self.show("update", f"0/{micro_batches} micro-batches")

    def micro_batch(self) -> None:
        self.micro_done += 1
        self.show("update", f"{self.micro_done}/{self.micro_total} micro-batches")

    def step_done(self, rec: dict) -> None:
        shown = [f"{k}={rec[k]:.2f}" for k in ("loss", "reward", "accuracy", "format") if k in rec]
        self.metrics = ", ".join([*shown, f"phase={rec['phase']}"])
        self.phase = ""
        self.bar.set_postfix_str(self.metrics)


def lr_at(cfg: Config, step: int) -> float:
    """--sft-lr, then linear warm-up and cosine decay to 0: a pure function of (cfg, step), nothing to checkpoint."""
    if step < cfg.sft_steps:
        return cfg.sft_lr
    step -= cfg.sft_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_rows(cfg: Config, rows: list[dict], step: int) -> list[dict]:
    """This rank's questions: SFT and GRPO steps walk their own seeded orders, by (seed, step) alone (exact resume)."""
    sft, rank, world = step < cfg.sft_steps, dist.get_rank(), dist.get_world_size()
    per_step = cfg.sft_batch if sft else cfg.prompts_per_step
    idx = step_prompts(len(rows), step if sft else step - cfg.sft_steps, per_step, cfg.seed + sft)
    per_rank = per_step // world
    return [rows[i] for i in idx[rank * per_rank : (rank + 1) * per_rank]]


def step_prompts(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices for a step: its window of a stream that is a fresh seeded permutation of the rows each epoch."""
    first, last = step * per_step, (step + 1) * per_step - 1  # the step's positions in the stream
    perm = lambda epoch: torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)
    ).tolist()
    # the epochs it spans
    stream = [i for epoch in range(first // n, last // n + 1) for i in perm(epoch)]
    return stream[first % n : first % n + per_step]


# ---------------------------------------------- setup: the questions, the models (FSDP2), the log
def load_questions(cfg: Config) -> list[dict]:
    """A local JSONL file or an HF dataset id; either way the fields of retrieval.qa_row."""
    if Path(cfg.dataset).suffix == ".jsonl" or Path(cfg.dataset).exists():
        return retrieval.read_qa(cfg.dataset)
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
    except Exception as e:  # offline hub, typo'd id: say which and what to do instead
        raise SystemExit(
            f"train.py: error: could not load dataset {cfg.dataset!r} (split {cfg.split!r}) from the "
            f"Hugging Face hub: {type(e).__name__}: {str(e)[:200]}\n  offline? use --dataset FILE.jsonl "
            "or --preset offline"
        ) from None
    return [retrieval.qa_row(r, f"{cfg.dataset} row {i}") for i, r in enumerate(ds)]


def corpus_warning(cfg: Config, n_docs: int) -> str | None:
    """A recipe meant for a large corpus, run without --index, searches the embedded summaries: say so."""
    if cfg.index or Path(cfg.dataset).resolve() == QA_FILE:
        return None
    return (
        f"train.py: warning: no --index: searching the {n_docs:,} embedded Wikipedia summaries; questions from "
        f"{cfg.dataset} need their own corpus (--index DIR or CORPUS.jsonl)"
    )


def build_models(cfg: Config, device: torch.device, world: int):
    """The policy (fp32: the optimizer's master copy), the frozen reference (beta > 0), the tokenizer and AdamW."""
    spec, cuda = None if cfg.model in (None, "default") else cfg.model, device.type == "cuda"
    mesh = init_device_mesh(device.type, (world,))
    model, tokenizer = load_sharded(cfg, spec, torch.float32, device, mesh, train=True)
    ref_dtype = torch.bfloat16 if cuda else torch.float32  # frozen: it only computes
    ref = load_sharded(cfg, spec, ref_dtype, device, mesh, train=False)[0] if cfg.beta > 0 else None
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: only the adapters
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=cuda
    )
    return model, ref, tokenizer, optimizer


def load_sharded(
    cfg: Config, spec: str | None, dtype: torch.dtype, device: torch.device, mesh, train: bool
):
    """The policy (train: LoRA if asked) or the frozen reference, read by rank 0 alone; every rank builds it on the meta
    device, shards it, and receives its shards from rank 0 tensor by tensor (memory: its shard plus one tensor)."""
    rank, cuda, lora = dist.get_rank(), device.type == "cuda", train and cfg.lora_rank
    if rank == 0:
        full, tokenizer = rollout.load_model(spec, dtype=dtype)  # host memory
        if lora:
            rollout.add_lora(full, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if mesh.size() == 1 and not cuda:  # a CPU world of one trains rank 0's plain module
        return shard_model(full, mesh, cuda, train, len(tokenizer), cfg.grad_ckpt), tokenizer
    wait_for_rank0()  # its read, and the embedded model's first conversion
    lm, tokenizer = rollout.load_model(spec, dtype=dtype, device=device, meta=True)
    if lora:
        rollout.add_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    model = shard_model(lm, mesh, cuda, train, len(tokenizer), cfg.grad_ckpt)
    model.to_empty(device=device)
    dsd.set_model_state_dict(
        lm,
        full.state_dict() if rank == 0 else {},
        options=dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    # non-persistent buffers (rotary inv_freq) are in no state dict
    for name, buf in lm.named_buffers():
        if rank == 0:
            buf.copy_(full.get_buffer(name))
        dist.broadcast(buf, src=0)
    return model, tokenizer


class LogProbs(torch.nn.Module):
    """The FSDP root: a causal LM whose forward returns token log-probs over the tokenizer's `vocab` ids, so that the
    head (gathered with the root, around its forward only) runs inside it. Rollouts call `.lm` within unsharded()."""

    def __init__(self, lm: torch.nn.Module, vocab: int | None = None):
        super().__init__()
        self.lm, self.vocab = lm, vocab

    def forward(
        self,
        ids=None,
        attn=None,
        temperature=1.0,
        chunk_size=1024,
        with_entropy=False,
        loss_mask=None,
    ):
        if ids is None:  # unsharded() calls it without input to run FSDP's root hooks
            return None
        return grpo.token_logprobs(
            self.lm, ids, attn, temperature, chunk_size, with_entropy, loss_mask, self.vocab
        )


def shard_model(
    lm: torch.nn.Module, mesh, cuda: bool, train: bool, vocab: int, ckpt: bool = True
) -> LogProbs:
    """LogProbs(lm) under FSDP2 (frozen unless `train`): one unit per decoder layer, and the root."""
    mp = (
        MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)
        if cuda
        else MixedPrecisionPolicy()
    )
    # recompute each layer in backward: activations kept per layer = its input only
    if train and ckpt and hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.25
        lm.activation_checkpointing_enable({"use_reentrant": False})
    elif train and ckpt:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = LogProbs(lm if train else lm.requires_grad_(False), vocab)
    # a CPU world of one: FSDP would only copy every layer per forward and backward
    if mesh.size() == 1 and not cuda:
        return model
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if not train:  # FSDP2 keeps the root gathered for a backward; a frozen model's never comes
        model.set_reshard_after_forward(True)
    return model


@contextlib.contextmanager
def unsharded(model: LogProbs):
    """Gather every FSDP unit once per generation, not per decoded token. The root runs first (no input): FSDP2 makes
    the first unit to run forward its root, and the rollout calls the LM, whose first unit is a decoder layer."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    model()  # no input: FSDP's root hooks only (none on a plain module)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def start_log(run: Run) -> None:
    """Rank 0: the run directory, its config.json, log.jsonl cut back to the starting step, wandb."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(run.cfg), indent=1))
    truncate_log(run.out / "log.jsonl", run.start)
    if run.cfg.wandb:
        import wandb

        wandb.init(project="knowledge-r1", config=dataclasses.asdict(run.cfg))


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint's step (a killed run may have logged steps it never saved)."""
    if path.is_file():
        keep = [
            x
            for x in path.read_text().splitlines(keepends=True)
            if x.strip() and json.loads(x)["step"] <= step
        ]
        (tmp := path.with_suffix(".tmp")).write_text("".join(keep))
        os.replace(tmp, path)  # atomic: a kill here leaves the old log or the new one


def json_line(rec: dict) -> str:
    """One strict-JSON log line: a non-finite float (NaN or inf loss, grad norm, ...) is written as null."""
    finite = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()
    }
    return json.dumps(finite, allow_nan=False)


def log_step(run: Run, rec: dict, progress: Progress) -> None:
    """Rank 0: the step's line in log.jsonl, the bar's metrics, a skipped step's notice, wandb."""
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json_line(rec) + "\n")
    progress.step_done(rec)
    if rec["skipped"]:
        tqdm.write(f"step {rec['step']}: non-finite loss or gradient norm; update skipped")
    if run.cfg.wandb:
        import wandb

        wandb.log(rec, step=rec["step"])


# ------------------------------------------------------------------------------------ checkpoints
# state/: LoRA's base is --model's
TRAINABLE = dsd.StateDictOptions(ignore_frozen_params=True, strict=False)
# published; being written; set aside while a step is re-saved
CKPT_DIR = re.compile(r"step_(\d+)(\.tmp|\.old)?")


def sharded_state(lm: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """What state/ holds: the trainable parameters (LoRA: the adapters alone) and the optimizer's state, sharded
    as the ranks hold them. By name: a head tied to a frozen embedding is frozen too, yet ignore_frozen_params
    keeps it (it is not in named_parameters(), which lists a tied tensor once)."""
    msd, osd = dsd.get_state_dict(lm, optimizer, options=TRAINABLE)
    trainable = {name for name, p in lm.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in trainable}, osd


def save_checkpoint(run: Run, step: int, *, hf: bool) -> Path:
    """OUT/checkpoints/step_N, written whole into step_N.tmp, then published (OUT/latest) and older ones pruned
    (--keep-last). state/: the trainable parameters and the optimizer, sharded; adapter/ (LoRA); hf/ if `hf`."""
    rank, lm, cfg, out = dist.get_rank(), run.model.lm, run.cfg, run.out
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_rank0()
    # before dcp.save's collectives: rank 0 renames after
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{rank}.pt")
    msd, osd = sharded_state(lm, run.optimizer)
    # sharded: each rank writes its part
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    save_weights(tmp, lm, run.tokenizer, cfg=cfg, hf=hf)
    if rank == 0:
        trainer = {"step": step, "config": dataclasses.asdict(cfg)}
        # last: a folder with one is complete
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        publish(out, tmp, final)
        prune(out, cfg.keep_last)
    wait_for_rank0()
    return final


def save_weights(tmp: Path, lm, tokenizer, cfg: Config, *, hf: bool) -> None:
    """Rank 0 writes LoRA's adapter/ (PEFT, and the rollout settings) and, if `hf`, hf/: a plain Hugging Face folder
    (from_pretrained, kr1.py --model), LoRA merged in. Without hf/, only the trainable tensors are gathered (and a
    head tied to the frozen embedding: see sharded_state)."""
    options = dsd.StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=not hf
    )
    # a collective; only rank 0 receives (cpu_offload)
    full = dsd.get_model_state_dict(lm, options=options)
    if dist.get_rank() != 0:
        return
    if cfg.lora_rank:
        base = None if cfg.model in (None, "default") else cfg.model
        rollout.save_adapter(
            tmp / "adapter",
            full,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            targets=cfg.lora_targets,
            base=base,
        )
        kr1.write_rollout_settings(  # kr1.py runs the adapter with the budgets it was trained with
            tmp / "adapter",
            k=cfg.top_k_passages,
            max_turns=cfg.max_turns,
            max_turn_tokens=cfg.max_turn_tokens,
            max_total_tokens=cfg.max_total_tokens,
            mode="agent",
        )
    if hf:
        weights = rollout.merged(full, cfg.lora_alpha / cfg.lora_rank) if cfg.lora_rank else full
        lm.save_pretrained(tmp / "hf", state_dict=weights)
        tokenizer.save_pretrained(tmp / "hf")


def publish(out: Path, tmp: Path, final: Path) -> None:
    """Rank 0: the complete `tmp` becomes `final`, then OUT/latest names it. A `final` already there (a run resumed
    from an older checkpoint re-saves a step) is set aside first and deleted last, so a kill at any point leaves it
    or the new one whole. Between the two renames latest names a missing folder; resolve_checkpoint then takes the
    set-aside copy."""
    aside = set_aside(final)
    tmp.rename(final)
    (out / "latest.tmp").write_text(str(final.relative_to(out)))
    os.replace(out / "latest.tmp", out / "latest")  # atomic pointer swap
    remove(aside)


def set_aside(final: Path) -> Path:
    """Rename `final`, if there, to step_N.old (a leftover of an earlier interrupted save goes first); that path."""
    aside = final.with_name(final.name + ".old")
    if final.exists():
        remove(aside)
        final.rename(aside)
    return aside


def remove(ckpt: Path) -> None:
    """Delete a checkpoint folder, trainer.json first: a kill midway leaves nothing that looks complete."""
    (ckpt / "trainer.json").unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def prune(out: Path, keep: int) -> None:
    """Rank 0, after a save (--keep-last): delete the published step_N folders past the newest `keep` (by step),
    never the one OUT/latest names; `keep` 0 keeps all."""
    if keep == 0:
        return
    latest = (out / (out / "latest").read_text().strip()).resolve()
    for p in checkpoint_dirs(out, ("",))[:-keep]:
        if p.resolve() != latest:
            remove(p)


def checkpoint_dirs(out: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """OUT/checkpoints/step_N{suffix} for the suffixes asked ("" published, ".old", ".tmp"), by step then name."""
    found = []
    for p in (out / "checkpoints").glob("step_*"):
        m = CKPT_DIR.fullmatch(p.name)
        if m and (m[2] or "") in suffixes:
            found.append((int(m[1]), p.name, p))
    return [p for _, _, p in sorted(found)]


def resolve_checkpoint(spec: str) -> Path:
    """--resume's checkpoint folder: a run dir's OUT/latest, or a checkpoint dir. A save killed between its renames
    leaves latest naming a missing step_N whose complete copy is step_N.old (publish): that copy is the checkpoint.
    Anything else missing is an error that lists the complete checkpoints to resume from instead."""
    path = Path(spec)
    if (path / "latest").is_file():
        named = path / (path / "latest").read_text().strip()
        aside = named.with_name(named.name + ".old")
        if not (named / "trainer.json").is_file() and (aside / "trainer.json").is_file():
            print(
                f"train.py: note: --resume {spec}: {named.name} was being saved again; resuming from its "
                f"complete copy {aside.name}",
                file=sys.stderr,
            )
            return aside
        if not (named / "trainer.json").is_file():
            raise SystemExit(missing_latest(spec, named))
        return named
    if not (path / "trainer.json").is_file():
        raise SystemExit(
            f"train.py: error: --resume {spec}: no checkpoint there (expected trainer.json or latest)"
        )
    return path


def missing_latest(spec: str, named: Path) -> str:
    """The one-line error for a latest that names no complete checkpoint: which, and the complete ones found."""
    head = f"train.py: error: --resume {spec}: latest names {named}, which is missing or incomplete (a save was cut)"
    found = [p for p in checkpoint_dirs(Path(spec), ("", ".old")) if (p / "trainer.json").is_file()]
    if not found:
        return f"{head}; no complete checkpoint is left in {Path(spec) / 'checkpoints'}: start again without --resume"
    names = ", ".join(p.name for p in found)
    return (
        f"{head}; complete checkpoints: {names}; resume from the newest with --resume {found[-1]}"
    )


def load_checkpoint(ckpt: Path, model: LogProbs, optimizer, cfg: Config) -> int:
    """Restore a checkpoint folder (resolve_checkpoint) into the trainable parameters (LoRA: the base weights are
    --model's, read at startup), the optimizer and this rank's RNG; its step."""
    trainer = json.loads((ckpt / "trainer.json").read_text())
    was = trainer["config"]["model"]
    if cfg.lora_rank and was != cfg.model and dist.get_rank() == 0:
        print(
            f"train.py: warning: --resume {ckpt}: its LoRA adapters were trained on --model {was}, not on "
            f"{cfg.model}",
            file=sys.stderr,
        )
    msd, osd = sharded_state(model.lm, optimizer)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt / "state"))  # in place
    dsd.set_state_dict(
        model.lm, optimizer, model_state_dict=msd, optim_state_dict=osd, options=TRAINABLE
    )
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng))
    return trainer["step"]


# ---------------------------------------------------- the process group, and one line per failure
# how long the others wait for rank 0 alone: reading the model, writing hf/
SOLO_WAIT = timedelta(days=1)
# (the default group, init_distributed's gloo group over its ranks for those waits)
solo = (None, None)
HEARTBEAT = 0.25  # seconds between a rank's beats in the store (start_heartbeat)


def init_distributed(timeout_min: float = 0.0) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` becomes a world of one (same code path). Collectives
    time out after `timeout_min` (--dist-timeout); waits for rank 0's solo phases (wait_for_rank0) do not."""
    global solo
    port = str(29500 + os.getpid() % 1000)
    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(k, v)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_min) if timeout_min else None
    )
    solo = dist.group.WORLD, dist.new_group(backend="gloo", timeout=SOLO_WAIT)
    # torchrun stops the other ranks when one ends: they say why (fail)
    if dist.get_world_size() > 1:
        signal.signal(signal.SIGTERM, raise_stopped)
        start_heartbeat(dist.get_rank())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def wait_for_rank0() -> None:
    """A barrier for the end of a phase rank 0 runs alone: it is not a stalled collective, so --dist-timeout does not
    bound it (a rank that fails ends the job at once: fail()). A process group made elsewhere: its own barrier."""
    dist.barrier(group=solo[1] if solo[0] is dist.group.WORLD else None)


def fail(e: BaseException, rank: int, world: int, out: Path) -> int:
    """A failure is one line. A known error: code 2; a world of one raises the rest (its traceback). With ranks, the
    failing rank prints `train.py: rank R: error: ...` (its traceback goes to OUT/error-rankR.txt) and every other
    rank one line saying why it stops (stop_reason); each exits at once (destroy_process_group could wait in a
    collective), and torchrun ends the job."""
    known = isinstance(e, (retrieval.RetrievalError, rollout.ModelLoadError))
    why = str(e.code if isinstance(e, SystemExit) else e if known else f"{type(e).__name__}: {e}")
    why = why.removeprefix("train.py: error: ")
    if world == 1 and not known:  # a traceback, or SystemExit's own message
        raise e
    if world == 1:
        print(f"train.py: error: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's stop must not cut this report short
    if isinstance(e, Stopped) or broke_in_a_collective(e):
        print(stop_reason(rank, world, signalled=isinstance(e, Stopped)), file=sys.stderr)
        os._exit(1)
    # the first failure is the job's: a rank that fails the same way (a bad flag) says that it stops because of it
    first = mine = f"{rank}\t{why}"
    with contextlib.suppress(Exception):  # no store: say it anyway
        first = failures().compare_set("failed", "", mine).decode()
    if first != mine and first.split("\t", 1)[1] == why:
        print(
            f"train.py: rank {rank}: stopping: rank {first.split()[0]} failed the same way",
            file=sys.stderr,
        )
    else:
        print(
            f"train.py: rank {rank}: error: {why}{saved_traceback(e, rank, out)}", file=sys.stderr
        )
    sys.stdout.flush()
    os._exit(2 if known or isinstance(e, SystemExit) else 1)


class Stopped(Exception):
    """Raised in a rank that torchrun stops (SIGTERM) because another rank has ended."""


def raise_stopped(signum, frame) -> None:
    raise Stopped("stopped by torchrun")


def broke_in_a_collective(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a collective that broke or timed out: a peer failed, not this rank."""
    while e is not None:
        if isinstance(e, dist.DistError) or "gloo/transport" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def failures() -> dist.Store:
    """The job's key-value store (torchrun's agent serves it, so it outlives any rank), under a prefix of ours."""
    return dist.PrefixStore("kr1/", dist.distributed_c10d._get_default_store())


def stop_reason(rank: int, world: int, signalled: bool) -> str:
    """Why this healthy rank stops, in one line: the rank that reported a failure; else (a rank said nothing) the
    ranks whose heartbeat stopped (killed: out of memory?) or, all beating, those that never reached this roll call
    (stuck outside the collective). One rank reports them as an error line naming them."""
    try:
        store = failures()
        store.set(f"stopping/{rank}", "")
        if wait_until(lambda: store.check(["failed"]), seconds=0.5):
            return f"train.py: rank {rank}: stopping: rank {store.get('failed').split()[0].decode()} failed"
        beats = [store.add(f"beat/{r}", 0) for r in range(world)]
        time.sleep(4 * HEARTBEAT)
        # a rank that checked in is stopping like this one: only the others can be to blame
        silent = [r for r in range(world) if not store.check([f"stopping/{r}"])]
        dead = [r for r in silent if store.add(f"beat/{r}", 0) == beats[r]]
        first = store.add("reported", 1) == 1
    except Exception:  # the store is gone too: torchrun's agent has ended
        silent, dead, first = [], [], False
    ranks = ", ".join(map(str, dead or silent))
    if first and dead:
        return f"train.py: rank {ranks}: error: killed without a word (by a signal: out of memory?)"
    if first and silent:
        return f"train.py: rank {ranks}: error: stuck: no collective from it within --dist-timeout"
    if ranks:
        return f"train.py: rank {rank}: stopping: rank {ranks} ended without a word"
    return f"train.py: rank {rank}: stopping: " + ("SIGTERM" if signalled else "a peer vanished")


def wait_until(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return done()


@dataclass
class Heartbeat:
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


heartbeat = Heartbeat()


def start_heartbeat(rank: int) -> None:
    """A thread that counts this rank's beats in the store: the roll call (stop_reason) tells killed from stuck.
    stop_heartbeat() ends it before the process group goes (a store call at teardown aborts the process)."""

    def beat() -> None:
        store = failures()
        with contextlib.suppress(Exception):  # the store has gone: the job is ending
            while not heartbeat.stop.is_set():
                store.add(f"beat/{rank}", 1)
                heartbeat.stop.wait(HEARTBEAT)

    heartbeat.thread = threading.Thread(target=beat, daemon=True)
    heartbeat.thread.start()


def stop_heartbeat() -> None:
    heartbeat.stop.set()
    if heartbeat.thread is not None:
        heartbeat.thread.join()


def saved_traceback(e: BaseException, rank: int, out: Path) -> str:
    """An unexpected error's traceback, written to OUT/error-rankR.txt: the pointer to it, or "" (a known error)."""
    if isinstance(e, (SystemExit, retrieval.RetrievalError, rollout.ModelLoadError)):
        return ""
    text = "".join(traceback.format_exception(e))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"error-rank{rank}.txt").write_text(text)
        return f" (traceback: {out / f'error-rank{rank}.txt'})"
    except OSError:
        print(text, file=sys.stderr, end="")
        return ""


if __name__ == "__main__":
    sys.exit(main())
