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
from trm_diag.backends.checkpoint import check_checkpoint, eos_token_ids, max_positions, read_config, vocab_size
from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, BackendSpec, SamplingConfig, Thresholds, as_dict, check_view
from trm_diag.errors import BackendFailure, InputError, ModelError, UsageError
from trm_diag.math.scoring import batch_columns
from trm_diag.report.assemble import Assembled, MemoryChunks, assemble, model_fingerprint, report_parts
from trm_diag.report.html_report import write_html_or_warn
from trm_diag.report.outputs import check_out_dir, check_output_file, claim_out_dir
from trm_diag.report.partial import PartialStore, run_fingerprint
from trm_diag.report.prompts import Prompt, PromptIds, load_prompts
from trm_diag.report.tables import write_summary, write_tables
from trm_diag.tiers import FIDELITIES, IMPORTABLE
from trm_diag.types import Rollout, Scored, TokenRows

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"
DEFAULT_MODEL = SAMPLE_DIR / "tiny-llama"
DEFAULT_PROMPTS = SAMPLE_DIR / "prompts.jsonl"
SCORE_CHUNK = 512  # imported rollouts scored per stored chunk


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
    max_held_bytes: int = 4 << 30  # rollout rows held while two vLLM engines swap
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


@dataclass(frozen=True)
class ScoreConfig:
    """Everything `trm-diag score` needs: existing rollouts, rescored by the training backend."""

    rollouts: str
    train: BackendSpec
    model: str = str(DEFAULT_MODEL)
    out: str = "trm-report"
    mapping: dict[str, str] = field(default_factory=dict)
    sampling: SamplingConfig | None = None  # None: the file's settings, else temperature 1
    thresholds: Thresholds = field(default_factory=Thresholds)
    fidelity: str | None = None  # None: top-K when the file has it, else sampled
    strip_after_eos: bool = True  # drop tokens after a response's first EOS (right padding of exports)
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    horizons: tuple[int, ...] = DEFAULT_HORIZONS
    view: str = DEFAULT_VIEW
    logprobs: str | None = None  # None: the file's `logprobs` field, else processed (config.LOGPROBS)
    allow_duplicates: bool = False  # score rows that repeat an earlier row (else refused)
    format: str | None = None  # rollouts_io.INPUT_FORMATS; None: by suffix, else the dump detected


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
) -> Scored:
    """Score every rollout with the training backend in batches. In the exact tier,
    rollout_rows(start, pairs) gives the rollout side's rows of the batch at ``start``; None means
    the rollout side is the training backend itself (its rows serve both sides)."""
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
        for r, (cols, comp) in zip(batch, done):
            columns.append(cols)
            if comp is not None:
                routing.append((r.seq_id, comp))
        advance(len(batch))
    return Scored(rollouts, columns, routing, kernels)


