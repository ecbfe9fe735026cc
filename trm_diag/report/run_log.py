"""A training run's folder (docs/trend.md): one row per step and rank in append-only Parquet parts, and
per-step length-bucket rows; readers merge the ranks and also read a `score` report of a multi-step dump.

Layout of RUN/:
- run.json: what the run measures (tool, kind 'run', thresholds, horizons, criterion, length edges), written
  once when the folder is created and never rewritten;
- steps/r<rank>-<n>.parquet: one step's row, written to a temporary name and renamed (a killed job loses at
  most the step in flight); r<rank>-c<first>-<last>.parquet: parts compacted into one file;
- buckets/r<rank>-<n>.parquet: that step's rows per length bucket, renamed into place before its step row.
Nothing is ever overwritten: a restarted writer continues the numbering; a step written twice (a job resumed
from an earlier checkpoint) is read as its latest row.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.errors import InputError, UsageError
from trm_diag.report.tables import atomic_write, to_json

if TYPE_CHECKING:
    import pandas as pd

RUN_MARKER = "run.json"
STEPS, BUCKETS = "steps", "buckets"
PART = re.compile(r"^r(?P<rank>\d+)-(?:(?P<n>\d+)|c(?P<first>\d+)-(?P<last>\d+))\.parquet$")
COMPACT_EVERY = 256  # parts of one rank merged into one file (a long run stays a few files per rank)
READ_TRIES = 5  # a listing raced by a compaction is read again
ORDER = ("step", "rank", "written", "attempt", "time", "n_sequences", "n_tokens")


def is_run(path: str | Path) -> bool:
    """True for a run folder (run.json of kind 'run')."""
    f = Path(path) / RUN_MARKER
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("kind") == "run"
    except (OSError, ValueError, AttributeError):
        return False


def _read_meta(p: Path) -> dict[str, Any]:
    f = p / RUN_MARKER
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {f} ({e})", "the run folder is damaged: start the run in a new folder") from None
    if not isinstance(meta, dict) or meta.get("kind") != "run":
        raise InputError(f"{f} is not a trm-diag run's file", "point at a folder written by trm_diag.Monitor")
    return meta


def _part_name(rank: int, n: int) -> str:
    return f"r{rank:05d}-{n:09d}.parquet"


def _parts(folder: Path, rank: int | None = None) -> list[tuple[Path, re.Match]]:
    if not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.iterdir()):
        m = PART.match(f.name)
        if m and (rank is None or int(m["rank"]) == rank):
            out.append((f, m))
    return out


class RunWriter:
    """Appends one rank's step rows to a run folder; creates the folder (and run.json) on first use, and
    continues an existing one with the same settings."""

    def __init__(self, out: str | Path, rank: int, meta: dict[str, Any]) -> None:
        self.root, self.rank = Path(out), rank
        self._open(meta)
        self._lock = _hold_rank(self.root, rank)
        n = [int(m["n"] or m["last"]) for _, m in _parts(self.root / STEPS, rank)]
        n += [int(m["n"] or m["last"]) for _, m in _parts(self.root / BUCKETS, rank)]
        self.next = max(n, default=0) + 1  # a restarted writer never reuses a name
        self.small = [f for f, m in _parts(self.root / STEPS, rank) if m["n"]]

    def _open(self, meta: dict[str, Any]) -> None:
        p = self.root
        if p.exists() and not p.is_dir():
            raise UsageError(f"run folder '{p}' is a file", "pass out= a folder path")
        if (p / RUN_MARKER).is_file():
            old = _read_meta(p)
            for key in ("thresholds", "horizons", "criterion"):
                if json.loads(to_json(old.get(key))) != json.loads(to_json(meta.get(key))):
                    raise UsageError(
                        f"run folder '{p}' was started with {key} {old.get(key)}, not {meta.get(key)}",
                        "continue it with the same settings, or log to a new folder",
                    )
            return
        if p.is_dir() and any(p.iterdir()):
            raise UsageError(
                f"'{p}' is not empty and holds no trm-diag run (no {RUN_MARKER})", "log to a new or empty folder"
            )
        for sub in (STEPS, BUCKETS):
            (p / sub).mkdir(parents=True, exist_ok=True)
        body = {"tool": "trm-diag", "kind": "run", "created": time.time(), **meta}
        # written whole under another name, then linked in: a reader never sees a half-written run.json, and of
        # two ranks creating the folder at once the first one's stays (link fails on an existing name)
        tmp = p / f".{RUN_MARKER}.{os.getpid()}.{self.rank}.tmp"
        tmp.write_text(to_json(body) + "\n", encoding="utf-8")
        try:
            os.link(tmp, p / RUN_MARKER)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def append(self, row: dict[str, Any], buckets: list[dict[str, Any]]) -> None:
        """One step: its bucket rows, then its row (the step counts as written once its row is in place). The
        row gets its rank and 'written', the part's number (the latest of a step written twice wins)."""
        import pandas as pd

        name = _part_name(self.rank, self.next)
        row = {**row, "rank": self.rank, "written": self.next}
        row = {**{k: row[k] for k in ORDER if k in row}, **row}
        self.next += 1
        if buckets:
            frame = pd.DataFrame([{"step": row["step"], "rank": self.rank, "written": row["written"], **b}
                                  for b in buckets])  # fmt: skip
            _write(self.root / BUCKETS / name, frame)
        _write(self.root / STEPS / name, pd.DataFrame([row]))
        self.small.append(self.root / STEPS / name)
        if len(self.small) >= COMPACT_EVERY:
            self.compact()

    def release(self) -> None:
        """Let another writer of this rank continue the run (the lock also goes when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def compact(self) -> None:
        """This rank's single-step parts as one file per table (written whole, then the parts removed)."""
        import pandas as pd

        for sub in (STEPS, BUCKETS):
            parts = [(f, m) for f, m in _parts(self.root / sub, self.rank) if m["n"]]
            if len(parts) < 2:
                continue
            ns = [int(m["n"]) for _, m in parts]
            frame = pd.concat([_read(f) for f, _ in parts], ignore_index=True)
            _write(self.root / sub / f"r{self.rank:05d}-c{min(ns):09d}-{max(ns):09d}.parquet", frame)
            for f, _ in parts:
                f.unlink(missing_ok=True)
        self.small = []


