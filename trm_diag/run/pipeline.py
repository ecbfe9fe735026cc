"""Orchestration of `compare` and `score`: engines in, report folder out.

Data flows one way (docs/design.md section 5): prompts -> rollout backend (generate) ->
training backend (score the same ids) -> divergences -> assemble -> write. The core never
prints: progress and warnings go through a :class:`Reporter` the CLI provides.

Over 500 lines on purpose: compare and score share their configs, result type, output-folder
claim, chunk store and report writing here, and splitting the two would write those steps twice.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from trm_diag.backends import can_coexist, reported_logprobs
from trm_diag.backends.base import Backend
from trm_diag.backends.checkpoint import check_checkpoint, max_positions, read_config, vocab_size
from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, BackendSpec, SamplingConfig, Thresholds, as_dict, check_view
from trm_diag.errors import BackendFailure, InputError, ModelError, UsageError
from trm_diag.math.batch_shape import from_scoring_pass
from trm_diag.math.scoring import batch_columns
from trm_diag.report.assemble import Assembled, MemoryChunks, assemble, model_fingerprint, report_parts
from trm_diag.report.html_report import write_html_or_warn
from trm_diag.report.outputs import check_out_dir, check_output_file, claim_out_dir
from trm_diag.report.partial import PartialStore, run_fingerprint
from trm_diag.report.prompts import Prompt, PromptIds, load_prompts
from trm_diag.report.row_store import RowStore, check_disk, resolve_budget
from trm_diag.report.tables import write_summary, write_tables
from trm_diag.tiers import FIDELITIES
from trm_diag.types import Rollout, Scored, TokenRows

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"
DEFAULT_MODEL = SAMPLE_DIR / "tiny-llama"
DEFAULT_PROMPTS = SAMPLE_DIR / "prompts.jsonl"


class Reporter:
    """Progress and warnings sink; the default one is silent."""

    @contextmanager
    def phase(self, name: str, total: int, unit: str = "", steps: int = 1) -> Iterator[Any]:
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
    # bytes of the rollout engine's rows held in RAM (exact tier); beyond it they go to disk. None:
    # $TRM_DIAG_MEMORY_BUDGET, else row_store.DEFAULT_BUDGET. Never changes a number of the report.
    memory_budget: int | None = None
    save_rollouts: str | None = None
    chunk_prompts: int = 64  # prompts per checkpointed chunk (see --resume)
    shard: tuple[int, int] | None = None  # (I, N): prompts with index % N == I
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    horizons: tuple[int, ...] = DEFAULT_HORIZONS
    truncate_prompts: bool = False  # cut prompts too long for the model to their last tokens (else refuse)
    view: str = DEFAULT_VIEW  # truncated sampling: the view that drives masks, bounds and metrics (views.py)


@dataclass
class CompareResult:
    """What a run wrote: its folder and its summary (compare, score, sweep, locate)."""

    out_dir: Path
    summary: dict[str, Any]


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


def default_rollout_spec() -> str:
    """vLLM in bf16 when it is installed (the comparison users care about), else transformers bf16."""
    return "vllm:dtype=bfloat16" if importlib.util.find_spec("vllm") is not None else "hf:dtype=bfloat16"


# summary.json lp_roll_source: where the rollout side's sampled-token log-probs (lp_roll) come from
LP_ROLL_SOURCES = {
    "decode": "the rollout engine's decode steps (what it reported while sampling)",
    "scoring": "the rollout spec's own scoring pass at its batch shape (the trainer against itself: the two specs "
    "differ only in batch_size, padding_side or regroup_seed, so lp_roll is old_log_prob, not a decode step)",
}
RolloutRows = Callable[[int, list[tuple[list[int], list[int]]]], list[TokenRows]]


def score_rollouts(
    rollouts: list[Rollout],
    train: Backend,
    rollout_rows: RolloutRows | None,
    sampling: SamplingConfig,
    fidelity: str,
    width: int,
    advance: Callable[[int], None],
    view: str = DEFAULT_VIEW,
    roll_from_rows: bool = False,
) -> Scored:
    """Score every rollout with the training backend in batches. In the exact tier,
    rollout_rows(start, pairs) gives the rollout side's rows of the batch at ``start``; None means
    the rollout side is the training backend itself (its rows serve both sides). ``roll_from_rows``
    (the trainer against itself): the rollout side's log-probs are its rows', not the decode steps'."""
    moe = train.moe
    columns, routing, kernels = [], [], set()
    for s in range(0, len(rollouts), train.batch_size):
        batch = rollouts[s : s + train.batch_size]
        pairs = [(r.prompt_ids, r.response_ids) for r in batch]
        q_rows = list(train.score(pairs, sampling))
        p_rows = None  # the rollout side's full rows: exact tier only
        if fidelity == "exact":
            p_rows = q_rows if rollout_rows is None else list(rollout_rows(s, pairs))
        done = batch_columns(
            batch, p_rows, q_rows, fidelity, width, experts_per_token=moe[1] if moe else None, kernels=kernels,
            sampling=sampling, view=view,
        )  # fmt: skip
        if roll_from_rows and p_rows is not None:
            done = [(from_scoring_pass(cols), comp) for cols, comp in done]
        for r, (cols, comp) in zip(batch, done):
            columns.append(cols)
            if comp is not None:
                routing.append((r.seq_id, comp))
        advance(len(batch))
    return Scored(rollouts, columns, routing, kernels)


