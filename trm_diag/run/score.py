"""`trm-diag score`: rollouts you already have (a rollout file, or a training run's dump) against the training
side, which is either a training backend re-scoring their token ids or, with no model at all, the log-probs
the trainer recorded next to them (a dump's ``train_logprobs``: the sampled tier straight from the file).

The flow is compare's from the training side on (run/pipeline.py): rows read twice (checked, then scored
chunk by chunk into a PartialStore), assembled into the same report.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trm_diag.backends import load_tokenizer, parse_spec
from trm_diag.backends.base import Backend
from trm_diag.backends.checkpoint import check_checkpoint, eos_token_ids, read_config, vocab_size
from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, BackendSpec, SamplingConfig, Thresholds, check_view
from trm_diag.errors import InputError, UsageError
from trm_diag.math.scoring import recorded_columns
from trm_diag.report.assemble import assemble, model_fingerprint
from trm_diag.report.dumps import DUMP_FORMATS
from trm_diag.report.id_tokenizer import IdTokenizer
from trm_diag.report.outputs import check_out_dir, claim_out_dir
from trm_diag.report.partial import PartialStore
from trm_diag.report.rollouts_io import (
    GENERATION_ONLY,
    RolloutFile,
    RolloutSource,
    first_row,
    forget_globs,
    input_format,
    iter_rollout_chunks,
    matches,
    scan_rollouts,
    score_tier,
)
from trm_diag.run.pipeline import (
    DEFAULT_MODEL,
    CompareResult,
    Engines,
    Reporter,
    score_rollouts,
    side_info,
    write_report,
)
from trm_diag.tiers import IMPORTABLE
from trm_diag.types import Rollout, Scored

SCORE_CHUNK = 512  # imported rollouts scored per stored chunk
KEPT_IDS_PER_CHUNK = 1 << 25  # kept-set ids a chunk holds for the replay view (~0.3 GB as int64 arrays)
RECORDED = "recorded"  # --train recorded: the trainer's log-probs recorded with the rollouts
DEFAULT_TRAIN = "hf:dtype=float32"


@dataclass(frozen=True)
class ScoreConfig:
    """Everything `trm-diag score` needs: existing rollouts and what scores their training side.

    ``train`` None and ``model`` None: the trainer's recorded log-probs when the input carries them (a dump of
    slime or SkyRL), else hf:dtype=float32 on the bundled sample model (a rollout file)."""

    rollouts: str
    train: BackendSpec | None = None
    model: str | None = None
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
    recorded: bool = False  # the trainer's recorded log-probs, never a model (--train recorded)
    # the fields of ``sampling`` the user set (the rest from the file); None: all of them (sampling replaces the file's)
    sampling_given: tuple[str, ...] | None = None
    other_checkpoint: bool = False  # the trainer loads another checkpoint than the rollouts' on purpose (staleness)


@dataclass
class TrainSide:
    """What scores the training side: a loaded backend, or (``backend`` None) the recorded log-probs."""

    backend: Backend | None
    tokenizer: Any
    vocab_width: int | None  # None: no model, token ids are not checked against a vocabulary
    eos: frozenset[int]
    info: dict[str, Any]  # summary.json "train"


def run_score(cfg: ScoreConfig, reporter: Reporter | None = None) -> CompareResult:
    """Score rollouts from a file or a dump against the training side and write the same report as compare."""
    with ExitStack() as run, Engines() as engines:
        return _score(cfg, reporter or Reporter(), engines, run)


def _wants_recorded(cfg: ScoreConfig, src: RolloutSource) -> bool:
    """--train recorded, or neither --train nor --model with recorded log-probs on the input's first row."""
    if cfg.recorded:
        if cfg.train is not None:
            raise UsageError("--train recorded and a training backend were both given", "pass one of them")
        return True
    if cfg.train is not None or cfg.model is not None:
        return False
    row = first_row(src, cfg.mapping)
    return row is not None and row.get("train_logprobs") is not None


