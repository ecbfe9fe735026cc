"""`score` picks the input format (rollout file or a framework's dump) and refuses what it cannot read, in one
line: decoded-text dumps (verl, TRL), folders of nothing it knows, unknown --format names."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli
from trm_diag.report.dumps import DUMP_FORMATS
from trm_diag.report.rollouts_io import INPUT_FORMATS, RolloutSource, input_format


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"input": "2+2=", "output": "4", "score": 1.0, "step": 3}, "verl's rollout_data_dir holds decoded text only"),
        ({"prompt": "2+2=", "completion": "4"}, "TRL's log_completions holds decoded text only"),
    ],
)
def test_decoded_text_dumps_point_at_compare(row, needle, tmp_path, dense_model, capsys):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(row) + "\n")
    code, _, err = run_cli(
        ["score", str(path), "--model", str(dense_model), "--out", str(tmp_path / "o"), "-q"], capsys
    )
    assert code == 2 and needle in err and "trm-diag compare" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "summary.json").exists()


def test_inputs_in_no_known_format_are_refused_before_any_engine(tmp_path, dense_model, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    for argv, needle in (
        ([str(folder)], "is a folder in no format trm-diag reads"),
        ([str(folder / "notes.txt")], "is a '.txt' file in no format trm-diag reads"),
        ([str(folder), "--format", "bogus"], "--format bogus is unknown"),
        ([str(tmp_path / "missing.jsonl")], "does not exist"),
    ):
        code, _, err = run_cli(["score", *argv, "--model", str(dense_model), "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_format_names_and_suffixes(tmp_path):
    assert set(INPUT_FORMATS) == {"jsonl", "parquet", *DUMP_FORMATS}
    for name, suffix in (("jsonl", ".jsonl"), ("jsonl", ".json"), ("parquet", ".parquet")):
        f = tmp_path / f"r{suffix}"
        f.write_text("")
        assert input_format(RolloutSource(f)) == name
    assert input_format(RolloutSource(tmp_path / "r.jsonl", "parquet")) == "parquet"  # named beats the suffix
