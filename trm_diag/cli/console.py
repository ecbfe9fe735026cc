"""The two consoles (data on stdout, everything else on stderr), the progress reporter the pipeline
drives, and the printing of a finished report that several commands share."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

out_console = Console(soft_wrap=True)  # data; lines are never wrapped (grep in CI logs), tables still fit
err_console = Console(stderr=True)  # progress, tables, messages


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


def print_report(summary: dict, out_dir, json_out: bool) -> None:
    """A finished report (compare, score, merge): summary.json on stdout, or its tables and where it was written."""
    if json_out:
        from trm_diag.report.tables import to_json

        print(to_json(summary))
        return
    from trm_diag.cli.render import render_compare

    render_compare(out_console, summary)  # the answer goes to stdout; progress and messages to stderr
    err_console.print(
        f"report written to [bold]{escape(str(out_dir))}/[/bold] (see it again: trm-diag show {escape(str(out_dir))})"
    )


def print_locate(summary: dict, json_out: bool) -> None:
    """A finished locate (locate, compare --locate): locate.json on stdout, or its table."""
    if json_out:
        from trm_diag.report.tables import to_json

        print(to_json(summary))
        return
    from trm_diag.cli.locate import render_locate

    render_locate(out_console, summary)
