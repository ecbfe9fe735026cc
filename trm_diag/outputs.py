"""Where trm-diag writes: output paths checked before any work, and one run per report folder.

Rules (README, 'Nothing lost'): every output path is checked before an engine loads (its
folder exists, it is not a folder or an input); nothing in an existing report folder is
touched until every input check has passed (:func:`check_out_dir` only reads,
:func:`claim_out_dir` is the first write); a run holds a lock file with its pid for its
whole life, so a second run cannot mix its chunks into the first one's folder.
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


def check_out_dir(out: str | Path, *, overwrite: bool, resume: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Check a report folder before any work, without touching it: returns its path.

    Refuses a file, a path below a file, an unwritable place, a folder used by a live run, an
    input inside the folder under a report file's name, a finished report (without --overwrite,
    or with --resume) and --resume where there is nothing to resume.
    """
    p = Path(out)
    ancestor = p
    while not _exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if _exists(ancestor) and not ancestor.is_dir():
        what = "is a file" if ancestor == p else f"lies below the file '{ancestor}'"
        raise UsageError(f"--out '{out}' {what}", "pass --out with a folder name")
    if _exists(ancestor) and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out '{out}': '{ancestor}' is not writable", "choose a writable location")
    for src in inputs:
        for name in (*REPORT_FILES, PARTIAL_DIR):
            if _exists(p / name) and _exists(Path(src)) and same_file(p / name, src):
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
        if any(_exists(p / f) for f in REPORT_FILES):
            raise UsageError(f"'{out}' already holds a report", "pass --overwrite, or choose another --out folder")
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


@contextmanager
def claim_out_dir(folder: Path, *, overwrite: bool, warn: Callable[[str], None]) -> Iterator[Path]:
    """Create the report folder and hold its lock for the run; with overwrite the old report stops
    looking complete. Leftovers of killed runs (temporary files, a stale lock) are removed and named."""
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
        if overwrite:
            (folder / MARKER).unlink(missing_ok=True)  # from now on the folder must not look like a complete report
        yield folder
    finally:
        lock.unlink(missing_ok=True)