def _recorded_side(cfg: ScoreConfig) -> TrainSide:
    """The recorded log-probs as the training side; --model, when given, only names the tokens."""
    if cfg.fidelity == "topk":
        raise UsageError(
            "--fidelity topk needs the trainer's full rows, which recorded log-probs do not have",
            "re-score with --train hf:dtype=float32 --model PATH, or use --fidelity sampled",
        )
    info = {"spec": RECORDED, "model": cfg.model, "model_fingerprint": None,
            "source": "the trainer's log-probs recorded with the rollouts (no model loaded)"}  # fmt: skip
    if cfg.model is None:
        return TrainSide(None, IdTokenizer(), None, frozenset(), info)
    check_checkpoint(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    info["model_fingerprint"] = model_fingerprint(cfg.model)
    width = vocab_size(read_config(cfg.model)) or len(tokenizer)
    return TrainSide(None, tokenizer, width, eos_token_ids(cfg.model, tokenizer), info)


def _backend_side(cfg: ScoreConfig, engines: Engines, rep: Reporter, timings: dict[str, float]) -> TrainSide:
    spec = (cfg.train or parse_spec(DEFAULT_TRAIN)).with_model(cfg.model or str(DEFAULT_MODEL))
    t = time.perf_counter()
    with rep.phase(f"load train ({spec.name})", 1) as advance:
        train = engines.load(spec, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        advance(1)
    timings["load_train_s"] = time.perf_counter() - t
    eos = eos_token_ids(train.model_path, train.tokenizer)
    return TrainSide(train, train.tokenizer, train.vocab_width, eos, side_info(train))


def _input_warnings(data: RolloutFile, cfg: ScoreConfig, side: TrainSide, rep: Reporter) -> None:
    """What the report should not hide about how the input was read."""
    n = data.count
    if side.backend is None:
        if data.train_logprob_rows < n:
            raise InputError(
                f"{data.without_train}: no train_logprobs, while {data.train_logprob_rows:,} of {n:,} rollouts carry "
                "the trainer's recorded log-probs: without a model every rollout needs them",
                "re-score with --train hf:dtype=float32 --model PATH (the checkpoint the run trains)",
            )
        unused = [what for what, rows in (("kept sets", data.kept_rows), ("routed experts", data.routed_rows)) if rows]
        if unused:
            rep.warn(
                f"the input's {' and '.join(unused)} need the trainer's rows (the replay view, router flips): pass "
                "--model PATH --train hf:dtype=float32 to re-score and use them"
            )
    elif data.train_logprob_rows:
        rep.warn(
            f"{data.train_logprob_rows:,} rollout(s) carry the trainer's own recorded log-probs; the training side is "
            f"re-scored with {side.info['spec']} instead (pass --train recorded to use the recorded ones)"
        )
    if data.appended_eos:
        rep.warn(
            f"{data.appended_eos:,} rollout(s) end in a token whose rollout log-prob is exactly 0.0 (the end-of-sequence "
            "token SkyRL appends after a stop string carries that placeholder): not scored"
        )
    if data.unscored_rollouts == n:
        raise InputError(
            f"every response token of the input's {n:,} rollout(s) has loss_mask 0: nothing the policy sampled to score",
            "check the loss_mask column (1 marks the policy's tokens), or score the rollouts of the trained policy",
        )
    if data.unscored_rollouts:
        rep.warn(
            f"{data.unscored_rollouts:,} rollout(s) have no token the policy sampled (loss_mask 0 throughout, e.g. a "
            "masked partial rollout): reported with length 0"
        )
    if data.masked_tokens > data.appended_eos:
        rep.warn(
            f"{data.masked_tokens - data.appended_eos:,} response token(s) have loss_mask 0 (context "
            "inside the response, e.g. a tool's output): not scored; positions count the policy's tokens only"
        )
    limit = side.backend.max_model_len if side.backend is not None else None
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
    if data.left_pad_rollouts:
        what = f"{data.left_pad_tokens:,} pad token(s) at the start of {data.left_pad_rollouts:,} prompt(s)"
        rep.warn(
            f"dropped {what} (left padding of a batched export: the engine was fed the prompt without it)"
            if cfg.strip_after_eos
            else f"{what} are scored as prompt tokens (--keep-after-eos)"
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


def _kept_set_source(
    cfg: ScoreConfig, data: RolloutFile, side: TrainSide, fidelity: str, sampling: SamplingConfig
) -> str | None:
    """Where the replay view's kept set comes from: the engine's own (recorded with the rollouts), or None when
    the view needs none; refuses a view the data cannot give."""
    if cfg.view != DEFAULT_VIEW and side.backend is None:
        raise UsageError(
            f"--view {cfg.view} needs the trainer's rows (its mass on the engine's kept set), which recorded "
            "log-probs do not have",
            f"use --view {DEFAULT_VIEW}, or re-score with --model PATH --train hf:dtype=float32",
        )
    if cfg.view == "replay" and side.backend is not None and data.kept_rows == data.count:
        if fidelity != "sampled":  # the top-K intervals are the pipeline view's: one view per report
            raise UsageError(
                "--view replay from the engine's kept set is given in the sampled tier only (the top-K intervals "
                "compare with the full trainer distribution)",
                "add --fidelity sampled",
            )
        if sampling.logprobs == "raw":
            raise UsageError(
                "--view replay needs the engine's processed log-probs (of p~); raw ones lack the temperature and the "
                "kept mass, which only the engine's rows give",
                "pass --logprobs processed if the file's log-probs are the sampled distribution's, else --view pipeline",
            )
        return "the engine's own kept set, recorded with the rollouts (kept_ids)"
    check_view(cfg.view, fidelity, sampling)
    return None


def _score(cfg: ScoreConfig, rep: Reporter, engines: Engines, run: ExitStack) -> CompareResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.fidelity is not None and cfg.fidelity not in IMPORTABLE:
        raise UsageError(
            f"--fidelity {cfg.fidelity} is not available for imported rollouts",
            "use topk (needs topk_logprobs in the file) or sampled; exact needs the rollout engine: use compare",
        )
    # input mistakes first, before the output folder is touched
    forget_globs()
    src = RolloutSource(Path(cfg.rollouts), cfg.format, cfg.allow_pickle)
    fmt = input_format(src)  # a missing file or an unknown layout, before any engine loads
    recorded = _wants_recorded(cfg, src)
    if not recorded and cfg.train is None and cfg.model is None and fmt in DUMP_FORMATS:
        raise UsageError(
            f"the {fmt} dump '{src.path}' carries no trainer log-probs, and no model was given to re-score it",
            "pass --model PATH (the checkpoint the run trains; --train picks the backend, default hf:dtype=float32)",
        )
    if not recorded:
        model = cfg.model or str(DEFAULT_MODEL)
        check_checkpoint(model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    models = [cfg.model] if recorded else [model]  # the report never lands among a checkpoint's files
    out_dir = check_out_dir(cfg.out, overwrite=cfg.overwrite, inputs=matches(src), models=models)
    side = _recorded_side(cfg) if recorded else _backend_side(cfg, engines, rep, timings)
    read = {"eos_ids": side.eos, "strip_after_eos": cfg.strip_after_eos}
    data = scan_rollouts(  # every row checked
        src, cfg.mapping, side.tokenizer, side.vocab_width, **read, allow_duplicates=cfg.allow_duplicates
    )
    _input_warnings(data, cfg, side, rep)
    fidelity, fallback = score_tier(data, src, "sampled" if recorded else cfg.fidelity)
    if fallback:
        rep.warn(fallback)
    hints = dict(data.sampling_hints)
    file_logprobs = hints.pop("logprobs", "processed")  # what the file's log-probs are: options never drop it
    file_settings = {k: (int(v) if k == "top_k" else v) for k, v in hints.items()}
    given = _given_settings(cfg)
    # options override the file's settings one by one (--top-p alone keeps the file's temperature)
    sampling = cfg.sampling if given is None else SamplingConfig(**{**file_settings, **given})
    sampling = replace(sampling, logprobs=cfg.logprobs or file_logprobs)
    t_given = given is None or "temperature" in given
    kept_set = _kept_set_source(cfg, data, side, fidelity, sampling)  # before the output folder is touched
    comparable = _comparable(cfg, data, side, sampling)  # NOT COMPARABLE before any scoring
    per_rollout = bool(data.temperatures) and not t_given and side.backend is not None
    unknown_t = not t_given and not data.temperature_rows  # nothing says how the engine was tempered
    if unknown_t and side.backend is not None and fmt in DUMP_FORMATS:
        rep.warn(
            f"the {fmt} dump records no sampling temperature: the trainer is tempered at 1; pass --temperature "
            "(the run's rollout temperature) for the distribution the engine sampled from"
        )
    if data.temperatures and t_given:
        rep.warn(
            f"the rollouts were sampled at temperatures {data.temperatures}; all are scored at "
            f"--temperature {sampling.temperature:g}"
        )
    t = time.perf_counter()
    # read again and scored chunk by chunk, kept on disk like compare's (no --resume here: a new score
    # always starts afresh), so neither the rollouts nor their token rows are ever all in memory
    n = data.count
    if not out_dir.exists():  # a folder this run made goes again if the run stops before its report
        run.callback(_remove_if_empty, out_dir)  # (runs last: after the claim's lock is released)
    run.enter_context(claim_out_dir(out_dir, overwrite=cfg.overwrite, warn=rep.warn))  # every input passed
    size = SCORE_CHUNK
    if kept_set is not None:  # a chunk holds every kept set of its rollouts: at most about KEPT_IDS_PER_CHUNK ids
        size = max(1, min(SCORE_CHUNK, KEPT_IDS_PER_CHUNK * n // max(1, data.kept_ids)))
    unused = tuple(
        k
        for k, used in (("kept_ids", kept_set is not None), ("routed_experts", bool(side.backend and side.backend.moe)))
        if not used
    )
    store = PartialStore(out_dir, "score", -(-n // size), resume=False, overwrite=True)
    run.callback(store.clear)  # no --resume for score: the chunks go however the run ends
    train = side.backend
    with rep.phase("score", n, "rollouts") as advance:
        chunks = iter_rollout_chunks(src, cfg.mapping, side.tokenizer, side.vocab_width, size, **read, unused=unused)
        for ci, rollouts in enumerate(chunks):
            if train is None:
                scored = Scored(rollouts, [cols for cols, _ in recorded_columns(rollouts, fidelity)], [], set())
                advance(len(rollouts))
            else:
                scored = _score_chunk(rollouts, train, sampling, fidelity, advance, cfg.view, per_rollout)
            store.save(ci, scored)
    timings["score_s"] = time.perf_counter() - t
    moe = train.moe if train is not None else None
    header = {
        "rollout": {"source": str(cfg.rollouts), "format": fmt, "mapping": cfg.mapping, "retokenized_fields": data.retokenized,
                    "empty_responses": data.empty, "sampling_from": _sampling_from(given, bool(file_settings), unknown_t),
                    "topk_rows": data.topk_rows, "duplicates": {"same_key": data.duplicate_keys,
                                                                "same_row": data.duplicate_rows},
                    "after_eos": {"rollouts": data.after_eos_rollouts, "tokens": data.after_eos_tokens,
                                  "stripped": cfg.strip_after_eos, "eos_ids": sorted(side.eos)},
                    "left_padding": {"rollouts": data.left_pad_rollouts, "tokens": data.left_pad_tokens,
                                     "stripped": cfg.strip_after_eos},
                    "recorded": {"train_logprobs": data.train_logprob_rows, "kept_ids": data.kept_rows,
                                 "routed_experts": data.routed_rows},
                    "kept_set": kept_set,
                    "loss_mask": {"rollouts": data.masked_rollouts, "tokens_not_scored": data.masked_tokens,
                                  "placeholder_eos": data.appended_eos}},
        "train": side.info,
        "comparable": comparable,
        "horizons": list(cfg.horizons),
        "routing_note": _routing_note(data) if moe else None,
    }  # fmt: skip
    assembled = assemble(
        store, command="score", fidelity=fidelity, sampling=sampling, thresholds=cfg.thresholds,
        horizons=cfg.horizons, tokenizer=side.tokenizer, width=side.vocab_width, moe=moe,
        header=header, warn=rep.warn, view=cfg.view,
    )  # fmt: skip
    # score generated nothing: no response budget, seed or samples per prompt; K is the file's (one, else null)
    assembled.summary["sampling"].update(dict.fromkeys(GENERATION_ONLY))
    assembled.summary["topk"] = assembled.summary["sampling"]["topk"] = (
        next(iter(data.topk_ks)) if fidelity == "topk" and len(data.topk_ks) == 1 else None
    )
    _label_sources(assembled.summary, side, data, kept_set)
    if data.temperatures and not t_given:  # each rollout at its own temperature
        _per_rollout_temperatures(assembled.summary, data.temperatures, scored_each=per_rollout)
    result = write_report(out_dir, assembled, timings, t_start, rep.warn)
    store.clear()
    return result


def _label_sources(summary: dict[str, Any], side: TrainSide, data: RolloutFile, kept_set: str | None) -> None:
    """summary.json says what a score of recorded log-probs, kept sets or experts compared, not a setting's guess."""
    if side.backend is None:
        summary["compared_distribution"] = (
            "the engine's log-probs against the trainer's recorded ones (each with its own temperature and processing)"
        )
        summary["views"] = {"truncated": None, "view": "pipeline",
                            "note": "the pipeline view as the run computed it: the engine's log-probs against the "
                                    "trainer's recorded ones, whatever the run's sampler (not recorded in the dump)"}  # fmt: skip
    if kept_set is not None:
        summary["views"] = {"truncated": True, "view": "replay", "kept_set": kept_set,
                            "note": "replay view from the engine's kept set: lp_train = log q(y) - log sum_K q; the "
                                    "full view needs the engine's mass on it (its rows)"}  # fmt: skip
    routing = summary.get("routing")
    if isinstance(routing, dict) and routing.get("available") and data.routed_rows:
        routing["margin"] = "k-th minus (k+1)-th router probability, trainer side only (the engine's router logits "
        routing["margin"] += "are not recorded)"


def _score_chunk(
    rollouts: list[Rollout],
    train: Backend,
    sampling: SamplingConfig,
    fidelity: str,
    advance: Any,
    view: str,
    per_rollout: bool,
) -> Scored:
    """score_rollouts of a chunk; with per-rollout temperatures, each temperature's rollouts at their own
    (the trainer's distribution tempered as the engine's was), columns back in the chunk's order."""
    if not per_rollout:
        return score_rollouts(rollouts, train, None, sampling, fidelity, train.vocab_width, advance, view)
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.extra["temperature"], []).append(i)
    columns: list[Any] = [None] * len(rollouts)
    routing, kernels = [], set()
    for t, idx in sorted(groups.items()):
        part = [rollouts[i] for i in idx]
        sc = score_rollouts(
            part, train, None, replace(sampling, temperature=t), fidelity, train.vocab_width, advance, view
        )
        for i, cols in zip(idx, sc.columns):
            columns[i] = cols
        routing += sc.routing
        kernels |= sc.kernels
    return Scored(rollouts, columns, routing, kernels)


def _per_rollout_temperatures(summary: dict[str, Any], temperatures: list[float], scored_each: bool) -> None:
    """summary.json for rollouts of several temperatures: no one temperature, and what was compared."""
    summary["sampling"]["temperature"] = None
    summary["sampling"]["temperatures"] = temperatures
    text = ", ".join(f"{t:g}" for t in temperatures)
    summary["compared_distribution"] = (
        f"each rollout's own temperature ({text}): " + summary["compared_distribution"]
        if scored_each
        else f"the trainer's recorded log-probs of rollouts sampled at temperatures {text}"
    )


def _comparable(cfg: ScoreConfig, data: RolloutFile, side: TrainSide, sampling: SamplingConfig) -> dict[str, Any]:
    """The rollouts against the training side (report/comparable.py): the weights they record against the ones
    loaded (unless --other-checkpoint), and the sampling settings they record against the ones used."""
    from trm_diag.report.comparable import check_sampling, check_score_weights, weights_record

    train_fp = side.info.get("weights_fingerprint")
    if side.backend is None and cfg.model is not None:  # recorded log-probs: --model names the tokens only
        train_fp = None
    roll_fp = check_score_weights(data.weights, train_fp, str(side.info.get("model")), cfg.other_checkpoint)
    check_sampling(data.sampling_hints, {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "min_p")})
    checks = ["token ids: prompt_ids match the prompt text's tokenisation wherever a row carries both",
              "sampling: the rollouts' recorded settings are the ones used" if data.sampling_hints
              else "sampling: the rollouts record none"]  # fmt: skip
    return {"ok": True, "weights": weights_record(roll_fp, train_fp, cfg.other_checkpoint), "checks": checks}


def _given_settings(cfg: ScoreConfig) -> dict[str, Any] | None:
    """The sampling settings the user gave ({} for none); None when ``cfg.sampling`` replaces the file's whole."""
    if cfg.sampling is None:
        return {}
    if cfg.sampling_given is None:
        return None
    return {k: getattr(cfg.sampling, k) for k in cfg.sampling_given}


def _sampling_from(given: dict[str, Any] | None, file_has: bool, unknown_t: bool) -> str:
    if given is None or (given and not file_has):
        return "options"
    if given:
        return "options and file"
    return "default" if unknown_t else "file"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (a report, or someone's files), or gone
        pass


def _routing_note(data: RolloutFile) -> str:
    if data.routed_rows == data.count:
        return "the engine's routed experts recorded with the rollouts, against the trainer's router"
    if data.routed_rows:
        return f"only {data.routed_rows:,} of {data.count:,} rollouts carry the engine's routed experts"
    return "imported rollouts carry no routed experts"
