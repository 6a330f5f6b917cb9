"""Markdown before/after table from the per-question files of bench/eval_learning.sh (kr1.py --eval --out).

    python bench/eval_table.py runs/smollm2-2wiki/eval
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

TYPES = ("compositional", "comparison", "bridge_comparison", "inference")


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python bench/eval_table.py EVAL_DIR")
    print("| cell | n | EM | F1 | cover-EM | tagged | well-formed | searches/q | " + " | ".join(
        f"EM {t}" for t in TYPES) + " |")
    print("|---|" + "---:|" * (7 + len(TYPES)))
    for f in sorted(Path(sys.argv[1]).glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)
        by_type = defaultdict(list)
        for r in rows:
            by_type[r.get("type")].append(r["em"])
        cells = [f"{sum(by_type[t]) / len(by_type[t]):.3f} ({len(by_type[t])})" if by_type[t] else "" for t in TYPES]
        print(f"| {f.stem} | {len(rows)} | {mean('em'):.3f} | {mean('f1'):.3f} | {mean('cover_em'):.3f} | "
              f"{mean('tagged'):.3f} | {mean('well_formed'):.3f} | "
              f"{sum(len(r['queries']) for r in rows) / len(rows):.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
