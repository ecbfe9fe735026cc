"""Token columns: a batch of rollouts scored together, in chunks that span rollouts, gives the same
columns as each rollout scored alone in one chunk (chunked and unchunked paths agree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import token_columns
from trm_diag.math.scoring import batch_columns
from trm_diag.schema import TIER_ONLY, TOKEN_COLUMNS, tier_columns
from trm_diag.types import Rollout, TensorRows

V = 60


class _Unnormalised(TensorRows):
    """Rows whose scores() are logits shifted by an arbitrary constant per row (like HF's lazy head)."""

    shift = 0.0

    def scores(self, start: int, stop: int) -> torch.Tensor:
        x = self.logp[start:stop]
        return x + torch.arange(stop - start, dtype=x.dtype)[:, None] * self.shift


def _batch(seed: int, topk: bool, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    rollouts, p_rows, q_rows = [], [], []
    for j, T in enumerate([5, 0, 17, 1, 9]):
        a = torch.randn(T, V, generator=g) * 3
        lp = torch.log_softmax(a, -1)
        lq = torch.log_softmax(a + 0.2 * torch.randn(T, V, generator=g), -1)
        if j == 3:
            lq[0, 4] = math.nan  # one non-finite row
        ids = torch.randint(0, V, (T,), generator=g).tolist()
        extra = {}
        if topk and j != 2:  # one rollout without top-K data
            top = lp.topk(6, -1)
            extra = {"topk": [dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)], "topk_k": 6}
        rollouts.append(Rollout(j, j, 0, [1, 2], ids, lp[torch.arange(T), ids].tolist(), "length", extra))
        p_rows.append(TensorRows(lp))
        q_rows.append(_Unnormalised(lq, normalized=False))
        q_rows[-1].shift = shift
    return rollouts, p_rows, q_rows


@pytest.mark.parametrize("fidelity", ["exact", "topk", "sampled"])
def test_batched_chunks_across_rollouts_equal_one_by_one(fidelity):
    rollouts, p_rows, q_rows = _batch(3, topk=fidelity == "topk")
    p = p_rows if fidelity == "exact" else None
    together = batch_columns(rollouts, p, q_rows, fidelity, V, chunk_elements=4 * V)  # 4-row chunks span rollouts
    for j, r in enumerate(rollouts):
        alone, _ = token_columns(r, p[j] if p else None, q_rows[j], fidelity, V)
        got, _ = together[j]
        want = tier_columns(fidelity) + (("row_differs",) if fidelity == "exact" else ())  # certify.py
        assert set(got) == set(want) and all(len(got[c]) == len(r.response_ids) for c in want)
        for c in want:
            np.testing.assert_allclose(got[c], alone[c], rtol=1e-12, atol=1e-15, err_msg=f"{fidelity} {j} {c}")
    cols3 = together[3][0]
    assert cols3["nonfinite"].tolist() == [True]
    if fidelity == "topk":
        assert np.isnan(together[2][0]["kl_hi"]).all() and np.isfinite(together[0][0]["kl_hi"]).all()
    if fidelity == "exact":
        ok = ~np.concatenate([c["nonfinite"] for c, _ in together])
        kl = np.concatenate([c["kl"] for c, _ in together])
        assert np.isfinite(kl[ok]).all() and np.isnan(kl[~ok]).all()


def test_unnormalised_scores_give_normalised_logprobs():
    """The training side's scores are shifted per row; lp_train is still log softmax at the sampled token."""
    rollouts, p_rows, q_rows = _batch(5, topk=False, shift=3.0)
    for fidelity in ("exact", "sampled"):
        out = batch_columns(rollouts, p_rows if fidelity == "exact" else None, q_rows, fidelity, V)
        for (cols, _), r, q in zip(out, rollouts, q_rows):
            want = q.logp.double()[torch.arange(len(r.response_ids)), r.response_ids].numpy()
            ok = ~cols["nonfinite"]
            np.testing.assert_allclose(cols["lp_train"][ok], want[ok], rtol=1e-6, atol=1e-6)
            assert np.isnan(cols["lp_train"][~ok]).all()
            # the rollout side is normalised (an engine's own log-probs): read exactly as given
            if fidelity == "exact":
                assert (cols["prefill_gap"][~cols["nonfinite"]] == 0).all()


def test_each_tier_writes_only_the_columns_it_fills():
    """No column that is NaN throughout: a tier's own columns are filled, the other tiers' are absent."""
    for fidelity in ("exact", "topk", "sampled"):
        rollouts, p_rows, q_rows = _batch(3, topk=fidelity == "topk")
        got = batch_columns(rollouts, p_rows if fidelity == "exact" else None, q_rows, fidelity, V)[0][0]
        rows = ("row_differs",) if fidelity == "exact" else ()  # the exact tier's bitwise row comparison
        assert set(got) == set(tier_columns(fidelity) + rows), fidelity
        assert {c for c in TOKEN_COLUMNS if c not in got} <= TIER_ONLY
        for c, v in got.items():
            assert not (np.issubdtype(v.dtype, np.floating) and np.isnan(v).all()), (fidelity, c)
