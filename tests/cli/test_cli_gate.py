"""`trm-diag gate`: pass, fail, baseline, every output format, every error class and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import run_cli
from trm_diag.cli import main
from trm_diag.report.gate import ReportMetrics


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
        (["{report}", "--config", "{report}"], "is a folder"),
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
        (b"tool = 5\ngate = 'x'\n", "gate must be a table, not str"),
        (b"[gate]\nrules = ['token.kl.p99 =< 1']\n", "malformed rule"),
        # rules at two levels: none is dropped silently (the failing top-level rule used to be ignored)
        (
            b"rules = ['token.kl.max <= 0']\n[gate]\nrules = ['token.kl.p99 <= 1']\n",
            "more than one level (top level, [gate])",
        ),
        (b"[tool.trm-diag.gate]\nrules = ['token.kl.max <= 0']\n[gate]\nrules = []\n", "more than one level"),
        (b"[gate]\nrule = ['token.kl.max <= 0']\n", "unknown key 'rule' in [gate]"),
        (b"title = 'rules live elsewhere'\n", "holds no rules"),
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
    assert code == 0 and json.loads(out)["rules"][0]["metric"] == "bounds.unified@1e3"  # a bound is >= 0
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
    assert code == 0 and "differ in" not in err  # x <= 2 * x for a report against itself


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

    from trm_diag.math.bounds import BoundInputs, all_bounds
    from trm_diag.math.metrics import bound_inputs

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
             "-r", "metrics.ppo_clip_frac <= 1", "-r", "bounds.unified@4096 <= 1e9",
             # summary.json holds these too: the README's own example never opens a table
             "-r", "token.kl.p99 <= 1e-3", "-r", "accept.trm_max >= 0.7", "-r", "views.replay.bias <= 1",
             "-r", "metrics.token_kl_p99 <= 1", "-r", "token.abs_log_ratio.max <= 1"]  # fmt: skip
    assert not set(_loaded_after(["gate", str(report), *rules])) & set(HEAVY)
    assert not set(_loaded_after(["show", str(report)])) & set(HEAVY)
    assert not set(_loaded_after(["bounds", "--delta", "1e-4", "--horizons", "4096"])) & set(HEAVY)
    assert _loaded_after(["--help"]) == []  # not even numpy
    assert "pyarrow" in _loaded_after(["gate", str(report), "-r", "token.kl.min <= 1"])  # a rule on a table


@pytest.fixture(scope="module")
def sampled_report(tmp_path_factory, dense_model):
    out = tmp_path_factory.mktemp("g") / "sampled"
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--train", "hf:dtype=float32",
              "--fidelity", "sampled", "--out", str(out), "--num-prompts", "3", "--max-new-tokens", "12", "-q"])  # fmt: skip
    assert e.value.code == 0
    return out


@pytest.mark.parametrize("which", ["report", "sampled_report"])
def test_every_listed_name_round_trips_through_a_rule(which, request, capsys):
    """--list-metrics offers only names a rule accepts: each parses back to itself, and one gate run over all
    of them judges every one (exit 0 or 1, never 2) with the value the listing shows."""
    from trm_diag.report.gate import parse_rule

    report = request.getfixturevalue(which)
    capsys.readouterr()  # what building the report printed
    code, out, _ = run(["gate", "--list-metrics", str(report), "--format", "json"], capsys)
    listed = json.loads(out)
    assert code == 0 and "breakdown.ent_lt_1e-3.n" in listed and "breakdown.ent_1e-3_1e-2.outside_band" in listed
    assert [n for n in listed if parse_rule(f"{n} <= 1").metric != n] == []
    rules = [x for n in listed for x in ("-r", f"{n} <= 1")]
    code, out, err = run(["gate", str(report), *rules, "--format", "json"], capsys)
    assert code in (0, 1) and "Traceback" not in err, err
    assert {r["metric"]: r["value"] for r in json.loads(out)["rules"]} == listed


def test_one_name_per_number_and_verls_names_are_marked(report, capsys):
    """A number summary.json holds under a second key is listed once, by its gate name; the other spelling
    still answers the same number with a note naming that name; verl's names stay verl's, listed as verl's."""
    import numpy as np
    import pandas as pd

    m = ReportMetrics(report)
    names = m.names()
    assert "token.kl.p99" in names and "metrics.token_kl_p99" not in names and "accept.trm_max" in names
    assert not [n for n in names if n.startswith(("metrics.token_", "metrics.accept_")) and "_n_" not in n]
    assert "metrics.kl" in names and "token.k1.mean" not in names and "metrics.abs_log_ratio_mean" not in names
    assert "metrics.kl_share_low_prob" not in names and "breakdown.prob_lt_1pct.kl_share" in names
    for old, new in (("metrics.token_kl_p99", "token.kl.p99"), ("metrics.accept_trm_max", "accept.trm_max"),
                     ("token.k1.mean", "verl's metrics.kl"), ("metrics.token_k3_mean", "verl's metrics.k3_kl"),
                     ("metrics.abs_log_ratio_mean", "token.abs_log_ratio.mean"),
                     ("metrics.kl_share_low_prob", "breakdown.prob_lt_1pct.kl_share")):  # fmt: skip
        code, out, _ = run(["gate", str(report), "-r", f"{old} <= 1", "--format", "json"], capsys)
        r = json.loads(out)["rules"][0]
        assert code == 0 and f"same number as {new}: write that name" in r["note"], r
        assert r["value"] == ReportMetrics(report).value(new.removeprefix("verl's ")), r
    # the numbers behind the moved names, against float64 references from the tables (pandas)
    tok = pd.read_parquet(report / "tokens.parquet")
    lr = tok["log_ratio"].to_numpy()
    tol = 8 * len(lr) * np.finfo(np.float64).eps * np.abs(lr).max()  # summation order only
    assert m.value("metrics.kl") == pytest.approx(float((tok["lp_roll"] - tok["lp_train"]).mean()), rel=0, abs=tol)
    assert m.value("token.log_ratio.mean") == pytest.approx(float(np.mean(lr)), rel=0, abs=tol)
    assert m.value("token.abs_log_ratio.p99") == pytest.approx(float(np.quantile(np.abs(lr), 0.99)), rel=1e-12)
    assert m.value("token.abs_log_ratio.min") == float(np.abs(lr).min())
    kl = tok["kl"].to_numpy()
    low = np.exp(tok["lp_roll"].to_numpy()) < 0.01
    assert m.value("metrics.kl_share_low_prob") == pytest.approx(kl[low].sum() / kl.sum(), rel=1e-12)
    # the listing's table says whose name each is
    code, out, _ = run(["gate", "--list-metrics", str(report)], capsys)
    by = {c[1].strip(): c[3].strip() for c in (line.split("│") for line in out.splitlines()) if len(c) == 5}
    assert code == 0 and by["metrics.kl"] == by["metrics.chi2_token"] == "verl"
    assert by["token.kl.mean"] == by["metrics.ess_seq"] == "trm-diag"


