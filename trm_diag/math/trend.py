"""What changed when, over a training run's steps (docs/trend.md): spikes above the run's own noise
floor, sustained drifts, and the first step a mask's acceptance falls below the paper's 70%.

Pure numpy over per-step series (one value per step, steps ascending). The rules and their numbers
are data (TrendConfig), so `trend`, `gate RUN` and `Monitor.update` flag the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAD_SCALE = 1.4826  # MAD x 1.4826 estimates the standard deviation of normal noise
# the gap both rules watch: mean |log ratio| (mean |delta logp|), first order in the mismatch; k3 is second order
# (its step-to-step noise is twice as large, relatively) and k1 is signed
SPIKE_METRICS = ("abs_log_ratio_mean",)
DRIFT_METRICS = ("abs_log_ratio_mean",)
ACCEPT_CRITERIA = ("trm_max", "trm_avg")  # the paper's masks; their 70% advice (docs/design.md section 4)


@dataclass(frozen=True)
class TrendConfig:
    """The rules' numbers (docs/trend.md says why each)."""

    window: int = 20  # trailing steps that give a step's noise floor (the step itself excluded)
    min_window: int = 5  # fewer earlier steps than this: no spike is judged
    spike_z: float = 6.0  # robust z-score (x - median) / (1.4826 MAD) at or above which a step spikes
    spike_ratio: float = 2.0  # ... and the value at least this many times the window's median
    scale_floor: float = 1e-6  # the noise scale never below this (identical sides give MAD 0)
    scale_rel: float = 0.1  # ... nor below this fraction of the median (a MAD of a few steps can be tiny)
    drift_window: int = 50  # steps over which the slope is fitted
    drift_min: int = 20  # fewer steps than this: no drift is judged (a sustained drift spans many steps)
    drift_noise: float = 4.0  # the rise over the window at least this many noise scales
    drift_rel: float = 0.5  # ... and at least this fraction of the fitted level at the window's start
    acceptance: float = 0.7  # the paper's advice: keep at least 70% of the sequences


ACTIONS = {
    "spike": "check weight sync / staleness: the sampler may have served old weights at this step (a skipped or "
    "failed weight update, a sleep-mode engine woken without the new weights, an async lag that jumped)",
    "drift": "the gap grows step after step: check a growing off-policy lag (async staleness), a precision or "
    "kernel change, longer responses; `trm-diag sweep` names the setting that carries the mismatch",
    "acceptance": "the mask drops more than 30% of the sequences from this step on: find the mismatch's source "
    "(`trm-diag sweep`) or choose a threshold for the horizon (`trm-diag bounds --budget`)",
}


@dataclass
class Flag:
    """One finding over the steps: kind (spike, drift, acceptance), the metric, its first step (and last for a
    drift), the numbers behind it, the action it suggests and a one-line message."""

    kind: str
    metric: str
    step: int
    last_step: int
    value: float
    detail: dict[str, float] = field(default_factory=dict)
    message: str = ""

    @property
    def action(self) -> str:
        return ACTIONS[self.kind]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "step": self.step, "last_step": self.last_step,
                "value": self.value, **self.detail, "message": self.message, "action": self.action}  # fmt: skip


def robust_z(values: np.ndarray, i: int, cfg: TrendConfig) -> tuple[float, float]:
    """(robust z-score of values[i] against the cfg.window finite values before it, their median); z is NaN
    with fewer than cfg.min_window of them. Scale: 1.4826 MAD, at least cfg.scale_rel x |median| and cfg.scale_floor."""
    prev = values[max(0, i - cfg.window) : i]
    prev = prev[np.isfinite(prev)]
    if prev.size < cfg.min_window or not np.isfinite(values[i]):
        return math.nan, math.nan
    med = float(np.median(prev))
    scale = max(MAD_SCALE * float(np.median(np.abs(prev - med))), cfg.scale_rel * abs(med), cfg.scale_floor)
    return (float(values[i]) - med) / scale, med


