"""Where trm-diag writes: output paths checked before any work, and one run per report folder.

Rules (README, 'Nothing lost'): every output path is checked before an engine loads (its
folder exists, it is not a folder or an input); nothing in an existing report folder is
touched until every input check has passed (:func:`check_out_dir` only reads,
:func:`claim_out_dir` is the first write); a run holds a lock file with its pid for its
whole life, so a second run cannot mix its chunks into the first one's folder. With --overwrite,
every file trm-diag owns in the folder (of any kind of output: a report, a sweep and its arm
folders, locate's files) goes before the new run writes; nothing else in the folder is touched.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from trm_diag.errors import UsageError

LOCK = ".trm-lock"
REPORT_FILES = (
    "tokens.parquet", "sequences.parquet", "bounds.parquet", "routing.parquet", "breakdowns.parquet", "report.html",
    "summary.json",
)  # fmt: skip
MARKER = "summary.json"  # written last: marks a report complete
PARTIAL_DIR = ".trm-partial"
# the command an unfinished folder's PARTIAL_DIR/manifest.json names -> (what it holds, how to finish it)
UNFINISHED = {
    "compare": ("an interrupted run", "finish it with the same `trm-diag compare ... --resume` (a `score` run: run "
                "it again with --overwrite)"),
    "sweep": ("an interrupted sweep", "finish it with the same `trm-diag sweep ... --resume`"),
    "sweep-arm": ("an arm of a sweep that did not finish", "finish the sweep (the folder above) with the same "
                  "`trm-diag sweep ... --resume`"),
}  # fmt: skip
LOCATE_TABLE, LOCATE_SUMMARY = "locate.parquet", "locate.json"  # what locate adds to a report folder
LOCATE_FILES = (LOCATE_TABLE, LOCATE_SUMMARY)
SWEEP_TABLE, SWEEP_ROLLOUTS = "sweep.parquet", "rollouts.parquet"  # a sweep's, beside one report folder per arm
SWEEP_FILES = (SWEEP_TABLE, SWEEP_ROLLOUTS, MARKER)
SWEEP_STATE = "sweep-state.json"  # sweep.py's record of finished arms, in PARTIAL_DIR
# What each kind of output folder holds, by name: all of it is cleared when a run overwrites the folder.
OWNED = {"report": (*REPORT_FILES, *LOCATE_FILES), "sweep": SWEEP_FILES}


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name the same file (through links, relative paths, case)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _exists(p: Path) -> bool:
    """Path.exists() that is False (not an error) for symlink loops and unreadable paths."""
    try:
        return p.exists()
    except OSError:
        return False


def _check_parent(path: Path, option: str) -> None:
    """The folder that will hold ``path`` exists, is a folder, and is writable."""
    parent = path.parent
    if not _exists(parent):
        raise UsageError(
            f"{option} {path}: the folder '{parent}' does not exist", "create it first, or choose another path"
        )
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: '{parent}' is a file, not a folder", "choose a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder '{parent}' is not writable", "choose a writable location")


def check_output_file(path: str | Path, option: str, inputs: Iterable[str | Path] = ()) -> None:
    """An output file: its folder exists and is writable, it is no folder, and it is none of the inputs."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path} is a folder", "name a file")
    _check_parent(p, option)
    for src in inputs:
        if _exists(p) and _exists(Path(src)) and same_file(p, src):
            raise UsageError(
                f"{option} {path} is also an input ({src}); writing it would destroy it", "write to a new file"
            )


