"""Paired comparison of two `kr1.py --eval --out` files over the same questions: is B better than A?

For each file: EM (mean over questions). Between them, on the questions both answered: how many answers B gained
(A wrong, B right) and lost, the exact McNemar p-value (two-sided binomial test on the discordant pairs), and a
paired bootstrap 95 % interval of EM(B) - EM(A) (questions resampled with replacement); then the same per question
kind (grpo.question_kind: open / two-option / yes-no), beside the score a guess gets on that kind (0.5 for two
options, the majority answer's share for yes/no) and the exact binomial p of B against it, and per 2Wiki `type`.
A file may hold several samples per question (sampled evaluation, T > 0): a question's score is then the mean
over its samples, and the bootstrap resamples questions (clustered by question). McNemar needs one 0/1 score per
question, so it is reported for single-sample (greedy) files only.

    python bench/paired_eval.py bench/results/grpo-gain/eval/start.jsonl bench/results/grpo-gain/eval/final.jsonl
    python bench/paired_eval.py A.jsonl B.jsonl --metric f1 --json      # one JSON object instead of the table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402  (the repo root is not a package)


class Questions(NamedTuple):
    scores: dict[str, float]  # question id -> mean score over its samples
    types: dict[str, str]  # id -> 2Wiki type ("(none)" where the file has none)
    kinds: dict[str, str]  # id -> grpo.question_kind
    yes: dict[str, bool]  # id -> whether the gold answer is "yes" (yes-no questions)
    samples: int  # the largest number of samples of one question


def per_question(path: str, metric: str) -> Questions:
    """A kr1.py --eval --out file, question by question (a kind: from the row, or from its question and answers)."""
    scores, q = defaultdict(list), Questions({}, {}, {}, {}, 0)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec.get("id") or rec["question"]
                scores[key].append(float(rec[metric]))
                kind = rec.get("kind") or grpo.question_kind(rec["question"], rec["answers"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
                raise SystemExit(
                    f"paired_eval.py: error: {path}:{lineno}: not a kr1.py --eval record with "
                    f"'{metric}', 'question' and 'answers' ({type(e).__name__}: {e})"
                ) from None
            q.types[key], q.kinds[key] = rec.get("type") or "(none)", kind
            q.yes[key] = grpo.normalize_answer(rec["answers"][0]) == "yes"
    samples = max((len(v) for v in scores.values()), default=0)
    return q._replace(scores={k: sum(v) / len(v) for k, v in scores.items()}, samples=samples)


def chance(kind: str, keys: list[str], yes: dict[str, bool]) -> float | None:
    """What a guess scores on these questions: a coin between two named options, or always the majority answer."""
    if kind == "two-option":
        return 0.5
    if kind == "yes-no":
        share = sum(yes[k] for k in keys) / len(keys)
        return max(share, 1 - share)
    return None


def binomial_p(successes: int, n: int, p: float) -> float:
    """Two-sided exact binomial test: P(an outcome no more likely than `successes` | n trials at p)."""
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    return min(1.0, sum(x for x in pmf if x <= pmf[successes] * (1 + 1e-9)))


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a split of the gained + lost discordant pairs at least this uneven | 1/2)."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_ci(diff: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of per-question differences, questions resampled with replacement."""
    if len(diff) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))  # (n_boot, n)
    means = diff[idx].mean(axis=1)  # (n_boot,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def compare(a: dict[str, float], b: dict[str, float], keys: list[str], single: bool) -> dict:
    """EM of each, gained / lost, McNemar p (single-sample files) and the bootstrap interval on `keys`."""
    xa = np.array([a[k] for k in keys], dtype=np.float64)  # (n,)
    xb = np.array([b[k] for k in keys], dtype=np.float64)  # (n,)
    gained, lost = int(((xb > xa) & (xa == 0)).sum()), int(((xb < xa) & (xb == 0)).sum())
    lo, hi = bootstrap_ci(xb - xa)
    out = {
        "n": len(keys),
        "a": float(xa.mean()) if len(keys) else float("nan"),
        "b": float(xb.mean()) if len(keys) else float("nan"),
        "diff": float((xb - xa).mean()) if len(keys) else 0.0,
        "ci95": [lo, hi],
        "gained": gained,
        "lost": lost,
    }
    if single:
        out["mcnemar_p"] = mcnemar_exact(gained, lost)
    return out


def report(path_a: str, path_b: str, metric: str = "em") -> dict:
    a, b = per_question(path_a, metric), per_question(path_b, metric)
    keys = [k for k in a.scores if k in b.scores]
    if not keys:
        raise SystemExit(f"paired_eval.py: error: {path_a} and {path_b} share no question ids")
    single = max(a.samples, b.samples) == 1 and metric in ("em", "cover_em")
    by_type, by_kind = defaultdict(list), defaultdict(list)
    for k in keys:
        by_type[a.types[k]].append(k)
        by_kind[a.kinds[k]].append(k)
    kinds = {}
    for kind in ("open", "two-option", "yes-no"):
        if ks := by_kind.get(kind):
            kinds[kind] = {
                **compare(a.scores, b.scores, ks, single),
                "chance": chance(kind, ks, a.yes),
            }
            if single and kinds[kind]["chance"] is not None:
                right = round(sum(b.scores[k] for k in ks))
                kinds[kind]["b_vs_chance_p"] = binomial_p(right, len(ks), kinds[kind]["chance"])
    types = {t: compare(a.scores, b.scores, ks, single) for t, ks in sorted(by_type.items())}
    return {
        "a": path_a,
        "b": path_b,
        "metric": metric,
        "samples_per_q": [a.samples, b.samples],
        "only_in_one": len(a.scores) + len(b.scores) - 2 * len(keys),
        "all": compare(a.scores, b.scores, keys, single),
        "by_kind": kinds,
        "by_type": types,
    }


def print_table(r: dict) -> None:
    print(
        f"A = {r['a']}\nB = {r['b']}\n{r['metric']}, samples per question {r['samples_per_q']}"
        + (
            f", {r['only_in_one']} questions in one file only (left out)"
            if r["only_in_one"]
            else ""
        )
    )
    print(
        f"{'':20} {'n':>5} {'A':>7} {'B':>7} {'B-A':>7} {'95% CI (bootstrap)':>20} {'gained':>7} {'lost':>5} "
        f"{'McNemar p':>10} {'chance':>7} {'B vs chance p':>14}"
    )
    rows = [
        ("all", r["all"]),
        *((f"kind: {k}", c) for k, c in r["by_kind"].items()),
        *((f"type: {t}", c) for t, c in r["by_type"].items()),
    ]
    for name, c in rows:
        p = f"{c['mcnemar_p']:.2g}" if "mcnemar_p" in c else "-"
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        guess = f"{c['chance']:.3f}" if c.get("chance") is not None else "-"
        vs = f"{c['b_vs_chance_p']:.2g}" if "b_vs_chance_p" in c else "-"
        print(
            f"{name:20} {c['n']:5d} {c['a']:7.3f} {c['b']:7.3f} {c['diff']:+7.3f} {ci:>20} {c['gained']:7d} "
            f"{c['lost']:5d} {p:>10} {guess:>7} {vs:>14}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the baseline's per-question file (kr1.py --eval --out)")
    p.add_argument("b", help="the candidate's per-question file, same questions")
    p.add_argument(
        "--metric",
        default="em",
        choices=["em", "f1", "cover_em"],
        help="per-question score (default em)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    r = report(args.a, args.b, args.metric)
    print(json.dumps(r)) if args.json else print_table(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
