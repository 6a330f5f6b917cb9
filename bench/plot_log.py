"""Plot a train.py log (OUT/log.jsonl): reward, format and accuracy per step, into one PNG.

    pip install matplotlib      # only this script needs it (the `bench` extra)
    python bench/plot_log.py runs/smollm2-2wiki/log.jsonl --out runs/smollm2-2wiki/curves.png
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="OUT/log.jsonl written by train.py")
    p.add_argument("--out", help="PNG path (default: beside the log)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window in steps (default 5)")
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"plot_log.py: error: {a.log} has no steps")
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("reward", "format", "accuracy"),
                              ("reward (accuracy + format)", "format reward (+1 / -1)", "accuracy (EM)"), strict=True):
        ys = [r[key] for r in rows]
        w = max(1, min(a.smooth, len(ys)))
        avg = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(steps, ys, alpha=0.3, label="per step")
        ax.plot(steps, avg, label=f"mean of {w}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out = Path(a.out) if a.out else Path(a.log).with_name("curves.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(rows)} steps)")


if __name__ == "__main__":
    main()
