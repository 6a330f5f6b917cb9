"""Markdown before/after table from the per-question files of bench/eval_learning.sh (kr1.py --eval --out).

EM per question kind (grpo.question_kind) beside the score a guess gets on it (two-option: 0.5; yes-no: the
majority answer's share), then per 2Wiki type.

    python bench/eval_table.py runs/smollm2-2wiki/eval
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402  (the repo root is not a package)

KINDS = ("open", "two-option", "yes-no")
TYPES = ("compositional", "comparison", "bridge_comparison", "inference")


def mean_cell(scores: list[float], guess: float | None = None) -> str:
    """'EM (n)', or 'EM (n; guess g)' for a kind a guess can score on."""
    if not scores:
        return ""
    extra = f"; guess {guess:.2f}" if guess is not None else ""
    return f"{sum(scores) / len(scores):.3f} ({len(scores)}{extra})"


def kind_cells(rows: list[dict]) -> list[str]:
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r.get("kind") or grpo.question_kind(r["question"], r["answers"])].append(r)
    yes = [grpo.normalize_answer(r["answers"][0]) == "yes" for r in by_kind["yes-no"]]
    majority = max(sum(yes), len(yes) - sum(yes)) / len(yes) if yes else None
    guess = {"open": None, "two-option": 0.5, "yes-no": majority}
    return [mean_cell([r["em"] for r in by_kind[k]], guess[k]) for k in KINDS]


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python bench/eval_table.py EVAL_DIR")
    head = ["cell", "n", "EM", "F1", "cover-EM", "tagged", "well-formed", "searches/q"]
    head += [f"EM {k}" for k in KINDS] + [f"EM {t}" for t in TYPES]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for f in sorted(Path(sys.argv[1]).glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        mean = lambda k: f"{sum(float(r[k]) for r in rows) / len(rows):.3f}"
        by_type = defaultdict(list)
        for r in rows:
            by_type[r.get("type")].append(r["em"])
        searches = f"{sum(len(r['queries']) for r in rows) / len(rows):.2f}"
        cells = [
            f.stem,
            str(len(rows)),
            *map(mean, ("em", "f1", "cover_em", "tagged", "well_formed")),
            searches,
        ]
        cells += kind_cells(rows) + [mean_cell(by_type[t]) for t in TYPES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
