"""`trm-diag show`: a saved report (or sweep) again, as text, JSON or markdown, or its HTML page."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from trm_diag.cli.console import RichReporter, err_console, out_console
from trm_diag.errors import UsageError

SHOW_FORMATS = ("text", "json", "markdown")


def show(
    report: Annotated[
        str, typer.Argument(help="Report folder (compare, score or merge), a sweep folder, or a Monitor run folder.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="text (the tables compare prints), json or markdown.")] = "text",
    top: Annotated[int, typer.Option(help="How many of the worst sequences to list.")] = 5,
    write_html: Annotated[
        bool,
        typer.Option("--html", help="(Re)write REPORT/report.html (figures and shaded worst sequences) and say where."),
    ] = False,
) -> None:
    """Show a saved report again: the verdict first, then the tables `compare` printed. A run folder of
    trm_diag.Monitor shows as `trm-diag trend` does (the metrics versus step and the flags).

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
    from trm_diag.report.run_log import is_run

    if is_run(report):  # a Monitor run folder: what `trend` prints, with the default rules
        show_run(report, fmt, write_html)
        return
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
    from trm_diag.report.gate import partial_coverage

    part = partial_coverage(summary, f"'{report}'")
    if part:  # on stderr in every format: a partial report must not read as the whole run
        RichReporter(quiet=True).warn(part)
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
    if fmt == "json":  # --top beyond summary.json's worst sequences: the rest from the table, as text shows them
        print(to_json({**summary, "worst_rows": worst_rows(path, summary, top)} if more else summary))
    elif fmt == "markdown":
        print(to_markdown(summary, worst_rows(path, summary, top) if more else None))
    else:
        render_compare(out_console, summary)
        if more:
            from trm_diag.cli.render import worst_table

            out_console.print(worst_table(worst_rows(path, summary, top)))


def show_run(run: str, fmt: str, write_html: bool) -> None:
    """A run folder: the text, JSON or page of `trm-diag trend RUN` (default rules), or its Markdown."""
    from trm_diag.report.trend_report import run_trend

    res = run_trend(run)
    if write_html:
        from trm_diag.cli.commands.trend import write_page

        write_page(res)
    elif fmt == "json":
        from trm_diag.report.tables import to_json

        print(to_json(res.as_dict()))
    elif fmt == "markdown":
        from trm_diag.cli.trend import trend_markdown

        print(trend_markdown(res), end="")
    else:
        from trm_diag.cli.trend import render_trend

        render_trend(out_console, res)