def side_info(backend: Backend) -> dict[str, Any]:
    from trm_diag.backends.fingerprint import weights_fingerprint

    return {
        "spec": backend.description,
        "model": backend.model_path,
        "model_fingerprint": model_fingerprint(backend.model_path),
        "weights_fingerprint": weights_fingerprint(backend.model_path),  # every byte of the weights it loaded
    }


def write_report(
    out_dir: Path, assembled: Assembled, timings: dict[str, float], t_start: float, warn: Any
) -> CompareResult:
    t = time.perf_counter()
    write_tables(out_dir, report_parts(assembled), assembled.summary)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    assembled.summary["timings"] = timings
    write_html_or_warn(out_dir, assembled.summary, warn)
    write_summary(out_dir, assembled.summary)
    return CompareResult(out_dir, assembled.summary)


class Engines:
    """The backends a run opened, all closed when it ends however it ends: an interrupted run must
    not leave a vLLM engine holding its KV cache in a process that goes on (a notebook, a test)."""

    def __init__(self) -> None:
        self.opened: list[Any] = []

    def load(self, spec: BackendSpec, **kw: Any) -> Backend:
        from trm_diag.backends import load_backend

        backend = load_backend(spec, **kw)
        self.opened.append(backend)
        return backend

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        for backend in self.opened:
            backend.close()


def run_compare(cfg: CompareConfig, reporter: Reporter | None = None) -> CompareResult:
    """Generate with the rollout backend, rescore with the training backend, write the report."""
    with ExitStack() as run, Engines() as engines:
        return _compare(cfg, reporter or Reporter(), engines, run)


def select_prompts(cfg: CompareConfig) -> tuple[list[Prompt], list[int]]:
    """The prompts of this run and their global indices (--num-prompts, then --shard I/N)."""
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    indices = list(range(len(prompts)))
    if cfg.shard is not None:  # a deterministic, strided slice: prompt i belongs to shard i % N
        shard_i, shard_n = cfg.shard
        indices = indices[shard_i::shard_n]
        prompts = [prompts[i] for i in indices]  # none when N > prompts: an empty shard report
    return prompts, indices


def check_compare_inputs(cfg: CompareConfig, roll_spec: BackendSpec, train_spec: BackendSpec) -> Path:
    """Every check that needs no engine: options, checkpoints, output paths; returns the --out folder."""
    if cfg.fidelity not in FIDELITIES:
        raise UsageError(f"--fidelity {cfg.fidelity} is unknown", f"use one of: {', '.join(FIDELITIES)}")
    if cfg.fidelity == "topk" and cfg.sampling.topk == 0:
        raise UsageError("--fidelity topk needs top-K log-probs", "pass --topk K with K >= 1")
    check_view(cfg.view, cfg.fidelity, cfg.sampling)
    for spec in (roll_spec, train_spec):
        check_checkpoint(spec.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    check_vocab_compatible(roll_spec, train_spec)
    if cfg.save_rollouts:
        from trm_diag.report.rollouts_io import check_rollouts_path

        check_rollouts_path(cfg.save_rollouts)
        check_output_file(cfg.save_rollouts, "--save-rollouts", inputs=[cfg.prompts])
    models = [roll_spec.model, train_spec.model]
    return check_out_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=[cfg.prompts], models=models)


