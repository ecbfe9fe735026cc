"""The entry point (`trm-diag`, `python -m trm_diag`): run the app; turn TrmDiagError, OS errors, usage
errors, Ctrl-C and SIGTERM into one line and their exit code."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from trm_diag.cli.app import app
from trm_diag.cli.console import err_console
from trm_diag.errors import ExitCode, TrmDiagError
from trm_diag.heap import tune_allocator
from trm_diag.kernels.choice import kernel_name

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


RESUMABLE = ("compare", "sweep")  # commands whose finished chunks --resume picks up


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
        args = sys.argv[1:] if argv is None else argv
        resumable = any(a in RESUMABLE for a in args[:1])
        err_console.print(
            f"[red]{what}.[/red] Finished chunks are kept in the --out folder's .trm-partial/; "
            "run the same command with --resume to finish."
            if resumable
            else f"[red]{what}.[/red] Nothing was written: run the command again."
        )
    sys.exit(code if isinstance(code, int) else 0)
