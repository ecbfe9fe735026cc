"""trm-diag command line: parse options, call the core, render. No math here.

Heavy modules (torch, transformers, vllm, pandas) are imported inside the commands that
need them, so `trm-diag --help`, `bounds` and `gate` start fast.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, THRESHOLDS, VIEW_HELP, parse_horizons
from trm_diag.errors import ExitCode, TrmDiagError, UsageError
from trm_diag.heap import tune_allocator
from trm_diag.kernels.choice import kernel_name
from trm_diag.run.arms import DEFAULT_REFERENCE
from trm_diag.tiers import TIERS

app = typer.Typer(
    name="trm-diag",
    help=(
        "Audit the mismatch between the policy that samples rollouts (pi_roll) and the policy "
        "that is trained (pi_theta), with the bounds and masks of Trust Region Masking "
        "(arXiv 2512.23075)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console(soft_wrap=True)  # data; lines are never wrapped (grep in CI logs), tables still fit
err_console = Console(stderr=True)  # progress, tables, messages

SAMPLE_HELP = "Default: the bundled sample."


def _version(value: bool) -> None:
    if value:
        from trm_diag import __version__

        print(f"trm-diag {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Audit the mismatch between the policy that samples rollouts (pi_roll) and the policy that is trained
    (pi_theta), with the bounds and masks of Trust Region Masking (arXiv 2512.23075)."""


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, slash, n = text.partition("/")
    try:
        pair = (int(i), int(n))
    except ValueError:
        pair = None
    if not slash or pair is None or not (0 <= pair[0] < pair[1]):
        raise UsageError(f"--shard '{text}' is not I/N with 0 <= I < N", "write e.g. --shard 0/4")
    return pair


class RichReporter:
    """Progress bars and warnings on stderr for the pipeline."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextmanager
    def phase(self, name: str, total: int, unit: str = "", steps: int = 1):
        """A progress line: label, bar, 'done/total unit', elapsed and remaining time (fits 80 columns).
        ``steps``: advances per unit (compare counts a rollout's generation and its scoring)."""
        if self.quiet:
            yield lambda n: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[done]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        ) as progress:
            of = total // steps

            def label(completed: float) -> str:
                return f"{int(completed) // steps:,}/{of:,} {unit}".rstrip()

            task = progress.add_task(name[:24], total=total, done=label(0))

            def advance(n: int) -> None:
                progress.advance(task, n)
                progress.update(task, done=label(progress.tasks[0].completed))

            yield advance

    def warn(self, message: str) -> None:
        err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


# ------------------------------------------------------------------ options shared by compare and score
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


def _thresholds(trm_max: float, trm_avg: float, ln_trm: float, ser: float, dppo_tv: float, dppo_kl: float):
    from trm_diag.config import Thresholds

    return Thresholds(trm_max=trm_max, trm_avg=trm_avg, ln_trm=ln_trm, ser=ser, dppo_tv=dppo_tv, dppo_kl=dppo_kl)


def _render(summary: dict, out_dir, json_out: bool) -> None:
    if json_out:
        from trm_diag.report.tables import to_json

        print(to_json(summary))
        return
    from trm_diag.cli.render import render_compare

    render_compare(out_console, summary)  # the answer goes to stdout; progress and messages to stderr
    err_console.print(
        f"report written to [bold]{escape(str(out_dir))}/[/bold] (see it again: trm-diag show {escape(str(out_dir))})"
    )