def _compare(cfg: CompareConfig, rep: Reporter, engines: Engines, run: ExitStack) -> CompareResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = dict.fromkeys(("generate_s", "rollout_rows_s", "score_s"), 0.0)
    roll_spec, train_spec = cfg.rollout.with_model(cfg.model), cfg.train.with_model(cfg.model)
    # what the rollout engine reports as log-probs decides the pipeline view (views.py)
    cfg = replace(cfg, sampling=replace(cfg.sampling, logprobs=reported_logprobs(roll_spec)))
    fidelity, sampling = cfg.fidelity, cfg.sampling
    prompts, indices = select_prompts(cfg)
    # every input and output is checked before an engine loads or the output folder is touched
    out_dir = check_compare_inputs(cfg, roll_spec, train_spec)
    # Chunks of prompts: each finished chunk is checkpointed, so Ctrl-C loses at most one chunk.
    n, step = len(prompts), max(1, cfg.chunk_prompts)
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
    settings = {
        k: v
        for k, v in as_dict(cfg).items()
        if k not in ("out", "overwrite", "resume", "save_rollouts", "memory_budget")
    }
    settings["specs"] = [roll_spec.describe(), train_spec.describe()]
    fingerprint = run_fingerprint(settings, [cfg.prompts])
    if cfg.resume:
        PartialStore.check_resumable(out_dir, fingerprint, len(chunks))
    kw = {"trust_remote_code": cfg.trust_remote_code, "allow_pickle": cfg.allow_pickle}
    same = train_spec.describe() == roll_spec.describe()
    coexist = same or can_coexist(roll_spec, train_spec)

    t = time.perf_counter()
    with rep.phase(f"load rollout ({roll_spec.name})", 1) as advance:
        roll = engines.load(roll_spec, **kw)
        advance(1)
    timings["load_rollout_s"] = time.perf_counter() - t
    prompt_ids = encode_prompts(prompts, roll, train_spec, cfg, rep)  # every prompt checked before any generation
    # specs that differ only in how the engine batches: one set of weights, the trainer against itself
    shared = None if same else getattr(roll, "rebatched", lambda spec: None)(train_spec)
    self_compare = shared is not None and fidelity == "exact"  # both sides' log-probs from scoring passes
    train = roll if same else (shared or (engines.load(train_spec, **kw) if coexist else None))
    if train is not None:
        check_pair(roll, train, same)
    budget, budget_from = resolve_budget(cfg.memory_budget)
    held_rows = fidelity == "exact" and not same and hasattr(roll, "row_sink")  # rows kept until the other side's
    if held_rows:  # the rows beyond the budget must fit on the disk: checked before anything is written
        done = PartialStore.check_resumable(out_dir, fingerprint, len(chunks))["done"] if cfg.resume else []
        left = sum(b - a for ci, (a, b) in enumerate(chunks) if ci not in done) * sampling.samples_per_prompt
        at_once = left if train is None else min(left, train.batch_size)  # swap: every chunk's; else a batch's
        row_bytes = roll.vocab_width * torch_itemsize(roll.rows_dtype)
        check_disk(
            at_once * sampling.max_new_tokens * row_bytes - budget, out_dir,
            f"the rollout engine's rows beyond --memory-budget {budget / 2**30:.2f} GiB ({row_bytes:,} bytes per token at "
            f"V = {roll.vocab_width:,}, up to {at_once * sampling.max_new_tokens:,} tokens at once)",
            "raise --memory-budget, lower --max-new-tokens or --num-prompts, or write --out to a larger disk",
        )  # fmt: skip
    run.enter_context(claim_out_dir(out_dir, overwrite=cfg.overwrite and not cfg.resume, warn=rep.warn))  # 1st write
    store = PartialStore(out_dir, fingerprint, len(chunks), cfg.resume, cfg.overwrite)
    resumed = len(store.done)
    rows = RowStore(budget, store.spill_dir())  # a killed run's spill files are gone from here on
    if held_rows:
        roll.row_sink = rows
    total = n * sampling.samples_per_prompt
    with rep.phase("generate + score", 2 * total, "rollouts", steps=2) as advance:
        held: dict[int, list[TokenRows]] = {}  # exact tier, engines that swap: rollout rows by chunk
        if train is None:  # two exclusive engines, one after the other: every chunk generated, then scored
            held = _generate_all(roll, prompt_ids, indices, chunks, store, sampling, fidelity, advance, timings)
            roll.close()
            t = time.perf_counter()
            train = engines.load(train_spec, **kw)
            timings["load_train_s"] = time.perf_counter() - t
            check_pair(roll, train, same)
        for ci, (a, b) in enumerate(chunks):
            if ci in store.done:
                advance(2 * (b - a) * sampling.samples_per_prompt)
                continue
            rollout_rows: RolloutRows | None = None  # the same backend on both sides
            if coexist:
                t = time.perf_counter()
                rollouts = roll.generate(prompt_ids[a:b], sampling, advance, prompt_indices=indices[a:b])
                timings["generate_s"] += time.perf_counter() - t
                if not same:
                    rollout_rows = lambda s, pairs: roll.score(pairs, sampling)  # noqa: E731
            else:
                rollouts = store.generated_rollouts(ci)
                rollout_rows = _held_rows(held.pop(ci, None), fidelity)
            t = time.perf_counter()
            store.save(
                ci,
                score_rollouts(
                    rollouts, train, rollout_rows, sampling, fidelity, roll.vocab_width, advance, cfg.view, self_compare
                ),
            )
            timings["score_s"] += time.perf_counter() - t
    roll_info, train_info = side_info(roll), side_info(train)
    if cfg.save_rollouts:
        from trm_diag.report.rollouts_io import write_rollouts

        chunks_out = (store.rollouts(i) for i in range(store.n_chunks))
        write_rollouts(cfg.save_rollouts, chunks_out, sampling, roll_info["weights_fingerprint"])
    notes = [b.routing_note for b in (roll, train)]
    memory = _memory_profile(rows, budget_from, fidelity, held_rows, coexist, getattr(roll, "step_tokens", None))
    header = {
        "rollout": roll_info,
        "train": train_info,
        "comparable": compare_comparable(roll_spec, train_spec, roll_info, train_info),
        "same_backend_instance": same,
        "shared_weights": shared is not None,
        "lp_roll_source": LP_ROLL_SOURCES["scoring" if self_compare else "decode"],
        "engines_sequential": not coexist,
        "prompts": {"path": str(cfg.prompts), "count": len(prompts), "chat": sum(p.is_chat for p in prompts)},
        "shard": None if cfg.shard is None else f"{cfg.shard[0]}/{cfg.shard[1]}",
        "horizons": list(cfg.horizons),
        "routing_note": next((n for n in notes if n), None),
        "run": {"chunks": len(chunks), "chunk_prompts": step, "resumed_chunks": resumed, "memory": memory},
    }
    if not prompts:
        rep.warn(f"shard {header['shard']} holds no prompts: its report is empty (merge accepts it)")
    source = store if chunks else MemoryChunks(Scored([], [], []))  # an empty shard has no chunk to read
    assembled = assemble(
        source, command="compare", fidelity=fidelity, sampling=sampling, thresholds=cfg.thresholds,
        horizons=cfg.horizons, tokenizer=roll.tokenizer, width=roll.vocab_width, moe=train.moe,
        header=header, warn=rep.warn, view=cfg.view,
    )  # fmt: skip
    memory["peak_rss_bytes"] = peak_rss_bytes()  # generation, scoring and assembly: where the memory peaks
    result = write_report(out_dir, assembled, timings, t_start, rep.warn)
    store.clear()
    return result