def _hold_rank(root: Path, rank: int) -> Any:
    """An exclusive lock on this rank's writing, held while the writer lives: two writers of one rank would pick
    the same part names and the second's rename would replace the first's steps."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer per rank is the caller's to keep
        return None
    f = open(root / f".r{rank:05d}.lock", "a")  # noqa: SIM115 (held open for the writer's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(
            f"rank {rank} of run '{root}' is being written by another Monitor",
            "give each process its own rank (rank=, torch.distributed's or $RANK), or close the other Monitor first",
        ) from None
    return f


def _write(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _read(f: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(f)
    except FileNotFoundError:
        raise
    except Exception as e:  # a part is renamed into place whole: a bad one was damaged afterwards
        raise InputError(
            f"run part '{f}' is unreadable ({type(e).__name__})", "remove that file and read again"
        ) from None


def _read_table(folder: Path) -> pd.DataFrame:
    """Every rank's rows of one table; the latest row per (rank, step)."""
    import pandas as pd

    for attempt in range(READ_TRIES):
        try:
            frames = [_read(f) for f, _ in _parts(folder)]
            break
        except FileNotFoundError:  # a compaction removed a part after the listing: list again
            if attempt == READ_TRIES - 1:
                raise
            time.sleep(0.05)
    if not frames:  # a run with no step yet
        return pd.DataFrame({k: pd.Series(dtype="int64") for k in ("step", "rank", "written")})
    df = pd.concat(frames, ignore_index=True)
    keys = ["rank", "written"] + (["bucket"] if "bucket" in df else [])
    df = df.drop_duplicates(subset=keys, keep="last")  # a compacted file and its parts, seen together
    latest = df.groupby(["rank", "step"])["written"].transform("max")
    return df[df["written"] == latest].sort_values(["step", "rank"]).reset_index(drop=True)


@dataclass
class RunData:
    """A run as trend and gate read it: one merged row per step, the rows per rank, per-step length buckets."""

    path: Path
    meta: dict[str, Any]
    steps: pd.DataFrame  # one row per step, the ranks merged
    by_rank: pd.DataFrame
    buckets: pd.DataFrame
    source: str = "monitor"  # or 'score' (a report of a multi-step dump)
    notes: list[str] = field(default_factory=list)

    @property
    def horizons(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.meta.get("horizons", ()))


def _merge_steps(by_rank: pd.DataFrame, horizons: tuple[int, ...]) -> pd.DataFrame:
    import pandas as pd

    from trm_diag.math.step_metrics import merge_ranks

    if by_rank.empty:
        return by_rank
    if by_rank["rank"].nunique() == 1:
        return by_rank.drop(columns=["rank"]).reset_index(drop=True)
    rows = [merge_ranks(g.to_dict("records"), horizons) for _, g in by_rank.groupby("step", sort=True)]
    return pd.DataFrame(rows)


def _rank_gaps(by_rank: pd.DataFrame) -> list[str]:
    """A note naming the steps that fewer ranks logged than the run has (a rank that crashed or lags): their rows
    hold only the ranks present, so their counts and means are of a part of the batch."""
    if by_rank.empty or by_rank["rank"].nunique() < 2:
        return []
    ranks = by_rank.groupby("step")["rank"].nunique()
    short = ranks[ranks < by_rank["rank"].nunique()]
    if short.empty:
        return []
    shown = ", ".join(str(int(s)) for s in short.index[:10]) + (", ..." if len(short) > 10 else "")
    return [
        f"{len(short)} step(s) logged by fewer ranks than the run's {by_rank['rank'].nunique()} (steps {shown}): "
        "their rows hold only the ranks present (a rank that crashed, lags or is still writing)"
    ]