# ------------------------------------------------------------------ compare
@app.command()
def compare(
    model: ModelOpt = "",
    prompts: Annotated[
        str,
        typer.Option(
            rich_help_panel="Inputs",
            help="Prompt file: .jsonl ('prompt' or 'messages'), .parquet or .txt. " + SAMPLE_HELP,
        ),
    ] = "",
    num_prompts: Annotated[
        int | None, typer.Option(rich_help_panel="Inputs", help="Use only the first N prompts.")
    ] = None,
    samples: Annotated[int, typer.Option(rich_help_panel="Inputs", help="Responses sampled per prompt.")] = 1,
    truncate_prompts: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Inputs",
            help="Cut prompts too long for the model (prompt + --max-new-tokens beyond its positions) to their "
            "last tokens, instead of refusing them.",
        ),
    ] = False,
    rollout: Annotated[
        str,
        typer.Option(
            rich_help_panel="Backends",
            help="Rollout backend spec, e.g. 'vllm:dtype=bfloat16' or 'hf:dtype=bfloat16,attn=sdpa'. "
            "Default: vllm:dtype=bfloat16 when vLLM is installed, else hf:dtype=bfloat16.",
        ),
    ] = "",
    train: TrainOpt = "hf:dtype=float32",
    fidelity: Annotated[
        str,
        typer.Option(
            rich_help_panel="Backends",
            help="; ".join(f"{t.name}: {t.help}" for t in TIERS.values()).replace("[", "\\[") + ".",
        ),
    ] = "exact",
    topk: Annotated[
        int,
        typer.Option(rich_help_panel="Backends", help="Top-K log-probs recorded per sampled token (top-K intervals)."),
    ] = 20,
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
    horizons: HorizonsOpt = ",".join(map(str, DEFAULT_HORIZONS)),
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    out: OutOpt = "trm-report",
    overwrite: OverwriteOpt = False,
    save_rollouts: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Output", help="Also write the rollouts (.jsonl or .parquet) in the schema `score` reads."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Output",
            help="Finish an interrupted run in --out (same command); completed chunks are kept.",
        ),
    ] = False,
    chunk_prompts: Annotated[
        int,
        typer.Option(
            rich_help_panel="Output", help="Prompts per checkpointed chunk: an interruption loses at most one chunk."
        ),
    ] = 64,
    shard: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Output",
            help="Run shard I of N ('I/N'): prompts whose index % N == I. Combine with `trm-diag merge`.",
        ),
    ] = None,
    ray: Annotated[
        int | None,
        typer.Option(
            "--ray",
            rich_help_panel="Output",
            help="Run N shards as tasks on the running Ray cluster (RAY_ADDRESS, else `ray start`'s; one GPU per "
            "shard where there are GPUs), then merge them into --out. Shards go to OUT.shards/; --resume re-runs "
            "only unfinished ones. Needs trm-diag[ray] and the model, prompts and --out on a filesystem every node sees.",
        ),
    ] = None,
    locate_top: Annotated[
        int | None,
        typer.Option(
            "--locate",
            rich_help_panel="Output",
            help="Then locate the K worst tokens: the layer where the two sides part (as `trm-diag locate`).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate rollouts with one backend, rescore the same tokens with another, and write a report.

    Writes tokens.parquet, sequences.parquet, bounds.parquet, breakdowns.parquet, routing.parquet (MoE
    models), report.html and summary.json (last) to --out.
    Example: trm-diag compare --model ./Qwen3-8B --rollout vllm:dtype=bfloat16 --train hf:dtype=float32
    """
    from trm_diag.backends import parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.run.pipeline import DEFAULT_MODEL, DEFAULT_PROMPTS, CompareConfig, default_rollout_spec, run_compare

    if num_prompts is not None and num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts} must be >= 1", "use a positive integer")
    if chunk_prompts < 1:
        raise UsageError(f"--chunk-prompts {chunk_prompts} must be >= 1", "use a positive integer (default 64)")
    cfg = CompareConfig(
        rollout=parse_spec(rollout or default_rollout_spec()),
        train=parse_spec(train),
        model=model or str(DEFAULT_MODEL),
        prompts=prompts or str(DEFAULT_PROMPTS),
        out=out,
        sampling=SamplingConfig(temperature, top_p, top_k, min_p, max_new_tokens, samples, seed, topk),
        fidelity=fidelity,
        thresholds=_thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
        num_prompts=num_prompts,
        save_rollouts=save_rollouts,
        resume=resume,
        chunk_prompts=chunk_prompts,
        shard=_shard(shard),
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        horizons=parse_horizons(horizons),
        truncate_prompts=truncate_prompts,
        view=view,
    )
    if locate_top is not None and locate_top < 1:
        raise UsageError(f"--locate {locate_top} must be >= 1", "give the number of tokens to locate, e.g. --locate 8")
    if ray is not None:
        from trm_diag.run.ray_shards import run_ray

        result = run_ray(cfg, ray, RichReporter(quiet or json_out))
    else:
        result = run_compare(cfg, RichReporter(quiet or json_out))
    _render(result.summary, result.out_dir, json_out)
    if locate_top is not None:
        from trm_diag.run.locate import LocateConfig, run_locate

        found = run_locate(LocateConfig(str(result.out_dir), top=locate_top, trust_remote_code=trust_remote_code,
                                        allow_pickle=allow_pickle), RichReporter(quiet or json_out))  # fmt: skip
        _render_locate(found.summary, json_out)


# ------------------------------------------------------------------ sweep
@app.command()
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
        str, typer.Option("--train", rich_help_panel="Arms", help="The base of --arms trainer.")
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
            "dtype, attention, batch 1, fp32 LM head). Default: engine,trainer when no --arm is given.",
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
    horizons: HorizonsOpt = ",".join(map(str, DEFAULT_HORIZONS)),
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
        thresholds=_thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
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


# ------------------------------------------------------------------ locate
@app.command()
def locate(
    report: Annotated[str, typer.Argument(help="Report folder written by compare.")],
    top: Annotated[
        int, typer.Option(help="Locate the K worst tokens: largest kl (top-K reports: kl_hi; sampled: k2).")
    ] = 8,
    seq: Annotated[int | None, typer.Option(help="Locate one sequence's token (its worst unless --pos).")] = None,
    pos: Annotated[int | None, typer.Option(help="Response position of the token, with --seq.")] = None,
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Where in the network the two sides part: re-run tokens of a report on both backends and find the
    layer (and attention or MLP) where their hidden states first jump apart.

    Writes REPORT/locate.parquet (token x layer x component) and REPORT/locate.json.
    Example: trm-diag locate ./trm-report --top 8;  trm-diag locate ./trm-report --seq 12 --pos 40
    """
    from trm_diag.run.locate import LocateConfig, run_locate

    cfg = LocateConfig(report, top, seq, pos, trust_remote_code, allow_pickle)
    _render_locate(run_locate(cfg, RichReporter(quiet or json_out)).summary, json_out)


def _render_locate(summary: dict, json_out: bool) -> None:
    if json_out:
        from trm_diag.report.tables import to_json

        print(to_json(summary))
        return
    from trm_diag.cli.locate import render_locate

    render_locate(out_console, summary)


# ------------------------------------------------------------------ score
@app.command()
def score(
    rollouts: Annotated[
        str, typer.Argument(help="Rollouts with token ids and rollout log-probs (.jsonl or .parquet).")
    ],
    model: ModelOpt = "",
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
            "exports, scored as real tokens otherwise); the summary says how many.",
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
    train: TrainOpt = "hf:dtype=float32",
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
    horizons: HorizonsOpt = ",".join(map(str, DEFAULT_HORIZONS)),
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    out: OutOpt = "trm-report",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Audit rollouts you already have: rescore their token ids with the training backend.

    The file needs prompt_ids, response_ids and rollout_logprobs per row (docs/rollout-schema.md);
    map other column names with --map. Writes the same report as compare (sampled or top-K tier).
    Example: trm-diag score rollouts.parquet --model ./Qwen3-8B --map rollout_logprobs=old_logprobs
    """
    from trm_diag.backends import parse_spec
    from trm_diag.config import SamplingConfig
    from trm_diag.report.rollouts_io import parse_mapping
    from trm_diag.run.pipeline import DEFAULT_MODEL, ScoreConfig, run_score

    given = {
        k: v
        for k, v in {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}.items()
        if v is not None
    }
    cfg = ScoreConfig(
        rollouts=rollouts,
        train=parse_spec(train),
        model=model or str(DEFAULT_MODEL),
        out=out,
        mapping=parse_mapping(mapping or []),
        sampling=SamplingConfig(**given) if given else None,
        thresholds=_thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
        fidelity=fidelity,
        strip_after_eos=strip_after_eos,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        horizons=parse_horizons(horizons),
        view=view,
        logprobs=logprobs,
        allow_duplicates=allow_duplicates,
    )
    result = run_score(cfg, RichReporter(quiet or json_out))
    _render(result.summary, result.out_dir, json_out)


# ------------------------------------------------------------------ merge
@app.command()
def merge(
    reports: Annotated[list[str], typer.Argument(help="Shard report folders (from compare --shard I/N).")],
    out: OutOpt = "trm-report",
    overwrite: OverwriteOpt = False,
    partial: Annotated[
        bool,
        typer.Option(
            "--partial",
            help="Merge an incomplete set of shards (one is missing): the report covers their prompts only, "
            "and summary.json's coverage says which shards it lacks.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Combine shard reports into one report; statistics are recomputed from the rows, not averaged.

    Every shard of the --shard I/N split must be given (or --partial).
    Example: trm-diag compare --shard 0/2 --out s0 && trm-diag compare --shard 1/2 --out s1 && trm-diag merge s0 s1 --out all
    """
    from trm_diag.run.merge import run_merge

    out_dir, summary = run_merge(reports, out, overwrite, warn=RichReporter(quiet).warn, partial=partial)
    _render(summary, out_dir, json_out)


# ------------------------------------------------------------------ show
SHOW_FORMATS = ("text", "json", "markdown")


@app.command()
def show(
    report: Annotated[str, typer.Argument(help="Report folder (compare, score or merge), or a sweep folder.")],
    fmt: Annotated[str, typer.Option("--format", help="text (the tables compare prints), json or markdown.")] = "text",
    top: Annotated[int, typer.Option(help="How many of the worst sequences to list.")] = 5,
    write_html: Annotated[
        bool,
        typer.Option("--html", help="(Re)write REPORT/report.html (figures and shaded worst sequences) and say where."),
    ] = False,
) -> None:
    """Show a saved report again: the verdict first, then the tables `compare` printed.

    Example: trm-diag show ./trm-report --format markdown > report.md
    """
    from trm_diag.cli.render import render_compare, to_markdown
    from trm_diag.report.tables import check_tables, complete_report, read_sweep, to_json, worst_rows
    from trm_diag.report.verdict import verdict
    from trm_diag.schema import WORST_K

    if fmt not in SHOW_FORMATS:
        raise UsageError(f"--format {fmt} is unknown", f"use one of: {', '.join(SHOW_FORMATS)}")
    if top < 0:
        raise UsageError(f"--top {top} is negative", "use 0 or more")
    swept = read_sweep(report)
    if swept is not None:  # a sweep folder: its verdict and ranked table
        from trm_diag.cli.sweep import render_sweep, sweep_markdown

        if write_html:  # report.html is one report's page: a sweep has one report per arm
            done = [name for name, a in (swept.get("arms") or {}).items() if a.get("status") == "done"]
            raise UsageError(
                f"'{report}' holds a sweep: --html writes one report's page, and a sweep has one report per arm",
                f"run trm-diag show {report}/<arm> --html (arms: {', '.join(done) or 'none finished'})",
            )
        if fmt == "json":
            print(to_json(swept))
        elif fmt == "markdown":
            print(sweep_markdown(swept))
        else:
            render_sweep(out_console, swept)
        return
    path, summary = complete_report(report, tables=False)  # tables are read (and checked) only when shown
    if "verdict" not in summary:  # reports written before verdicts existed
        summary["verdict"] = verdict(summary)
    if write_html:
        from trm_diag.report.html_report import write_html as html_page

        check_tables(path, summary)
        err_console.print(f"wrote {escape(str(html_page(path, summary)))} (open it in a browser; no network needed)")
        return
    saved = summary.get("worst_sequences") or []
    summary["worst_sequences"] = saved[:top]
    more = top > WORST_K and len(saved) == WORST_K  # beyond what summary.json keeps: read sequences.parquet
    if more:
        check_tables(path, summary)
    if fmt == "json":
        print(to_json(summary))
    elif fmt == "markdown":
        print(to_markdown(summary, worst_rows(path, summary, top) if more else None))
    else:
        render_compare(out_console, summary)
        if more:
            from trm_diag.cli.render import worst_table

            out_console.print(worst_table(worst_rows(path, summary, top)))


# ------------------------------------------------------------------ diff
@app.command()
def diff(
    baseline: Annotated[str, typer.Argument(help="The older report (A).")],
    report: Annotated[str, typer.Argument(help="The newer report (B).")],
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    strict: Annotated[
        bool,
        typer.Option(
            help="Refuse reports that differ in model, tokenizer, tier, prompts, sampling, thresholds, view or "
            "horizons (default: warn)."
        ),
    ] = False,
    same_below: Annotated[
        float | None,
        typer.Option(help="Relative changes at or below this read as unchanged (float noise). Default: 1e-6."),
    ] = None,
) -> None:
    """Two reports side by side: what got better or worse, and by how much (B against A).

    Example: trm-diag diff ./before-upgrade ./after-upgrade
    """
    from trm_diag.report.diff import SAME_BELOW, run_diff
    from trm_diag.report.tables import to_json

    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt} is unknown", "use text or json")
    tolerance = SAME_BELOW if same_below is None else same_below
    result = run_diff(baseline, report, strict, tolerance, RichReporter(quiet=True).warn)
    if fmt == "json":
        print(to_json(result))
        return
    from trm_diag.cli.render import render_diff

    render_diff(out_console, result, baseline, report)


# ------------------------------------------------------------------ bounds
@app.command()
def bounds(
    delta: Annotated[float | None, typer.Option(help="D_KL^{tok,max}: max token-level KL(p||q).")] = None,
    eps: Annotated[
        float | None, typer.Option(help="D_TV^{tok,max}: max token-level TV (default: Pinsker min(1, sqrt(delta/2))).")
    ] = None,
    kl_seq: Annotated[
        float | None, typer.Option(help="D_KL^seq: sequence-level KL (used at every T; not with --kl-rate).")
    ] = None,
    tv_seq: Annotated[
        float | None, typer.Option(help="D_TV^seq: sequence-level TV (default: Pinsker from --kl-seq).")
    ] = None,
    kl_rate: Annotated[
        float | None, typer.Option(help="Mean per-token KL: models D_KL^seq(T) = T * rate (also for --budget).")
    ] = None,
    report: Annotated[
        str | None, typer.Option(help="Measured mode: read the inputs from a report folder (read only; see --write).")
    ] = None,
    horizons: Annotated[
        str, typer.Option(help="Comma-separated horizons T (with --report, its observed max length is added).")
    ] = "256,1024,4096,16384",
    budget: Annotated[
        float | None,
        typer.Option(
            help="Inverse view: largest delta with B* <= budget, per T; D_KL^seq = T * per-token KL rate "
            "(the report's, or --kl-rate; else T * delta)."
        ),
    ] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write", help="With --report: add rows for new horizons to its bounds.parquet (keeps its rows)."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
    plot: Annotated[
        str | None, typer.Option(help="Write a log-log plot of the bounds versus T (needs matplotlib).")
    ] = None,
) -> None:
    """Tables of every bound of the paper versus horizon T, from parameters or from a report.

    Example (the paper's table): trm-diag bounds --delta 1e-4 --eps 5e-3 --kl-seq 0.01 --tv-seq 0.05 --horizons 4096
    """
    from trm_diag.cli.bounds import run_bounds

    run_bounds(
        delta=delta, eps=eps, kl_seq=kl_seq, tv_seq=tv_seq, kl_rate=kl_rate, report=report,
        horizons=parse_horizons(horizons), budget=budget, write=write, json_out=json_out, plot=plot,
        out_console=out_console, err_console=err_console,
    )  # fmt: skip


# ------------------------------------------------------------------ gate
@app.command()
def gate(
    report: Annotated[str, typer.Argument(help="Report folder written by `trm-diag compare`.")],
    rule: Annotated[
        list[str] | None,
        typer.Option("--rule", "-r", help="Rule '<metric> <op> <value>', e.g. 'token.kl.p99 <= 1e-3'. Repeatable."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="TOML file with rules = \\[...] (top level, \\[gate] or \\[tool.trm-diag.gate]). "
            "Default: \\[tool.trm-diag.gate] of ./pyproject.toml when no --rule is given."
        ),
    ] = None,  # fmt: skip
    baseline: Annotated[
        str | None, typer.Option(help="Older report for relative rules: 'token.kl.p99 <= 1.2 * baseline'.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table, json, junit or github (workflow annotations).")
    ] = "table",
    output: Annotated[
        str | None, typer.Option(help="Also write the result to this file (JSON for table, else the chosen format).")
    ] = None,
    list_metrics: Annotated[
        bool, typer.Option("--list-metrics", help="List every metric name with its value.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(help="Refuse a --baseline of another model, tokenizer or fidelity tier (default: warn)."),
    ] = False,
) -> None:
    """Check rules against a report: exit 0 when all hold, 1 when any fails, 2 on a usage or input error.

    Metric names: token.<column>.<stat>, seq.<column>.<stat> (stat: mean p50 p90 p99 p999 max min),
    accept.<criterion>, bounds.<bound>@<T>, metrics.<name>, routing.flip_rate, views.<view>.<stat>,
    breakdown.<bucket>.<stat> (`--list-metrics` lists them all).
    Example: trm-diag gate ./trm-report -r 'token.kl.p99 <= 1e-3' -r 'accept.trm_max >= 0.7'
    """
    from pathlib import Path

    from trm_diag.cli.gate import run_gate

    code = run_gate(
        report=report, rules=rule or [], config=Path(config) if config else None,
        baseline=baseline, fmt=fmt, output=output, list_metrics=list_metrics,
        out_console=out_console, strict=strict, warn=RichReporter(quiet=True).warn,
    )  # fmt: skip
    raise typer.Exit(code)


INTERRUPTED = 130  # the shell's exit code for SIGINT
TERMINATED = 143  # and for SIGTERM (128 + 15)

# click's usage errors (typer vendors its own click, so they are matched by name)
USAGE_EXCEPTIONS = {"UsageError", "BadParameter", "MissingParameter", "NoSuchOption", "BadOptionUsage",
                    "BadArgumentUsage", "ClickException", "FileError", "NoArgsIsHelpError"}  # fmt: skip


class _Signals:
    """SIGTERM ends a run the way Ctrl-C does (engines closed, finished chunks kept), with its own exit code."""

    terminated = False

    @classmethod
    def install(cls) -> None:
        import signal

        def on_term(signum: int, frame: object) -> None:
            cls.terminated = True
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (an embedding program): leave its handler alone
            pass


def _fail(problem: str, fix: str | None, code: int) -> None:
    err_console.print(
        f"[bold red]error:[/bold red] {escape(TrmDiagError(problem, fix).one_line())}", highlight=False, soft_wrap=True
    )
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn TrmDiagError and OS errors into one line and their exit code."""
    from trm_diag.errors import os_error

    tune_allocator()  # reuse chunk buffers instead of faulting fresh pages per op (heap.py)
    _Signals.install()
    try:
        kernel_name()  # a bad TRM_DIAG_KERNEL fails here, before any work
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
    except TrmDiagError as e:
        _fail(e.problem, e.fix, int(e.exit_code))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = TERMINATED if _Signals.terminated else INTERRUPTED
    except OSError as e:  # disk full, read-only folder ...: the environment, not a bug
        if os.environ.get("TRM_DIAG_DEBUG"):  # the traceback, for a bug report
            raise
        err = os_error(e)
        _fail(err.problem, err.fix, int(err.exit_code))
    except Exception as e:  # bad options arrive here in non-standalone mode (typer's vendored click)
        if type(e).__name__ in USAGE_EXCEPTIONS and hasattr(e, "show"):
            e.show(file=sys.stderr)
            sys.exit(int(ExitCode.USAGE))
        raise
    if code == INTERRUPTED and _Signals.terminated:
        code = TERMINATED
    if code in (INTERRUPTED, TERMINATED):  # typer turns Ctrl-C into a silent Exit(130)
        what = "terminated" if code == TERMINATED else "interrupted"
        err_console.print(
            f"[red]{what}.[/red] Finished chunks are kept in the --out folder's .trm-partial/; "
            "run the same command with --resume to finish."
        )
    sys.exit(code if isinstance(code, int) else 0)
