"""stats.describe, the one statistics function, against a float64 reference with infinities and NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trm_diag.math.stats import STATS, describe, statistic


@pytest.mark.parametrize("seed", range(5))
def test_describe_matches_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(-6, 2, size=rng.integers(1, 400))
    finite = x.copy()
    got = describe(x)
    for stat, q in STATS.items():
        want = finite.mean() if q is None else np.quantile(finite, q)
        assert math.isclose(got[stat], float(want), rel_tol=1e-12), stat
    assert got["n_inf"] == 0 and got["n_nan"] == 0


def test_an_infinite_value_is_a_value_and_nan_is_skipped():
    x = np.array([0.01, 0.02, np.inf, np.nan, 0.03, np.nan])
    d = describe(x)
    assert d["max"] == math.inf and d["mean"] == math.inf and d["n_inf"] == 1 and d["n_nan"] == 2
    assert d["min"] == 0.01 and d["p50"] == 0.03  # order statistic above the middle of 4 values
    assert not (d["max"] <= 0.05)  # what the gate's `<=` sees
    assert statistic(x, "max") == math.inf
    assert math.isnan(describe(np.array([np.inf, -np.inf]))["mean"])
    empty = describe(np.array([np.nan]))
    assert all(math.isnan(empty[s]) for s in STATS) and empty["n_nan"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upper_mean_matches_statistics_on_random_values(seed):
    """mean + 1.645 s / sqrt(n) from sums and sums of squares, against the statistics module (exact fractions)."""
    import statistics

    from trm_diag.math.stats import upper_mean

    rng = np.random.default_rng(seed)
    x = [
        float(v) for v in rng.normal(loc=rng.uniform(-1, 1), scale=rng.uniform(0.01, 2), size=int(rng.integers(2, 300)))
    ]
    want = statistics.fmean(x) + 1.645 * statistics.stdev(x) / math.sqrt(len(x))
    got = upper_mean(len(x), math.fsum(x), math.fsum(v * v for v in x))
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15)


def test_upper_mean_edges():
    from trm_diag.math.stats import upper_mean

    assert upper_mean(1, -0.25, 0.0625) == -0.25  # one value: no spread, the value itself
    # three equal values: the mean, up to the sum of squares' cancellation (a spread of sqrt(eps) x the mean)
    assert upper_mean(3, 0.3, 0.03) == pytest.approx(0.1, abs=2 * 0.1 * math.sqrt(2**-52))
    assert math.isnan(upper_mean(0, 0.0, 0.0))
    assert upper_mean(2, math.inf, math.inf) == math.inf
