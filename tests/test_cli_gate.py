"""`trm-diag gate`: pass, fail, baseline, every output format, every error class and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import run_cli
from trm_diag.cli import main
from trm_diag.gate import ReportMetrics


def run(argv, capsys):
    return run_cli(argv, capsys)


def make_report(tmp_path_factory, dense_model, name, rollout):
    out = tmp_path_factory.mktemp("g") / name
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", str(dense_model), "--rollout", rollout, "--train", "hf:dtype=float32", "--out",
              str(out), "--num-prompts", "8", "--max-new-tokens", "24", "-q"])  # fmt: skip
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory, dense_model):
    return make_report(tmp_path_factory, dense_model, "bf16", "hf:dtype=bfloat16")


@pytest.fixture(scope="module")
def clean_report(tmp_path_factory, dense_model):
    return make_report(tmp_path_factory, dense_model, "fp32", "hf:dtype=float32,batch_size=3")


def test_metric_values_match_the_report(report):
    import numpy as np
    import pandas as pd

    m = ReportMetrics(report)
    tok = pd.read_parquet(report / "tokens.parquet")
    seq = pd.read_parquet(report / "sequences.parquet")
    assert m.value("token.kl.p99") == pytest.approx(float(np.quantile(tok["kl"], 0.99)))
    assert m.value("token.tv.max") == pytest.approx(tok["tv"].max())
    assert m.value("seq.length.mean") == pytest.approx(seq["length"].mean())
    assert m.value("accept.trm_max") == pytest.approx(seq["accept_trm_max"].mean())
    s = json.loads((report / "summary.json").read_text())
    assert m.value("metrics.chi2_token") == pytest.approx(s["metrics"]["chi2_token"])
    obs = s["bound_inputs"]["observed_T"]
    assert m.value(f"bounds.unified@{obs}") == pytest.approx(s["bounds_at_observed_T"]["unified"])


def test_pass_and_fail_exit_codes(report, capsys):
    code, out, _ = run(["gate", str(report), "-r", "token.kl.p99 <= 1", "-r", "accept.trm_max >= 0.5"], capsys)
    assert code == 0 and "2/2 rules passed" in out
    code, out, _ = run(["gate", str(report), "-r", "token.kl.max <= 0", "-r", "accept.trm_max >= 0.5"], capsys)
    assert code == 1 and "FAIL" in out and "1/2 rules passed" in out


def test_baseline_rules(report, clean_report, capsys):
    # bf16 is far worse than the fp32 baseline: a relative rule fails; against itself it passes
    code, *_ = run(
        ["gate", str(report), "--baseline", str(clean_report), "-r", "token.kl.p99 <= 1.2 * baseline"], capsys
    )
    assert code == 1
    code, *_ = run(["gate", str(report), "--baseline", str(report), "-r", "token.kl.p99 <= 1.2 * baseline",
                    "-r", "token.tv.mean <= baseline + 0"], capsys)  # fmt: skip
    assert code == 0
    code, out, _ = run(
        ["gate", str(clean_report), "--baseline", str(report), "-r", "token.kl.p99 <= baseline", "--format", "json"],
        capsys,
    )
    data = json.loads(out)
    assert code == 0 and data["rules"][0]["baseline"] == pytest.approx(ReportMetrics(report).value("token.kl.p99"))


def test_json_junit_github_formats(report, tmp_path, capsys):
    rules = ["-r", "token.kl.p99 <= 1", "-r", "token.kl.max <= 0"]
    code, out, _ = run(["gate", str(report), *rules, "--format", "json", "--output", str(tmp_path / "g.json")], capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and data["n_failed"] == 1 and len(data["rules"]) == 2
    assert json.loads((tmp_path / "g.json").read_text()) == data
    code, out, _ = run(["gate", str(report), *rules, "--format", "junit", "--output", str(tmp_path / "g.xml")], capsys)
    suite = ET.fromstring(out.split("\n", 1)[1])
    assert code == 1 and suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.find("failure") is not None for c in cases] == [False, True]
    assert ET.parse(tmp_path / "g.xml").getroot().get("failures") == "1"
    code, out, _ = run(["gate", str(report), *rules, "--format", "github"], capsys)
    assert code == 1 and out.count("::error") == 1 and "::notice" in out and "1/2 rules passed" in out
    assert "above the limit 0" in out


def test_a_failed_gate_says_which_rule_by_how_much_and_where_to_look(report, tmp_path, monkeypatch, capsys):
    value = ReportMetrics(report).value("token.kl.p99")
    limit = value / 4
    code, out, _ = run(["gate", str(report), "-r", f"token.kl.p99 <= {limit!r}", "-r", "accept.combined >= 0"], capsys)
    assert code == 1 and "1/2 rules passed" in out
    line = " ".join(out[out.index("FAILED token.kl.p99") :].split())
    assert f"value {value:.3g} is {value - limit:.3g} above the limit {limit:.3g} (4x)" in line
    assert f"trm-diag show {report}" in line and "report.html" in line
    # --format github also writes a Markdown job summary (appended, as GitHub expects) when GITHUB_STEP_SUMMARY is set
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, _ = run(["gate", str(report), "-r", f"token.kl.p99 <= {limit!r}", "--format", "github"], capsys)
    md = summary.read_text()
    headline = json.loads((report / "summary.json").read_text())["verdict"]["headline"]
    assert code == 1 and md.startswith("earlier step\n") and "0/1 rules passed" in md and "| `token.kl.p99" in md
    assert headline in md and "(4x)" in md
    code, out, _ = run(["gate", str(report), "-r", "token.kl.p99 <= 1", "--output", str(tmp_path / "t.json")], capsys)
    assert code == 0 and json.loads((tmp_path / "t.json").read_text())["passed"] is True


def test_rules_from_toml_and_pyproject(report, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "gate.toml"
    cfg.write_text('[gate]\nrules = ["token.kl.p99 <= 1", "accept.trm_avg >= 0"]\n')
    code, out, _ = run(["gate", str(report), "--config", str(cfg)], capsys)
    assert code == 0 and "2/2" in out
    (tmp_path / "pyproject.toml").write_text('[tool.trm-diag.gate]\nrules = ["token.kl.max <= 0"]\n')
    monkeypatch.chdir(tmp_path)
    code, *_ = run(["gate", str(report)], capsys)
    assert code == 1


def test_list_metrics(report, capsys):
    code, out, _ = run(["gate", "--list-metrics", str(report), "--format", "json"], capsys)
    names = json.loads(out)
    assert code == 0 and "token.kl.p999" in names and "accept.combined" in names and "bounds.unified@4096" in names
    assert "seq.kl_max.max" in names and "metrics.ess_seq" in names
    # only meaningful metrics: no statistic of an identifier, no column another tier fills, flags by their mean
    assert not [n for n in names if n.split(".")[1] in ("seq_id", "pos", "token_id", "prompt_idx", "sample_idx")]
    assert not [n for n in names if n.startswith(("token.kl_lo.", "token.tv_hi.", "seq.kl_hi_max."))]
    assert "token.zero_prob.mean" in names and "token.zero_prob.p99" not in names


def test_report_tables_are_readable(report):
    """Decoded text beside the ids; no column that is NaN throughout."""
    import pyarrow.parquet as pq

    from trm_diag.schema import TIER_ONLY

    tokens, seqs = (pq.read_table(report / f"{t}.parquet").to_pandas() for t in ("tokens", "sequences"))
    assert "token_text" in tokens and "prompt_text" in seqs and "response_text" in seqs
    for (_, row), text in zip(seqs.iterrows(), seqs["response_text"]):
        pieces = tokens[tokens["seq_id"] == row["seq_id"]]["token_text"]
        assert "".join(pieces).strip() == text.strip()  # the byte-level pieces of this tokenizer concatenate back
    for df in (tokens, seqs):
        assert not [c for c in df if df[c].isna().all()]
    assert not {"kl_lo", "tv_hi"} & set(tokens) and TIER_ONLY - set(tokens) == {"kl_lo", "kl_hi", "tv_lo", "tv_hi"}


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["/no/such/report", "-r", "token.kl.p99 <= 1"], "does not exist"),
        (["{report}", "-r", "token.nope.p99 <= 1"], "unknown metric 'token.nope.p99'"),
        (["{report}", "-r", "token.kl.p99 =< 1"], "malformed rule"),
        (["{report}", "-r", "token.kl.p99 <= lots"], "malformed right-hand side"),
        (["{report}", "-r", "token.kl.p99 <= baseline"], "--baseline"),
        (["{report}"], "no gate rules given"),
        (["{report}", "-r", "token.kl.p99 <= 1", "--format", "xml"], "--format xml is unknown"),
        (["{report}", "--config", "/no/rules.toml"], "does not exist"),
        (["{report}", "-r", "bounds.unified@0 <= 1"], "must hold positive integers"),
        (["{report}", "-r", "bounds.unified@99999999999999 <= 1"], "beyond 10,000,000 tokens"),
    ],
)
def test_errors_exit_2(report, tmp_path, monkeypatch, argv, needle, capsys):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml with rules here
    argv = [a.replace("{report}", str(report)) for a in argv]
    code, _, err = run(["gate", *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"\xff\xfe\x00bad", "cannot read gate config"),
        (b"rules = [", "cannot read gate config"),
        (b"rules = [1, 2]", "rules must be a list of strings"),
        (b"tool = 5\ngate = 'x'\n", "no gate rules given"),
        (b"[gate]\nrules = ['token.kl.p99 =< 1']\n", "malformed rule"),
    ],
)
def test_broken_config_files_exit_2(report, tmp_path, monkeypatch, content, needle, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "gate.toml"
    cfg.write_bytes(content)
    code, _, err = run(["gate", str(report), "--config", str(cfg)], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_incomplete_report_is_an_input_error(report, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / "summary.json").unlink()
    code, _, err = run(["gate", str(broken), "-r", "token.kl.p99 <= 1"], capsys)
    assert code == 2 and "no complete report" in err


@pytest.mark.parametrize("table,metric", [("tokens", "token.kl.p99"), ("sequences", "seq.length.mean")])
def test_damaged_table_is_an_input_error(report, tmp_path, table, metric, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / f"{table}.parquet").write_bytes(b"PAR1 not really")
    code, _, err = run(["gate", str(broken), "-r", f"{metric} <= 1"], capsys)
    assert code == 2 and f"cannot read report file '{broken / table}.parquet'" in err and "Traceback" not in err


def test_gate_never_imports_torch(report):
    code = (f"import sys; from trm_diag.cli import main\ntry: main(['gate', {str(report)!r}, '-r', 'token.kl.p99 <= 1', '-r', 'bounds.unified@4096 <= 1e9'])\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_routing_flip_rate_metric(moe_model, tmp_path, capsys):
    out = tmp_path / "moe"
    code, *_ = run(["compare", "--model", str(moe_model), "--rollout", "hf:dtype=bfloat16", "--out", str(out),
                    "--num-prompts", "12", "--max-new-tokens", "32", "-q"], capsys)  # fmt: skip
    assert code == 0
    rate = json.loads((out / "summary.json").read_text())["routing"]["flip_rate"]
    assert ReportMetrics(out).value("routing.flip_rate") == pytest.approx(rate) and rate > 0
    code, *_ = run(["gate", str(out), "-r", "routing.flip_rate <= 0"], capsys)
    assert code == 1
    code, out_text, _ = run(["gate", "--list-metrics", str(out), "--format", "json"], capsys)
    assert "routing.flip_rate" in json.loads(out_text)


def test_horizons_read_like_the_options_and_baselines_must_be_comparable(
    report, dense_model, moe_model, tmp_path, capsys
):
    code, out, _ = run(["gate", str(report), "-r", "bounds.unified@1e3 >= 0", "--format", "json"], capsys)
    assert code in (0, 1) and json.loads(out)["rules"][0]["metric"] == "bounds.unified@1e3"
    other = make_report(tmp_path_factory=_Factory(tmp_path), dense_model=moe_model, name="moe", rollout="hf")
    code, _, err = run(["gate", str(report), "-r", "token.kl.p99 <= 2 * baseline", "--baseline", str(other)], capsys)
    assert "warning" in err and "differ in" in err and "the rollout model" in err
    code, _, err = run(
        ["gate", str(report), "-r", "token.kl.p99 <= 2 * baseline", "--baseline", str(other), "--strict"], capsys
    )
    assert code == 2 and "differ in" in err
    code, _, err = run(
        ["gate", str(report), "-r", "token.kl.p99 <= 2 * baseline", "--baseline", str(report), "--strict"], capsys
    )
    assert code in (0, 1) and "differ in" not in err


def test_old_metric_names_still_answer(report, capsys):
    code, out, _ = run(["gate", str(report), "-r", "metrics.k1_mean <= 1", "--format", "json"], capsys)
    r = json.loads(out)["rules"][0]
    assert code == 0 and "renamed to metrics.kl" in r["note"]
    assert r["value"] == ReportMetrics(report).value("metrics.kl")


class _Factory:
    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        d = self.root / name
        d.mkdir()
        return d


def test_bound_inputs_are_saved_once_and_equal_a_recomputation(report):
    """gate reads delta, eps, D^seq and Dbar_t from summary.json; they equal those of the tables."""
    import numpy as np
    import pandas as pd

    from trm_diag.bounds import BoundInputs, all_bounds
    from trm_diag.metrics import bound_inputs

    saved = BoundInputs.from_dict(json.loads((report / "summary.json").read_text())["bound_inputs"])
    fresh = bound_inputs(
        pd.read_parquet(report / "tokens.parquet"), pd.read_parquet(report / "sequences.parquet"), "exact"
    )
    assert saved is not None and saved.dbar is not None and np.array_equal(saved.dbar, fresh.dbar)
    for T in (64, 4096):
        assert all_bounds(T, saved)[0] == all_bounds(T, fresh)[0]
        assert ReportMetrics(report).value(f"bounds.unified@{T}") == all_bounds(T, fresh)[0]["unified"]


HEAVY = ("torch", "transformers", "pandas", "pyarrow")


def _loaded_after(argv: list[str]) -> list[str]:
    """The heavy packages a fresh interpreter has imported once `trm-diag ARGV` returned."""
    code = (f"import sys; from trm_diag.cli import main\ntry: main({argv!r})\n"
            "except SystemExit as e: assert e.code in (0, 1, None), e.code\n"
            f"print('LOADED:' + ','.join(m for m in {HEAVY + ('numpy',)!r} if m in sys.modules), file=sys.stderr)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stderr.splitlines() if x.startswith("LOADED:"))
    return [m for m in line.removeprefix("LOADED:").split(",") if m]


def test_summary_only_commands_never_import_the_parquet_stack(report):
    """gate on summary.json's numbers, show, bounds from parameters and --help start in a fraction of a
    second: the Parquet stack (pyarrow, pandas) loads only for rules and commands that read tables."""
    rules = ["-r", "views.pipeline.kl_mean <= 1", "-r", "breakdown.prob_gt_90pct.kl.mean <= 1",
             "-r", "metrics.ppo_clip_frac <= 1", "-r", "bounds.unified@4096 <= 1e9"]  # fmt: skip
    assert not set(_loaded_after(["gate", str(report), *rules])) & set(HEAVY)
    assert not set(_loaded_after(["show", str(report)])) & set(HEAVY)
    assert not set(_loaded_after(["bounds", "--delta", "1e-4", "--horizons", "4096"])) & set(HEAVY)
    assert _loaded_after(["--help"]) == []  # not even numpy
    assert "pyarrow" in _loaded_after(["gate", str(report), "-r", "token.kl.p99 <= 1"])  # a rule on a table
