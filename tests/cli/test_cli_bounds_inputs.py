"""`trm-diag bounds` on hostile inputs: an output path that is one of the report's own files."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def report(small_report):
    return small_report


@pytest.mark.parametrize("name", ["summary.json", "bounds.parquet", "tokens.parquet"])
def test_plot_onto_a_file_of_the_report_is_refused_and_the_file_kept(report, name, capsys):
    """`bounds --report` never changes the report (README): --plot naming one of its files would overwrite it."""
    before = (report / name).read_bytes()
    code, _, err = run_cli(
        ["bounds", "--report", str(report), "--horizons", "64", "--plot", str(report / name)], capsys
    )
    assert code == 2 and "is also an input" in err and "Traceback" not in err
    assert (report / name).read_bytes() == before
