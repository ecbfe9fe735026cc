"""`compare --ray N`: the N shards of a compare as Ray tasks on a running cluster, then one merged report.

RL teams already run Ray (verl, OpenRLHF, SkyRL). Each task is a normal `compare --shard I/N` into
``<out>.shards/shard-I-of-N`` (one GPU per task where the cluster has GPUs, one CPU otherwise); when
all are done they are merged into ``--out`` exactly as `trm-diag merge` does. A finished shard is kept:
`--ray N --resume` runs only the shards that are not complete (each resumes its own chunks). Every
node must see the model, the prompts and the output folder at the same paths (a shared filesystem),
and have trm-diag installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from trm_diag.errors import BackendFailure, BackendUnavailable, ExitCode, InputError, TrmDiagError, UsageError
from trm_diag.report.outputs import PARTIAL_DIR
from trm_diag.report.tables import complete_report
from trm_diag.run.pipeline import (
    CompareConfig,
    CompareResult,
    Reporter,
    check_compare_inputs,
    run_compare,
    select_prompts,
)


def shard_dir(out: str | Path, i: int, n: int) -> Path:
    """Where shard i of n writes its report: beside --out, so the merged report's folder stays clean."""
    out = Path(out)
    return out.parent / f"{out.name}.shards" / f"shard-{i}-of-{n}"


def _complete(path: Path) -> bool:
    """A shard that finished: its report is complete (report.complete_report's checks)."""
    try:
        complete_report(path, tables=False)
    except InputError:
        return False
    return True


def _run_shard(cfg: CompareConfig) -> str:
    """One shard, inside a Ray worker: a quiet compare; errors travel back as (message, fix)."""
    try:
        run_compare(cfg)
    except TrmDiagError as e:
        return json.dumps({"error": e.problem, "fix": e.fix, "code": int(e.exit_code)})
    return ""


def _connect() -> Any:
    """The running cluster (RAY_ADDRESS, else the one `ray start` left on this machine)."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailable(
            "--ray needs the package 'ray', which is not installed", "pip install 'trm-diag[ray]'"
        ) from None
    address = os.environ.get("RAY_ADDRESS", "auto")
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError:
            raise UsageError(
                f"no running Ray cluster found (address {address!r})",
                "start one with `ray start --head` (or on your cluster), or set RAY_ADDRESS",
            ) from None
    return ray


def run_ray(cfg: CompareConfig, n: int, reporter: Reporter | None = None) -> CompareResult:
    """Run the N shards of ``cfg`` as Ray tasks, wait, merge into cfg.out; returns the merged report."""
    from trm_diag.run.merge import run_merge

    rep = reporter or Reporter()
    if n < 2:
        raise UsageError(
            f"--ray {n} needs at least 2 shards", "give the number of shards, e.g. --ray 8 (or drop --ray)"
        )
    if cfg.shard is not None:
        raise UsageError("--ray and --shard both split the prompts", "use one: --ray N runs every shard for you")
    if cfg.save_rollouts:
        raise UsageError("--save-rollouts with --ray would have every shard write one file", "run with --shard I/N "
                         "and a --save-rollouts file per shard, or drop --save-rollouts")  # fmt: skip
    # every input is checked here, before a task starts: a bad path fails once, not once per shard
    if not select_prompts(replace(cfg, shard=(n - 1, n)))[0]:  # the prompts file, and the last shard has prompts
        raise UsageError(f"--ray {n}: shard {n - 1}/{n} holds no prompts", "use fewer shards than prompts")
    specs = cfg.rollout.with_model(cfg.model), cfg.train.with_model(cfg.model)
    check_compare_inputs(replace(cfg, resume=False, overwrite=cfg.overwrite or cfg.resume), *specs)  # merged --out
    dirs = [shard_dir(cfg.out, i, n) for i in range(n)]
    todo = [i for i in range(n) if not (cfg.resume and _complete(dirs[i]))]
    ray = _connect()
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_retries=0)(_run_shard)
    pending = {}
    for i in todo:
        resume = cfg.resume and (dirs[i] / PARTIAL_DIR).is_dir()  # an interrupted shard finishes its chunks
        shard_cfg = replace(cfg, shard=(i, n), out=str(dirs[i]), resume=resume, overwrite=not resume)
        pending[task.remote(shard_cfg)] = i
    failures = []
    with rep.phase(f"shards on Ray ({'GPU' if gpus else 'CPU'} each)", n, "shards") as advance:
        advance(n - len(todo))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                err = ray.get(done[0])
            except Exception as e:  # a worker that died (out of memory, a node lost): the shard can resume
                err = json.dumps({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", "code": 3})
            if err:
                failures.append((i, json.loads(err)))
            advance(1)
    if failures:
        i, info = failures[0]
        kind = UsageError if info.get("code") == ExitCode.USAGE else BackendFailure
        raise kind(
            f"{len(failures)} of {n} shards failed; shard {i}: {info['error']}",
            (info.get("fix") or "fix the cause")
            + f"; then re-run with --resume (finished shards in {dirs[0].parent} are kept)",
        )
    out_dir, summary = run_merge([str(d) for d in dirs], cfg.out, overwrite=True, warn=rep.warn)
    return CompareResult(out_dir, summary)