def is_spike(values: np.ndarray, i: int, cfg: TrendConfig) -> tuple[bool, float, float]:
    """Whether step i's gap is far above the trailing noise floor: z >= spike_z and value >= spike_ratio x median."""
    z, med = robust_z(values, i, cfg)
    hit = bool(z >= cfg.spike_z and values[i] >= cfg.spike_ratio * med)
    return hit, z, med


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil-Sen line: the median of the pairwise slopes and the median intercept (robust to a spike)."""
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    slope = float(np.median((y[j] - y[i])[ok] / dx[ok])) if ok.any() else 0.0
    return slope, float(np.median(y - slope * x))


def drift_at(steps: np.ndarray, values: np.ndarray, i: int, cfg: TrendConfig) -> dict[str, float] | None:
    """The drift over the cfg.drift_window steps ending at i, when there is one: the fitted rise is at least
    drift_noise noise scales (1.4826 MAD of the residuals) and drift_rel of the fitted starting level. Returns
    the slope per step, the rate per 100 steps (absolute, and in percent of the start), the rise and the noise."""
    lo = max(0, i - cfg.drift_window + 1)
    x, y = steps[lo : i + 1].astype(np.float64), values[lo : i + 1]
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < cfg.drift_min:
        return None
    slope, icpt = theil_sen(x, y)
    start = icpt + slope * x[0]
    rise = slope * (x[-1] - x[0])
    noise = max(MAD_SCALE * float(np.median(np.abs(y - (icpt + slope * x)))), cfg.scale_floor)
    if slope <= 0 or rise < cfg.drift_noise * noise or rise < cfg.drift_rel * abs(start):
        return None
    rel = 100.0 * (100.0 * slope) / start if start > 0 else math.inf  # percent of the starting level
    return {"slope": slope, "per_100_steps": 100.0 * slope, "relative_per_100_steps": rel, "rise": rise,
            "noise": noise, "start_level": start}  # fmt: skip


def first_below(steps: np.ndarray, values: np.ndarray, limit: float) -> int | None:
    """Index of the first step whose value is below limit (NaN never is), or None."""
    hit = np.flatnonzero(values < limit)
    return int(hit[0]) if hit.size else None


def trend_flags(series: dict[str, np.ndarray], cfg: TrendConfig | None = None) -> list[Flag]:
    """Every flag over a run: ``series`` maps 'step' and metric names to per-step arrays (steps ascending).
    A spike per step that jumps; a drift per stretch of consecutive drifting windows (reported at its last
    window); a criterion's first step under cfg.acceptance."""
    cfg = cfg or TrendConfig()
    steps = np.asarray(series["step"], dtype=np.int64)
    out: list[Flag] = []
    for m in SPIKE_METRICS:
        if m not in series:
            continue
        v = np.asarray(series[m], dtype=np.float64)
        for i in range(len(v)):
            hit, z, med = is_spike(v, i, cfg)
            if hit:
                msg = f"step {steps[i]}: {m} {v[i]:.3g} is {v[i] / med if med > 0 else math.inf:.3g}x the trailing median {med:.3g} (robust z {z:.3g})"
                out.append(Flag("spike", m, int(steps[i]), int(steps[i]), float(v[i]),
                                {"z": z, "median": med}, msg))  # fmt: skip
    for m in DRIFT_METRICS:
        if m not in series:
            continue
        v = np.asarray(series[m], dtype=np.float64)
        current: Flag | None = None
        for i in range(len(v)):
            d = drift_at(steps, v, i, cfg)
            if d is None:
                current = None
                continue
            if current is None:
                current = Flag("drift", m, int(steps[i]), int(steps[i]), float(v[i]))
                out.append(current)
            current.last_step, current.value, current.detail = int(steps[i]), float(v[i]), d
            current.message = (
                f"steps {current.step}-{current.last_step}: {m} rises {d['per_100_steps']:.3g} per 100 steps "
                f"({d['relative_per_100_steps']:.3g}% of its level {d['start_level']:.3g}; noise {d['noise']:.3g})"
            )
    for c in ACCEPT_CRITERIA:
        m = f"accept_{c}"
        if m not in series:
            continue
        v = np.asarray(series[m], dtype=np.float64)
        i = first_below(steps, v, cfg.acceptance)
        if i is not None:
            below = np.flatnonzero(v < cfg.acceptance)
            msg = (
                f"step {steps[i]}: {m} {v[i]:.1%} is below {cfg.acceptance:.0%} ({len(below)} of {len(v)} steps "
                f"below; last step {'unknown (no tokens)' if np.isnan(v[-1]) else format(v[-1], '.1%')})"
            )
            out.append(Flag("acceptance", m, int(steps[i]), int(steps[below[-1]]), float(v[i]),
                            {"steps_below": float(len(below))}, msg))  # fmt: skip
    return out