def test_names_valid_for_the_tier_are_always_judged(report, sampled_report, capsys):
    """Without truncation the views coincide, so each view's name answers with the report's own number; an
    empty bucket has n = 0 and every other statistic 0 (with a note): judged, never refused. Names the tier
    cannot have are refused whatever the data."""
    import numpy as np
    import pandas as pd

    capsys.readouterr()  # what building the reports printed
    tok = pd.read_parquet(report / "tokens.parquet")
    kl, lr = tok["kl"].to_numpy(), tok["log_ratio"].to_numpy()
    rules = ["views.replay.kl_mean <= 1", "views.full.bias <= 1", "views.pipeline.kl_p99 <= 1",
             "breakdown.replay.prob_gt_90pct.kl_mean <= 1", "breakdown.ent_lt_1e-3.kl_mean <= 1"]  # fmt: skip
    code, out, err = run(["gate", str(report), *[x for r in rules for x in ("-r", r)], "--format", "json"], capsys)
    got = json.loads(out)["rules"]
    assert code == 0, err
    tol = 8 * len(lr) * np.finfo(np.float64).eps * np.abs(lr).max()
    assert got[0]["value"] == pytest.approx(float(kl.mean()), rel=1e-12) and "views coincide" in got[0]["note"]
    assert got[1]["value"] == pytest.approx(float(lr.mean()), rel=0, abs=tol)
    assert got[2]["value"] == pytest.approx(float(np.quantile(kl, 0.99)), rel=1e-12)
    sure = np.exp(tok["lp_roll"].to_numpy()) >= 0.9
    assert got[3]["value"] == pytest.approx(float(kl[sure].mean()), rel=1e-12)
    ent = tok["ent_roll"].to_numpy() < 1e-3
    assert ent.any() and got[4]["value"] == pytest.approx(float(kl[ent].mean()), rel=1e-12)
    # no token at position >= 4096 in this report: the bucket is empty, and its rules are judged
    assert not (tok["pos"] >= 4096).any()
    rules = ["breakdown.pos_4096_16383.n <= 0", "breakdown.pos_4096_16383.kl_mean <= 1e-9",
             "breakdown.full.pos_ge_16384.outside_band <= 0", "breakdown.pos_4096_16383.token_share >= 0.01"]  # fmt: skip
    code, out, _ = run(["gate", str(report), *[x for r in rules for x in ("-r", r)], "--format", "json"], capsys)
    got = json.loads(out)["rules"]
    assert code == 1 and [r["value"] for r in got] == [0, 0, 0, 0]
    assert [r["passed"] for r in got] == [True, True, True, False] and all("bucket empty" in r["note"] for r in got)
    # the sampled tier has no views and no per-token KL: refused, on every run
    for rule, needle in (("views.replay.kl_mean <= 1", "needs the exact tier"),
                         ("breakdown.prob_gt_90pct.kl_mean <= 1", "has no per-token KL")):  # fmt: skip
        code, _, err = run(["gate", str(sampled_report), "-r", rule], capsys)
        assert code == 2 and needle in err and "Traceback" not in err
    code, *_ = run(["gate", str(sampled_report), "-r", "breakdown.pos_4096_16383.n <= 0"], capsys)
    assert code == 0


