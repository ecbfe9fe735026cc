"""`trm-diag diff`: a report against itself changes nothing; against another run the signs are right."""

from __future__ import annotations

import json

import pytest

from tests.helpers import main_exit, run_cli


def _report(root, model, name, rollout):
    out = root / name
    assert main_exit(["compare", "--model", str(model), "--rollout", rollout, "--num-prompts", "6",
                      "--max-new-tokens", "16", "--out", str(out), "-q"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory, dense_model):
    root = tmp_path_factory.mktemp("diff")
    return _report(root, dense_model, "bf16", "hf:dtype=bfloat16"), _report(
        root, dense_model, "fp32", "hf:dtype=float32"
    )


def test_a_report_against_itself_changes_nothing(reports, capsys):
    code, out, err = run_cli(["diff", str(reports[0]), str(reports[0]), "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["comparable"] and not err
    assert data["rows"] and all(r["direction"] in ("same", None) for r in data["rows"])
    code, text, _ = run_cli(["diff", str(reports[0]), str(reports[0])], capsys)
    assert code == 0 and "0 better, 0 worse" in text


def test_the_signs_of_two_runs(reports, capsys):
    bf16, fp32 = reports  # rollout in float32 against a float32 trainer: no mismatch at all
    code, out, _ = run_cli(["diff", str(bf16), str(fp32), "--format", "json"], capsys)
    rows = {r["metric"]: r for r in json.loads(out)["rows"]}
    assert code == 0
    kl = rows["token kl mean"]
    assert kl["b"] < kl["a"] and kl["direction"] == "better" and kl["change"] == pytest.approx(kl["b"] - kl["a"])
    assert rows["B* at the observed length"]["direction"] == "better"
    code, out, _ = run_cli(["diff", str(fp32), str(bf16), "--format", "json"], capsys)
    assert {r["metric"]: r for r in json.loads(out)["rows"]}["token kl mean"]["direction"] == "worse"


def test_reports_of_other_models_warn_or_are_refused(reports, moe_model, tmp_path, capsys):
    other = _report(tmp_path, moe_model, "moe", "hf:dtype=bfloat16")
    code, _, err = run_cli(["diff", str(reports[0]), str(other)], capsys)
    assert code == 0 and "warning" in err and "differ in" in err
    code, _, err = run_cli(["diff", str(reports[0]), str(other), "--strict"], capsys)
    assert code == 2 and "differ in" in err
