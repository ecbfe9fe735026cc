"""The trainer against itself: two scoring passes of one model that differ only in how they batch.

Between `old_log_prob` and `log_prob` of one update, a trainer runs the same weights twice, at
possibly different micro-batch sizes, padding and groupings. Neither pass is a decode step, so the
rollout side's sampled-token log-prob is its scoring pass's (`lp_roll_prefill`), not the engine's
decode-step value; the sampled-token columns follow from it (docs/metrics.md, batch shape).
"""

from __future__ import annotations

import numpy as np
import torch

from trm_diag.math.divergence import sampled_token_metrics


def from_scoring_pass(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One rollout's token columns (exact tier) with lp_roll := lp_roll_prefill and every sampled-token column
    (log_ratio, k1..k3, binary TV/KL, zero_prob) recomputed from it; prefill_gap becomes 0."""
    out = dict(cols)
    lp_roll = np.asarray(cols["lp_roll_prefill"], dtype=np.float64)
    st = sampled_token_metrics(torch.from_numpy(lp_roll), torch.from_numpy(np.asarray(cols["lp_train"])))
    out.update({k: v.numpy() for k, v in st.items() if k in cols})
    out["lp_roll"] = lp_roll.copy()
    if "prefill_gap" in cols:
        out["prefill_gap"] = np.zeros_like(lp_roll)
    if "zero_prob" in cols:
        out["zero_prob"] = np.isneginf(lp_roll) | np.isneginf(np.asarray(cols["lp_train"], dtype=np.float64))
    return out
