"""The three views of truncated sampling, exact and in float64 (docs/design.md section 7).

With top-k / top-p / min-p the rollout engine samples from p~: the tempered softmax p restricted to
its kept set K_t and renormalised by the kept mass M_t = sum_{K_t} p. What a trainer compares it with
depends on the pipeline:

- ``pipeline``: p~ vs q (the trainer's full-vocabulary tempered softmax; verl/TRL/OpenRLHF defaults);
  the sampled-token log ratio carries log M_t on top of the numerics.
- ``replay``: p~ vs q~ (q restricted to K_t and renormalised by Q_t = sum_{K_t} q: the sampler's mask
  replayed by the trainer); numerics on the kept support.
- ``full``: p vs q, both untruncated: the pure numerical mismatch.

Row by row: lr_pipeline = lr_full + log M_t and lr_replay = lr_full + log M_t - log Q_t.

An engine that reports raw log-probs (``SamplingConfig.logprobs == "raw"``, vLLM's default) hands the
trainer log r(y) with r = softmax(logits) untempered and untruncated; the ``pipeline`` view is then
r vs q (lr_pipeline = lr_full + log p(y) - log r(y)), while replay and full, which describe the
sampler, are unchanged. Pure torch over rows; no backend imports.
"""

from __future__ import annotations

import math

import torch

from trm_diag.config import CLIP_BANDS, VIEWS, SamplingConfig
from trm_diag.math.sampling import truncate