def _merge_buckets(b: pd.DataFrame) -> pd.DataFrame:
    """Length-bucket rows of several ranks per (step, bucket): counts summed, means weighted by them."""
    if b.empty or b["rank"].nunique() == 1:
        return b.drop(columns=["rank"], errors="ignore")
    import numpy as np
    import pandas as pd

    out = []
    for (step, bucket), g in b.groupby(["step", "bucket"], sort=True):
        n_tok, n_seq = g["n_tokens"].to_numpy(float), g["n_sequences"].to_numpy(float)
        row = {"step": step, "bucket": bucket, "n_sequences": int(n_seq.sum()), "n_tokens": int(n_tok.sum())}
        row["mean_T"] = float(np.sum(g["mean_T"] * n_seq) / n_seq.sum())
        for c in g.columns:
            if c in ("kl", "k3_kl"):
                row[c] = float(np.sum(g[c] * n_tok) / n_tok.sum())
            elif c.startswith("accept_"):
                row[c] = float(np.sum(g[c] * n_seq) / n_seq.sum())
            elif c.endswith("_max"):
                row[c] = float(g[c].max())
        out.append(row)
    return pd.DataFrame(out)


def read_run(path: str | Path) -> RunData:
    """A run folder (written by Monitor) or a `score` report of a multi-step dump, as RunData. Reading while a
    run writes is safe: parts are renamed into place whole."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise InputError(f"run folder '{path}' {what}", "pass the out= folder of trm_diag.Monitor")
    if (p / RUN_MARKER).is_file():
        meta = _read_meta(p)
        by_rank = _read_table(p / STEPS)
        buckets = _read_table(p / BUCKETS)
        if not buckets.empty:  # a step's buckets count once its row is in place
            done = set(zip(by_rank["rank"], by_rank["written"]))
            buckets = buckets[[k in done for k in zip(buckets["rank"], buckets["written"])]]
        horizons = tuple(int(h) for h in meta.get("horizons", ()))
        steps = _merge_steps(by_rank, horizons)
        return RunData(p, meta, steps, by_rank, _merge_buckets(buckets), notes=_rank_gaps(by_rank))
    if (p / "summary.json").is_file():
        return _read_score_report(p)
    raise InputError(
        f"'{path}' is neither a run folder (no {RUN_MARKER}) nor a report (no summary.json)",
        "pass the out= folder of trm_diag.Monitor, or a `trm-diag score` report of a multi-step dump",
    )


def _read_score_report(p: Path) -> RunData:
    """Per-step rows of a report whose sequences carry a training step (`score` of a dump), computed by the
    same code as Monitor's rows from the report's own token log-probs."""
    import numpy as np
    import pandas as pd

    from trm_diag.config import Thresholds
    from trm_diag.math.step_metrics import step_metrics
    from trm_diag.report.tables import complete_report, read_table

    _, summary = complete_report(p)
    seq_cols = read_table(p / "sequences.parquet", columns=None).schema.names
    if "step" not in seq_cols:
        raise InputError(
            f"report '{p}' has no training steps (sequences.parquet has no 'step' column)",
            "trend reads a Monitor run folder or a `trm-diag score` report of a multi-step dump",
        )
    seqs = read_table(p / "sequences.parquet", columns=["seq_id", "step", "length"]).to_pandas()
    toks = read_table(p / "tokens.parquet", columns=["seq_id", "pos", "lp_roll", "lp_train"]).to_pandas()
    toks = toks.sort_values(["seq_id", "pos"], kind="stable")
    th_fields = {k: v for k, v in (summary.get("thresholds") or {}).items() if k in Thresholds.__dataclass_fields__}
    th = Thresholds(**th_fields)
    horizons = tuple(sorted(set(int(t) for t in read_table(p / "bounds.parquet", columns=["T"]).column(0).to_pylist())))
    rows, bucket_rows = [], []
    by_seq = {sid: g for sid, g in toks.groupby("seq_id", sort=False)}
    empty = toks.iloc[0:0]
    for step, g in seqs.groupby("step", sort=True):
        g = g.sort_values("seq_id")
        parts = [by_seq.get(s, empty) for s in g["seq_id"]]
        lp_roll = np.concatenate([x["lp_roll"].to_numpy(np.float64) for x in parts]) if parts else np.zeros(0)
        lp_train = np.concatenate([x["lp_train"].to_numpy(np.float64) for x in parts]) if parts else np.zeros(0)
        row, _, _, buckets = step_metrics(lp_roll, lp_train, g["length"].to_numpy(), th, horizons)
        rows.append({"step": int(step), **row})
        bucket_rows += [{"step": int(step), **b} for b in buckets]
    meta = {"tool": "trm-diag", "kind": "report", "thresholds": summary.get("thresholds"), "horizons": list(horizons),
            "fidelity": "sampled", "report_fidelity": summary.get("fidelity")}  # fmt: skip
    notes = []
    if summary.get("fidelity") != "sampled":
        notes.append(
            f"the report is {summary.get('fidelity')}-tier; trend uses the sampled tokens' log-probs (sampled tier)"
        )
    steps = pd.DataFrame(rows)
    return RunData(p, meta, steps, steps.assign(rank=0), pd.DataFrame(bucket_rows), source="score", notes=notes)
