"""Token columns of one rollout from the two sides' rows, per fidelity tier (issue: three tiers).

- sampled: only the sampled token's two log-probs (k1/k2/k3, binary TV/KL);
- topk:    plus certified [lo, hi] intervals of kl and tv from the rollout's top-K;
- exact:   exact kl, kl_rev, tv and both entropies from full rows of both sides, in one
           fused pass (the intervals are left to the top-K tier: exact values make them
           redundant, and at V = 151,936 their sort cost more than the exact values).
Columns that a tier cannot fill are NaN, so every report has the same schema.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from trm_diag.backends.base import Rollout, TokenRows
from trm_diag.divergence import (
    DEFAULT_CHUNK_ELEMENTS,
    EXACT_KEYS,
    gather_logprobs,
    logit_divergences,
    sampled_logprob,
    sampled_token_metrics,
    topk_intervals,
)
from trm_diag.heap import release_heap
from trm_diag.moe import RoutingComparison, compare_routing

FIDELITIES = ("exact", "topk", "sampled")
TRIM_EVERY = 8  # chunks between heap trims: a 2,048-token response at V = 151,936 grew 2.3 GB without
INTERVAL_KEYS = ("kl_lo", "kl_hi", "tv_lo", "tv_hi")
TOKEN_COLUMNS = (
    "seq_id", "pos", "token_id", "lp_roll", "lp_train", "log_ratio", "k1", "k2", "k3", "abs_rho_m1",
    "kl", "kl_rev", "tv", "tv_bin", "kl_bin", "kl_lo", "kl_hi", "tv_lo", "tv_hi", "ent_roll", "ent_train",
    "lp_roll_prefill", "prefill_gap", "nonfinite", "zero_prob",
)  # fmt: skip


def _entropy(lq: torch.Tensor) -> torch.Tensor:
    q = lq.exp()
    return -torch.where(q > 0, q * lq, torch.zeros_like(q)).sum(-1)


def topk_tensors(topk: list[dict[int, float]], k: int, sampled: list[int]) -> tuple[torch.Tensor, ...]:
    """Pad per-position {token: log-prob} dicts (top-k plus the sampled token) into tensors."""
    width = max((len(d) for d in topk), default=1)
    n = len(topk)
    lps = torch.full((n, width), -math.inf, dtype=torch.float64)
    ids = torch.zeros((n, width), dtype=torch.long)
    member = torch.zeros((n, width), dtype=torch.bool)
    for i, d in enumerate(topk):
        extra = len(d) > k  # the sampled token came on top of the top-k
        for j, (tid, lp) in enumerate(d.items()):
            ids[i, j], lps[i, j] = tid, lp
            member[i, j] = not (extra and tid == sampled[i])
    return lps, ids, member


def token_columns(
    r: Rollout,
    p_rows: TokenRows | None,
    q_rows: TokenRows,
    fidelity: str,
    vocab_width: int,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    experts_per_token: int | None = None,
) -> tuple[dict[str, np.ndarray], RoutingComparison | None]:
    """One rollout's token columns (see TOKEN_COLUMNS) and, for MoE models whose two sides
    both reported router logits, the routing comparison. p_rows is None unless fidelity is exact."""
    T = len(r.response_ids)
    ids = torch.tensor(r.response_ids, dtype=torch.long)
    nan = np.full(T, np.nan)
    cols: dict[str, list[torch.Tensor]] = {
        k: [] for k in (*EXACT_KEYS, *INTERVAL_KEYS, "lp_train", "lp_roll_prefill", "nonfinite")
    }
    topk = r.extra.get("topk") if fidelity == "topk" else None
    n = max(1, chunk_elements // vocab_width)  # rows per chunk: memory bounded whatever T and V
    for s in range(0, T, n):
        e = min(T, s + n)
        if (s // n) % TRIM_EVERY == TRIM_EVERY - 1:
            release_heap()
        if p_rows is not None:  # exact tier: one fused pass over both sides' scores, never normalised
            lq = q_rows.scores(s, e)  # (n, V) training side, up to a constant per row
            lp = lq if p_rows is q_rows else p_rows.scores(s, e)  # (n, V) rollout side
            d = logit_divergences(lp, lq, token_ids=ids[s:e])
            bad = torch.isnan(d["kl"]) | torch.isnan(d["lp_train"])  # NaN logits on a side
            for key in EXACT_KEYS:
                d[key][bad] = math.nan
                cols[key].append(d[key])
            # an engine's own log-probs are read as they are (so vLLM's decode-vs-prefill gap stays exact)
            cols["lp_train"].append(gather_logprobs(lq, ids[s:e]).double() if q_rows.normalized else d["lp_train"])
            prefill = gather_logprobs(lp, ids[s:e]).double() if p_rows.normalized else d["lp_roll"]
            cols["lp_roll_prefill"].append(prefill)
        else:  # top-K and sampled tiers: the training side's rows only
            sc = q_rows.scores(s, e).cpu()  # (n, V)
            lq = sc if q_rows.normalized else torch.log_softmax(sc, -1)  # (n, V) normalised
            bad = torch.isnan(lq).any(-1)
            y = ids[s:e]
            # float64 from the scores, like the exact tier's kernel (both agree to ~1e-15)
            cols["lp_train"].append(gather_logprobs(sc, y).double() if q_rows.normalized else sampled_logprob(sc, y))
            cols["ent_train"].append(_entropy(lq))
            if topk is not None:
                lps, tids, member = topk_tensors(topk[s:e], r.extra["topk_k"], r.response_ids[s:e])
                iv = topk_intervals(lps, tids, member, lq)
                for key in INTERVAL_KEYS:
                    iv[key][bad] = math.nan
                    cols[key].append(iv[key])
        cols["nonfinite"].append(bad)
    out: dict[str, Any] = {}
    for key, parts in cols.items():
        out[key] = torch.cat(parts).double().numpy() if parts else nan.copy()
    out["nonfinite"] = out["nonfinite"].astype(bool) if cols["nonfinite"] else np.zeros(T, dtype=bool)
    lp_roll = torch.tensor(r.lp_roll, dtype=torch.float64)
    st = sampled_token_metrics(lp_roll, torch.from_numpy(out["lp_train"]))
    out.update({k: v.numpy() for k, v in st.items()})
    out["lp_roll"] = lp_roll.numpy()
    # a sampled token one side gives probability 0 (e.g. outside its top-k): infinite KL, flagged
    out["zero_prob"] = np.isneginf(out["lp_roll"]) | np.isneginf(out["lp_train"])
    out["prefill_gap"] = out["lp_roll_prefill"] - out["lp_roll"]
    out["seq_id"] = np.full(T, r.seq_id, dtype=np.int64)
    out["pos"] = np.arange(T, dtype=np.int64)
    out["token_id"] = np.asarray(r.response_ids, dtype=np.int64)
    routing = None
    if experts_per_token and p_rows is not None and p_rows.routing is not None and q_rows.routing is not None:
        routing = compare_routing(p_rows.routing, q_rows.routing, experts_per_token)
        out["route_flips"] = routing.route_flips
        out["route_margin"] = routing.route_margin
    return out, routing
