"""`trm-diag show`: a saved report rendered again (text, JSON, Markdown), `--version`, bare invocation."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def report(tmp_path_factory, dense_model):
    from tests.helpers import main_exit

    out = tmp_path_factory.mktemp("show") / "r"
    assert main_exit(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "8",
                      "--max-new-tokens", "16", "--out", str(out), "-q"]) == 0  # fmt: skip
    return out


def test_show_reproduces_compares_summary(dense_model, tmp_path, capsys):
    out = tmp_path / "r"
    code, printed, _ = run_cli(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16",
                                "--num-prompts", "4", "--max-new-tokens", "12", "--out", str(out), "-q"], capsys)  # fmt: skip
    assert code == 0
    code, shown, err = run_cli(["show", str(out)], capsys)
    assert code == 0 and shown == printed and not err


def test_show_formats(report, capsys):
    code, out, _ = run_cli(["show", str(report), "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["verdict"]["status"] in ("inside", "outside", "inside, masking too much")
    assert list(data)[:5] == ["tool", "command", "version", "complete", "verdict"]
    code, md, _ = run_cli(["show", str(report), "--format", "markdown", "--top", "7"], capsys)
    assert code == 0 and md.startswith("## trm-diag compare: ") and "### Worst sequences" in md
    worst = md.split("### Worst sequences")[1].strip().splitlines()
    assert len(worst) == 2 + 7  # header, rule, seven rows read from sequences.parquet
    code, text, _ = run_cli(["show", str(report), "--top", "2"], capsys)
    assert code == 0 and text.count("\n") > 10
    code, _, err = run_cli(["show", str(report), "--format", "xml"], capsys)
    assert code == 2 and "--format xml is unknown" in err
    code, _, err = run_cli(["show", str(report.parent / "missing")], capsys)
    assert code == 2 and "does not exist" in err


def test_show_gives_older_reports_a_verdict(report, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(report, old)
    s = json.loads((old / "summary.json").read_text())
    del s["verdict"]
    (old / "summary.json").write_text(json.dumps(s))
    code, out, _ = run_cli(["show", str(old), "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["verdict"]["headline"]


def test_version_and_bare_invocation(capsys):
    from trm_diag import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"trm-diag {__version__}"
    code, out, err = run_cli([], capsys)
    assert code == 2 and "Commands" in out + err and "Traceback" not in err
