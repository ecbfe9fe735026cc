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
