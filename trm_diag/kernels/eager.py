"""The fused exact-tier kernel as torch ops (the reference the compiled and C kernels follow)."""

from __future__ import annotations

import torch

from trm_diag.kernels import OUTPUTS


def fused_rows(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[len(OUTPUTS), n] float64 (kernels.OUTPUTS: kl, kl_rev, tv, ent_roll, ent_train, lp_roll[y], lp_train[y]) for rows of finite
    logits a (rollout) and b (training) [n, V], each known up to a constant per row.

    p = softmax(a) from m = max a and w = exp(a - m) (float32: one exact 1 per maximum, so z - 1 is
    summed without them and near-one-hot rows keep their tiny entropies). Everything else is
    float64: dd = (b - a) - (b_y - a_y) is log q - log p up to the constant c = log1p(S) with
    E = expm1(dd), S = sum p E, so q is never normalised; x = dd - c = log q - log p and
    e = (E - S) / (1 + S) = q/p - 1 reuse E (one float64 exp per entry). The divergences are sums of
    non-negative terms, so rounding never cancels: KL(p||q) = sum p (e - x), KL(q||p) =
    sum p ((1 + e) x - e), TV = sum p |e| / 2, H(p) = sum p g + log z, H(q) = sum q (g - x) + log z
    with g = m - a. The float32 w carries ~1e-7 relative error into every term alike, so results
    agree with a float64 reference to ~1e-7 whatever the offset between a and b. Eager, each op is
    a pass over [n, V]; torch.compile fuses it into three passes per row (max, exps, sums).
    """
    f64 = torch.float64
    m = a.amax(-1, keepdim=True)  # (n, 1)
    yy = y.unsqueeze(-1)
    a_y, b_y = a.gather(-1, yy).to(f64), b.gather(-1, yy).to(f64)
    a64 = a.to(f64)
    below = a < m
    w32 = torch.exp(a - m)  # (n, V), exactly 1 at the maxima
    z1 = torch.where(below, w32, 0.0).to(f64).sum(-1, keepdim=True) + ((~below).sum(-1, keepdim=True) - 1)
    z = 1 + z1  # sum exp(a - m)
    w = w32.to(f64)
    dd = (b.to(f64) - a64) - (b_y - a_y)  # (n, V), exactly 0 at y
    big_e = torch.expm1(dd)
    g = m.to(f64) - a64  # -log p - log z >= 0
    s = (w * big_e).sum(-1, keepdim=True) / z  # sum p E
    c = torch.log1p(s)
    x = dd - c  # log q - log p
    e = (big_e - s) * (1 / (1 + s))  # q/p - 1 (a reciprocal per row: no division per entry)
    kl = (w * (e - x)).sum(-1, keepdim=True) / z
    kl_rev = (w * (e * x)).sum(-1, keepdim=True) / z - kl  # sum p (1 + e) x - e, with sum p e = 0
    tv = 0.5 * (w * e.abs()).sum(-1, keepdim=True) / z
    h_p = (w * g).sum(-1, keepdim=True) / z
    h_q = h_p + (w * (e * g)).sum(-1, keepdim=True) / z - kl_rev  # sum q (g - x), q = p (1 + e)
    log_z = torch.log1p(z1)
    lp_roll = a_y - m.to(f64) - log_z
    named = {"kl": kl, "kl_rev": kl_rev, "tv": tv, "ent_roll": h_p + log_z, "ent_train": h_q + log_z,
             "lp_roll": lp_roll, "lp_train": lp_roll - c}  # fmt: skip
    return torch.cat([named[k] for k in OUTPUTS], -1).T
