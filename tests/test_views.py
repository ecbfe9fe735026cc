"""The three views of truncated sampling against an independent float64 reference (numpy, row by row)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trm_diag.config import SamplingConfig
from trm_diag.views import kept_set, view_columns


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference_keep(z, s):
    """vLLM's order, one row: min_p on probabilities, then top-k on logits (ties kept), then top-p."""
    keep = np.ones_like(z, dtype=bool)
    if s.min_p > 0:
        p = _softmax(z)
        keep &= p >= s.min_p * p.max()
    if s.top_k > 0:
        kth = np.sort(z[keep])[::-1][min(s.top_k, keep.sum()) - 1]
        keep &= z >= kth
    if s.top_p < 1:
        idx = np.flatnonzero(keep)
        p = _softmax(z[idx])
        order = np.argsort(p, kind="stable")  # ascending
        cum = np.cumsum(p[order])
        drop = cum <= 1 - s.top_p
        drop[-1] = False
        keep[idx[order[drop]]] = False
    return keep


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) if y > 0 else math.inf for x, y in zip(a, b) if x > 0)


SETTINGS = [
    SamplingConfig(temperature=0.8, top_p=0.9),
    SamplingConfig(temperature=0.8, top_k=5),
    SamplingConfig(temperature=0.8, min_p=0.1),
    SamplingConfig(temperature=0.7, top_p=0.8, top_k=20, min_p=0.02),
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.8, top_p=0.9, logprobs="raw"),
    SamplingConfig(temperature=0.7, logprobs="raw"),
]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"T{s.temperature}-p{s.top_p}-k{s.top_k}-m{s.min_p}-{s.logprobs}")
def test_views_match_a_float64_reference(s):
    rng = np.random.default_rng(0)
    n, V = 24, 300
    za = rng.normal(0, 3, (n, V))
    zb = za + rng.normal(0, 0.05, (n, V))  # a second engine's logits: close, not equal
    ta, tb = za / s.temperature, zb / s.temperature
    y = np.array([rng.choice(V, p=_softmax(ta[i]) * _reference_keep(ta[i], s) / (_softmax(ta[i]) * _reference_keep(ta[i], s)).sum()) for i in range(n)])  # fmt: skip
    got = view_columns(torch.from_numpy(ta).float(), torch.from_numpy(tb).float(), torch.from_numpy(y), s)
    ta, tb = torch.from_numpy(ta).float().double().numpy(), torch.from_numpy(tb).float().double().numpy()
    for i in range(n):
        p, q = _softmax(ta[i]), _softmax(tb[i])
        keep = _reference_keep(ta[i], s)
        keep[y[i]] = True
        m, qm = p[keep].sum(), q[keep].sum()
        pt = np.where(keep, p / m, 0.0)
        qt = np.where(keep, q / qm, 0.0)
        want = {
            "kept_mass": m, "kept_count": keep.sum(), "train_kept_mass": qm,
            "support_differs": bool((_reference_keep(tb[i], s) != keep).any()),
            "lr_full": math.log(q[y[i]]) - math.log(p[y[i]]),
            "lr_pipeline": math.log(q[y[i]]) - math.log(pt[y[i]]),
            "lr_replay": math.log(qt[y[i]]) - math.log(pt[y[i]]),
            "kl_full": _kl(p, q), "kl_rev_full": _kl(q, p), "tv_full": 0.5 * np.abs(p - q).sum(),
            "kl_pipeline": _kl(pt, q), "kl_rev_pipeline": _kl(q, pt), "tv_pipeline": 0.5 * np.abs(pt - q).sum(),
            "kl_replay": _kl(pt, qt), "kl_rev_replay": _kl(qt, pt), "tv_replay": 0.5 * np.abs(pt - qt).sum(),
        }  # fmt: skip
        if s.logprobs == "raw":  # the engine hands the trainer log r(y): r = softmax(logits), untempered
            r = _softmax(ta[i] * s.temperature)
            want.update(kl_pipeline=_kl(r, q), kl_rev_pipeline=_kl(q, r), tv_pipeline=0.5 * np.abs(r - q).sum(),
                        lr_pipeline=math.log(q[y[i]]) - math.log(r[y[i]]), lp_roll_pipeline=math.log(r[y[i]]))  # fmt: skip
        for k, w in want.items():
            g = got[k][i].item()
            if isinstance(w, (bool, np.bool_)) or math.isinf(w):
                assert g == w, (k, i, g, w)
            else:
                assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-12), (k, i, g, w)
    # pipeline and replay are finite in the forward direction; the identities hold row by row
    for v in ("pipeline", "replay"):
        assert torch.isfinite(got[f"kl_{v}"]).all() and torch.isfinite(got[f"tv_{v}"]).all()
    assert torch.isfinite(got["kl_rev_replay"]).all()
    # pipeline = full + log p(y) - log pi_roll(y): log M with processed log-probs
    shift = got["lp_roll_full"] - got["lp_roll_pipeline"]
    if s.logprobs == "processed":
        torch.testing.assert_close(shift, got["kept_mass"].log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["lr_pipeline"], got["lr_full"] + shift, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["lr_replay"], got["lr_full"] + got["kept_mass"].log() - got["train_kept_mass"].log(), rtol=0, atol=1e-12)  # fmt: skip
    if not s.truncated:  # without truncation replay and full coincide, and pipeline too unless raw and tempered
        for k in ("kl", "kl_rev", "tv", "lr"):
            a, b, c = (got[f"{k}_{v}"] for v in ("pipeline", "replay", "full"))
            torch.testing.assert_close(b, c, rtol=0, atol=1e-12)
            if not s.has_views:
                torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
        assert torch.allclose(got["kept_mass"], torch.ones(n, dtype=torch.float64)) and not got["support_differs"].any()
    if s.logprobs == "raw":  # tempering alone is a mismatch of the pipeline view: far above the numerics
        assert (got["kl_pipeline"] > 10 * got["kl_full"]).all()


def test_kept_set_agrees_with_the_float32_sampler():
    """The float64 kept set and the sampler's own float32 processing keep the same tokens (away from ties)."""
    from trm_diag.sampling import processed_logprobs

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(0, 3, (64, 500)))
    for s in SETTINGS:
        keep = kept_set((x.float() / s.temperature).double(), s)  # the same float32 tempered logits
        lp = processed_logprobs(x.float(), s)
        assert torch.equal(keep, torch.isfinite(lp)), s
