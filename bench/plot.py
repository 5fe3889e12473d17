"""Speedup and roofline fraction per shape, as a PNG (matplotlib optional)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path


def _by_shape(rows: list[dict], impl: str, key: str, op: str | None = None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["impl"] == impl and key in r and (op is None or r["op"] == op):
            out.setdefault(r["shape"], []).append(r[key])
    return out


def plot(rows: list[dict], primary: str, path: Path) -> bool:
    """Top: geometric-mean speedup of the primary over each baseline, per shape (all dtypes,
    layouts, fields and ops). Bottom: the primary's median % of the copy roofline per shape and op.
    Returns False (with a message) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no plot", file=sys.stderr)
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    baselines = list(dict.fromkeys(r["impl"] for r in rows if "speedup" in r and r["impl"] != primary))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 1.8 * len(shapes)), 7), constrained_layout=True)

    def bars(ax, series: dict[str, dict[str, list[float]]], summary) -> None:
        width = 0.8 / max(len(series), 1)
        for k, (name, per_shape) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i, s in enumerate(shapes) if s in per_shape]
            ax.bar(xs, [summary(per_shape[s]) for s in shapes if s in per_shape], width, label=name)
        ax.set_xticks(range(len(shapes)), [s.replace(" ", "\n") for s in shapes])
        ax.legend(fontsize="small")

    bars(ax1, {b: _by_shape(rows, b, "speedup") for b in baselines},
         lambda v: math.exp(statistics.fmean(map(math.log, v))))
    ax1.axhline(1, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel(f"baseline time / {primary} time\n(geometric mean)")
    bars(ax2, {op: {s: [100 * x for x in v] for s, v in _by_shape(rows, primary, "roofline", op).items()}
               for op in ops}, statistics.median)
    ax2.set_ylabel(f"{primary}: % of copy roofline\n(median)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
