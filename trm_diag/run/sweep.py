"""`trm-diag sweep`: sample once, re-score the same tokens under many arms, attribute the mismatch.

Phases (each saved in the folder's .trm-partial/, so `--resume` continues where a run stopped):
1. the rollout engine generates every rollout once and scores them (its full rows go to disk);
2. the reference (default hf:dtype=float64) scores the same tokens (rows to disk);
3. the arms run one after another (two vLLM engines never coexist; memory stays one batch): each writes
   a normal report into OUT/<arm>/ (rollout side vs arm) and its own error against the reference;
4. sweep.parquet, rollouts.parquet and summary.json (written last) gather them (docs/design.md section 8).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from trm_diag.backends import load_tokenizer, parse_spec, reported_logprobs
from trm_diag.backends.base import Backend, first_line
from trm_diag.backends.checkpoint import check_checkpoint
from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, BackendSpec, SamplingConfig, Thresholds, as_dict, check_view
from trm_diag.errors import BackendFailure, BackendUnavailable, InputError, ModelError, UsageError
from trm_diag.math.attribution import decompose, error_stats, reference_errors
from trm_diag.report.outputs import (
    PARTIAL_DIR,
    SWEEP_ROLLOUTS,
    SWEEP_STATE,
    SWEEP_TABLE,
    check_out_dir,
    claim_out_dir,
    clear_owned,
    owned_paths,
)
from trm_diag.report.partial import PartialStore, run_fingerprint
from trm_diag.report.row_file import RowReader, RowWriter, bytes_needed
from trm_diag.report.sweep_table import HORIZON_4096, headline, table_rows, verdict
from trm_diag.report.tables import atomic_write, complete_report, to_json
from trm_diag.run.arms import Arm, plan_arms
from trm_diag.run.pipeline import (
    DEFAULT_MODEL,
    DEFAULT_PROMPTS,
    LP_ROLL_SOURCES,
    CompareConfig,
    CompareResult,
    Engines,
    Reporter,
    check_tokenizers,
    check_vocab_compatible,
    encode_prompts,
    score_rollouts,
    select_prompts,
    side_info,
    write_report,
)  # fmt: skip
from trm_diag.run.score import SCORE_CHUNK
from trm_diag.types import Rollout, TokenRows

ERR_BLOCK = 1 << 22  # reference-error entries per step (~32 MB of float64 per temporary)


@dataclass(frozen=True)
class SweepConfig:
    """Everything `trm-diag sweep` needs; recorded in its summary.json."""

    rollout: BackendSpec
    train: BackendSpec  # the base of the `trainer` preset
    arms: tuple[str, ...] = ()  # explicit arm specs
    presets: tuple[str, ...] = ()  # arms.ARM_PRESETS names
    reference: BackendSpec | None = None  # None: no reference (no own errors)
    model: str = str(DEFAULT_MODEL)
    prompts: str = str(DEFAULT_PROMPTS)
    out: str = "trm-sweep"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    num_prompts: int | None = None
    horizons: tuple[int, ...] = DEFAULT_HORIZONS
    view: str = DEFAULT_VIEW
    truncate_prompts: bool = False
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False


class _Tee:
    """An arm's backend whose every scored batch also goes to ``on_rows`` (its own error against the
    reference), so the arm's rows are computed once for its report and its error."""

    def __init__(self, backend: Backend, on_rows: Any) -> None:
        self.backend, self.on_rows = backend, on_rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def score(self, pairs: list, sampling: SamplingConfig) -> list[TokenRows]:
        rows = list(self.backend.score(pairs, sampling))
        self.on_rows(rows)
        return rows