def test_lines_users_grep_never_wrap(report, capsys):
    """In a CI log (stdout not a terminal: 80 columns) the verdict, its findings, every table title and the
    gate's FAILED line each stay on one line; tables still fit."""
    value = ReportMetrics(report).value("token.kl.p99")
    rule = f"token.kl.p99 <= {value / 100!r}"
    code, out, _ = run(["gate", str(report), "--baseline", str(report), "-r", rule], capsys)
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    assert code == 1 and len(failed) == 1 and failed[0].startswith(f"FAILED {rule}: value ") and len(failed[0]) > 80
    assert failed[0].endswith("(100x)") and f"trm-diag gate: {report} vs baseline {report}" in lines
    code, out, _ = run(["show", str(report)], capsys)
    lines = out.splitlines()
    v = json.loads((report / "summary.json").read_text())["verdict"]
    assert code == 0 and len(v["headline"]) > 80 and v["headline"] in lines and v["findings"]
    for f in v["findings"][:3]:
        assert f"  - {f['finding']}" in lines and f"    -> {f['action']}" in lines
    title = next(line for line in lines if line.startswith("Acceptance by length"))
    assert title.endswith("over the threshold)")
    assert max(len(line) for line in lines if line.startswith(("┃", "│", "┏", "└"))) <= 80


def test_counts_print_as_counts():
    """Whole numbers read as counts in every table: 1,375, never 1.38e+03; other numbers keep 3 digits."""
    from trm_diag.cli.numbers import fmt

    assert [fmt(1375.0), fmt(1375), fmt(1375.4), fmt(999.7), fmt(123456.0), fmt(-2048.0)] == [
        "1,375", "1,375", "1,375", "1,000", "123,456", "-2,048"]  # fmt: skip
    assert [fmt(0.5), fmt(0.0123), fmt(123.456), fmt(2.5e-4), fmt(1.5e5 + 0.5), fmt(float("inf"))] == [
        "0.5", "0.0123", "123", "2.50e-04", "1.50e+05", "inf"]  # fmt: skip


