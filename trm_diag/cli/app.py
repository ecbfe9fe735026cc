"""trm-diag command line: the typer app, its --version, and the one place the commands are registered
(each lives in commands/; the options they share in options.py, the consoles in console.py). No math here.

Heavy modules (torch, transformers, vllm, pandas) are imported inside the commands that
need them, so `trm-diag --help`, `bounds`, `gate` and `show` start fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.commands import bounds, compare, diff, gate, locate, merge, score, show, sweep, trend
from trm_diag.cli.console import err_console, out_console

__all__ = ["app", "err_console", "out_console"]

app = typer.Typer(
    name="trm-diag",
    help=(
        "Audit the mismatch between the policy that samples rollouts (pi_roll) and the policy "
        "that is trained (pi_theta), with the bounds and masks of Trust Region Masking "
        "(arXiv 2512.23075)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from trm_diag import __version__

        print(f"trm-diag {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Audit the mismatch between the policy that samples rollouts (pi_roll) and the policy that is trained
    (pi_theta), with the bounds and masks of Trust Region Masking (arXiv 2512.23075)."""


# the order `trm-diag --help` lists them in
for _command in (
    compare.compare,
    sweep.sweep,
    locate.locate,
    score.score,
    merge.merge,
    show.show,
    diff.diff,
    trend.trend,
    bounds.bounds,
    gate.gate,
):
    app.command()(_command)
del _command
