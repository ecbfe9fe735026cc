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


# one-sided 95% quantiles of Student's t by degrees of freedom, to 4 decimals; beyond 30 the Cornish-Fisher
# series around the normal's quantile (error < 1e-6)
T95 = (6.3138, 2.92, 2.3534, 2.1318, 2.015, 1.9432, 1.8946, 1.8595, 1.8331, 1.8125, 1.7959, 1.7823, 1.7709,
       1.7613, 1.7531, 1.7459, 1.7396, 1.7341, 1.7291, 1.7247, 1.7207, 1.7171, 1.7139, 1.7109, 1.7081, 1.7056,
       1.7033, 1.7011, 1.6991, 1.6973)  # fmt: skip
Z95 = 1.6448536269514722


def t95(df: int) -> float:
    """The one-sided 95% quantile of Student's t with df >= 1 degrees of freedom."""
    if df <= len(T95):
        return T95[df - 1]
    z, v = Z95, float(df)
    return (
        z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )  # fmt: skip


def upper_mean(n: int, total: float, total_sq: float) -> float:
    """Upper one-sided 95% confidence value of a mean, mean + t95(n - 1) s / sqrt(n), from n values' sum and sum
    of squares (s: their sample standard deviation), so ranks can add their sums. NaN for n < 2 (no spread to
    bound the mean by); an infinite sum gives +-inf."""
    if n < 2:
        return math.nan
    mean = total / n
    if not math.isfinite(total) or not math.isfinite(total_sq):
        return mean
    var = max(0.0, (total_sq - total * mean) / (n - 1))  # rounding can take a zero spread a hair below 0
    return mean + t95(n - 1) * math.sqrt(var / n)