def compare_comparable(
    roll_spec: BackendSpec, train_spec: BackendSpec, roll_info: dict[str, Any], train_info: dict[str, Any]
) -> dict[str, Any]:
    """summary.json `comparable` of a compare run (report/comparable.py): both sides score the same token ids under
    one sampling setting by construction; the weights must be one set unless the specs name two checkpoints."""
    from trm_diag.report.comparable import NotComparable, weights_record

    two = roll_spec.model != train_spec.model  # model=PATH per side: a staleness audit, asked for
    w = weights_record(roll_info["weights_fingerprint"], train_info["weights_fingerprint"], two)
    if w["same"] is False and not two:
        raise NotComparable(
            f"both sides name '{roll_spec.model}' but loaded different weights ({str(w['rollout'])[:12]} and "
            f"{str(w['train'])[:12]}): the checkpoint changed during the run",
            "run again on a checkpoint nobody writes to",
        )
    checks = ["token ids: the training side scores the rollout engine's own ids", "sampling: one setting, both sides"]
    return {"ok": True, "weights": w, "checks": checks}


def torch_itemsize(dtype: Any) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (ru_maxrss), None where the platform has no getrusage."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _memory_profile(
    rows: RowStore, budget_from: str, fidelity: str, held_rows: bool, coexist: bool, step_tokens: int | None
) -> dict[str, Any]:
    """summary.json run.memory: which mode held the rollout rows and why, and what it cost."""
    spilled = rows.spilled_bytes > 0
    if fidelity != "exact":
        mode, why = "no full rows", f"the {fidelity} tier compares no full rows"
    elif not held_rows:
        mode, why = "paired in flight", "the rollout side's rows are computed when scored: none are held"
    elif coexist:
        mode = "spilled" if spilled else "paired in flight"
        why = "both engines run side by side: each batch's rollout rows are scored as soon as the engine gives them"
    else:
        mode = "spilled" if spilled else "in RAM"
        why = "two exclusive engines run one after the other: every chunk's rollout rows wait for the training engine"
    if spilled:
        why += f"; {rows.spilled_bytes / 2**20:,.1f} MiB beyond the memory budget went to disk"
    return {"mode": mode, "why": why, **rows.stats(), "budget_from": budget_from, "engine_step_tokens": step_tokens}


