"""Token columns of rollouts from the two sides' rows, per fidelity tier (tiers.py).

- sampled: only the sampled token's two log-probs (k1/k2/k3, binary TV/KL);
- topk:    plus certified [lo, hi] intervals of kl and tv from the rollout's top-K;
- exact:   exact kl, kl_rev, tv and both entropies from full rows of both sides, in one
           fused pass (the intervals are left to the top-K tier: exact values make them
           redundant, and at V = 151,936 their sort cost more than the exact values).
Columns that a tier cannot fill are NaN, so every report has the same schema.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trm_diag.config import DEFAULT_VIEW, SamplingConfig
from trm_diag.errors import InputError
from trm_diag.heap import release_heap
from trm_diag.math.certify import ROW_DIFFERS, rows_differ
from trm_diag.math.divergence import (
    DEFAULT_CHUNK_ELEMENTS,
    EXACT_KEYS,
    gather_logprobs,
    logit_divergences,
    sampled_logprob,
    sampled_token_metrics,
    topk_intervals,
)
from trm_diag.math.moe import RoutingComparison, compare_routed, compare_routing
from trm_diag.math.views import view_columns
from trm_diag.schema import VIEW_COLUMNS, tier_columns
from trm_diag.types import Rollout, TokenRows

TRIM_EVERY = 8  # chunks between heap trims: a 2,048-token response at V = 151,936 grew 2.3 GB without
INTERVAL_KEYS = ("kl_lo", "kl_hi", "tv_lo", "tv_hi")


def _entropy(lq: torch.Tensor) -> torch.Tensor:
    q = lq.exp()
    return -torch.where(q > 0, q * lq, torch.zeros_like(q)).sum(-1)


def topk_tensors(topk: list[dict[int, float]], k: int | list[int], sampled: list[int]) -> tuple[torch.Tensor, ...]:
    """Pad per-position {token: log-prob} dicts (top-k plus the sampled token) into tensors; k per position or one."""
    ks = k if isinstance(k, list) else [k] * len(topk)
    width = max((len(d) for d in topk), default=1)
    n = len(topk)
    lps = torch.full((n, width), -math.inf, dtype=torch.float64)
    ids = torch.zeros((n, width), dtype=torch.long)
    member = torch.zeros((n, width), dtype=torch.bool)
    for i, d in enumerate(topk):
        extra = len(d) > ks[i]  # the sampled token came on top of the top-k
        for j, (tid, lp) in enumerate(d.items()):
            ids[i, j], lps[i, j] = tid, lp
            member[i, j] = not (extra and tid == sampled[i])
    return lps, ids, member


def _pieces(lengths: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(rollout j, first row, end row) of the rollouts that flat rows start..stop-1 span."""
    out, offset = [], 0
    for j, length in enumerate(lengths):
        lo, hi = max(start, offset), min(stop, offset + length)
        if lo < hi:
            out.append((j, lo - offset, hi - offset))
        offset += length
        if offset >= stop:
            break
    return out


def _gather_scores(rows: list[TokenRows], pieces: list[tuple[int, int, int]]) -> torch.Tensor:
    """One [n, V] tensor of scores from pieces of several rollouts' rows. Rows that can compute
    several pieces at once (joint_scores: HF joins hidden states before its head) do so."""
    if len(pieces) == 1:
        j, a, b = pieces[0]
        return rows[j].scores(a, b)
    kinds = {type(rows[j]) for j, _, _ in pieces}
    joint = rows[pieces[0][0]].joint_scores if len(kinds) == 1 else None
    if joint is not None:
        return joint([(rows[j], a, b) for j, a, b in pieces])
    parts = [rows[j].scores(a, b) for j, a, b in pieces]
    return torch.cat([x.to(parts[0].device) for x in parts])


def _view_pieces(flat: dict[str, torch.Tensor], v: dict[str, torch.Tensor], view: str, s: int, e: int) -> None:
    """Rows s..e of the token columns from views.view_columns: the chosen view fills kl / kl_rev / tv /
    lp_train / lp_roll_prefill (so masks, bounds and metrics follow it); VIEW_COLUMNS keep every view."""
    for key in ("kl", "kl_rev", "tv", "lp_train"):
        flat[key][s:e] = v[f"{key}_{view}"].cpu()
    flat["lp_roll_prefill"][s:e] = v[f"lp_roll_{view}"].cpu()
    for key in ("ent_roll", "ent_train", *VIEW_COLUMNS):
        flat[key][s:e] = v[key].double().cpu()