def side_info(backend: Backend) -> dict[str, Any]:
    return {
        "spec": backend.description,
        "model": backend.model_path,
        "model_fingerprint": model_fingerprint(backend.model_path),
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
    return check_out_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=[cfg.prompts])


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
    settings = {k: v for k, v in as_dict(cfg).items() if k not in ("out", "overwrite", "resume", "save_rollouts")}
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
    train = roll if same else (engines.load(train_spec, **kw) if coexist else None)
    if train is not None:
        check_pair(roll, train, same)
    run.enter_context(claim_out_dir(out_dir, overwrite=cfg.overwrite and not cfg.resume, warn=rep.warn))  # 1st write
    store = PartialStore(out_dir, fingerprint, len(chunks), cfg.resume, cfg.overwrite)
    resumed = len(store.done)
    total = n * sampling.samples_per_prompt
    with rep.phase("generate + score", 2 * total, "rollouts", steps=2) as advance:
        held: dict[int, list[TokenRows]] = {}  # exact tier, engines that swap: rollout rows by chunk
        if train is None:  # two exclusive engines, one after the other: every chunk generated, then scored
            held = _generate_all(
                roll, prompt_ids, indices, chunks, store, sampling, fidelity, roll.vocab_width, cfg, advance, timings
            )
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
                score_rollouts(rollouts, train, rollout_rows, sampling, fidelity, roll.vocab_width, advance, cfg.view),
            )
            timings["score_s"] += time.perf_counter() - t
    if cfg.save_rollouts:
        from trm_diag.report.rollouts_io import write_rollouts

        write_rollouts(cfg.save_rollouts, (store.rollouts(i) for i in range(store.n_chunks)), sampling)
    notes = [b.routing_note for b in (roll, train)]
    header = {
        "rollout": side_info(roll),
        "train": side_info(train),
        "same_backend_instance": same,
        "engines_sequential": not coexist,
        "prompts": {"path": str(cfg.prompts), "count": len(prompts), "chat": sum(p.is_chat for p in prompts)},
        "shard": None if cfg.shard is None else f"{cfg.shard[0]}/{cfg.shard[1]}",
        "horizons": list(cfg.horizons),
        "routing_note": next((n for n in notes if n), None),
        "run": {"chunks": len(chunks), "chunk_prompts": step, "resumed_chunks": resumed},
    }
    if not prompts:
        rep.warn(f"shard {header['shard']} holds no prompts: its report is empty (merge accepts it)")
    source = store if chunks else MemoryChunks(Scored([], [], []))  # an empty shard has no chunk to read
    assembled = assemble(
        source, command="compare", fidelity=fidelity, sampling=sampling, thresholds=cfg.thresholds,
        horizons=cfg.horizons, tokenizer=roll.tokenizer, width=roll.vocab_width, moe=train.moe,
        header=header, warn=rep.warn, view=cfg.view,
    )  # fmt: skip
    result = write_report(out_dir, assembled, timings, t_start, rep.warn)
    store.clear()
    return result


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
    width: int,
    cfg: CompareConfig,
    advance: Callable[[int], None],
    timings: dict[str, float],
) -> dict[int, list[TokenRows]]:
    """Phase one of a run whose engines cannot coexist: generate and save every chunk not yet
    scored. The exact tier also needs the rollout engine's full rows of every such chunk while
    the engines swap: those are held (up to cfg.max_held_bytes) and returned by chunk."""
    held: dict[int, list[TokenRows]] = {}
    size = 0
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
        size += 4 * width * sum(len(r.response_ids) for r in rollouts)
        if size > cfg.max_held_bytes:
            raise UsageError(
                f"exact fidelity between two vLLM engines would hold over {size / 2**30:.1f} GiB of rollout rows",
                "use --fidelity topk (with --overwrite), fewer prompts, or an hf training side",
            )
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


def run_score(cfg: ScoreConfig, reporter: Reporter | None = None) -> CompareResult:
    """Rescore rollouts from a file with the training backend and write the same report as compare."""
    with ExitStack() as run, Engines() as engines:
        return _score(cfg, reporter or Reporter(), engines, run)


