"""The one statistics function of trm-diag: summary.json, the gate and every reader use it.

An infinite value is a value: a token with probability 0 on one side has KL = +inf, and
the mean, maxima and upper quantiles that include it are +inf (so a rule `<= 0.05` fails).
NaN means "no value" (non-finite logits) and is skipped; how many values were infinite and
how many NaN is counted with every statistic.
"""

from __future__ import annotations

import math

import numpy as np

# statistic -> quantile (None: the mean)
STATS: dict[str, float | None] = {
    "mean": None,
    "p50": 0.5,
    "p90": 0.9,
    "p99": 0.99,
    "p999": 0.999,
    "max": 1.0,
    "min": 0.0,
}
COUNTS = ("n_inf", "n_nan")


def describe(x: np.ndarray, stats: tuple[str, ...] = tuple(STATS)) -> dict[str, float]:
    """The requested statistics of x (NaN skipped, +/-inf kept) plus n_inf and n_nan."""
    x = np.asarray(x, dtype=np.float64).ravel()
    nan = np.isnan(x)
    out: dict[str, float] = {}
    x = x[~nan]
    n_inf = int(np.isinf(x).sum())
    if x.size == 0:
        out.update(dict.fromkeys(stats, math.nan))
    else:
        names = [s for s in stats if STATS[s] is not None]
        if "mean" in stats:
            with np.errstate(invalid="ignore"):  # +inf and -inf together: no mean (NaN)
                out["mean"] = float(x.mean())
        if names:
            # interpolating towards an infinity gives NaN, so then take the order statistic above
            qs = np.quantile(x, [STATS[s] for s in names], method="linear" if n_inf == 0 else "higher")
            out.update({s: float(v) for s, v in zip(names, qs)})
        out = {s: out[s] for s in stats}
    out["n_inf"] = n_inf
    out["n_nan"] = int(nan.sum())
    return out


def statistic(x: np.ndarray, stat: str) -> float:
    """One statistic of x, as :func:`describe` computes it."""
    return describe(x, (stat,))[stat]


UPPER_Z = 1.645  # one-sided 95%: the normal quantile an upper confidence value of a mean adds standard errors at


def upper_mean(n: int, total: float, total_sq: float, z: float = UPPER_Z) -> float:
    """Upper one-sided confidence value of a mean, mean + z s / sqrt(n), from n values' sum and sum of squares
    (s: their sample standard deviation), so ranks can add their sums; the mean itself when n < 2 (no spread).
    An infinite sum gives +-inf."""
    if n < 1:
        return math.nan
    mean = total / n
    if n < 2 or not math.isfinite(total) or not math.isfinite(total_sq):
        return mean
    var = max(0.0, (total_sq - total * mean) / (n - 1))  # rounding can take a zero spread a hair below 0
    return mean + z * math.sqrt(var / n)
