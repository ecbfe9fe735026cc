"""One training step's mismatch numbers, from the sampled tokens' two log-probs: the row that
`trm_diag.Monitor` logs per step and `trm-diag trend` plots (docs/trend.md).

Every number comes from the sampled tier's report code (docs/design.md sections 2-4, 9):
divergence.sampled_token_metrics for the token columns, sequences.sequence_stats for the masks,
metrics.batch_metrics and metrics.bound_inputs for the batch metrics and the bounds' inputs,
bounds.all_bounds for B*. Nothing here restates a formula. Pure numpy / torch, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from trm_diag.config import Thresholds
from trm_diag.criteria import CRITERIA
from trm_diag.math.bounds import UNIFIED, BoundInputs, all_bounds
from trm_diag.math.divergence import sampled_token_metrics
from trm_diag.math.metrics import SUMMARY_STATS, batch_metrics, bound_inputs
from trm_diag.math.sequences import sequence_stats
from trm_diag.math.stats import describe, upper_mean

FIDELITY = "sampled"  # a training loop has the sampled token's log-probs only
# sequence-length buckets of the per-step length rows: lower edges, the last bucket open above (fixed, so a
# bucket means the same lengths at every step)
LENGTH_EDGES = (1, 64, 256, 1024, 4096, 16384)
INPUTS = ("delta", "eps", "kl_seq", "tv_seq", "kl_rate", "tv_rate", "seq_T")  # the bounds' inputs, per step
DPPO = ("dppo_tv", "dppo_kl")  # the token-level masks (docs/design.md section 4)


def bucket_name(lo: int, hi: int | None) -> str:
    """'64-255' or '16384+' (the length bucket's name in the rows)."""
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


def length_buckets(lengths: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(bucket name, selection of sequences) for each LENGTH_EDGES bucket that holds a sequence."""
    out = []
    edges = (*LENGTH_EDGES, None)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (lengths >= lo) & (lengths < hi) if hi is not None else lengths >= lo
        if sel.any():
            out.append((bucket_name(lo, hi), sel))
    return out


def bstar(inp: BoundInputs, horizons: tuple[int, ...]) -> dict[str, float | None]:
    """B* (bounds.UNIFIED) at the observed length ('bstar_obs') and at each horizon ('bstar@T')."""
    out: dict[str, float | None] = {}
    t_obs = inp.seq_T or 1
    for name, T in (("bstar_obs", t_obs), *((f"bstar@{T}", T) for T in horizons)):
        v = all_bounds(int(T), inp)[0][UNIFIED]
        out[name] = None if v is None else float(v)
    return out


class _Column(np.ndarray):
    """A numpy column that also answers ``.to_numpy(dtype)`` as a pandas Series does."""

    def to_numpy(self, dtype: Any = None) -> np.ndarray:
        return np.asarray(self, dtype=dtype)


class Columns:
    """Equal-length numpy columns read the way batch_metrics reads a DataFrame: ``frame[name]`` (with
    ``.to_numpy()``, ``.mean()``, comparisons), ``name in frame``, ``len(frame)`` = the number of rows. A step
    has few tokens: building two DataFrames cost more than the metrics themselves (pandas' per-column work)."""

    def __init__(self, cols: dict[str, np.ndarray], n_rows: int) -> None:
        self.cols, self.n_rows = cols, n_rows

    def __getitem__(self, name: str) -> _Column:
        return np.asarray(self.cols[name]).view(_Column)

    def __contains__(self, name: object) -> bool:
        return name in self.cols

    def __len__(self) -> int:
        return self.n_rows


def frame(cols: dict[str, np.ndarray], n_rows: int) -> Any:
    """The table batch_metrics reads, of numpy columns (bench/monitor.py --pandas swaps in a DataFrame)."""
    return Columns(cols, n_rows)


def token_columns(lp_roll: np.ndarray, lp_train: np.ndarray) -> dict[str, np.ndarray]:
    """The sampled tier's token columns (log_ratio, k1, k2, k3, abs_rho_m1, tv_bin, kl_bin) of flat
    float64 log-probs, by the report's own function."""
    st = sampled_token_metrics(torch.from_numpy(lp_roll), torch.from_numpy(lp_train))
    cols = {k: v.numpy() for k, v in st.items()}
    cols["lp_roll"], cols["lp_train"] = lp_roll, lp_train
    return cols


def step_metrics(
    lp_roll: np.ndarray,
    lp_train: np.ndarray,
    lengths: np.ndarray,
    th: Thresholds,
    horizons: tuple[int, ...],
    *,
    kept_mass: np.ndarray | None = None,
    route_flips: np.ndarray | None = None,
    n_layers: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, Any]]]:
    """(step row, per-sequence columns with accept_<criterion>, token columns, length-bucket rows) of one batch.

    lp_roll, lp_train: flat float64 [N] log-probs of the sampled tokens, sequence after sequence; lengths [B]
    (sum N). kept_mass [N]: the sampler's kept mass M_t (truncated sampling), route_flips [N]: MoE layers whose
    expert set differs per token (of n_layers). The row holds batch_metrics' names (verl's where verl has
    them; token_<col>_<stat> as summary.json's, plus k1's), the bounds' INPUTS and B* ('bstar_obs', 'bstar@T').
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    tok = token_columns(lp_roll, lp_train)
    seqs = sequence_stats(tok, lengths, th, basis=FIDELITY)
    tables = frame(tok, len(lp_roll)), frame(seqs, len(lengths))
    row: dict[str, Any] = batch_metrics(*tables, fidelity=FIDELITY, thresholds=th)
    d = describe(tok["k1"], SUMMARY_STATS)  # k1's statistics too (the report keeps only its mean, verl's kl)
    row.update({f"token_k1_{s}": d[s] for s in SUMMARY_STATS})
    inp = bound_inputs({"log_ratio": tok["log_ratio"], "k1": tok["k1"], "k2": tok["k2"]}, seqs, fidelity=FIDELITY)
    for k in INPUTS:
        v = getattr(inp, k)
        row[k] = math.nan if v is None else float(v)
    # the k1 mean D_KL^seq's upper value is taken from, and the rollouts' squared k1 sums and count (those with
    # a token): ranks add them up
    row["kl_seq_mean"] = math.nan if inp.kl_seq_mean is None else inp.kl_seq_mean
    with np.errstate(over="ignore"):
        row["k1_seq_sumsq"] = float(np.sum(np.square(seqs["log_seq_ratio"][lengths > 0])))
    row["k1_seq_n"] = int(np.sum(lengths > 0))
    row.update({k: math.nan if v is None else v for k, v in bstar(inp, horizons).items()})
    if kept_mass is not None:
        km = np.asarray(kept_mass, dtype=np.float64)
        row["kept_mass_mean"] = float(np.mean(km)) if km.size else math.nan
        row["kept_mass_min"] = float(np.min(km)) if km.size else math.nan
        with np.errstate(divide="ignore"):
            row["neg_log_kept_mass_mean"] = float(np.mean(-np.log(km))) if km.size else math.nan
    if route_flips is not None:
        flips = np.asarray(route_flips, dtype=np.float64)
        row["route_flip_rate"] = float(flips.sum() / (flips.size * n_layers)) if flips.size and n_layers else 0.0
        row["route_token_flip_rate"] = float(np.mean(flips > 0)) if flips.size else 0.0
    buckets = []
    for name, sel in length_buckets(lengths):
        n_tok = int(lengths[sel].sum())
        k1 = seqs["k1_mean"][sel]
        b = {"bucket": name, "n_sequences": int(sel.sum()), "n_tokens": n_tok,
             "mean_T": float(lengths[sel].mean()), "kl": float(np.sum(k1 * lengths[sel]) / n_tok)}  # fmt: skip
        b["k3_kl"] = float(np.sum(seqs["k3_mean"][sel] * lengths[sel]) / n_tok)
        b["abs_log_ratio_max"] = float(np.max(seqs["abs_log_ratio_max"][sel]))
        for c in CRITERIA:
            b[f"accept_{c}"] = float(np.mean(seqs[f"accept_{c}"][sel]))
        buckets.append(b)
    return row, seqs, tok, buckets


def dppo_token_mask(
    tok: dict[str, np.ndarray], th: Thresholds, which: str, advantages: np.ndarray | None = None
) -> np.ndarray:
    """DPPO's token mask [N] (docs/design.md section 4): drop token t when its binary divergence (tv_bin for
    'dppo_tv', kl_bin for 'dppo_kl') exceeds the threshold in the direction the advantage pushes (A > 0 and
    q(y_t) > p(y_t), or A < 0 and q(y_t) < p(y_t)); without advantages, in either direction (conservative)."""
    column, limit = ("tv_bin", th.dppo_tv) if which == "dppo_tv" else ("kl_bin", th.dppo_kl)
    over = tok[column] > limit
    if advantages is not None:
        lr = tok["log_ratio"]
        pushes = ((advantages > 0) & (lr > 0)) | ((advantages < 0) & (lr < 0))
        over &= pushes
    return ~over


# ------------------------------------------------------------------ merging ranks
# a step logged by several ranks: each number combined by what it is (the reader merges the ranks' rows)
SUMS = ("n_tokens", "n_sequences", "k1_seq_sumsq", "k1_seq_n")
SEQ_WEIGHTED = (
    "training_ppl", "training_log_ppl", "rollout_ppl", "rollout_log_ppl", "log_ppl_diff", "log_ppl_abs_diff",
    "ppl_ratio", "kl_seq", "kl_seq_mean", "tv_seq",
)  # fmt: skip
MAXIMA = ("log_ppl_diff_max", "abs_log_ratio_max", "delta", "eps", "seq_T", "kept_mass_min_neg")
MINIMA = ("log_ppl_diff_min", "kept_mass_min")
APPROXIMATE = ("rollout_is_eff_sample_size_token", "rollout_is_eff_sample_size_seq", "ess_token", "ess_seq")


def merge_rule(name: str) -> str:
    """How a step-row column combines over ranks: sum, tokens / sequences (a mean weighted by each rank's
    count), max, min, upper (a quantile: the largest rank's, an upper value), approx (a weighted mean of a
    ratio that does not merge exactly) or bstar (recomputed from the merged inputs)."""
    if name in SUMS or name.endswith(("_n_inf", "_n_nan")):
        return "sum"
    if name.startswith("bstar"):
        return "bstar"
    if name in MAXIMA or name.endswith("_max"):
        return "max"
    if name in MINIMA:
        return "min"
    if name.startswith("token_") and not name.endswith("_mean"):
        return "upper"
    if name in APPROXIMATE:
        return "approx"
    if name in SEQ_WEIGHTED or name.startswith("accept_") or name == "chi2_seq":
        return "sequences"
    return "tokens"


def merge_ranks(rows: list[dict[str, Any]], horizons: tuple[int, ...]) -> dict[str, Any]:
    """One step's rows from several ranks as one row (what the ranks' batches together give), B* recomputed
    from the merged inputs by the bounds' own code."""
    if len(rows) == 1:
        return dict(rows[0])
    scored = [r for r in rows if (_none(r.get("n_tokens")) or 0) > 0]
    if 0 < len(scored) < len(rows):  # a rank whose batch had no token: its counts only (its values are NaN)
        out = merge_ranks(scored, horizons)
        out["n_sequences"] = float(np.nansum([r.get("n_sequences", 0) for r in rows]))
        out["n_ranks"] = len(rows)
        return out
    out: dict[str, Any] = {"n_ranks": len(rows)}
    names = [k for k in rows[0] if k not in ("rank",)]
    w_tok = np.array([r.get("n_tokens", 0) for r in rows], dtype=np.float64)
    w_seq = np.array([r.get("n_sequences", 0) for r in rows], dtype=np.float64)
    for k in names:
        vals = np.array([np.nan if r.get(k) is None else r.get(k) for r in rows], dtype=np.float64)
        rule = merge_rule(k)
        if k in ("step", "time", "written", "attempt"):
            out[k] = rows[0][k] if k == "step" else float(np.nanmax(vals))
        elif rule == "sum":
            out[k] = float(np.nansum(vals))
        elif rule in ("max", "upper"):
            out[k] = float(np.max(vals))  # NaN propagates: a rank without the value leaves it unknown
        elif rule == "min":
            out[k] = float(np.min(vals))
        elif rule != "bstar":
            w = w_seq if rule == "sequences" else w_tok
            out[k] = float(np.sum(vals * w) / w.sum()) if w.sum() > 0 else math.nan
    # D_KL^seq and the KL rate from the ranks' k1 sums and squared sums: the upper 95% value of the whole step's
    # k1 mean, as one rank with the whole batch computes it (each rank's own is a wider value, clamped at 0)
    k1_total = float(np.sum([r["kl"] * r["n_tokens"] for r in rows]))
    squares = [_none(r.get("k1_seq_sumsq")) for r in rows]  # None: a row written before they were kept
    counts = [_none(r.get("k1_seq_n")) for r in rows]
    n_seq = int(sum(counts)) if None not in counts else int(out.get("n_sequences") or 0)
    if n_seq and None not in squares:
        upper = upper_mean(n_seq, k1_total, float(np.sum(squares)))
        out["kl_seq_mean"] = k1_total / n_seq
        out["kl_seq"] = math.nan if math.isnan(upper) else max(0.0, upper)
        out["kl_rate"] = out["kl_seq"] * n_seq / out["n_tokens"]
    elif n_seq and not any(_none(r.get("kl_seq")) is None for r in rows):  # rows of an older version: the mean
        out["kl_seq"] = max(0.0, k1_total / n_seq)
        out["kl_rate"] = out["kl_seq"] * n_seq / out["n_tokens"]
    inp = BoundInputs(
        delta=_none(out.get("delta")), eps=_none(out.get("eps")), kl_seq=_none(out.get("kl_seq")),
        tv_seq=_none(out.get("tv_seq")), kl_rate=_none(out.get("kl_rate")), tv_rate=_none(out.get("tv_rate")),
        seq_T=None if _none(out.get("seq_T")) is None else int(out["seq_T"]),
    )  # fmt: skip
    out.update({k: math.nan if v is None else v for k, v in bstar(inp, horizons).items()})
    return out


def _none(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
