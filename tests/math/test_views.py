"""The three views of truncated sampling against an independent float64 reference (numpy, row by row)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trm_diag.config import SamplingConfig
from trm_diag.math.views import kept_set, view_columns


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_kept_set(z, s):
    """The kept set of one row of tempered logits z, from vLLM's documented semantics, in float64 and in
    descending order (sampling.truncate sorts ascending in float32): min_p keeps p_v >= min_p * max p;
    top-k keeps every token whose logit is >= the k-th largest (ties with the k-th stay); top-p, on the
    distribution renormalised over what is left, keeps a token while the mass ranked strictly above it is
    below top_p (the smallest prefix reaching top_p; the most likely token always stays).

    Tie rule: tokens of equal logit have equal probability, and which of them vLLM's sort ranks first is
    unspecified (torch.sort, stable=False). Where such a block straddles the top-p cut, the count kept is
    still fixed: member i (0-based, in whatever order) has above + i * p_tie ranked above it. Returns
    (sure, tied, n_tied, margin): the tokens kept whatever the order, the straddling block (empty when
    none) of which exactly n_tied are kept, and the smallest relative distance of any decision from its
    threshold (for callers that compare with a float32 decision)."""
    z = np.asarray(z, dtype=np.float64)
    keep = np.ones(z.shape, dtype=bool)
    tied, n_tied, margin = np.zeros(0, dtype=np.int64), 0, math.inf
    if s.greedy or not s.truncated:
        return keep, tied, n_tied, margin
    if s.min_p > 0:
        ratio = np.exp(z - z.max())  # p_v / max p
        keep &= ratio >= s.min_p
        margin = min(margin, float(np.abs(ratio / s.min_p - 1).min()))
    if s.top_k > 0:
        desc = np.sort(z[keep])[::-1]
        if s.top_k < desc.size:
            keep &= z >= desc[s.top_k - 1]
    if s.top_p < 1:
        ids = np.flatnonzero(keep)
        prob = _softmax(z[ids])
        above = 0.0  # mass of the tokens ranked above the current block
        for v in np.unique(z[ids])[::-1]:  # distinct logits, largest first
            members = ids[z[ids] == v]
            pv = float(prob[z[ids] == v][0])
            ahead = above + pv * np.arange(members.size)  # mass ranked above each member, in any order
            margin = min(margin, float(np.abs(ahead / s.top_p - 1).min()))
            n = int((ahead < s.top_p).sum())
            if n < members.size:
                keep[members] = False
                if n:
                    tied, n_tied = members, n
                keep[ids[z[ids] < v]] = False  # everything ranked below: the mass above it reaches top_p
                break
            above += pv * members.size
    return keep, tied, n_tied, margin


def _reference_keep(z, s):
    """The reference kept set of a row without a tied block at the top-p cut (random real-valued logits)."""
    keep, tied, _, _ = reference_kept_set(z, s)
    assert tied.size == 0, "a tied block straddles the cut: use reference_kept_set"
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


TIE_SETTINGS = [  # each step alone, and all three together (vLLM's order: min_p -> top_k -> top_p)
    SamplingConfig(temperature=0.8, top_p=0.9),
    SamplingConfig(temperature=0.8, top_p=0.5),
    SamplingConfig(temperature=0.8, top_k=5),
    SamplingConfig(temperature=0.8, top_k=40),
    SamplingConfig(temperature=0.8, min_p=0.1),
    SamplingConfig(temperature=0.7, top_p=0.8, top_k=20, min_p=0.02),
    SamplingConfig(temperature=0.7, top_p=0.95, top_k=3),
]


def _check_against_reference(t32: torch.Tensor, s: SamplingConfig) -> tuple[int, int]:
    """kept_set of float32 tempered logits t32 [n, V] against reference_kept_set row by row; returns the
    rows checked and how many of them had a tied block at the top-p cut. A row with a decision within
    float32 rounding of its threshold (a V-term float32 cumulative sum: V * eps) is skipped: there the
    float64 reference cannot referee the engine's float32 decision."""
    got = kept_set(t32, s).numpy()
    rows = t32.double().numpy()  # exactly the float32 values the engine decides on
    tol = rows.shape[-1] * np.finfo(np.float32).eps
    checked = n_tied = 0
    for i, z in enumerate(rows):
        sure, tied, count, margin = reference_kept_set(z, s)
        if margin <= tol:
            continue
        checked += 1
        outside = np.ones(z.size, dtype=bool)
        outside[tied] = False
        assert np.array_equal(got[i][outside], sure[outside]), (s, i, np.flatnonzero(got[i] != sure))
        assert int(got[i][tied].sum()) == count, (s, i, tied, count)
        n_tied += tied.size > 0
    return checked, n_tied


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"T{s.temperature}-p{s.top_p}-k{s.top_k}-m{s.min_p}")
def test_kept_set_matches_vllms_rule_on_real_valued_logits(s):
    """Away from ties: the engine's float32 kept set is the float64 reference's, token for token."""
    rng = np.random.default_rng(3)
    t32 = (torch.from_numpy(rng.normal(0, 3, (64, 500))) / s.temperature).float()
    checked, n_tied = _check_against_reference(t32, s)
    assert checked >= 60 and n_tied == 0


@pytest.mark.parametrize("s", TIE_SETTINGS, ids=lambda s: f"p{s.top_p}-k{s.top_k}-m{s.min_p}")
def test_kept_set_on_bfloat16_ties_follows_the_tie_rule(s):
    """bf16 logits tie often: every token tied with the k-th stays; a tied block at the top-p cut keeps
    exactly the count the cumulative rule gives, and nothing outside it differs from the reference."""
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(0, 2, (200, 256))).to(torch.bfloat16)  # an engine's bf16 rows
    t32 = logits.float() / s.temperature
    checked, n_tied = _check_against_reference(t32, s)
    assert checked >= 180
    if s.top_p < 1:  # the rule was exercised: some cuts fell inside a tied block
        assert n_tied > 0
    if s.top_k and s.top_p == 1 and s.min_p == 0:  # ties with the k-th stay: more than k kept somewhere
        assert (kept_set(t32, s).sum(-1) > s.top_k).any()


def test_kept_set_ties_by_hand():
    """Hand-made rows whose kept sets follow from the rule alone."""
    s = SamplingConfig(temperature=1.0, top_k=2)
    row = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])  # the 2nd largest logit (1.0) is tied three ways: all stay
    assert kept_set(row, s).tolist() == [[True, True, True, True, False]]
    # probabilities 0.4 and ten tokens of 0.06: mass above the i-th tied token is 0.4 + 0.06 i; top_p 0.62
    # keeps the top token and the tied tokens with 0.4 + 0.06 i < 0.62, i = 0..3: four of the ten
    probs = torch.tensor([0.4] + [0.06] * 10, dtype=torch.float64)
    got = kept_set(probs.log()[None].float(), SamplingConfig(temperature=1.0, top_p=0.62))[0]
    assert bool(got[0]) and int(got[1:].sum()) == 4
    got = kept_set(probs.log()[None].float(), SamplingConfig(temperature=1.0, top_p=0.39))[0]
    assert got.tolist() == [True] + [False] * 10  # the most likely token always stays
