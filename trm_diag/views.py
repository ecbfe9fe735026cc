"""The three views of truncated sampling, exact and in float64 (DESIGN.md section 7).

With top-k / top-p / min-p the rollout engine samples from p~: the tempered softmax p restricted to
its kept set K_t and renormalised by the kept mass M_t = sum_{K_t} p. What a trainer compares it with
depends on the pipeline:

- ``pipeline``: p~ vs q (the trainer's full-vocabulary tempered softmax; verl/TRL/OpenRLHF defaults);
  the sampled-token log ratio carries log M_t on top of the numerics.
- ``replay``: p~ vs q~ (q restricted to K_t and renormalised by Q_t = sum_{K_t} q: the sampler's mask
  replayed by the trainer); numerics on the kept support.
- ``full``: p vs q, both untruncated: the pure numerical mismatch.

Row by row: lr_pipeline = lr_full + log M_t and lr_replay = lr_full + log M_t - log Q_t.
Pure torch over rows; no backend imports.
"""

from __future__ import annotations

import torch

from trm_diag.config import CLIP_BANDS, VIEWS, SamplingConfig
from trm_diag.sampling import truncate


def kept_set(x: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Tokens the sampler keeps [n, V] (bool) given tempered logits x [n, V]: decided on float32 values
    exactly as the engine decides them (sampling.truncate: vLLM's steps, its tie order), so K_t is the
    engine's kept set; masses and divergences are then computed in float64."""
    return torch.isfinite(truncate(x.float(), sampling))


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probs; terms where a = 0 are 0, where b = 0 < a are +inf."""
    pa = la.exp()
    terms = torch.where(pa > 0, pa * (la - lb), torch.zeros((), dtype=la.dtype))
    return terms.sum(-1)


def _tv(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    return 0.5 * (la.exp() - lb.exp()).abs().sum(-1)


def view_columns(
    a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, sampling: SamplingConfig
) -> dict[str, torch.Tensor]:
    """Per token [n] (float64): each view's kl, kl_rev, tv, sampled-token log ratio and the two sides'
    log-probs of the sampled token, the rollout's kept mass and kept count, the trainer's mass on that
    set, whether the trainer's own kept set differs, and the entropies of p~ and q. a, b: tempered logits (rollout, training) [n, V]; y: sampled token ids [n].

    The sampled token is always in K_t (the engine sampled it): a token at the truncation boundary
    that the recomputed rows would drop is kept, so no view gives it probability 0."""
    a64, b64 = a.double(), b.double()
    lp, lq = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)  # (n, V) full tempered
    rows = torch.arange(len(y), device=a.device)
    keep = kept_set(a64, sampling)
    keep[rows, y] = True
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=a.device)
    log_m = torch.logsumexp(torch.where(keep, lp, neg_inf), -1)  # (n,) log M_t
    log_q = torch.logsumexp(torch.where(keep, lq, neg_inf), -1)  # (n,) log Q_t
    lpt = torch.where(keep, lp - log_m[:, None], neg_inf)  # p~
    lqt = torch.where(keep, lq - log_q[:, None], neg_inf)  # q~
    lr_full = lq[rows, y] - lp[rows, y]
    out = {
        "kept_mass": log_m.exp(),
        "kept_count": keep.sum(-1).double(),
        "train_kept_mass": log_q.exp(),
        "support_differs": (kept_set(b64, sampling) != keep).any(-1),
        "lr_full": lr_full,
        "lr_pipeline": lr_full + log_m,
        "lr_replay": lr_full + log_m - log_q,
    }
    for view, (la, lb) in {"full": (lp, lq), "pipeline": (lpt, lq), "replay": (lpt, lqt)}.items():
        out[f"kl_{view}"] = _kl(la, lb)
        out[f"kl_rev_{view}"] = _kl(lb, la)
        out[f"tv_{view}"] = _tv(la, lb)
        out[f"lp_roll_{view}"] = la[rows, y]
        out[f"lp_train_{view}"] = lb[rows, y]
    out["ent_roll"] = -_kl(lpt, torch.zeros((), dtype=torch.float64))  # H(p~): what the sampler draws from
    out["ent_train"] = -_kl(lq, torch.zeros((), dtype=torch.float64))  # H(q)
    return out


def views_summary(tokens, lengths, trm_max: float, trm_avg: float, view: str) -> dict:
    """summary.json's ``views``: per view the mean sampled-token log ratio (bias), token KL mean / p99,
    the share of sequences TRM-Max and TRM-Avg accept, and the share of tokens whose ratio leaves the
    PPO clip band through mismatch alone; plus how often the two sides' kept sets differ and the kept
    mass. ``tokens``: a mapping with VIEW_COLUMNS; ``lengths``: tokens per sequence, in table order."""
    import numpy as np

    from trm_diag.sequences import per_sequence
    from trm_diag.stats import describe

    lengths = np.asarray(lengths, dtype=np.int64)
    empty = lengths == 0
    out: dict = {"truncated": True, "view": view, "by_view": {}}
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


def untruncated_note(view: str) -> dict:
    """summary.json's ``views`` when nothing truncates: the three views are one."""
    return {"truncated": False, "view": view, "note": "no truncation (top-p 1, top-k off, min-p 0): the "
            "pipeline, replay and full views coincide"}  # fmt: skip
