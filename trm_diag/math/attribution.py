"""Own errors against a reference and their decomposition (docs/design.md section 8): pure functions.

For a scorer X and a reference R over the same tokens: e_X = log q_X(y) - log q_R(y) (sampled token)
and KL(q_R || q_X) per position, both in float64 on the full tempered distributions. The gap between
the rollout side and an arm is e_arm - e_roll; independent errors give
rms(gap)^2 ~ rms(e_roll)^2 + rms(e_arm)^2, and their correlation says when they share a cause.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_errors(ref: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(kl, lp_err), each [n] float64: KL(q_R || q_X) and log q_X(y) - log q_R(y), from scores [n, V] of the
    reference and of X, each known up to a constant per row (logits or log-probs), and token ids y [n].

    KL is summed as sum_v q_R (expm1(-d) + d) with d = log q_R - log q_X: every term is >= 0, so a KL of
    1e-12 between an fp32 scorer and a float64 reference is not lost to cancellation."""
    lr = torch.log_softmax(ref.double(), dim=-1)
    lx = torch.log_softmax(x.double(), dim=-1)
    d = lr - lx
    p = lr.exp()
    terms = torch.where(p > 0, p * (torch.expm1(-d) + d), torch.zeros_like(p))
    kl = terms.sum(-1)
    yy = y.long()[:, None]
    lp_err = (lx.gather(-1, yy) - lr.gather(-1, yy)).squeeze(-1)
    return kl.numpy(), lp_err.numpy()


def rms(x: np.ndarray) -> float:
    """Root mean square of the finite entries (NaN when there are none)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x * x))) if x.size else math.nan


def error_stats(kl: np.ndarray, lp_err: np.ndarray) -> dict[str, float]:
    """A scorer's own error against the reference: KL mean / p99 / max and rms of the log-prob error."""
    kl = np.asarray(kl, dtype=np.float64)
    ok = kl[np.isfinite(kl)]
    return {
        "ref_kl_mean": float(ok.mean()) if ok.size else math.nan,
        "ref_kl_p99": float(np.quantile(ok, 0.99)) if ok.size else math.nan,
        "ref_kl_max": float(ok.max()) if ok.size else math.nan,
        "ref_lp_err_rms": rms(lp_err),
        "ref_lp_err_mean": float(np.nanmean(lp_err)) if np.size(lp_err) else math.nan,
    }


def decompose(e_roll: np.ndarray, e_arm: np.ndarray) -> dict[str, float]:
    """The gap e_arm - e_roll against two independent errors (docs/design.md section 8).

    gap_lp_rms: rms of the gap; indep_lp_rms: sqrt(rms(e_roll)^2 + rms(e_arm)^2), what independent errors
    predict; gap_share_roll: rms(e_roll)^2 / (rms(e_roll)^2 + rms(e_arm)^2), the rollout side's share;
    err_corr: Pearson correlation of e_roll and e_arm (NaN when either is constant)."""
    a, b = np.asarray(e_roll, dtype=np.float64), np.asarray(e_arm, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    r_roll, r_arm = rms(a), rms(b)
    power = r_roll**2 + r_arm**2
    corr = math.nan
    if a.size > 1 and a.std() > 0 and b.std() > 0:
        corr = float(np.corrcoef(a, b)[0, 1])
    return {
        "gap_lp_rms": rms(b - a),
        "indep_lp_rms": math.sqrt(power) if a.size else math.nan,
        "gap_share_roll": r_roll**2 / power if power > 0 else math.nan,
        "err_corr": corr,
    }
