"""stats.describe, the one statistics function, against a float64 reference with infinities and NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.helpers import t95_reference
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


def test_t95_matches_the_t_distribution():
    from trm_diag.math.stats import t95

    for df in (*range(1, 31), 31, 35, 40, 60, 100, 1000):
        tol = 5e-5 if df <= 30 else 1e-6  # the table's 4 decimals; the series' error beyond it
        assert abs(t95(df) - t95_reference(df)) <= tol, df


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upper_mean_matches_statistics_on_random_values(seed):
    """mean + t95(n - 1) s / sqrt(n) from sums and sums of squares, against the statistics module (exact
    fractions) and the t quantile by root-finding."""
    import statistics

    from trm_diag.math.stats import upper_mean

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    x = [float(v) for v in rng.normal(loc=rng.uniform(-1, 1), scale=rng.uniform(0.01, 2), size=n)]
    want = statistics.fmean(x) + t95_reference(n - 1) * statistics.stdev(x) / math.sqrt(n)
    got = upper_mean(n, math.fsum(x), math.fsum(v * v for v in x))
    se = statistics.stdev(x) / math.sqrt(n)
    assert abs(got - want) <= 5e-5 * se + 1e-12  # t95's table holds 4 decimals: its error times the standard error


def test_upper_mean_edges():
    from trm_diag.math.stats import upper_mean

    assert math.isnan(upper_mean(1, -0.25, 0.0625))  # one value: no spread to bound the mean by
    assert math.isnan(upper_mean(0, 0.0, 0.0))
    # three equal values: the mean, up to the sum of squares' cancellation (a spread of sqrt(eps) x the mean)
    assert upper_mean(3, 0.3, 0.03) == pytest.approx(0.1, abs=3 * 0.1 * math.sqrt(2**-52))
    assert upper_mean(2, math.inf, math.inf) == math.inf