def kept_set(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Tokens the sampler keeps [n, V] (bool) given tempered logits x [n, V]: decided on float32 values
    exactly as the engine decides them (sampling.truncate: vLLM's steps, its tie order), so K_t is the
    engine's kept set; masses and divergences are then computed in float64."""
    return torch.isfinite(truncate(x.float(), sampling))


def _weighted(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w * x with 0 where w = 0 (so 0 * -inf terms vanish), [n, V]."""
    return torch.where(w > 0, w * x, torch.zeros((), dtype=w.dtype, device=w.device))


def view_columns(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, sampling: SamplingConfig
) -> dict[str, torch.Tensor]:
    """Per token [n] (float64): each view's kl, kl_rev, tv, sampled-token log ratio and the two sides'
    log-probs of the sampled token, the rollout's kept mass M and kept count, the trainer's mass Q on
    that set, whether the trainer's own kept set differs, and the entropies of p~ and q.
    a, b: tempered logits (rollout, training) [n, V]; y: sampled token ids [n].

    One pass of masked sums over the full rows serves every view: with S = sum_K p (log p - log q),
    KL(p~ || q) = S / M - log M and KL(p~ || q~) = S / M - log M + log Q (docs/design.md section 7).
    The sampled token is always in K_t (the engine sampled it), so no view gives it probability 0."""
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)  # (n, V) full tempered
    p, q = lp.exp(), lq.exp()
    rows = torch.arange(len(y), device=a.device)
    keep = kept_set(a, sampling)
    keep[rows, y] = True
    k = keep.double()  # (n, V) 1 on K_t
    m, qm = (p * k).sum(-1), (q * k).sum(-1)  # (n,) M_t, Q_t
    log_m, log_q = m.log(), qm.log()
    p_lr, q_lr = _weighted(p, lp - lq), _weighted(q, lq - lp)  # (n, V) KL(p||q) and KL(q||p) terms
    s_pk, s_qk = (p_lr * k).sum(-1), (q_lr * k).sum(-1)
    outside = ((q > 0) & ~keep).any(-1)  # q puts mass where p~ has none: KL(q || p~) is infinite
    pt = p / m[:, None]  # (n, V) p~ on K_t (masked below)
    lr_full = lq[rows, y] - lp[rows, y]
    out = {
        "kept_mass": m,
        "kept_count": k.sum(-1),
        "train_kept_mass": qm,
        "support_differs": (kept_set(b, sampling) != keep).any(-1),
        "lr_full": lr_full,
        "lr_pipeline": lr_full + log_m,
        "lr_replay": lr_full + log_m - log_q,
        "kl_full": p_lr.sum(-1),
        "kl_rev_full": q_lr.sum(-1),
        "tv_full": 0.5 * (p - q).abs().sum(-1),
        "kl_pipeline": s_pk / m - log_m,
        "kl_rev_pipeline": torch.where(outside, math.inf, s_qk + log_m),
        "tv_pipeline": 0.5 * (((pt - q).abs() * k).sum(-1) + (1.0 - qm)),
        "kl_replay": s_pk / m - log_m + log_q,
        "kl_rev_replay": s_qk / qm - log_q + log_m,
        "tv_replay": 0.5 * ((pt - q / qm[:, None]).abs() * k).sum(-1),
        "ent_roll": log_m - (_weighted(p, lp) * k).sum(-1) / m,  # H(p~): what the sampler draws from
        "ent_train": -_weighted(q, lq).sum(-1),  # H(q)
    }
    lp_y, lq_y = lp[rows, y], lq[rows, y]
    roll_y = {"full": lp_y, "pipeline": lp_y - log_m, "replay": lp_y - log_m}
    train_y = {"full": lq_y, "pipeline": lq_y, "replay": lq_y - log_q}
    if sampling.logprobs == "raw":  # the trainer is handed log r(y): r = softmax(logits), untempered
        lr = torch.log_softmax(a.double() * sampling.temperature, -1)  # (n, V) a = logits / T
        r = lr.exp()
        out["kl_pipeline"] = _weighted(r, lr - lq).sum(-1)
        out["kl_rev_pipeline"] = _weighted(q, lq - lr).sum(-1)
        out["tv_pipeline"] = 0.5 * (r - q).abs().sum(-1)
        roll_y["pipeline"] = lr[rows, y]
        out["lr_pipeline"] = lq_y - roll_y["pipeline"]
    for view in VIEWS:
        out[f"lp_roll_{view}"], out[f"lp_train_{view}"] = roll_y[view], train_y[view]
    return out


def views_summary(tokens, lengths, trm_max: float, trm_avg: float, view: str, truncated: bool = True) -> dict:
    """summary.json's ``views``: per view the mean sampled-token log ratio (bias), token KL mean / p99,
    the share of sequences TRM-Max and TRM-Avg accept, and the share of tokens whose ratio leaves the
    PPO clip band through mismatch alone; plus how often the two sides' kept sets differ and the kept
    mass. ``tokens``: a mapping with VIEW_COLUMNS; ``lengths``: tokens per sequence, in table order."""
    import numpy as np

    from trm_diag.math.sequences import per_sequence
    from trm_diag.math.stats import describe

    lengths = np.asarray(lengths, dtype=np.int64)
    empty = lengths == 0
    out: dict = {"truncated": truncated, "view": view, "by_view": {}}
    for v in VIEWS:
        kl = np.asarray(tokens[f"kl_{v}"], dtype=np.float64)
        lr = np.asarray(tokens[f"lr_{v}"], dtype=np.float64)
        d = describe(kl, ("mean", "p99"))
        with np.errstate(invalid="ignore"):
            accept_max = empty | (per_sequence(kl, lengths, "max") <= trm_max)
            accept_avg = empty | (per_sequence(kl, lengths, "mean") <= trm_avg)
        out["by_view"][v] = {
            "bias": describe(lr, ("mean",))["mean"],
            "kl_mean": d["mean"],
            "kl_p99": d["p99"],
            "accept_trm_max": float(accept_max.mean()) if len(lengths) else float("nan"),
            "accept_trm_avg": float(accept_avg.mean()) if len(lengths) else float("nan"),
            **{
                f"{name}_clip_frac": float(((lr < np.log1p(-lo)) | (lr > np.log1p(hi))).mean())
                if lr.size
                else float("nan")
                for name, (lo, hi) in CLIP_BANDS.items()
            },
        }
    differs = np.asarray(tokens["support_differs"], dtype=bool)
    mass = describe(np.asarray(tokens["kept_mass"], dtype=np.float64), ("mean", "p50", "min"))
    out["support_differs_frac"] = float(differs.mean()) if differs.size else float("nan")
    out["kept_mass"] = {k: mass[k] for k in ("mean", "p50", "min")}
    out["kept_count_mean"] = describe(np.asarray(tokens["kept_count"], dtype=np.float64), ("mean",))["mean"]
    return out


def views_note(view: str, sampling: SamplingConfig, fidelity: str) -> dict:
    """summary.json's ``views`` without the side-by-side table: the views coincide, or the tier's data
    (no full rollout rows) give the pipeline view only."""
    if not sampling.has_views:
        note = "no truncation (top-p 1, top-k off, min-p 0): the pipeline, replay and full views coincide"
    else:
        note = (
            f"the {fidelity} tier gives the pipeline view only (the replay and full views need the "
            "rollout's full rows: --fidelity exact)"
        )
    return {"truncated": sampling.truncated, "view": view, "note": note}  # fmt: skip