def test_an_unwritable_job_summary_warns_and_keeps_the_exit_code(report, tmp_path, monkeypatch, capsys):
    """$GITHUB_STEP_SUMMARY is a side output: when it cannot be appended to, a warning names the variable and
    the gate's own 0 / 1 stands."""
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))  # a folder: no file can be appended there
    for rule, expected in (("token.kl.p99 <= 1", 0), ("token.kl.p99 <= 0", 1)):
        code, out, err = run(["gate", str(report), "-r", rule, "--format", "github"], capsys)
        assert code == expected and "::notice" in out, err
        assert "warning" in err and "$GITHUB_STEP_SUMMARY" in err and str(tmp_path) in err and "Traceback" not in err


def test_gate_wording_at_equality_and_limits_without_a_value(report, tmp_path, capsys):
    import shutil

    value = ReportMetrics(report).value("token.kl.p99")
    near = value * (1 - 1e-9)
    code, out, _ = run(["gate", str(report), "-r", f"token.kl.p99 < {value!r}", "-r", f"token.kl.p99 <= {near!r}",
                        "-r", f"token.kl.p99 > {value!r}"], capsys)  # fmt: skip
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert code == 1 and len(failed) == 3
    assert failed[0].endswith(f"value {value:.3g} equals the limit; the rule wants it strictly below")
    assert failed[2].endswith(f"value {value:.3g} equals the limit; the rule wants it strictly above")
    # two numbers equal to 3 digits are printed with the digits that tell them apart
    shown = failed[1].split(": ", 1)[1].split()
    assert shown[0] == "value" and shown[1] != shown[-2] and float(shown[1]) > float(shown[-2])
    # 0 x an infinite baseline has no value: the rule fails and says why (the baseline has a value)
    base = tmp_path / "base"
    shutil.copytree(report, base)
    s = json.loads((base / "summary.json").read_text())
    s["metrics"]["chi2_token"] = None
    s.setdefault("infinite_values", {})["/metrics/chi2_token"] = "inf"
    (base / "summary.json").write_text(json.dumps(s))
    code, out, _ = run(["gate", str(report), "--baseline", str(base), "-r", "metrics.chi2_token <= 0 * baseline",
                        "--format", "json"], capsys)  # fmt: skip
    r = json.loads(out)["rules"][0]
    assert code == 1 and r["note"] == "the limit '0 * baseline' has no value with the baseline inf", r


def test_reports_without_a_section_name_what_they_lack(report, tmp_path, capsys):
    """A report of an older trm-diag (no breakdowns, no views) or one whose routing was not compared: a rule on
    that section is refused with the reason, not answered with a number the report does not hold."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(report, old)
    s = json.loads((old / "summary.json").read_text())
    del s["breakdowns"], s["views"]
    s["routing"] = {"available": False, "reason": "routing is compared in the exact tier only"}
    (old / "summary.json").write_text(json.dumps(s))
    for rule, needle in (("breakdown.pos_0_15.n >= 0", "keeps no breakdowns (written by an older trm-diag)"),
                         ("views.replay.kl_mean <= 1", "keeps no views (written by an older trm-diag)"),
                         ("routing.flip_rate <= 0", "compared no routing (routing is compared in the exact tier only)"),
                         ("metrics.kl_share_low_prob <= 1", "")):  # fmt: skip
        code, _, err = run(["gate", str(old), "-r", rule], capsys)
        assert (code, needle in err) == ((2, True) if needle else (0, True)), (rule, err)
    code, out, _ = run(["gate", "--list-metrics", str(old), "--format", "json"], capsys)
    names = json.loads(out)
    assert code == 0 and "metrics.kl_share_low_prob" in names and not [n for n in names if n.startswith("breakdown.")]


def test_bounds_of_a_sampled_report_without_saved_inputs_are_recomputed(sampled_report, tmp_path):
    """Saved bound inputs that do not read (an older or damaged summary): the gate recomputes them from the tables."""
    import shutil

    from trm_diag.math.bounds import BoundInputs, all_bounds

    old = tmp_path / "old"
    shutil.copytree(sampled_report, old)
    s = json.loads((old / "summary.json").read_text())
    saved = BoundInputs.from_dict(s["bound_inputs"])
    s["bound_inputs"] = {"observed_T": s["bound_inputs"]["observed_T"]}  # from_dict: None, so recomputed
    (old / "summary.json").write_text(json.dumps(s))
    assert ReportMetrics(old).value("bounds.unified@4096") == all_bounds(4096, saved)[0]["unified"]
