"""Plot a train.py log (OUT/log.jsonl) into one PNG: reward, format, accuracy, support recall, searches per
trajectory, response length, loss, entropy and seconds per step; a dashed line marks where the SFT warm-start ends
and GRPO begins. Steps without a rollout (SFT steps between probes) simply have no point in the rollout panels.

    pip install matplotlib      # only this script needs it (the `bench` extra)
    python bench/plot_log.py runs/smollm2-2wiki/log.jsonl --out runs/smollm2-2wiki/curves.png
"""

import argparse
import json
from pathlib import Path

PANELS = [
    ("reward", "reward (accuracy + format + support)"),
    ("format", "format reward (+1 / -1)"),
    ("accuracy", "accuracy (EM or F1: --acc)"),
    ("support", "support recall (gold titles read)"),
    ("searches", "searches per trajectory"),
    ("response_tokens", "sampled tokens per trajectory"),
    ("loss", "loss (SFT: NLL/token; GRPO: surrogate)"),
    ("entropy", "entropy (nats/token, GRPO)"),
    ("seconds", "seconds per step (rollout + update)"),
]


def moving_mean(ys: list[float], w: int) -> list[float]:
    return [
        sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
        for i in range(len(ys))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="OUT/log.jsonl written by train.py")
    p.add_argument("--out", help="PNG path (default: beside the log)")
    p.add_argument(
        "--smooth", type=int, default=5, help="moving-average window in points (default 5)"
    )
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"plot_log.py: error: {a.log} has no steps")
    for r in rows:
        r["seconds"] = r.get("rollout_s", 0.0) + r.get("update_s", 0.0)
    sft_end = max((r["step"] for r in rows if r.get("phase") == "sft"), default=None)
    fig, axes = plt.subplots(3, 3, figsize=(15, 9.6))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]  # null: a skipped step
        if pts:
            xs, ys = zip(*pts)
            w = max(1, min(a.smooth, len(ys)))
            ax.plot(xs, ys, "o-" if len(xs) < 40 else "-", alpha=0.35, ms=3, label="per step")
            legend = f"mean of {w}"
            for sft in (
                True,
                False,
            ):  # the mean restarts at GRPO: SFT probes are sparse, another regime
                ph = [
                    (r["step"], r[key])
                    for r in rows
                    if r.get(key) is not None and (r.get("phase") == "sft") == sft
                ]
                if ph:
                    ax.plot(
                        [x for x, _ in ph], moving_mean([y for _, y in ph], w), c="C1", label=legend
                    )
                    legend = None
        if sft_end is not None:
            ax.axvline(sft_end + 0.5, ls="--", c="gray", lw=1, label="SFT | GRPO")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(a.out) if a.out else Path(a.log).with_name("curves.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out} ({len(rows)} steps)")


if __name__ == "__main__":
    main()