def _score(cfg: ScoreConfig, rep: Reporter, engines: Engines, run: ExitStack) -> CompareResult:
    from trm_diag.report.rollouts_io import (
        GENERATION_ONLY,
        RolloutSource,
        input_format,
        iter_rollout_chunks,
        scan_rollouts,
        score_tier,
    )

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.fidelity is not None and cfg.fidelity not in IMPORTABLE:
        raise UsageError(
            f"--fidelity {cfg.fidelity} is not available for imported rollouts",
            "use topk (needs topk_logprobs in the file) or sampled; exact needs the rollout engine: use compare",
        )
    train_spec = cfg.train.with_model(cfg.model)
    # input mistakes first, before the output folder is touched
    check_checkpoint(train_spec.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    src = RolloutSource(Path(cfg.rollouts), cfg.format, cfg.allow_pickle)
    fmt = input_format(src)  # a missing file or an unknown layout, before any engine loads
    out_dir = check_out_dir(cfg.out, overwrite=cfg.overwrite, inputs=[cfg.rollouts])
    t = time.perf_counter()
    with rep.phase(f"load train ({train_spec.name})", 1) as advance:
        train = engines.load(train_spec, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        advance(1)
    timings["load_train_s"] = time.perf_counter() - t
    eos = eos_token_ids(train.model_path, train.tokenizer)
    read = {"eos_ids": eos, "strip_after_eos": cfg.strip_after_eos}
    data = scan_rollouts(  # every row checked
        src, cfg.mapping, train.tokenizer, train.vocab_width, **read, allow_duplicates=cfg.allow_duplicates
    )
    if data.train_logprob_rows:
        rep.warn(
            f"{data.train_logprob_rows:,} rollout(s) carry the trainer's own recorded log-probs; this version scores "
            f"the training side with {train_spec.name} (--train) instead and does not use them yet"
        )
    limit = train.max_model_len
    if limit and data.longest > limit:
        raise InputError(
            f"{data.longest_where}: prompt + response hold {data.longest:,} tokens, beyond the model's {limit:,} positions",
            "score rollouts of this model's context length (the training side would run past its positions)",
        )
    if data.after_eos_rollouts:
        what = f"{data.after_eos_tokens:,} token(s) after the first end-of-sequence token in {data.after_eos_rollouts:,} rollout(s)"
        rep.warn(
            f"dropped {what} (right padding of the export)"
            if cfg.strip_after_eos
            else f"{what} are scored as real tokens (--keep-after-eos)"
        )
    if data.retokenized:
        rep.warn(
            f"{data.retokenized} prompt/response field(s) had no token ids and were tokenised with the model's "
            "tokenizer; re-tokenised text can differ from the ids the engine sampled"
        )
    if data.empty:
        rep.warn(f"{data.empty} rollout(s) have empty responses; they are reported with length 0")
    if data.duplicate_keys:
        rep.warn(
            f"{data.duplicate_keys:,} rollout(s) share their (prompt_idx, sample_idx) with an earlier row (first: "
            f"{data.duplicate_where}; {data.duplicate_rows:,} repeat its response too); each is scored as a rollout"
        )
    fidelity, fallback = score_tier(data, src, cfg.fidelity)
    if fallback:
        rep.warn(fallback)
    hints = dict(data.sampling_hints)
    file_logprobs = hints.pop("logprobs", "processed")  # what the file's log-probs are: options never drop it
    sampling = cfg.sampling or SamplingConfig(**{k: (int(v) if k == "top_k" else v) for k, v in hints.items()})
    sampling = replace(sampling, logprobs=cfg.logprobs or file_logprobs)
    check_view(cfg.view, fidelity, sampling)  # before the output folder is touched
    t = time.perf_counter()
    # read again and scored chunk by chunk, kept on disk like compare's (no --resume here: a new score
    # always starts afresh), so neither the rollouts nor their token rows are ever all in memory
    n = data.count
    run.enter_context(claim_out_dir(out_dir, overwrite=cfg.overwrite, warn=rep.warn))  # every input passed
    store = PartialStore(out_dir, "score", -(-n // SCORE_CHUNK), resume=False, overwrite=True)
    with rep.phase("score", n, "rollouts") as advance:
        chunks = iter_rollout_chunks(src, cfg.mapping, train.tokenizer, train.vocab_width, SCORE_CHUNK, **read)
        for ci, rollouts in enumerate(chunks):
            store.save(
                ci, score_rollouts(rollouts, train, None, sampling, fidelity, train.vocab_width, advance, cfg.view)
            )
    timings["score_s"] = time.perf_counter() - t
    header = {
        "rollout": {"source": str(cfg.rollouts), "format": fmt, "mapping": cfg.mapping, "retokenized_fields": data.retokenized,
                    "empty_responses": data.empty, "sampling_from": "options" if cfg.sampling else "file",
                    "topk_rows": data.topk_rows, "duplicates": {"same_key": data.duplicate_keys,
                                                                "same_row": data.duplicate_rows},
                    "after_eos": {"rollouts": data.after_eos_rollouts, "tokens": data.after_eos_tokens,
                                  "stripped": cfg.strip_after_eos, "eos_ids": sorted(eos)}},
        "train": side_info(train),
        "horizons": list(cfg.horizons),
        "routing_note": "imported rollouts carry no router logits" if train.moe else None,
    }  # fmt: skip
    assembled = assemble(
        store, command="score", fidelity=fidelity, sampling=sampling, thresholds=cfg.thresholds,
        horizons=cfg.horizons, tokenizer=train.tokenizer, width=train.vocab_width, moe=train.moe,
        header=header, warn=rep.warn, view=cfg.view,
    )  # fmt: skip
    # score generated nothing: no response budget, seed or samples per prompt; K is the file's (one, else null)
    assembled.summary["sampling"].update(dict.fromkeys(GENERATION_ONLY))
    assembled.summary["topk"] = assembled.summary["sampling"]["topk"] = (
        next(iter(data.topk_ks)) if fidelity == "topk" and len(data.topk_ks) == 1 else None
    )
    result = write_report(out_dir, assembled, timings, t_start, rep.warn)
    store.clear()
    return result
