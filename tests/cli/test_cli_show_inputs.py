"""`trm-diag show`: every format answers the options alike (--top beyond what summary.json keeps)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def report(small_report):
    return small_report


def test_top_beyond_the_summary_lists_as_many_sequences_in_json_as_in_text(report, capsys):
    """summary.json keeps 5 worst sequences; `--top 7` reads the rest from sequences.parquet in text and
    Markdown, and JSON must not stop silently at 5."""
    seqs = pd.read_parquet(report / "sequences.parquet")
    assert len(seqs) == 8
    code, out, err = run_cli(["show", str(report), "--format", "json", "--top", "7"], capsys)
    assert code == 0, err
    data = json.loads(out)
    rows = data["worst_rows"]
    expected = seqs.sort_values("kl_max", ascending=False, kind="stable")["seq_id"].head(7).tolist()
    assert [r["seq_id"] for r in rows] == expected
    assert [r["score"] for r in rows] == seqs.set_index("seq_id").loc[expected, "kl_max"].tolist()
    code, md, _ = run_cli(["show", str(report), "--format", "markdown", "--top", "7"], capsys)
    assert code == 0 and len(md.split("### Worst sequences")[1].strip().splitlines()) == 2 + len(rows)
    code, out, _ = run_cli(["show", str(report), "--format", "json", "--top", "3"], capsys)
    data = json.loads(out)
    assert code == 0 and len(data["worst_sequences"]) == 3 and "worst_rows" not in data


def test_a_partial_merge_says_so_when_shown(report, tmp_path, capsys):
    """A --partial merge (or one shard) reads like the whole run in every table: a warning says it is not."""
    import shutil

    part = tmp_path / "part"
    shutil.copytree(report, part)
    summary = json.loads((part / "summary.json").read_text())
    summary["coverage"] = {"split": 3, "shards": ["0/3", "1/3"], "missing": ["2/3"], "complete": False,
                           "partial": True}  # fmt: skip
    (part / "summary.json").write_text(json.dumps(summary))
    for fmt in ("text", "markdown", "json"):
        code, _, err = run_cli(["show", str(part), "--format", fmt], capsys)
        assert code == 0 and f"'{part}' merges 2 of 3 shards (missing 2/3, --partial)" in err
    code, _, err = run_cli(["show", str(report)], capsys)
    assert code == 0 and not err


def test_a_reports_summary_file_given_for_the_report_names_the_folder(report, capsys):
    code, _, err = run_cli(["show", str(report / "summary.json")], capsys)
    assert code == 2 and "is a file, not a report folder" in err and f"'{report}'" in err
    code, _, err = run_cli(["diff", str(report), str(report / "summary.json")], capsys)
    assert code == 2 and "is a file, not a report folder" in err
