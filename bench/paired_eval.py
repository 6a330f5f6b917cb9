"""Paired comparison of two `kr1.py --eval --out` files over the same questions: is B better than A?

For each file: EM (mean over questions). Between them, on the questions both answered: how many answers B gained
(A wrong, B right) and lost, the exact McNemar p-value (two-sided binomial test on the discordant pairs), and a
paired bootstrap 95 % interval of EM(B) - EM(A) (questions resampled with replacement); then the same per 2Wiki
`type`. A file may hold several samples per question (sampled evaluation, T > 0): a question's score is then the
mean over its samples, and the bootstrap resamples questions (clustered by question). McNemar needs one 0/1
score per question, so it is reported for single-sample (greedy) files only.

    python bench/paired_eval.py bench/results/grpo-gain/eval/start.jsonl bench/results/grpo-gain/eval/final.jsonl
    python bench/paired_eval.py A.jsonl B.jsonl --metric f1 --json      # one JSON object instead of the table
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import numpy as np


def per_question(path: str, metric: str) -> tuple[dict[str, float], dict[str, str], int]:
    """{question id: mean score over its samples}, {id: type}, the largest number of samples of one question."""
    scores, types = defaultdict(list), {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec.get("id") or rec["question"]
                scores[key].append(float(rec[metric]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"paired_eval.py: error: {path}:{lineno}: not a kr1.py --eval record with "
                                 f"'{metric}' ({type(e).__name__}: {e})") from None
            types[key] = rec.get("type") or "all"
    return {k: sum(v) / len(v) for k, v in scores.items()}, types, max((len(v) for v in scores.values()), default=0)


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
    out = {"n": len(keys), "a": float(xa.mean()) if len(keys) else float("nan"),
           "b": float(xb.mean()) if len(keys) else float("nan"), "diff": float((xb - xa).mean()) if len(keys) else 0.0,
           "ci95": [lo, hi], "gained": gained, "lost": lost}
    if single:
        out["mcnemar_p"] = mcnemar_exact(gained, lost)
    return out


def report(path_a: str, path_b: str, metric: str = "em") -> dict:
    a, types, na = per_question(path_a, metric)
    b, _, nb = per_question(path_b, metric)
    keys = [k for k in a if k in b]
    if not keys:
        raise SystemExit(f"paired_eval.py: error: {path_a} and {path_b} share no question ids")
    single = max(na, nb) == 1 and metric in ("em", "cover_em")
    by_type = defaultdict(list)
    for k in keys:
        by_type[types[k]].append(k)
    return {"a": path_a, "b": path_b, "metric": metric, "samples_per_q": [na, nb],
            "only_in_one": len(a) + len(b) - 2 * len(keys), "all": compare(a, b, keys, single),
            "by_type": {t: compare(a, b, ks, single) for t, ks in sorted(by_type.items())}}


def print_table(r: dict) -> None:
    print(f"A = {r['a']}\nB = {r['b']}\n{r['metric']}, samples per question {r['samples_per_q']}"
          + (f", {r['only_in_one']} questions in one file only (left out)" if r["only_in_one"] else ""))
    print(f"{'':20} {'n':>5} {'A':>7} {'B':>7} {'B-A':>7} {'95% CI (bootstrap)':>20} {'gained':>7} {'lost':>5} "
          f"{'McNemar p':>10}")
    for name, c in [("all", r["all"]), *r["by_type"].items()]:
        p = f"{c['mcnemar_p']:.2g}" if "mcnemar_p" in c else "-"
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        print(f"{name:20} {c['n']:5d} {c['a']:7.3f} {c['b']:7.3f} {c['diff']:+7.3f} {ci:>20} {c['gained']:7d} "
              f"{c['lost']:5d} {p:>10}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the baseline's per-question file (kr1.py --eval --out)")
    p.add_argument("b", help="the candidate's per-question file, same questions")
    p.add_argument("--metric", default="em", choices=["em", "f1", "cover_em"], help="per-question score (default em)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    r = report(args.a, args.b, args.metric)
    print(json.dumps(r)) if args.json else print_table(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