def _json_object(path: Path) -> dict:
    """A JSON file's object; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _arm_folders(folder: Path) -> list[Path]:
    """A sweep's arm folders in ``folder``: named in its summary.json or state file, a subfolder whose
    summary.json names it as the sweep's arm, or one whose interrupted run is the sweep's own."""
    names: set[str] = set()
    for record in (_json_object(folder / MARKER), _json_object(folder / PARTIAL_DIR / SWEEP_STATE)):
        if isinstance(record.get("arms"), dict):
            names.update(record["arms"])
    run = _json_object(folder / PARTIAL_DIR / "manifest.json").get("fingerprint")
    try:
        subfolders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.is_symlink() and d.name != PARTIAL_DIR)
    except OSError:
        return []
    out = []
    for d in subfolders:
        sweep = _json_object(d / MARKER).get("sweep")
        mine = isinstance(sweep, dict) and sweep.get("arm") == d.name
        manifest = _json_object(d / PARTIAL_DIR / "manifest.json")
        same_run = manifest.get("command") == "sweep-arm" or (run is not None and manifest.get("fingerprint") == run)
        if d.name in names or mine or same_run:
            out.append(d)
    return out


def _is_sweep(folder: Path) -> bool:
    """The folder holds a sweep, finished or interrupted."""
    return (
        _json_object(folder / MARKER).get("command") == "sweep"
        or _exists(folder / "sweep.parquet")
        or _exists(folder / PARTIAL_DIR / SWEEP_STATE)
        or _json_object(folder / PARTIAL_DIR / "manifest.json").get("command") == "sweep"
    )


def owned_paths(folder: str | Path) -> list[Path]:
    """What trm-diag owns in an output folder, as it exists (OWNED files of every kind, the interrupted run,
    a sweep's arm folders after what they hold, leftover temporaries): what --overwrite clears."""
    p = Path(folder)
    if not p.is_dir():
        return []
    sweep = _is_sweep(p)  # a file named like a sweep's (rollouts.parquet) is its own only in a sweep's folder
    names = dict.fromkeys((*OWNED["report"], *(OWNED["sweep"] if sweep else ())))
    found = [p / n for n in names if _exists(p / n)]
    for arm in _arm_folders(p):
        found += [arm / n for n in (*OWNED["report"], PARTIAL_DIR) if _exists(arm / n)]
        found += [*arm.glob(".*.tmp"), arm]
    if _exists(p / PARTIAL_DIR):
        found.append(p / PARTIAL_DIR)
    return found


def _within(path: Path, src: Path) -> bool:
    """True when ``src`` is the file ``path`` or lies inside the folder ``path``."""
    if same_file(path, src):
        return True
    return path.is_dir() and src.resolve().is_relative_to(path.resolve())


def clear_owned(folder: Path) -> None:
    """Remove what trm-diag owns in ``folder`` (owned_paths), summary.json first (the folder stops looking
    complete); an arm folder goes only once it is empty, so a file someone else put there stays."""
    import shutil

    paths = owned_paths(folder)  # found before anything goes: summary.json names a sweep's arms
    for path in sorted(paths, key=lambda q: q != folder / MARKER):
        if path.name == PARTIAL_DIR:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError:  # it holds files trm-diag does not own
                pass
        else:
            path.unlink(missing_ok=True)


def check_out_dir(
    out: str | Path,
    *,
    overwrite: bool,
    resume: bool = False,
    inputs: Iterable[str | Path] = (),
    models: Iterable[str | Path | None] = (),
) -> Path:
    """Check a report folder before any work, without touching it: returns its path.

    Refuses a file, a path below a file, an unwritable place, a folder that is or lies inside one of the run's
    model folders (the report would land among the checkpoint's files and change its fingerprint), a folder
    used by a live run, an
    input among what --overwrite would clear there (owned_paths), a finished report or sweep (without
    --overwrite, or with --resume) and --resume where there is nothing to resume. --resume wins over
    --overwrite: "the same command with --resume" finishes an interrupted run even when that command
    carries --overwrite, and nothing is cleared (the callers pass overwrite=False to claim_out_dir then).
    """
    p = Path(out)
    overwrite = overwrite and not resume
    ancestor = p
    while not _exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if _exists(ancestor) and not ancestor.is_dir():
        what = "is a file" if ancestor == p else f"lies below the file '{ancestor}'"
        raise UsageError(f"--out '{out}' {what}", "pass --out with a folder name")
    if _exists(ancestor) and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{out}': '{ancestor}' is not writable", "choose a writable location")
    for model in models:
        if model and Path(model).is_dir() and p.resolve().is_relative_to(Path(model).resolve()):
            raise UsageError(
                f"--out '{out}' lies in the model folder '{model}', an input of this run",
                "choose an --out folder outside the checkpoint",
            )
    owned = owned_paths(p) if p.is_dir() else []
    for src in inputs:
        if _exists(Path(src)) and any(_within(path, Path(src)) for path in owned):
            raise UsageError(
                f"the input '{src}' lies in --out '{out}', which this run rewrites", "use another --out folder"
            )
    if not p.is_dir():
        if resume:
            raise UsageError(f"there is no interrupted run to resume in '{out}'", "drop --resume")
        return p
    holder = lock_holder(p)
    if holder is not None and holder.get("alive"):
        raise UsageError(
            f"'{out}' is in use by a running trm-diag (pid {holder.get('pid')} on {holder.get('host')})",
            "wait for it to finish, or choose another --out folder",
        )
    finished = (p / MARKER).is_file()
    partial = (p / PARTIAL_DIR / "manifest.json").is_file()
    if resume and not partial:
        what = "a finished report" if finished else "no interrupted run"
        raise UsageError(f"there is nothing to resume in '{out}' (it holds {what})", "drop --resume")
    if not resume and not overwrite:
        if partial:
            raise UsageError(
                f"'{out}' holds an interrupted run", "pass --resume to finish it, or --overwrite to start again"
            )
        if any(path.name != PARTIAL_DIR for path in owned):
            what = "a sweep" if _is_sweep(p) else "a report"
            raise UsageError(f"'{out}' already holds {what}", "pass --overwrite, or choose another --out folder")
    return p


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat, counted after the command name


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def lock_holder(folder: Path) -> dict | None:
    """Who holds the folder's lock: {'pid', 'host', 'alive'}, or None when it is not locked."""
    try:
        info = json.loads((folder / LOCK).read_text())
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            raise ValueError
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "alive": False}  # a damaged lock names no live run
    local = info.get("host") == socket.gethostname()
    info["alive"] = not local or _alive(info["pid"], info.get("started"))  # another host's run: assume alive
    return info


