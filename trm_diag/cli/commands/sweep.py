"""`trm-diag sweep`: sample once, re-score under each arm, rank the arms."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from trm_diag.cli.console import RichReporter, err_console, out_console
from trm_diag.cli.options import (
    DEFAULT,
    HORIZONS,
    SAMPLE_HELP,
    DppoKlOpt,
    DppoTvOpt,
    HorizonsOpt,
    JsonOpt,
    LnTrmOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    OverwriteOpt,
    PickleOpt,
    QuietOpt,
    RemoteCodeOpt,
    SeedOpt,
    SerOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    TrmAvgOpt,
    TrmMaxOpt,
    ViewOpt,
    thresholds,
)
from trm_diag.config import DEFAULT_VIEW, parse_horizons
from trm_diag.errors import UsageError
from trm_diag.run.arms import DEFAULT_REFERENCE


def sweep(
    model: ModelOpt = "",
    prompts: Annotated[
        str, typer.Option(rich_help_panel="Inputs", help="Prompt file (as compare). " + SAMPLE_HELP)
    ] = "",
    num_prompts: Annotated[
        int | None, typer.Option(rich_help_panel="Inputs", help="Use only the first N prompts.")
    ] = None,
    samples: Annotated[int, typer.Option(rich_help_panel="Inputs", help="Responses sampled per prompt.")] = 1,
    truncate_prompts: Annotated[
        bool, typer.Option(rich_help_panel="Inputs", help="Cut prompts too long for the model (as compare).")
    ] = False,
    rollout: Annotated[
        str,
        typer.Option(
            rich_help_panel="Arms",
            help="The rollout engine that samples once (and the base of --arms engine). Default as compare.",
        ),
    ] = "",
    train: Annotated[
        str, typer.Option("--train", rich_help_panel="Arms", help="The base of --arms trainer and --arms batch.")
    ] = "hf:dtype=float32",
    arm: Annotated[
        list[str] | None,
        typer.Option(
            "--arm", rich_help_panel="Arms", help="An arm: a backend spec that re-scores the rollouts. Repeatable."
        ),
    ] = None,
    arms: Annotated[
        str | None,
        typer.Option(
            "--arms",
            rich_help_panel="Arms",
            help="Presets, comma-separated: engine (the rollout spec, one knob at a time: dtype, eager, batch 1, "
            "chunked prefill, prefix caching, fp8 KV cache, batch-invariant mode) and trainer (the --train spec: "
            "dtype, attention, batch 1, fp32 LM head) and batch (the --train spec against itself at batch size 1: "
            "batch 1, 8, 32, left/right padding, regrouped; reports the share of tokens with rho outside [0.9, 1.1], "
            "PPO/DAPO clip flips and MoE route flips). Default: engine,trainer when no --arm is given.",
        ),
    ] = None,
    reference: Annotated[
        str,
        typer.Option(
            rich_help_panel="Arms",
            help="High-precision scorer every side's own error is measured against ('none': no reference).",
        ),
    ] = DEFAULT_REFERENCE,
    max_new_tokens: MaxNewTokensOpt = 96,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    view: ViewOpt = DEFAULT_VIEW,
    seed: SeedOpt = 0,
    trm_max: TrmMaxOpt = DEFAULT["trm_max"],
    trm_avg: TrmAvgOpt = DEFAULT["trm_avg"],
    ln_trm: LnTrmOpt = DEFAULT["ln_trm"],
    ser: SerOpt = DEFAULT["ser"],
    dppo_tv: DppoTvOpt = DEFAULT["dppo_tv"],
    dppo_kl: DppoKlOpt = DEFAULT["dppo_kl"],
    horizons: HorizonsOpt = HORIZONS,
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    out: Annotated[
        str, typer.Option("--out", rich_help_panel="Output", help="Sweep folder: one report per arm, sweep.parquet.")
    ] = "trm-sweep",
    overwrite: OverwriteOpt = False,
    resume: Annotated[
        bool,
        typer.Option(rich_help_panel="Output", help="Finish an interrupted sweep in --out; finished arms are kept."),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Which setting causes the mismatch: sample once, re-score the same tokens under each arm (one setting
    changed), and measure every side against a float64 reference.

    Writes OUT/<arm>/ (a normal report per arm: rollout side vs arm), OUT/sweep.parquet (one row per arm),
    OUT/rollouts.parquet and OUT/summary.json.
    Example: trm-diag sweep --rollout vllm:dtype=bfloat16 --arm hf:dtype=float32 --arm hf:dtype=bfloat16
    """
    from trm_diag.backends import parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.run.pipeline import DEFAULT_MODEL, DEFAULT_PROMPTS, default_rollout_spec
    from trm_diag.run.sweep import SweepConfig, run_sweep

    if num_prompts is not None and num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts} must be >= 1", "use a positive integer")
    presets = [p.strip() for p in (arms or "").split(",") if p.strip()]
    if not arm and not presets:
        presets = ["engine", "trainer"]
    cfg = SweepConfig(
        rollout=parse_spec(rollout or default_rollout_spec()),
        train=parse_spec(train),
        arms=tuple(arm or ()),
        presets=tuple(presets),
        reference=None if reference.strip().lower() == "none" else parse_spec(reference),
        model=model or str(DEFAULT_MODEL),
        prompts=prompts or str(DEFAULT_PROMPTS),
        out=out,
        sampling=SamplingConfig(temperature, top_p, top_k, min_p, max_new_tokens, samples, seed, 0),
        thresholds=thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
        num_prompts=num_prompts,
        horizons=parse_horizons(horizons),
        view=view,
        truncate_prompts=truncate_prompts,
        resume=resume,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    result = run_sweep(cfg, RichReporter(quiet or json_out))
    if json_out:
        from trm_diag.report.tables import to_json

        print(to_json(result.summary))
        return
    from trm_diag.cli.sweep import render_sweep

    render_sweep(out_console, result.summary)
    err_console.print(
        f"sweep written to [bold]{escape(str(result.out_dir))}/[/bold]: one report per arm (trm-diag show "
        f"{escape(str(result.out_dir))}/<arm>), sweep.parquet"
    )
