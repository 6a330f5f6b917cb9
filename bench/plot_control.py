"""The trained policy beside its control arm, step by step: two train.py logs of the same prompts and sampling seeds,
one with GRPO updates, one with --no-update (the frozen starting policy). Question difficulty moves both curves the
same way at each step, so the per-step difference (trained - control) is what the updates did. One PNG: accuracy,
reward, format, support recall and searches of both arms (those both logs have; thin: per step; thick: moving mean),
and the running mean of the difference in accuracy with a ±2 standard-error band. Also prints the mean difference
by quarter, of accuracy and, where both logs have it, of support recall.

    python bench/plot_control.py runs/grpo-gain/trained/log.jsonl runs/grpo-gain/control/log.jsonl \\
        --out bench/results/grpo-gain/control.png
"""

import argparse
import json
import math
from pathlib import Path

from plot_log import moving_mean  # bench/ is on sys.path when run as a script

CURVES = ("accuracy", "reward", "format", "support", "searches")  # the per-step log keys plotted


def grpo_steps(path: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if r.get("phase") == "grpo"}


def running_diff(d: list[float]) -> tuple[list[float], list[float]]:
    """Running mean of the per-step differences and its standard error (steps treated as independent)."""
    means, ses = [], []
    for i in range(1, len(d) + 1):
        m = sum(d[:i]) / i
        var = sum((x - m) ** 2 for x in d[:i]) / max(1, i - 1)
        means.append(m)
        ses.append(math.sqrt(var / i))
    return means, ses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trained", help="log.jsonl of the run with updates")
    p.add_argument("control", help="log.jsonl of the same run with --no-update")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument(
        "--smooth", type=int, default=8, help="moving-average window in steps (default 8)"
    )
    a = p.parse_args()
    tr, co = grpo_steps(a.trained), grpo_steps(a.control)
    steps = sorted(set(tr) & set(co))
    if not steps:
        raise SystemExit("plot_control.py: error: the two logs share no GRPO step")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if all(k in r for r in (tr[steps[0]], co[steps[0]]))]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    axes = axes.flatten()
    for ax in axes[len(keys) : -1]:
        ax.axis("off")
    for ax, key in zip(axes, keys):
        for arm, rows, color in (("trained (GRPO)", tr, "C0"), ("control (--no-update)", co, "C3")):
            ys = [rows[s][key] for s in steps]
            ax.plot(steps, ys, color=color, alpha=0.25, lw=1)
            ax.plot(steps, moving_mean(ys, a.smooth), color=color, lw=2, label=arm)
        ax.set_title(f"{key} (sampled, same prompts and seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    diff = [tr[s]["accuracy"] - co[s]["accuracy"] for s in steps]
    m, se = running_diff(diff)
    axes[-1].plot(steps, m, color="k", lw=2)
    axes[-1].fill_between(
        steps, [x - 2 * e for x, e in zip(m, se)], [x + 2 * e for x, e in zip(m, se)], alpha=0.2
    )
    axes[-1].axhline(0, color="grey", lw=1, ls="--")
    axes[-1].set_title("accuracy: trained - control, running mean ± 2 s.e.")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    for key in ("accuracy", "support"):
        if key in keys:
            print_quarters(key, steps, [tr[s][key] - co[s][key] for s in steps])
    print(f"figure {a.out}")


def print_quarters(key: str, steps: list[int], diff: list[float]) -> None:
    """The mean per-step difference (trained - control) by quarter of the run, then over all of it."""
    q = max(1, len(steps) // 4)
    for i in range(0, len(steps), q):
        part = diff[i : i + q]
        print(
            f"steps {steps[i]}-{steps[min(i + q, len(steps)) - 1]}: {key} trained - control "
            f"{sum(part) / len(part):+.3f} (mean of {len(part)} steps)"
        )
    m, se = running_diff(diff)
    print(f"all {len(steps)} steps: {key} trained - control {m[-1]:+.3f} ± {se[-1]:.3f} (s.e.)")


if __name__ == "__main__":
    main()
