"""`trm-diag score`: rescore rollouts you already have with the training backend."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, print_report
from trm_diag.cli.options import (
    DEFAULT,
    HORIZONS,
    DppoKlOpt,
    DppoTvOpt,
    HorizonsOpt,
    InputFormatOpt,
    JsonOpt,
    LnTrmOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RemoteCodeOpt,
    ScorePickleOpt,
    ScoreViewOpt,
    SerOpt,
    TrmAvgOpt,
    TrmMaxOpt,
    thresholds,
)
from trm_diag.config import DEFAULT_VIEW, parse_horizons


def score(
    rollouts: Annotated[
        list[str],
        typer.Argument(
            help="Rollouts with token ids and rollout log-probs (.jsonl or .parquet), or a training run's dump "
            "(slime, SkyRL, prime-rl: see --format): a folder, one step's file, or a quoted glob of steps "
            "('DIR/rollout_data/*.pt').",
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            rich_help_panel="Inputs",
            help="Model folder of the training side. Default: none when the input carries the trainer's recorded "
            "log-probs (a slime or SkyRL dump), else the bundled sample model.",
        ),
    ] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            rich_help_panel="Inputs",
            help="Column mapping canonical=source, e.g. response_ids=output_ids. Repeatable.",
        ),
    ] = None,
    strip_after_eos: Annotated[
        bool,
        typer.Option(
            "--strip-after-eos/--keep-after-eos",
            rich_help_panel="Inputs",
            help="Drop tokens after a response's first end-of-sequence token (the right padding of verl-style "
            "exports, scored as real tokens otherwise) and pad tokens before a prompt (a batch's left padding); "
            "the summary says how many.",
        ),
    ] = True,
    allow_duplicates: Annotated[
        bool,
        typer.Option(
            "--allow-duplicates",
            rich_help_panel="Inputs",
            help="Score rows that repeat an earlier row (same prompt_idx, sample_idx and response) instead of "
            "refusing the file; each copy then counts as a rollout.",
        ),
    ] = False,
    train: Annotated[
        str | None,
        typer.Option(
            "--train",
            rich_help_panel="Backends",
            help="Training side: a backend spec that re-scores the token ids (e.g. 'hf:dtype=float32'), or 'recorded' "
            "(the trainer's log-probs in the input, no model: sampled tier). Default: recorded when the input "
            "carries them and no --model is given, else hf:dtype=float32.",
        ),
    ] = None,
    fidelity: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Backends",
            help="topk (needs topk_logprobs on every row) or sampled. Default: topk when every row has it.",
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(rich_help_panel="Sampling", help="Rollout temperature (default: the file's, else 1)."),
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(rich_help_panel="Sampling", help="Rollout top-p (default: the file's, else 1).")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(rich_help_panel="Sampling", help="Rollout top-k (default: the file's, else off).")
    ] = None,
    min_p: Annotated[
        float | None, typer.Option(rich_help_panel="Sampling", help="Rollout min-p (default: the file's, else off).")
    ] = None,
    logprobs: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Sampling",
            help="What rollout_logprobs are: processed (the distribution sampled from: vLLM processed_logprobs, "
            "SGLang) or raw (untempered, untruncated: vLLM's default raw_logprobs). Default: the file's "
            "`logprobs` field, else processed.",
        ),
    ] = None,
    view: ScoreViewOpt = DEFAULT_VIEW,
    trm_max: TrmMaxOpt = DEFAULT["trm_max"],
    trm_avg: TrmAvgOpt = DEFAULT["trm_avg"],
    ln_trm: LnTrmOpt = DEFAULT["ln_trm"],
    ser: SerOpt = DEFAULT["ser"],
    dppo_tv: DppoTvOpt = DEFAULT["dppo_tv"],
    dppo_kl: DppoKlOpt = DEFAULT["dppo_kl"],
    horizons: HorizonsOpt = HORIZONS,
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: ScorePickleOpt = False,
    input_format: InputFormatOpt = None,
    other_checkpoint: Annotated[
        bool,
        typer.Option(
            "--other-checkpoint",
            help="The training side loads another checkpoint than the one the rollouts record (a staleness audit): "
            "score instead of refusing them as NOT COMPARABLE.",
        ),
    ] = False,
    out: OutOpt = "trm-report",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Audit rollouts you already have, or a training run's dump, against the training side.

    A rollout file needs prompt_ids, response_ids and rollout_logprobs per row (docs/rollout-schema.md);
    map other column names with --map. A slime or SkyRL dump also holds the trainer's log-probs: scored as
    they are, with no model (sampled tier); --model re-scores the ids instead (entropy, the replay view
    from the engine's kept set, router flips). Writes the same report as compare.
    Examples: trm-diag score runs/slime-dump --allow-pickle;
    trm-diag score rollouts.parquet --model ./Qwen3-8B --map rollout_logprobs=old_logprobs
    """
    from trm_diag.backends import parse_spec
    from trm_diag.errors import UsageError

    if len(rollouts) != 1:  # a glob the shell expanded
        raise UsageError(
            f"score reads one input, got {len(rollouts)} paths ({', '.join(rollouts[:2])}, ...; a glob the shell expanded)",
            "quote the pattern so trm-diag expands it, e.g. 'DIR/rollout_data/*.pt', or pass the dump folder",
        )
    from trm_diag.config import SamplingConfig
    from trm_diag.report.rollouts_io import parse_mapping
    from trm_diag.run.score import RECORDED, ScoreConfig, run_score

    given = {
        k: v
        for k, v in {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}.items()
        if v is not None
    }
    cfg = ScoreConfig(
        rollouts=rollouts[0],
        train=None if train in (None, RECORDED) else parse_spec(train),
        model=model or None,
        recorded=train == RECORDED,
        other_checkpoint=other_checkpoint,
        out=out,
        mapping=parse_mapping(mapping or []),
        sampling=SamplingConfig(**given) if given else None,
        sampling_given=tuple(given),
        thresholds=thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
        fidelity=fidelity,
        strip_after_eos=strip_after_eos,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        horizons=parse_horizons(horizons),
        view=view,
        logprobs=logprobs,
        allow_duplicates=allow_duplicates,
        format=input_format,
    )
    result = run_score(cfg, RichReporter(quiet or json_out))
    print_report(result.summary, result.out_dir, json_out)
