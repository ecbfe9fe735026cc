"""The report's figures as PNG bytes (matplotlib, no pyplot state, no display needed).

Each function takes the numbers summary.json keeps (or bounds rows) and returns one PNG; report.html
embeds them and `bounds --plot` writes one. Good practice throughout: a title, labelled axes with
units, log scales where values span decades, a distinct colour and line style per series.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 2, 1, 2)), "-", "--")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _figure(width: float = 7.0, height: float = 4.0, cols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _finite(values: Sequence[Any]) -> list[float]:
    """Plot data with None and +-inf as NaN (a gap in the line; infinities break matplotlib's transforms)."""
    return [float(v) if v is not None and math.isfinite(v) else math.nan for v in values]


def _spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return len(pos) > 1 and math.log10(max(pos) / min(pos)) >= decades


def _style(i: int) -> dict[str, Any]:
    return {"color": COLOURS[i % len(COLOURS)], "linestyle": STYLES[i % len(STYLES)]}


def profile_png(profile: dict[str, Any], labels: dict[str, str]) -> bytes:
    """Token divergences along the response: one panel per column, mean (solid) and p99 (dashed) per
    position bin."""
    cols = [c for c in profile.get("columns", []) if f"{c}_mean" in profile]
    fig, axes = _figure(4.2 * len(cols), 3.6, len(cols))
    x = [(lo + hi) / 2 for lo, hi in zip(profile["pos_lo"], profile["pos_hi"])]
    for i, (ax, c) in enumerate(zip(axes, cols)):
        mean, p99 = _finite(profile[f"{c}_mean"]), _finite(profile[f"{c}_p99"])
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(x, mean, marker="o", markersize=3, label="mean", color=colour, linestyle="-")
        ax.plot(x, p99, label="p99", color=colour, linestyle="--", alpha=0.7)
        if _spans_decades(list(mean) + list(p99)):
            ax.set_yscale("log")
        ax.set_title(labels.get(c, c))
        ax.set_xlabel("position in the response (tokens)")
        ax.set_ylabel(f"{labels.get(c, c)} per token")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Token mismatch along the response")
    return _png(fig)


def acceptance_png(by_length: list[dict[str, Any]], series: dict[str, str], target: float) -> bytes:
    """Acceptance per length bucket: each criterion as measured, TRM-Max's (1 - p)^T prediction dashed,
    the paper's target as a dotted line."""
    fig, (ax,) = _figure(7.0, 4.0)
    x = [r["mean_T"] for r in by_length]
    for i, (key, label) in enumerate(series.items()):
        y = [100 * v for v in _finite([r.get(key) for r in by_length])]
        ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], label=label, **_style(i))
    ax.axhline(100 * target, color="black", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("response length T (tokens, mean of the bucket)")
    ax.set_ylabel("sequences accepted (%)")
    ax.set_title("Acceptance versus length: measured and predicted")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def bounds_png(rows: list[dict[str, Any]], labels: dict[str, str], unified: str, observed_T: int | None) -> bytes:
    """Every bound and B* against the horizon T (log-log), the vacuous region (>= 1) shaded."""
    fig, (ax,) = _figure(7.5, 4.6)
    names = list(dict.fromkeys(r["bound"] for r in rows))
    top = 1.0
    for i, name in enumerate(n for n in names if n != unified):
        pts = sorted((r["T"], r["value"]) for r in rows if r["bound"] == name and r["value"] is not None)
        pts = [(t, v) for t, v in pts if v > 0 and math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), label=labels.get(name, name), linewidth=1.2, **_style(i))
            top = max(top, max(v for _, v in pts))
    pts = sorted((r["T"], r["value"]) for r in rows if r["bound"] == unified and r["value"] is not None)
    pts = [(t, v) for t, v in pts if v > 0 and math.isfinite(v)]
    if pts:
        ax.plot(*zip(*pts), label=labels.get(unified, unified), color="black", linewidth=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhspan(1.0, top * 10, color="red", alpha=0.08)
    ax.axhline(1.0, color="red", linewidth=1, label="vacuous (>= 1)")
    if observed_T:
        ax.axvline(observed_T, color="grey", linestyle=":", linewidth=1, label=f"observed T = {observed_T:,}")
    ax.set_xlabel("horizon T (tokens)")
    ax.set_ylabel("bound on the surrogate error")
    ax.set_title("Trust-region bounds versus horizon (B* = the smallest)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def histogram_png(hist: dict[str, Any], xlabel: str) -> bytes:
    """Counts per bin (log scale): a bias shows as an off-centre peak, heavy tails as wide shoulders."""
    fig, (ax,) = _figure(7.0, 3.8)
    edges, counts = hist["edges"], hist["counts"]
    if counts:
        ax.stairs(counts, edges, fill=True, color=COLOURS[0], alpha=0.7)
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":")
        if max(counts) > 0:
            ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title("Distribution of the sampled token's log ratio")
    ax.grid(alpha=0.3)
    return _png(fig)


def breakdown_png(rows: list[dict[str, Any]], title: str, xlabel: str) -> bytes:
    """Per bucket: the share of tokens next to the share of the KL (or the mean |log ratio| when the tier
    has no per-token KL): a bucket whose KL share far exceeds its token share is where the mismatch sits."""
    import numpy as np

    fig, (ax,) = _figure(6.0, 3.6)
    x = np.arange(len(rows))
    names = [str(r["range"]) for r in rows]
    if any("kl_share" in r for r in rows):
        ax.bar(x - 0.2, [100 * r["token_share"] for r in rows], 0.4, label="share of tokens", color=COLOURS[0])
        ax.bar(x + 0.2, [100 * (r.get("kl_share") or 0.0) for r in rows], 0.4, label="share of KL", color=COLOURS[1])
        ax.set_ylabel("share (%)")
        ax.legend(fontsize=8)
    else:
        ax.bar(x, _finite([r["abs_log_ratio_mean"] for r in rows]), 0.6, color=COLOURS[0])
        ax.set_ylabel("mean |log ratio| per token")
    ax.set_xticks(x, names)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def routing_png(per_layer: list[float]) -> bytes:
    """MoE router flips per layer: the fraction of tokens whose top-k expert set differs."""
    fig, (ax,) = _figure(7.0, 3.4)
    ax.bar(range(len(per_layer)), [100 * v for v in per_layer], color=COLOURS[3])
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens with a flipped expert set (%)")
    ax.set_title("MoE routing flips per layer")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def steps_png(
    steps: Sequence[int],
    series: dict[str, Sequence[Any]],
    title: str,
    ylabel: str,
    marks: Sequence[tuple[int, int, str]] = (),
    target: tuple[float, str] | None = None,
    percent: bool = False,
) -> bytes:
    """Metrics versus training step (a run's rows), one line per series; ``marks`` (first step, last step,
    label): a flagged step as a red dotted line, a flagged stretch shaded; ``target``: a dotted level."""
    fig, (ax,) = _figure(7.5, 3.8)
    scale = 100.0 if percent else 1.0
    values = {k: [scale * v for v in _finite(ys)] for k, ys in series.items()}
    every = [v for ys in values.values() for v in ys if not math.isnan(v)]
    for i, (label, ys) in enumerate(values.items()):
        ax.plot(steps, ys, label=label, marker=MARKERS[i % len(MARKERS)], markersize=2.5, linewidth=1.2, **_style(i))
    for j, (first, last, label) in enumerate(marks):
        lab = label if label not in [m[2] for m in marks[:j]] else None
        if last > first:
            ax.axvspan(first, last, color="red", alpha=0.08, label=lab)
        else:
            ax.axvline(first, color="red", linestyle=":", linewidth=1.2, label=lab)
    if target is not None:
        ax.axhline(scale * target[0], color="black", linestyle=":", linewidth=1, label=target[1])
    if not percent and every and min(every) > 0 and _spans_decades(every):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