def _errors_against(ref: RowReader, index: int, scores: Any, response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(kl, lp_err) of one response: a side's scores(a, b) against the reference's rows, a block at a time."""
    import torch

    n = len(response)
    step = max(1, ERR_BLOCK // max(ref.width, 1))
    kl, err = np.empty(n), np.empty(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        y = torch.tensor(response[a:b])
        kl[a:b], err[a:b] = reference_errors(ref.scores(index, a, b), scores(a, b), y)
    return kl, err


def run_sweep(cfg: SweepConfig, reporter: Reporter | None = None) -> CompareResult:
    """Run the sweep (or finish an interrupted one with cfg.resume) and write its folder."""
    with ExitStack() as run, Engines() as engines:
        return _Sweep(cfg, reporter or Reporter(), engines, run).run()


class _Sweep:
    def __init__(self, cfg: SweepConfig, rep: Reporter, engines: Engines, run: ExitStack) -> None:
        self.rep, self.engines, self.stack = rep, engines, run
        self.t_start = time.perf_counter()
        self.timings: dict[str, float] = {}
        roll = cfg.rollout.with_model(cfg.model)
        horizons = tuple(sorted(set(cfg.horizons) | {HORIZON_4096}))
        sampling = replace(cfg.sampling, logprobs=reported_logprobs(roll))
        self.cfg = cfg = replace(cfg, rollout=roll, train=cfg.train.with_model(cfg.model), sampling=sampling,
                                 horizons=horizons, reference=cfg.reference and cfg.reference.with_model(cfg.model))  # fmt: skip

    # ------------------------------------------------------------------ checks (nothing written yet)
    def _check(self) -> None:
        import torch

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        self.plan = plan_arms(list(cfg.arms), list(cfg.presets), cfg.rollout, cfg.train, cuda, cfg.model)
        self.compare_cfg = CompareConfig(
            rollout=cfg.rollout, train=cfg.train, model=cfg.model, prompts=cfg.prompts, sampling=cfg.sampling,
            num_prompts=cfg.num_prompts, truncate_prompts=cfg.truncate_prompts,
        )  # fmt: skip
        self.prompts, self.indices = select_prompts(self.compare_cfg)
        check_view(cfg.view, "exact", cfg.sampling)
        sides = [cfg.rollout, *([cfg.reference] if cfg.reference else []), *(a.spec for a in self.plan if not a.skip)]
        for spec in sides:
            check_checkpoint(spec.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
            check_vocab_compatible(cfg.rollout, spec)
        self.out = check_out_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=[cfg.prompts],
                                 models=[spec.model for spec in sides])  # fmt: skip
        self._check_arm_folders()
        # the rollouts depend on neither the arms nor the reference: a sweep resumes with others (_check_reference)
        settings = {
            k: v
            for k, v in as_dict(cfg).items()
            if k not in ("out", "overwrite", "resume", "arms", "presets", "reference")
        }
        self.fingerprint = run_fingerprint(settings, [cfg.prompts])
        if cfg.resume:
            PartialStore.check_resumable(self.out, self.fingerprint, 1)

    def _check_arm_folders(self) -> None:
        """An arm writes OUT/<arm>/: a folder of that name that is not a sweep's own arm folder (a user's) is
        refused, so that nothing in it is replaced; hf sides' device and seed are checked before any work."""
        from trm_diag.backends.hf import check_spec

        for spec in (self.cfg.rollout, self.cfg.reference, *(a.spec for a in self.plan if not a.skip)):
            if spec is not None and spec.name == "hf":
                check_spec(spec)
        owned = set(owned_paths(self.out))
        for arm in self.plan:
            folder = self.out / arm.name
            if not arm.skip and folder.exists() and folder not in owned:
                raise UsageError(
                    f"'{folder}' exists and is not an arm folder of a sweep: the arm {arm.name} would write its report "
                    "there", "move that folder away, or choose another --out folder",
                )  # fmt: skip

    # ------------------------------------------------------------------ the run
    def run(self) -> CompareResult:
        cfg = self.cfg
        self._check()
        self.stack.enter_context(
            claim_out_dir(self.out, overwrite=cfg.overwrite and not cfg.resume, warn=self.rep.warn)
        )
        self.store = PartialStore(self.out, self.fingerprint, 1, cfg.resume, cfg.overwrite, command="sweep")
        self.work = self.out / PARTIAL_DIR
        self.state = self._read_state()
        self._check_reference()
        rollouts = self._rollouts()
        roll_rows = RowReader(self.work / "rows-rollout.bin")
        self.tokenizer = load_tokenizer(cfg.rollout.model, cfg.trust_remote_code)
        e_roll = self._reference(rollouts, roll_rows)
        arms = [self._arm(arm, rollouts, roll_rows, e_roll) for arm in self.plan]
        return self._finish(rollouts, arms + self._earlier_arms())

    def _read_state(self) -> dict[str, Any]:
        path = self.work / SWEEP_STATE
        if self.cfg.resume and path.is_file():
            return json.loads(path.read_text())
        return {"arms": {}}

    def _check_reference(self) -> None:
        """A sweep resumed with another reference (or none): the reference's rows and every own error are
        measured again; the rollouts and the rollout side's rows are kept."""
        now = self.cfg.reference.describe() if self.cfg.reference else None
        if self.state.get("reference_spec", now) == now:
            self.state["reference_spec"] = now
            return
        before = self.state["reference_spec"]
        for name in ("rows-reference.bin", "err-rollout.npy"):
            (self.work / name).unlink(missing_ok=True)
        for key in ("reference", "rollout_errors"):
            self.state.pop(key, None)
        arms = sorted(self.state["arms"])
        self.state.update(reference_spec=now, arms={})
        self._save_state()
        said = {k: _short(parse_spec(v)) if v else "none" for k, v in (("before", before), ("now", now))}
        self.rep.warn(
            f"the reference changed ({said['before']} -> {said['now']}): the sampled rollouts are kept; the "
            f"own errors are measured again{', and the finished arms re-run (' + ', '.join(arms) + ')' if arms else ''}"
        )

    def _earlier_arms(self) -> list[dict[str, Any]]:
        """Arms an earlier run of this sweep finished that this command does not name: kept in the table while
        their reports are whole (said in a warning), else left out (said too)."""
        planned = {a.name for a in self.plan}
        kept = []
        for name, row in sorted(self.state["arms"].items()):
            if name in planned or row.get("status") != "done":
                continue
            try:
                complete_report(self.out / name, tables=False)
            except InputError as e:
                self.rep.warn(f"arm {name} (finished earlier, not among this command's arms) is left out: {e.problem}")
                continue
            self.rep.warn(f"arm {name} (finished earlier, not among this command's arms) is kept in the table")
            kept.append(row)
        return kept

    def _save_state(self) -> None:
        atomic_write(self.work / SWEEP_STATE, lambda tmp: Path(tmp).write_text(to_json(self.state)))

    def _rollouts(self) -> list[Rollout]:
        """Phase 1: generate once (kept for --resume) and the rollout engine's full rows of every token."""
        cfg, kw = self.cfg, {"trust_remote_code": self.cfg.trust_remote_code, "allow_pickle": self.cfg.allow_pickle}
        path, roll = self.work / "rows-rollout.bin", None
        if 0 in self.store.generated:
            rollouts = self.store.generated_rollouts(0)
        else:
            t = time.perf_counter()
            with self.rep.phase(f"load rollout ({cfg.rollout.name})", 1) as advance:
                roll = self.engines.load(cfg.rollout, **kw)
                advance(1)
            ids = encode_prompts(self.prompts, roll, cfg.train, self.compare_cfg, self.rep)
            total = len(self.prompts) * cfg.sampling.samples_per_prompt
            with self.rep.phase("generate", total, "rollouts") as advance:
                rollouts = roll.generate(ids[0 : len(self.prompts)], cfg.sampling, advance, prompt_indices=self.indices)
            self.store.save_generated(0, rollouts)
            self.timings["generate_s"] = time.perf_counter() - t
        self._check_disk(rollouts)
        if not RowReader.complete(path):
            t = time.perf_counter()
            if roll is None:
                roll = self.engines.load(cfg.rollout, **kw)
            self.state["rollout"] = side_info(roll)
            self._save_rows(roll, rollouts, path, "float32", "rollout rows")
            self._save_state()
            self.timings["rollout_rows_s"] = time.perf_counter() - t
        if roll is not None:
            roll.close()
        return rollouts

    def _check_disk(self, rollouts: list[Rollout]) -> None:
        """The rows kept on disk must fit, with room to spare; refused in one line before they are written."""
        from trm_diag.backends.checkpoint import read_config, vocab_size

        tokens = sum(len(r.response_ids) for r in rollouts)
        width = vocab_size(read_config(self.cfg.rollout.model))
        need = bytes_needed(tokens, width, "float32") + (
            bytes_needed(tokens, width, "float64") if self.cfg.reference else 0
        )
        free = shutil.disk_usage(self.out).free
        if need > free - (1 << 30):
            raise UsageError(
                f"the sweep keeps the rollout and reference rows on disk: {need / 2**30:.1f} GiB for {tokens:,} tokens "
                f"at V = {width:,}, but '{self.out}' has {free / 2**30:.1f} GiB free",
                "use fewer prompts (--num-prompts), shorter responses (--max-new-tokens), or another --out disk",
            )

    def _save_rows(self, backend: Backend, rollouts: list[Rollout], path: Path, dtype: str, label: str) -> None:
        writer = RowWriter(path, [len(r.response_ids) for r in rollouts], backend.vocab_width, dtype)
        with self.rep.phase(label, len(rollouts), "rollouts") as advance:
            for s in range(0, len(rollouts), backend.batch_size):
                batch = rollouts[s : s + backend.batch_size]
                for j, rows in enumerate(
                    backend.score([(r.prompt_ids, r.response_ids) for r in batch], self.cfg.sampling)
                ):
                    writer.put(s + j, rows)
                advance(len(batch))
        writer.finish()

    def _reference(self, rollouts: list[Rollout], roll_rows: RowReader) -> np.ndarray | None:
        """Phase 2: the reference's rows, and the rollout side's own error against them (None: no reference)."""
        cfg = self.cfg
        if cfg.reference is None:
            return None
        path = self.work / "rows-reference.bin"
        if not RowReader.complete(path):
            t = time.perf_counter()
            keep = ("the sampled rollouts are kept: run the same command with --resume and another --reference "
                    "(e.g. hf:dtype=float32), or --reference none")  # fmt: skip
            try:
                ref = self.engines.load(
                    cfg.reference, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle
                )
                check_tokenizers(self.tokenizer, ref.tokenizer)
                self.state["reference"] = side_info(ref)
                self._save_rows(ref, rollouts, path, "float64", f"reference ({cfg.reference.name})")
            except (ModelError, BackendFailure, BackendUnavailable) as e:
                raise type(e)(f"the reference {_short(cfg.reference)}: {e.problem}", keep) from None
            except RuntimeError as e:  # a kernel the engine lacks for this dtype, out of memory ...
                raise BackendFailure(
                    f"the reference {_short(cfg.reference)} failed while scoring: {first_line(e)}", keep
                ) from e
            ref.close()
            self.timings["reference_s"] = time.perf_counter() - t
        self.ref_rows = RowReader(path)
        err_path = self.work / "err-rollout.npy"
        if err_path.is_file():
            e_roll = np.load(err_path)
        else:
            kl, err = [], []
            for i, r in enumerate(rollouts):
                k, e = _errors_against(self.ref_rows, i, lambda a, b, i=i: roll_rows.scores(i, a, b), r.response_ids)
                kl.append(k)
                err.append(e)
            e_roll = np.concatenate(err) if err else np.empty(0)
            self.state["rollout_errors"] = error_stats(np.concatenate(kl) if kl else np.empty(0), e_roll)
            atomic_write(err_path, lambda tmp: np.save(open(tmp, "wb"), e_roll))
            self._save_state()
        return e_roll

    def _arm(
        self, arm: Arm, rollouts: list[Rollout], roll_rows: RowReader, e_roll: np.ndarray | None
    ) -> dict[str, Any]:
        """Phase 3, one arm: its report in OUT/<name>/ and its numbers (skipped or failed: the reason)."""
        row = {
            "arm": arm.name,
            "kind": "arm",
            "backend": arm.spec.name,
            "changed": arm.changed,
            "spec": arm.spec.describe(),
            "against": _short(arm.against) if arm.against is not None else "",
        }
        if arm.skip:
            return {**row, "status": "skipped", "reason": arm.skip}
        done = self.state["arms"].get(arm.name)
        folder = self.out / arm.name
        if done and done.get("spec") == row["spec"] and done.get("status") == "done":
            try:
                complete_report(folder, tables=False)
                return done
            except InputError:
                pass  # its report is gone or damaged: run the arm again
        _clear_arm_folder(folder)  # an arm this sweep started and did not finish
        t = time.perf_counter()
        try:
            with self.rep.phase(f"load {arm.name}"[:24], 1) as advance:
                backend = self._load_arm(arm)
                advance(1)
        except (ModelError, BackendFailure, BackendUnavailable) as e:
            self.rep.warn(f"arm {arm.name} skipped: {e.problem}")
            return {**row, "status": "failed", "reason": e.problem}
        try:
            return self._run_arm(arm, backend, row, rollouts, roll_rows, e_roll, folder, t)
        except (RuntimeError, BackendFailure) as e:  # a kernel the engine lacks for this setting, out of memory ...
            problem = e.problem if isinstance(e, BackendFailure) else first_line(e)
            self.rep.warn(f"arm {arm.name} failed while scoring: {problem}")
            backend.close()
            _clear_arm_folder(folder)
            return {**row, "status": "failed", "reason": problem}

    def _run_arm(
        self, arm: Arm, backend: Backend, row: dict[str, Any], rollouts: list[Rollout], roll_rows: RowReader,
        e_roll: np.ndarray | None, folder: Path, t: float,
    ) -> dict[str, Any]:  # fmt: skip
        """One loaded arm: score the rollouts (its own error on the way), write its report, record its row."""
        cfg = self.cfg
        check_tokenizers(self.tokenizer, backend.tokenizer)
        errs: dict[str, list[np.ndarray]] = {"kl": [], "err": []}
        cursor = [0]

        def on_rows(rows: list[TokenRows]) -> None:
            if e_roll is None:
                return
            for tr in rows:
                i = cursor[0]
                k, e = _errors_against(self.ref_rows, i, tr.scores, rollouts[i].response_ids)
                errs["kl"].append(k)
                errs["err"].append(e)
                cursor[0] += 1

        tee = _Tee(backend, on_rows)
        own = self._against(arm, backend)  # the trainer against itself: the base spec's own scoring pass
        n = len(rollouts)
        chunks = [(a, min(n, a + SCORE_CHUNK)) for a in range(0, n, SCORE_CHUNK)]
        folder.mkdir(parents=True, exist_ok=True)
        store = PartialStore(folder, self.fingerprint, len(chunks), resume=False, overwrite=True, command="sweep-arm")
        with self.rep.phase(f"score {arm.name}"[:24], n, "rollouts") as advance:
            for ci, (a, b) in enumerate(chunks):
                if own is None:
                    held = lambda s, pairs, a=a: [roll_rows.rows(a + s + j) for j in range(len(pairs))]  # noqa: E731
                else:
                    held = lambda s, pairs: own.score(pairs, cfg.sampling)  # noqa: E731
                scored = score_rollouts(
                    rollouts[a:b], tee, held, cfg.sampling, "exact", backend.vocab_width, advance, cfg.view,
                    roll_from_rows=own is not None,
                )  # fmt: skip
                store.save(ci, scored)
        header = {
            "rollout": self.state["rollout"] if own is None else side_info(own),
            "lp_roll_source": LP_ROLL_SOURCES["decode" if own is None else "scoring"],
            "train": side_info(backend),
            "same_backend_instance": False,
            "engines_sequential": True,
            "prompts": {
                "path": str(cfg.prompts),
                "count": len(self.prompts),
                "chat": sum(p.is_chat for p in self.prompts),
            },
            "shard": None,
            "horizons": list(cfg.horizons),
            "routing_note": "a sweep keeps no router logits of the rollout side"
            if backend.moe and own is None
            else None,
            "run": {"chunks": len(chunks), "chunk_prompts": SCORE_CHUNK, "resumed_chunks": 0},
            "sweep": {
                "arm": arm.name,
                "changed": arm.changed,
                "folder": str(self.out),
                "against": None if own is None else own.description,
            },  # fmt: skip
        }
        from trm_diag.report.assemble import assemble

        assembled = assemble(
            store, command="compare", fidelity="exact", sampling=cfg.sampling, thresholds=cfg.thresholds,
            horizons=cfg.horizons, tokenizer=self.tokenizer, width=backend.vocab_width, moe=backend.moe,
            header=header, warn=self.rep.warn, view=cfg.view,
        )  # fmt: skip
        result = write_report(folder, assembled, {"score_s": time.perf_counter() - t}, t, self.rep.warn)
        store.clear()
        backend.close()
        row.update(status="done", reason="", **headline(result.summary))
        if e_roll is not None:
            e_arm = np.concatenate(errs["err"]) if errs["err"] else np.empty(0)
            row.update(error_stats(np.concatenate(errs["kl"]) if errs["kl"] else np.empty(0), e_arm))
            row.update(decompose(e_roll, e_arm))
        row["seconds"] = time.perf_counter() - t
        self.state["arms"][arm.name] = row
        self._save_state()
        return row

    def _load_arm(self, arm: Arm) -> Backend:
        """An arm's engine; the arms compared with the trainer itself share one set of weights (each a batch shape
        of the first one loaded), so a batch preset loads the model once."""
        kept = getattr(self, "_kept", None)
        shared = kept.rebatched(arm.spec) if kept is not None and arm.against is not None else None
        if shared is not None:
            return shared
        cfg = self.cfg
        backend = self.engines.load(arm.spec, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        if arm.against is not None and hasattr(backend, "rebatched"):
            self._kept = backend.rebatched(backend.spec)  # a handle on the weights that outlives the arm's close()
        return backend

    def _against(self, arm: Arm, backend: Backend) -> Backend | None:
        """The engine an arm of a SELF_PRESETS preset is compared with: the base spec at the reference batch shape,
        sharing the arm's weights where the backend can (else loaded beside it); None for other arms."""
        if arm.against is None:
            return None
        shared = getattr(backend, "rebatched", lambda spec: None)(arm.against)
        if shared is not None:
            return shared
        cfg = self.cfg
        return self.engines.load(arm.against, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)

    def _finish(self, rollouts: list[Rollout], arms: list[dict[str, Any]]) -> CompareResult:
        """Phase 4: sweep.parquet, rollouts.parquet, then summary.json (last: the sweep is complete)."""
        import pandas as pd

        from trm_diag.report.rollouts_io import write_rollouts

        cfg = self.cfg
        roll_row = {"arm": "rollout", "kind": "rollout", "status": "done", "backend": cfg.rollout.name,
                    "changed": "", "spec": cfg.rollout.describe(), **self.state.get("rollout_errors", {})}  # fmt: skip
        rows = table_rows(roll_row, arms)
        ref_name = cfg.reference and _short(cfg.reference)
        lines = verdict(rows, ref_name)
        atomic_write(self.out / SWEEP_TABLE, lambda tmp: pd.DataFrame(rows).to_parquet(tmp, index=False))
        write_rollouts(self.out / SWEEP_ROLLOUTS, [rollouts], cfg.sampling)
        self.timings["total_s"] = time.perf_counter() - self.t_start
        summary = {
            "tool": "trm-diag",
            "command": "sweep",
            "complete": True,
            "verdict": lines,
            "rollout": self.state.get("rollout"),
            "reference": self.state.get("reference"),
            "arms": {
                r["arm"]: {"spec": r["spec"], "changed": r["changed"], "status": r["status"], "reason": r["reason"]}
                for r in rows[1:]
            },  # fmt: skip
            "table": rows,
            "prompts": {"path": str(cfg.prompts), "count": len(self.prompts)},
            "rollouts": {"count": len(rollouts), "tokens": sum(len(r.response_ids) for r in rollouts)},
            "sampling": as_dict(cfg.sampling),
            "view": cfg.view,
            "horizons": list(cfg.horizons),
            "config": as_dict(cfg),
            "timings": self.timings,
        }
        atomic_write(self.out / "summary.json", lambda tmp: Path(tmp).write_text(to_json(summary) + "\n"))
        self.store.clear()
        return CompareResult(self.out, summary)


def _clear_arm_folder(folder: Path) -> None:
    """Remove what trm-diag owns in an arm's folder (a partial or failed report) and the folder once empty; a file
    someone else put there stays."""
    if not folder.is_dir():
        return
    clear_owned(folder)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # it holds files trm-diag does not own
        pass


def _short(spec: BackendSpec) -> str:
    """A spec's text without its model path (the reference's name in a verdict)."""
    opts = ",".join(f"{k}={v}" for k, v in spec.options.items() if k != "model")
    return f"{spec.name}:{opts}" if opts else spec.name
