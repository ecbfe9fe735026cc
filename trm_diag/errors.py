"""Typed errors and exit codes. The core raises these; only the CLI turns them into exits."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented exit codes (README, 'Exit codes')."""

    OK = 0  # success, or gate passed
    GATE_FAILED = 1  # a gate rule did not hold
    USAGE = 2  # bad option, bad input file, missing model ...
    RUNTIME = 3  # a backend failed at run time (out of memory, NaN everywhere, ...)


class TrmDiagError(Exception):
    """Base class: a one-line message that names the problem and the fix."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem}. Fix: {self.fix}" if self.fix else self.problem


class UsageError(TrmDiagError):
    """A bad option or option value."""


class InputError(TrmDiagError):
    """A bad input file (prompts, rollouts, report)."""


class ModelError(TrmDiagError):
    """A missing, unreadable or unsafe model, or two models that cannot be compared."""


class BackendUnavailable(TrmDiagError):
    """A backend whose engine is not installed."""


class BackendFailure(TrmDiagError):
    """A backend that failed while running."""

    exit_code = ExitCode.RUNTIME


class DiskFull(TrmDiagError):
    """The disk filled up while writing: finished chunks stay resumable."""

    exit_code = ExitCode.RUNTIME


def os_error(e: OSError) -> TrmDiagError:
    """The one-line error for an OS error met while reading or writing (disk full, read-only, ...)."""
    import errno

    where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
    text = str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text:
        return DiskFull(
            f"no space left on the device while writing{where}",
            "free some space and run the same command again (compare: with --resume, finished chunks are kept)",
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UsageError(f"cannot write{where}: {e.strerror or text}", "choose a writable --out or output path")
    if e.errno == errno.ELOOP:
        return UsageError(f"{where.strip() or 'a path'} is a symlink loop", "point the option at a real file or folder")
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return UsageError(f"bad path{where}: {e.strerror or text}", "check the path")
    return BackendFailure(f"I/O error{where}: {e.strerror or text}", "check the disk and the paths, then run again")
