"""`trm-diag compare`: sample with one backend, rescore with another, write and print the report."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, print_locate, print_report
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
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    QuietOpt,
    RemoteCodeOpt,
    SeedOpt,
    SerOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    TrainOpt,
    TrmAvgOpt,
    TrmMaxOpt,
    ViewOpt,
    thresholds,
)
from trm_diag.config import DEFAULT_VIEW, parse_horizons
from trm_diag.errors import UsageError
from trm_diag.tiers import TIERS


def _shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/N as (I, N); None without --shard."""
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
    horizons: HorizonsOpt = HORIZONS,
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
    memory_budget: Annotated[
        str | None,
        typer.Option(
            rich_help_panel="Output",
            help="RAM for the rollout engine's full rows (exact tier), e.g. 4GiB; rows beyond it wait on disk "
            "under --out (checked before generation). Never changes a number. Default: $TRM_DIAG_MEMORY_BUDGET, "
            "else 1GiB.",
        ),
    ] = None,
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
    from trm_diag.report.row_store import parse_bytes
    from trm_diag.run.pipeline import DEFAULT_MODEL, DEFAULT_PROMPTS, CompareConfig, default_rollout_spec, run_compare

    if num_prompts is not None and num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts} must be >= 1", "use a positive integer")
    if chunk_prompts < 1:
        raise UsageError(f"--chunk-prompts {chunk_prompts} must be >= 1", "use a positive integer (default 64)")
    budget = None if memory_budget is None else parse_bytes(memory_budget, "--memory-budget")
    cfg = CompareConfig(
        rollout=parse_spec(rollout or default_rollout_spec()),
        train=parse_spec(train),
        model=model or str(DEFAULT_MODEL),
        prompts=prompts or str(DEFAULT_PROMPTS),
        out=out,
        sampling=SamplingConfig(temperature, top_p, top_k, min_p, max_new_tokens, samples, seed, topk),
        fidelity=fidelity,
        thresholds=thresholds(trm_max, trm_avg, ln_trm, ser, dppo_tv, dppo_kl),
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
        memory_budget=budget,
    )
    if locate_top is not None and locate_top < 1:
        raise UsageError(f"--locate {locate_top} must be >= 1", "give the number of tokens to locate, e.g. --locate 8")
    if ray is not None:
        from trm_diag.run.ray_shards import run_ray

        result = run_ray(cfg, ray, RichReporter(quiet or json_out))
    else:
        result = run_compare(cfg, RichReporter(quiet or json_out))
    print_report(result.summary, result.out_dir, json_out)
    if locate_top is not None:
        from trm_diag.run.locate import LocateConfig, run_locate

        found = run_locate(LocateConfig(str(result.out_dir), top=locate_top, trust_remote_code=trust_remote_code,
                                        allow_pickle=allow_pickle), RichReporter(quiet or json_out))  # fmt: skip
        print_locate(found.summary, json_out)
