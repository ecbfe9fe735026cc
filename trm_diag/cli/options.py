"""The options several commands share, defined once (help texts, panels, defaults), and the helper
that turns the threshold options into a Thresholds."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.config import DEFAULT_HORIZONS, THRESHOLDS, VIEW_HELP

SAMPLE_HELP = "Default: the bundled sample."

# ------------------------------------------------------------------ options shared by compare, sweep and score
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        rich_help_panel="Inputs",
        help="Model folder (a spec's model=PATH overrides one side). " + SAMPLE_HELP,
    ),
]
TrainOpt = Annotated[
    str,
    typer.Option(
        "--train", rich_help_panel="Backends", help="Training backend spec, e.g. 'hf:dtype=float32,attn=eager'."
    ),
]
OutOpt = Annotated[str, typer.Option("--out", rich_help_panel="Output", help="Report folder.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", rich_help_panel="Output", help="Replace a report already in --out.")
]
TrmMaxOpt = Annotated[float, typer.Option("--trm-max", rich_help_panel="Thresholds", help=THRESHOLDS["trm_max"].help)]
TrmAvgOpt = Annotated[float, typer.Option("--trm-avg", rich_help_panel="Thresholds", help=THRESHOLDS["trm_avg"].help)]
LnTrmOpt = Annotated[float, typer.Option("--ln-trm", rich_help_panel="Thresholds", help=THRESHOLDS["ln_trm"].help)]
SerOpt = Annotated[float, typer.Option("--ser", rich_help_panel="Thresholds", help=THRESHOLDS["ser"].help)]
DppoTvOpt = Annotated[float, typer.Option("--dppo-tv", rich_help_panel="Thresholds", help=THRESHOLDS["dppo_tv"].help)]
DppoKlOpt = Annotated[float, typer.Option("--dppo-kl", rich_help_panel="Thresholds", help=THRESHOLDS["dppo_kl"].help)]
DEFAULT = {k: t.default for k, t in THRESHOLDS.items()}
HORIZONS = ",".join(map(str, DEFAULT_HORIZONS))  # the default of --horizons
HorizonsOpt = Annotated[
    str,
    typer.Option(
        "--horizons",
        rich_help_panel="Thresholds",
        help="Horizons T for bounds.parquet (the observed max length is added).",
    ),
]
RemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", rich_help_panel="Backends", help="Allow checkpoints that ship their own model code."
    ),
]
PickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", rich_help_panel="Backends", help="Allow pickle (.bin) weights; safetensors only by default."
    ),
]
ScorePickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        rich_help_panel="Inputs",
        help="Allow pickles: .bin weights, and pickled training-run dumps (slime .pt, SkyRL .pkl), which can run "
        "code when loaded; dumps are then read with a restricted unpickler. Off by default.",
    ),
]
InputFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        rich_help_panel="Inputs",
        help="What ROLLOUTS is: jsonl, parquet (the rollout schema), or a training run's dump: slime "
        "(--dump-details folder or one rollout_data/N.pt), skyrl (dumped_data/ or one .pkl), prime-rl "
        "(rollouts/step_N/rank_R.bin). Default: by suffix, else the dump detected.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", rich_help_panel="Output", help="Print summary.json to stdout instead of tables.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Output", help="No progress bars.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", rich_help_panel="Sampling", help="Sampling temperature (0 = greedy).")
]
TopPOpt = Annotated[float, typer.Option("--top-p", rich_help_panel="Sampling", help="Nucleus sampling (1 = off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", rich_help_panel="Sampling", help="Top-k sampling (0 = off).")]
ViewOpt = Annotated[
    str,
    typer.Option(
        "--view",
        rich_help_panel="Sampling",
        help="With top-p / top-k / min-p: the view that drives masks, bounds, metrics and the gate; "
        + "; ".join(f"{v}: {h}" for v, h in VIEW_HELP.items())
        + ". With --fidelity exact the summary shows all three side by side; the topk and sampled tiers give "
        "the pipeline view only.",
    ),
]
ScoreViewOpt = Annotated[
    str,
    typer.Option(
        "--view",
        rich_help_panel="Sampling",
        help="pipeline (the only view score gives: its rollouts carry no full rows, and replay and full need the "
        "rollout's kept set; compare --fidelity exact gives all three). Without top-p / top-k / min-p the views "
        "coincide.",
    ),
]
MinPOpt = Annotated[float, typer.Option("--min-p", rich_help_panel="Sampling", help="Min-p sampling (0 = off).")]
MaxNewTokensOpt = Annotated[int, typer.Option(rich_help_panel="Sampling", help="Maximum response length.")]
SeedOpt = Annotated[int, typer.Option(rich_help_panel="Sampling", help="Sampling seed.")]


def thresholds(trm_max: float, trm_avg: float, ln_trm: float, ser: float, dppo_tv: float, dppo_kl: float):
    """The Thresholds of the six threshold options (config is imported here, not at start-up)."""
    from trm_diag.config import Thresholds

    return Thresholds(trm_max=trm_max, trm_avg=trm_avg, ln_trm=ln_trm, ser=ser, dppo_tv=dppo_tv, dppo_kl=dppo_kl)