def unfinished(folder: Path) -> tuple[str, str] | None:
    """(what the folder holds, what to do) for a folder with no summary.json that a run is writing (its
    lock, or for a sweep's arm the sweep's lock, names a live process) or left unfinished; None otherwise."""
    try:
        command = json.loads((folder / PARTIAL_DIR / "manifest.json").read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    for owner in (folder, folder.parent) if command == "sweep-arm" else (folder,):
        holder = lock_holder(owner)
        if holder is not None and holder.get("alive"):
            what = "a sweep's arm that a running trm-diag" if owner != folder else "a run that a running trm-diag"
            return (f"{what} (pid {holder.get('pid')} on {holder.get('host')}) is still writing",
                    "wait for it to finish, then read it")  # fmt: skip
    if not (folder / PARTIAL_DIR).is_dir():
        return None
    return UNFINISHED.get(command, UNFINISHED["compare"])


@contextmanager
def claim_out_dir(folder: Path, *, overwrite: bool, warn: Callable[[str], None]) -> Iterator[Path]:
    """Create the report folder and hold its lock for the run; with overwrite everything trm-diag owns in
    it goes first (clear_owned: an old report or sweep of any kind, never other files). Leftovers of
    killed runs (temporary files, a stale lock) are removed and named."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())})
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock_holder(folder)
            if attempt or holder is None or holder["alive"]:
                pid = holder.get("pid") if holder else "?"
                raise UsageError(
                    f"'{folder}' is in use by a running trm-diag (pid {pid})",
                    "wait for it to finish, or choose another --out folder",
                ) from None
            warn(f"removed the stale lock of trm-diag pid {holder['pid']} in '{folder}' (that run is gone)")
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    try:
        stale = [t for d in (folder, folder / PARTIAL_DIR) if d.is_dir() for t in d.glob(".*.tmp")]
        for t in stale:
            t.unlink(missing_ok=True)
        if overwrite:  # the old output goes, summary.json first: the folder must not look like a complete report
            clear_owned(folder)
        yield folder
    finally:
        lock.unlink(missing_ok=True)
