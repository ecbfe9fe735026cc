"""`trm-diag locate`: the layer where the two sides part, for the worst tokens of a report."""

from __future__ import annotations

from typing import Annotated

import typer

from trm_diag.cli.console import RichReporter, print_locate
from trm_diag.cli.options import JsonOpt, PickleOpt, QuietOpt, RemoteCodeOpt


def locate(
    report: Annotated[str, typer.Argument(help="Report folder written by compare.")],
    top: Annotated[
        int, typer.Option(help="Locate the K worst tokens: largest kl (top-K reports: kl_hi; sampled: k2).")
    ] = 8,
    seq: Annotated[int | None, typer.Option(help="Locate one sequence's token (its worst unless --pos).")] = None,
    pos: Annotated[int | None, typer.Option(help="Response position of the token, with --seq.")] = None,
    bitwise: Annotated[
        bool,
        typer.Option(
            help="For pairs meant to be identical: name the first module (layer; attention, router, MLP, "
            "norm or head) whose output differs by any bit."
        ),
    ] = False,
    trust_remote_code: RemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Where in the network the two sides part: re-run tokens of a report on both backends and find the
    layer (and attention or MLP) where their hidden states first jump apart.

    Writes REPORT/locate.parquet (token x layer x component) and REPORT/locate.json.
    Example: trm-diag locate ./trm-report --top 8;  trm-diag locate ./trm-report --seq 12 --pos 40 --bitwise
    """
    from trm_diag.run.locate import LocateConfig, run_locate

    cfg = LocateConfig(report, top, seq, pos, trust_remote_code, allow_pickle, bitwise)
    print_locate(run_locate(cfg, RichReporter(quiet or json_out)).summary, json_out)
