"""processed_logprobs against a plain float64 re-implementation written differently (descending order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trm_diag.config import SamplingConfig
from trm_diag.math.sampling import processed_logprobs


def ref_row(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    x = logits.astype(np.float64)
    if s.temperature > 0:
        x = x / s.temperature
    keep = np.ones_like(x, dtype=bool)
    if s.temperature > 0:
        if s.min_p > 0:
            p = np.exp(x - x.max())
            p /= p.sum()
            keep &= p >= s.min_p * p.max()
        if s.top_k > 0:
            kth = np.sort(x[keep])[::-1][min(s.top_k, keep.sum()) - 1]
            keep &= x >= kth
        if s.top_p < 1:
            z = np.where(keep, x, -np.inf)
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            before = 0.0
            for i in order:  # keep token i iff the mass strictly above it is < top_p
                if before >= s.top_p:
                    keep[i] = False
                before += p[i]
    z = np.where(keep, x, -np.inf)
    m = z[keep].max()
    return z - (m + math.log(np.exp(z[keep] - m).sum()))


SETTINGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=0),
    SamplingConfig(temperature=1.3, top_k=5),
    SamplingConfig(temperature=0.8, top_p=0.9),
    SamplingConfig(temperature=1.0, min_p=0.05),
    SamplingConfig(temperature=0.6, top_k=20, top_p=0.8, min_p=0.02),
]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}")
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_processed_matches_reference(s, scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(5, 64, generator=g) * scale
    got = processed_logprobs(logits, s).double().numpy()
    for row, ref in zip(got, (ref_row(r, s) for r in logits.numpy())):
        assert np.array_equal(np.isinf(row), np.isinf(ref)), "support differs"
        fin = np.isfinite(ref)
        np.testing.assert_allclose(row[fin], ref[fin], rtol=1e-5, atol=1e-5)
        assert math.isclose(np.exp(row[fin]).sum(), 1.0, rel_tol=1e-5)