def _held_rows(rows: list[TokenRows] | None, fidelity: str) -> RolloutRows | None:
    """The rollout side's rows of a chunk, held across an engine swap (exact tier only)."""
    if rows is None:
        if fidelity == "exact":  # never scored against the training side's own rows instead
            raise BackendFailure("the rollout rows of a chunk were lost across the engine swap", "run again")
        return None
    return lambda s, pairs: rows[s : s + len(pairs)]


def encode_prompts(
    prompts: list, roll: Backend, train_spec: BackendSpec, cfg: CompareConfig, rep: Reporter
) -> PromptIds:
    """Every prompt's ids, inside the vocabulary and, with the response, inside the positions both models
    take (too long: refused, or cut to its last tokens with --truncate-prompts)."""
    limits = [x for x in (roll.max_model_len, max_positions(read_config(train_spec.model))) if x]
    new = cfg.sampling.max_new_tokens
    budget = min(limits) - new if limits else None
    if budget is not None and budget < 1:
        raise UsageError(
            f"--max-new-tokens {new} leaves no room for a prompt: the model takes {min(limits)} positions",
            f"use --max-new-tokens below {min(limits)}",
        )
    ids = PromptIds(prompts, roll.tokenizer, roll.vocab_width, budget if cfg.truncate_prompts else None)
    if budget is not None and not cfg.truncate_prompts and len(ids):
        lengths = np.diff(ids.offsets)
        worst = int(np.argmax(lengths))
        if lengths[worst] > budget:
            raise InputError(
                f"prompt {worst} has {lengths[worst]:,} tokens; with --max-new-tokens {new} it needs "
                f"{lengths[worst] + new:,} positions, beyond the model's {min(limits):,}",
                "shorten the prompt, lower --max-new-tokens, or pass --truncate-prompts (keeps each prompt's last tokens)",
            )
    if ids.truncated:
        rep.warn(f"{ids.truncated} prompt(s) cut to their last {budget} tokens (--truncate-prompts)")
    return ids


def _generate_all(
    roll: Backend,
    prompt_ids: PromptIds,
    indices: list[int],
    chunks: list[tuple[int, int]],
    store: PartialStore,
    sampling: SamplingConfig,
    fidelity: str,
    advance: Callable[[int], None],
    timings: dict[str, float],
) -> dict[int, list[TokenRows]]:
    """Phase one of a run whose engines cannot coexist: generate and save every chunk not yet
    scored. The exact tier also needs the rollout engine's full rows of every such chunk while
    the engines swap: those are held (in RAM up to the memory budget, beyond it on disk: the
    engine's row_sink) and returned by chunk."""
    held: dict[int, list[TokenRows]] = {}
    for ci, (a, b) in enumerate(chunks):
        if ci in store.done:
            continue
        t = time.perf_counter()
        if ci in store.generated:  # a resumed run: generated before the interruption
            rollouts = store.generated_rollouts(ci)
            advance(len(rollouts))
        else:
            rollouts = roll.generate(prompt_ids[a:b], sampling, advance, prompt_indices=indices[a:b])
            store.save_generated(ci, rollouts)
        timings["generate_s"] += time.perf_counter() - t
        if fidelity != "exact":
            continue
        t = time.perf_counter()
        pairs = [(r.prompt_ids, r.response_ids) for r in rollouts]
        held[ci] = [row for s in range(0, len(pairs), 16) for row in roll.score(pairs[s : s + 16], sampling)]
        timings["rollout_rows_s"] += time.perf_counter() - t
    return held


def check_pair(roll: Backend, train: Backend, same: bool) -> None:
    """Both sides must share the vocabulary and the tokenizer."""
    if train.vocab_width != roll.vocab_width:
        raise ModelError(
            f"vocab mismatch between backends: logits widths {roll.vocab_width} and {train.vocab_width}",
            "compare checkpoints with the same vocabulary",
        )
    if not same:
        check_tokenizers(roll.tokenizer, train.tokenizer)
