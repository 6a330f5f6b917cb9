"""Rollout engine, second generation, on CPU: one prefill per GRPO group, searches off the decode path.

group  GRPO's sampling shape: P prompts (agent system prompt) x G samples, T = 1, N sampled tokens per row (end
       tokens and every token with a '>' are suppressed (-inf) in all engines, so each row samples exactly N):
       ours, ours with share_prefix off, rollout.py at --old-rev, HF generate(num_return_sequences=G).
grpo   agent rollouts as train.py runs them: the shipped adapter on SmolLM2, P 2Wiki train questions x G, T = 1,
       real BM25 searches over the 2Wiki corpus, the shipped budgets; ours vs rollout.py at --old-rev with the
       same seed (the trajectories are compared, so both did the same work).
wait   greedy agent rollouts of P x G distinct 2Wiki questions whose searches go to a 1M-passage synthetic
       wiki-18-layout index (bench_retrieval.py's generator; each query mapped to a 12-word Zipf query):
       search_lag 0 (the loop waits) vs 4 (a background thread); seconds the loop was blocked on search and the
       decode steps that is (blocked s / mean forward s). Greedy: every lag yields the same trajectories (checked).

  python bench/bench_engine.py --old-rev 2c2f99a --out bench/results/engine_cpu.json
  python bench/bench_engine.py --only group --old-rev c83e5c2 --repeats 3 --out bench/results/engine_group_cpu.json
  python bench/bench_engine.py --only group --prompts 2 --group 2 --new-tokens 8      # a quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_retrieval import vocabulary, write_corpus, zipf  # noqa: E402
from bench_rollout import engine_from_git, log  # noqa: E402

import retrieval  # noqa: E402
import rollout as R  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "2wiki"
SHIPPED = dict(
    max_turns=2, max_turn_tokens=64, max_total_tokens=768
)  # the shipped adapter's training budgets (k 2)


class Suppress(torch.nn.Module):
    """The model with -inf logits at `ids`: no row can end a turn or close a tag, so every row samples N tokens."""

    def __init__(self, inner, ids: list[int]):
        super().__init__()
        self.inner, self.ids, self.config = inner, ids, inner.config
        self.generation_config = inner.generation_config

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits[..., self.ids] = float("-inf")
        return out


def run(mod, model, tok, rows: list[str], search, cfg, seed: int | None = 0):
    """(trajectories, seconds, stats) of one rollout() of `mod` (an older rollout.py takes no stats)."""
    kw = {"stats": R.RolloutStats()} if mod is R else {}
    t = time.perf_counter()
    trajs = mod.rollout(
        model,
        tok,
        rows,
        search,
        cfg,
        None if seed is None else torch.Generator().manual_seed(seed),
        **kw,
    )
    return trajs, time.perf_counter() - t, dataclasses.asdict(kw["stats"]) if kw else {}


def common(mod, **kw):
    """A RolloutConfig of `mod` (an older rollout.py lacks the new fields)."""
    names = {f.name for f in dataclasses.fields(mod.RolloutConfig)}
    return mod.RolloutConfig(**{k: v for k, v in kw.items() if k in names})


def bench_group(model, tok, questions: list[str], G: int, N: int, old, repeats: int = 1) -> dict:
    ids = sorted(
        R.end_ids(tok, model) | R.token_sets(tok).with_gt
    )  # end tokens and every '>' token
    sup = Suppress(model, ids)
    rows = [q for q in questions for _ in range(G)]
    cfg = dict(mode="agent", max_turn_tokens=N, max_total_tokens=N + 1, temperature=1.0)
    res = {
        "prompts": len(questions),
        "G": G,
        "new_tokens": N,
        "repeats": repeats,
    }  # seconds: the fastest repeat
    engines = [("ours", R, dict(cfg)), ("ours_no_share", R, dict(cfg, share_prefix=False))]
    engines += [(f"rollout@{old[0]}", old[1], dict(cfg))] if old else []
    log(
        "  group warm-up (untimed, full size): the first big rollout after loading pays the allocator's growth"
    )
    run(R, sup, tok, rows, None, common(R, **cfg))
    for name, mod, kw in engines:
        mod.rollout(
            sup, tok, rows[:2], None, common(mod, **dict(kw, max_turn_tokens=2, max_total_tokens=3))
        )
        log(f"  group {name}: {len(rows)} rows x {N} tokens, x {repeats}")
        trajs, sec, st = min(
            (run(mod, sup, tok, rows, None, common(mod, **kw)) for _ in range(repeats)),
            key=lambda r: r[1],
        )
        assert all(len(t.ids) - t.prompt_len == N for t in trajs), f"{name}: a row stopped early"
        res[name] = {"s": round(sec, 2), "tok_s": round(len(rows) * N / sec, 1), **st}
    prompts = [t.ids[: t.prompt_len] for t in trajs[::G]]
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    gen = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=G,
        suppress_tokens=ids,
        pad_token_id=tok.pad_token_id,
    )
    model.generate(**enc, max_new_tokens=2, **gen)
    log(f"  group HF generate: {len(rows)} rows x {N} tokens, x {repeats}")
    torch.manual_seed(0)
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=N, **gen)
        secs.append(time.perf_counter() - t)
    sec = min(secs)
    assert out.shape == (len(rows), enc.input_ids.shape[1] + N)
    res["hf"] = {"s": round(sec, 2), "tok_s": round(len(rows) * N / sec, 1)}
    for name in [k for k in res if isinstance(res[k], dict) and k != "hf"]:
        res[name]["vs_hf"] = round(res["hf"]["s"] / res[name]["s"], 2)
    return res


def bench_grpo(model, tok, questions: list[str], G: int, search, old) -> dict:
    rows = [q for q in questions for _ in range(G)]
    res = {"prompts": len(questions), "G": G, **SHIPPED, "k": 2, "temperature": 1.0}
    engines = [("ours", R, {}), ("ours_no_share", R, {"share_prefix": False})]
    engines += [(f"rollout@{old[0]}", old[1], {})] if old else []
    out = {}
    log(
        "  grpo warm-up (untimed): the first rollout after loading pays ~5 s of allocator growth, whoever runs it"
    )
    run(R, model, tok, rows, search, common(R, temperature=1.0, **SHIPPED), seed=1)
    for name, mod, extra in engines:
        log(f"  grpo {name}: {len(rows)} rows")
        trajs, sec, st = run(
            mod, model, tok, rows, search, common(mod, temperature=1.0, **SHIPPED, **extra)
        )
        out[name] = trajs
        sampled = sum(sum(t.mask) for t in trajs)
        res[name] = {
            "s": round(sec, 2),
            "sampled_tokens": sampled,
            "tok_s": round(sampled / sec, 1),
            "n_searches": sum(len(t.queries) for t in trajs),
            **st,
        }
    for name in out:
        res[name]["same_trajectories_as_ours"] = sum(
            a.ids == b.ids for a, b in zip(out["ours"], out[name])
        )
    if old:  # wall time compares equal work only when the trajectories are the same (same sampler and seed)
        res["speedup_vs_old"] = round(res[f"rollout@{old[0]}"]["s"] / res["ours"]["s"], 2)
        res["tok_s_vs_old"] = round(res["ours"]["tok_s"] / res[f"rollout@{old[0]}"]["tok_s"], 2)
    return res


def big_index(n: int, vocab: int) -> retrieval.Index:
    """The synthetic n-passage index, built once into runs/bench-engine/ (~3.4 GiB peak, ~3 min at 1M)."""
    out = ROOT / "runs" / "bench-engine" / f"index-{n}"
    if not out.is_dir():  # Index.build is atomic: a directory is a whole index
        corpus = out.parent / f"synthetic-{n}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_corpus(corpus, n, vocab, 100)
        retrieval.Index.build(corpus, out)
        corpus.unlink()
    return retrieval.Index.load(out)


def zipf_search(index: retrieval.Index, vocab: int, k: int):
    """search() that sends each query as a 12-word Zipf query of the synthetic corpus (seeded by the query's text):
    a search over a big index costs what a real one does, whatever the model asked."""
    voc = vocabulary(vocab)

    def search(queries):
        mapped = []
        for q in queries:
            seed = int.from_bytes(hashlib.sha1(q.encode()).digest()[:8], "little")
            mapped.append(" ".join(voc[zipf(np.random.default_rng(seed), vocab, (12,))]))
        return index.search(mapped, k=k)

    return search


def bench_wait(model, tok, questions: list[str], search, n: int) -> dict:
    res = {"rows": len(questions), "index_passages": n, **SHIPPED, "greedy": True}
    ref = None
    for lag in (0, 4):
        log(f"  wait search_lag {lag}: {len(questions)} rows")
        trajs, sec, st = run(
            R,
            model,
            tok,
            questions,
            search,
            R.RolloutConfig(greedy=True, search_lag=lag, **SHIPPED),
        )
        ref = ref or [t.ids for t in trajs]
        assert [t.ids for t in trajs] == ref, "greedy rollouts must not depend on search_lag"
        step = st["forward_s"] / (st["forwards"] - 1)  # the steps after the prefill
        res[f"lag_{lag}"] = {
            "s": round(sec, 2),
            "searches": st["searches"],
            "forwards": st["forwards"],
            "mean_forward_ms": round(1e3 * step, 1),
            "search_wait_s": round(st["search_wait_s"], 3),
            "steps_lost": round(st["search_wait_s"] / step, 1),
        }
    base = res["lag_0"]["steps_lost"]
    res["lag_4"]["steps_lost_vs_lag0"] = (
        round(res["lag_4"]["steps_lost"] / base, 3) if base else None
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=["group", "grpo", "wait"], help="run one part")
    p.add_argument(
        "--prompts",
        type=int,
        default=4,
        help="distinct prompts (group, grpo); wait: prompts x group",
    )
    p.add_argument("--group", type=int, default=8, help="G samples per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="group: sampled tokens per row")
    p.add_argument("--old-rev", help="also run rollout.py of this git revision (group, grpo)")
    p.add_argument(
        "--index-passages", type=int, default=1_000_000, help="wait: synthetic index size"
    )
    p.add_argument("--vocab", type=int, default=300_000, help="wait: synthetic vocabulary")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--repeats", type=int, default=1, help="group: runs per engine, the fastest counts"
    )
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    res = {
        "device": f"CPU ({os.cpu_count()} cores)",
        "commit": commit,
        "threads": a.threads,
        "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
        "torch": torch.__version__,
    }
    old = (a.old_rev, engine_from_git(a.old_rev)) if a.old_rev else None
    qa = [r["question"] for r in retrieval.read_qa(DATA / "train.jsonl")]
    if a.only in (None, "group"):
        model, tok = R.load_model(None)
        res["group"] = bench_group(
            model, tok, qa[: a.prompts], a.group, a.new_tokens, old, a.repeats
        )
    if a.only in (None, "grpo", "wait"):
        model, tok = R.load_model(None, adapter=ROOT / "data" / "smollm2-kr1-lora")
        res["model"] += " + the shipped adapter (grpo, wait)"
    if a.only in (None, "grpo"):
        index = retrieval.open_index(DATA / "corpus.jsonl")
        res["grpo"] = bench_grpo(
            model, tok, qa[: a.prompts], a.group, lambda qs: index.search(qs, k=2), old
        )
    if a.only in (None, "wait"):
        search = zipf_search(big_index(a.index_passages, a.vocab), a.vocab, 2)
        search(["compile numba's kernels outside the timings"])
        res["wait"] = bench_wait(model, tok, qa[: a.prompts * a.group], search, a.index_passages)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