def _read(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The given log-probs [n, V] at tokens y [n], float64 on the CPU (gathered where the rows live)."""
    return gather_logprobs(logp, y.to(logp.device)).double().cpu()


def kept_log_mass(scores: torch.Tensor, sets: list[np.ndarray]) -> torch.Tensor:
    """log Q_t = log sum over the kept set K_t of q, per row of scores [n, V] (log-probs up to a constant per row),
    float64 end to end like sampled_logprob (views.py: lr_replay = lr_pipeline - log Q_t); NaN for an empty set
    (a token the policy did not sample)."""
    x = scores.double().cpu()
    sizes = torch.tensor([len(a) for a in sets])
    rows = torch.repeat_interleave(torch.arange(len(sets)), sizes)
    member = torch.zeros(x.shape, dtype=torch.bool)
    if len(rows):
        member[rows, torch.from_numpy(np.concatenate(sets))] = True
    out = torch.logsumexp(torch.where(member, x, -math.inf), dim=-1) - torch.logsumexp(x, dim=-1)
    return torch.where(sizes > 0, out, math.nan)


def batch_columns(
    rollouts: list[Rollout],
    p_rows: list[TokenRows] | None,
    q_rows: list[TokenRows],
    fidelity: str,
    vocab_width: int,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    experts_per_token: int | None = None,
    kernels: set[str] | None = None,
    sampling: SamplingConfig | None = None,
    view: str = DEFAULT_VIEW,
) -> list[tuple[dict[str, np.ndarray], RoutingComparison | None]]:
    """Token columns (see TOKEN_COLUMNS) of a batch of rollouts and, for MoE models whose two sides
    both reported router logits, each rollout's routing comparison. p_rows is None unless fidelity
    is exact. Rows of all rollouts are processed together in chunks of about chunk_elements, so
    short responses share one kernel call and memory stays bounded whatever T and V. The exact-tier
    kernels that ran are added to ``kernels``."""
    lengths = [len(r.response_ids) for r in rollouts]
    total = sum(lengths)
    ids = torch.tensor([t for r in rollouts for t in r.response_ids], dtype=torch.long)
    views = p_rows is not None and sampling is not None and sampling.has_views
    keys = (*EXACT_KEYS, *INTERVAL_KEYS, "lp_train", "lp_roll_prefill", *(VIEW_COLUMNS if views else ()))
    roll_shift = torch.zeros(total, dtype=torch.float64)  # views: log pi_roll(y) of the view minus the reported one
    flat = {k: torch.full((total,), math.nan, dtype=torch.float64) for k in keys}
    nonfinite = torch.zeros(total, dtype=torch.bool)
    row_diff = torch.zeros(total, dtype=torch.bool) if p_rows is not None else None  # exact tier: rows not bit-equal
    topk: list[dict[int, float] | None] = []  # per flat row; None where a rollout has no top-K
    topk_k: list[int] = []
    if fidelity == "topk":
        for r, T in zip(rollouts, lengths):
            topk += r.extra["topk"] if "topk" in r.extra else [None] * T
            topk_k += [int(r.extra.get("topk_k", 0))] * T
    # the replay view without the rollout's rows: the engine's kept set, recorded with the rollout (a dump's)
    kept = None
    if p_rows is None and view == "replay" and rollouts and all("kept_ids" in r.extra for r in rollouts):
        kept = [a for r in rollouts for a in r.extra["kept_ids"]]
        kept_log_q = torch.full((total,), math.nan, dtype=torch.float64)  # log Q_t = log sum_{K_t} q
    n = max(1, chunk_elements // vocab_width)  # rows per chunk: memory bounded whatever T and V
    same = p_rows is not None and all(p is q for p, q in zip(p_rows, q_rows))
    for ci, s in enumerate(range(0, total, n)):
        e = min(total, s + n)
        if ci % TRIM_EVERY == TRIM_EVERY - 1:
            release_heap()
        pieces, y = _pieces(lengths, s, e), ids[s:e]
        q_norm = q_rows[pieces[0][0]].normalized
        if p_rows is not None:  # exact tier: one fused pass over both sides' scores, never normalised
            p_norm = p_rows[pieces[0][0]].normalized
            lq = _gather_scores(q_rows, pieces)  # (n, V) training side, up to a constant per row
            lp = lq if same else _gather_scores(p_rows, pieces)  # (n, V) rollout side
            if not same and row_diff is not None:  # certify.py: compared while both chunks are in hand
                row_diff[s:e] = rows_differ(lp, lq)
            if views:  # truncated sampling: every view from the untruncated rows, in float64 (views.py)
                vc = view_columns(lp, lq, y.to(lp.device), sampling)
                _view_pieces(flat, vc, view, s, e)
                roll_shift[s:e] = (vc[f"lp_roll_{view}"] - vc["lp_roll_pipeline"]).cpu()
                if kernels is not None:
                    kernels.add("views-float64")
                nonfinite[s:e] = torch.isnan(flat["kl"][s:e]) | torch.isnan(flat["lp_train"][s:e])
                continue
            d = logit_divergences(lp, lq, token_ids=y, used=kernels)
            bad = torch.isnan(d["kl"]) | torch.isnan(d["lp_train"])  # NaN logits on a side
            for key in EXACT_KEYS:
                flat[key][s:e] = torch.where(bad, math.nan, d[key])
            # an engine's own log-probs are read as they are (so vLLM's decode-vs-prefill gap stays exact)
            flat["lp_train"][s:e] = _read(lq, y) if q_norm else d["lp_train"]
            flat["lp_roll_prefill"][s:e] = _read(lp, y) if p_norm else d["lp_roll"]
        else:  # top-K and sampled tiers: the training side's rows only
            sc = _gather_scores(q_rows, pieces).cpu()  # (n, V)
            lq = sc if q_norm else torch.log_softmax(sc, -1)  # (n, V) normalised
            bad = torch.isnan(lq).any(-1)
            # float64 from the scores, like the exact tier's kernel (both agree to ~1e-15)
            flat["lp_train"][s:e] = gather_logprobs(sc, y).double() if q_norm else sampled_logprob(sc, y)
            flat["ent_train"][s:e] = _entropy(lq)
            if kept is not None:
                kept_log_q[s:e] = kept_log_mass(sc, kept[s:e])
            has = [i for i in range(s, e) if topk and topk[i] is not None]
            if has:
                rows = torch.tensor(has) - s
                lps, tids, member = topk_tensors([topk[i] for i in has], [topk_k[i] for i in has], ids[has].tolist())
                iv = topk_intervals(lps, tids, member, lq[rows])
                for key in INTERVAL_KEYS:
                    flat[key][has] = torch.where(bad[rows], math.nan, iv[key])
        nonfinite[s:e] = bad.cpu()
    if kept is not None:
        flat["lp_train"] = flat["lp_train"] - kept_log_q  # NaN (flagged) wherever a kept set is missing
        nonfinite |= torch.isnan(kept_log_q)
    if row_diff is not None:
        flat[ROW_DIFFERS] = row_diff
    return _finish(
        rollouts, lengths, ids, flat, nonfinite, roll_shift, fidelity, views, p_rows, q_rows, experts_per_token
    )


def _finish(
    rollouts: list[Rollout],
    lengths: list[int],
    ids: torch.Tensor,
    flat: dict[str, torch.Tensor],
    nonfinite: torch.Tensor,
    roll_shift: torch.Tensor,
    fidelity: str,
    views: bool,
    p_rows: list[TokenRows] | None,
    q_rows: list[TokenRows] | None,
    experts_per_token: int | None,
) -> list[tuple[dict[str, np.ndarray], RoutingComparison | None]]:
    """The sampled-token columns from both sides' log-probs, cut into one dict per rollout (the tier's
    columns, seq_id and pos), tokens outside a rollout's loss mask left out, and its routing comparison."""
    lp_roll = torch.tensor([x for r in rollouts for x in r.lp_roll], dtype=torch.float64)
    # the engine reports the pipeline view's log pi_roll(y); another view's differs from it by what the rows
    # give (full, processed log-probs: + log M), so the decode-vs-prefill gap is kept in every view
    lp_roll = lp_roll + roll_shift
    st = sampled_token_metrics(lp_roll, flat["lp_train"])
    cols = {k: v.numpy() for k, v in {**flat, **st}.items()}
    cols["lp_roll"] = lp_roll.numpy()
    cols["nonfinite"] = nonfinite.numpy()
    # a sampled token one side gives probability 0 (e.g. outside its top-k): infinite KL, flagged
    cols["zero_prob"] = np.isneginf(cols["lp_roll"]) | np.isneginf(cols["lp_train"])
    cols["prefill_gap"] = cols["lp_roll_prefill"] - cols["lp_roll"]
    cols["token_id"] = ids.numpy()
    if views:
        cols["support_differs"] = cols["support_differs"] > 0.5
        cols["kept_count"] = cols["kept_count"].astype(np.int64)
    cols = {
        k: cols[k] for k in (*tier_columns(fidelity, views), ROW_DIFFERS) if k in cols
    }  # the tier's columns only (seq_id, pos below), and the exact tier's row comparison
    out = []
    offset = 0
    for j, (r, T) in enumerate(zip(rollouts, lengths)):
        one = {k: v[offset : offset + T].copy() for k, v in cols.items()}
        routing = None
        pr, qr = (p_rows[j] if p_rows is not None else None), (q_rows[j] if q_rows is not None else None)
        if experts_per_token and qr is not None and qr.routing is not None:
            if pr is not None and pr.routing is not None:
                routing = compare_routing(pr.routing, qr.routing, experts_per_token)
            elif "routed_experts" in r.extra:  # the engine's own choice, recorded in a dump
                try:
                    routing = compare_routed(torch.as_tensor(r.extra["routed_experts"]), qr.routing, experts_per_token)
                except ValueError as e:
                    raise InputError(
                        f"rollout {r.seq_id} (prompt_idx {r.prompt_idx}, sample_idx {r.sample_idx}): {e}: the "
                        "experts were not recorded by this model",
                        "re-score with the checkpoint the run trained (its MoE layers and experts per token)",
                    ) from None
        if routing is not None:
            one["route_flips"] = routing.route_flips
            one["route_margin"] = routing.route_margin
        keep = r.extra.get("loss_mask")
        if keep is not None:  # context inside the response (a tool's output): not the policy's tokens
            one = {k: v[keep] for k, v in one.items()}
            routing = routing.subset(torch.as_tensor(keep)) if routing is not None else None
        n = len(one["token_id"])
        one["seq_id"] = np.full(n, r.seq_id, dtype=np.int64)
        one["pos"] = np.arange(n, dtype=np.int64)  # t of the paper: the policy's tokens, counted from 0
        out.append((one, routing))
        offset += T
    return out


def recorded_columns(
    rollouts: list[Rollout], fidelity: str = "sampled"
) -> list[tuple[dict[str, np.ndarray], RoutingComparison | None]]:
    """Token columns of rollouts whose training side is the log-probs a trainer recorded (``train_logprobs``
    in ``Rollout.extra``): the sampled tier without a model. What needs the trainer's rows (its entropy,
    top-K intervals, routing) is NaN / absent."""
    lengths = [len(r.response_ids) for r in rollouts]
    total = sum(lengths)
    ids = torch.tensor([t for r in rollouts for t in r.response_ids], dtype=torch.long)
    keys = (*EXACT_KEYS, *INTERVAL_KEYS, "lp_train", "lp_roll_prefill")
    flat = {k: torch.full((total,), math.nan, dtype=torch.float64) for k in keys}
    flat["lp_train"] = torch.tensor([x for r in rollouts for x in r.extra["train_logprobs"]], dtype=torch.float64)
    nonfinite = torch.isnan(flat["lp_train"])  # a trainer that gave NaN: the token fails every mask
    zero = torch.zeros(total, dtype=torch.float64)
    return _finish(rollouts, lengths, ids, flat, nonfinite, zero, fidelity, False, None, None, None)
