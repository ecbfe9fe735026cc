"""`trm-diag bounds`: parameter mode, measured mode, inverse view, JSON, plot, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers import main_exit, run_cli

PAPER = ["--delta", "1e-4", "--eps", "5e-3", "--kl-seq", "0.01", "--tv-seq", "0.05"]


def run(argv, capsys):
    return run_cli(argv, capsys)


def test_paper_table_json(capsys):
    code, out, _ = run(["bounds", *PAPER, "--horizons", "256,4096", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    keys = {"classical", "classical_kl", "coupling", "pm_kl", "pm_tv", "mix_kl", "mix_tv", "adaptive_kl",
            "adaptive_tv", "adaptive_hybrid", "unified"}  # fmt: skip
    assert set(data["bounds"]) == {"256", "4096"} and set(data["bounds"]["4096"]) == keys
    b = data["bounds"]["4096"]
    assert abs(b["classical"] - 839) / 839 < 0.005 and abs(b["mix_tv"] - 4.1) < 0.05 and b["unified"] == b["mix_tv"]


def test_table_marks_vacuous_and_missing(capsys):
    code, out, _ = run(["bounds", "--delta", "0.05", "--horizons", "1024,4096"], capsys)
    assert code == 0 and "vacuous" in out and "Unified B*" in out
    code, out, _ = run(["bounds", "--delta", "1e-4", "--horizons", "4096", "--json"], capsys)
    b = json.loads(out)["bounds"]["4096"]
    assert b["mix_kl"] is None and b["mix_tv"] is None and b["unified"] is not None  # no sequence inputs


def test_budget_inverse_view(capsys):
    code, out, _ = run(["bounds", "--budget", "1", "--horizons", "256,4096", "--json"], capsys)
    md = json.loads(out)["max_delta"]
    assert code == 0 and md["256"]["delta"] > md["4096"]["delta"] > 0
    code, out, _ = run(["bounds", "--budget", "1", "--horizons", "256,4096"], capsys)
    assert "max delta" in out and "0.05" in out


@pytest.fixture(scope="module")
def scored(tmp_path_factory, dense_model):
    """A `score` report whose rollout log-probs are the model's own but for two tokens a rollout, 1 and -0.99
    nats off: delta (k2 max 0.5) is large against the per-token KL rate (a k1 sum of 0.01 in every rollout, no
    spread, so its upper value is the mean: 0.06 / 200 tokens), B* >= 1 at the observed length, and the largest
    delta within B* <= 1 lies above that rate (so the rate matters)."""
    d = tmp_path_factory.mktemp("bounds")
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": [int(x) for x in rng.integers(10, 2000, 4)],
             "response_ids": [int(x) for x in rng.integers(10, 2000, n)]} for n in (24, 28, 32, 36, 40, 40)]  # fmt: skip
    with open(d / "r0.jsonl", "w") as f:  # any log-probs: this run only yields the model's own (lp_train)
        f.writelines(json.dumps({**r, "rollout_logprobs": [-1.0] * len(r["response_ids"])}) + "\n" for r in rows)
    assert main_exit(["score", str(d / "r0.jsonl"), "--model", str(dense_model), "--out", str(d / "own"), "-q"]) == 0
    own = pd.read_parquet(d / "own" / "tokens.parquet").sort_values(["seq_id", "pos"])
    with open(d / "r.jsonl", "w") as f:
        for i, r in enumerate(rows):
            lp = own.loc[own["seq_id"] == i, "lp_train"].to_list()
            lp[5] += 1.0  # log_ratio = lp_train - lp_roll = -1 (k1 = 1, k2 = 0.5)
            lp[9] -= 0.99  # log_ratio = 0.99 (k1 = -0.99)
            f.write(json.dumps({**r, "rollout_logprobs": lp}) + "\n")
    assert main_exit(["score", str(d / "r.jsonl"), "--model", str(dense_model), "--out", str(d / "rep"), "-q"]) == 0
    return d / "rep"


def test_verdict_and_budget_give_one_threshold(scored, capsys):
    """The verdict's "mask at delta <= X" and `bounds --report --budget 1` at the observed length are one
    number: the largest delta with B* <= 1 with the measured per-token KL rate (docs/design.md section 3)."""
    from trm_diag.cli.numbers import fmt
    from trm_diag.math.bounds import delta_for_budget
    from trm_diag.report.verdict import _fmt, verdict

    s = json.loads((scored / "summary.json").read_text())
    T, rate = s["bound_inputs"]["observed_T"], s["bound_inputs"]["kl_rate"]
    code, out, _ = run(
        ["bounds", "--report", str(scored), "--budget", "1", "--horizons", f"{T},4096", "--json"], capsys
    )
    md = json.loads(out)["max_delta"][str(T)]
    assert code == 0 and md["kl_rate"] == rate and md["delta"] is not None
    for v in (s["verdict"], verdict(s)):  # as the run wrote it, and as `show` recomputes it
        f = next(f for f in v["findings"] if f["id"] == "vacuous_bound")
        assert f"delta <= {_fmt(md['delta'])} (" in f["action"] and f"T * min({rate:.3g}, delta)" in f["action"]
    worst = delta_for_budget(T, 1.0).delta  # D_KL^seq = T * delta, what the verdict used to assume
    assert worst < md["delta"] / 2  # the measured rate matters on this report
    code, out, _ = run(["bounds", "--report", str(scored), "--budget", "1", "--horizons", "4096"], capsys)
    rows = [line for line in out.splitlines() if line.startswith(f"│ {T:>5} │")]
    assert any(fmt(md["delta"]) in row for row in rows)  # the observed length is added to the horizons of a report
    v = verdict({**s, "bound_inputs": {**s["bound_inputs"], "kl_rate": None}})
    f = next(f for f in v["findings"] if f["id"] == "vacuous_bound")
    assert f"delta <= {_fmt(worst)} (" in f["action"] and "worst case" in f["action"]  # says what it assumed


def test_report_mode_reads_only_and_write_merges(scored, tmp_path, capsys):
    """`bounds --report` never changes the report; --write adds rows for new horizons and keeps the run's own."""
    import shutil

    rep = tmp_path / "rep"
    shutil.copytree(scored, rep)
    before = (rep / "bounds.parquet").read_bytes()
    own = pd.read_parquet(rep / "bounds.parquet")
    code, out, _ = run(["bounds", "--report", str(rep), "--horizons", "100,200", "--json"], capsys)
    assert code == 0 and (rep / "bounds.parquet").read_bytes() == before
    s = json.loads((rep / "summary.json").read_text())
    assert json.loads(out)["inputs"]["delta"] == pytest.approx(s["bound_inputs"]["delta"])
    code, _, err = run(["bounds", "--report", str(rep), "--horizons", "100,1024", "--write"], capsys)
    assert code == 0 and "added T = 100" in err
    b = pd.read_parquet(rep / "bounds.parquet")
    assert set(b["T"]) == set(own["T"]) | {100} and list(b["T"]) == sorted(b["T"])
    kept = b[b["T"].isin(own["T"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, own, check_dtype=False)  # the run's rows, observed length included
    new = b[b["T"] == 100].set_index("bound")["value"]
    ref = json.loads(run(["bounds", "--report", str(rep), "--horizons", "100", "--json"], capsys)[1])["bounds"]["100"]
    assert set(new.index) == set(ref)
    for k, v in ref.items():
        assert math.isnan(new[k]) if v is None else new[k] == v, k
    once = (rep / "bounds.parquet").read_bytes()
    code, _, err = run(["bounds", "--report", str(rep), "--horizons", "100", "--write"], capsys)
    assert code == 0 and "left as it was" in err and (rep / "bounds.parquet").read_bytes() == once
    (rep / "bounds.parquet").write_text("damaged")
    code, _, err = run(["bounds", "--report", str(rep), "--horizons", "300", "--write"], capsys)
    assert code == 2 and "cannot read report file" in err and (rep / "bounds.parquet").read_text() == "damaged"
    (rep / "tokens.parquet").write_text("damaged")
    code, _, err = run(["bounds", "--report", str(rep)], capsys)
    assert code == 2 and "cannot read report file" in err and "Traceback" not in err


def test_each_horizon_shows_the_inputs_it_used(scored, capsys):
    code, out, _ = run(["bounds", "--delta", "1e-4", "--kl-seq", "0.01", "--horizons", "4096", "--json"], capsys)
    data = json.loads(out)
    used, b = data["used"]["4096"], data["bounds"]["4096"]
    tv = math.sqrt(0.01 / 2)  # Pinsker from --kl-seq: what Mixed TV used
    assert used["tv_seq"] == pytest.approx(tv, rel=1e-15) and "Pinsker" in used["sources"]
    assert b["mix_tv"] == pytest.approx(4 * 4096 * math.sqrt(1e-4 / 2) * tv, rel=1e-12)
    code, out, _ = run(["bounds", "--delta", "1e-4", "--kl-seq", "0.01", "--horizons", "4096"], capsys)
    assert code == 0 and "0.0707" in out and "D_TV^seq=-" not in out
    s = json.loads((scored / "summary.json").read_text())
    rate, T = s["bound_inputs"]["kl_rate"], s["bound_inputs"]["observed_T"]
    code, out, _ = run(["bounds", "--report", str(scored), "--horizons", "1024,4096", "--json"], capsys)
    used = json.loads(out)["used"]
    assert used[str(T)]["kl_seq"] == pytest.approx(s["bound_inputs"]["kl_seq"], rel=1e-15)  # measured at T
    for h in (1024, 4096):
        assert used[str(h)]["kl_seq"] == pytest.approx(h * rate, rel=1e-12) and "modelled" in used[str(h)]["sources"]
    code, out, _ = run(["bounds", "--report", str(scored), "--horizons", "1024,4096"], capsys)
    assert fmt_(1024 * rate) in out and fmt_(4096 * rate) in out


def fmt_(x):
    from trm_diag.cli.numbers import fmt

    return fmt(x)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--delta", "1e-4", "--kl-seq", "0.01", "--kl-rate", "1e-5"], "--kl-seq and --kl-rate both set D_KL^seq"),
        (["--report", "/nope", "--kl-rate", "1e-5"], "--report cannot be combined with"),
        (["--budget", "1", "--kl-seq", "0.01"], "no bound from --kl-seq alone"),
        (["--budget", "1", "--tv-seq", "0.1", "--kl-rate", "1e-5"], "no bound from --tv-seq alone"),
        (["--budget", "1", "--plot", "p.png"], "--plot has no bounds to draw"),
        (["--delta", "1e-4", "--write"], "--write needs --report DIR"),
    ],
)
def test_inputs_no_output_would_use_are_refused(argv, needle, capsys):
    code, _, err = run(["bounds", *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_budget_says_any_delta_and_caps_eps(capsys):
    code, out, _ = run(["bounds", "--budget", "1", "--horizons", "1,64", "--json"], capsys)
    md = json.loads(out)["max_delta"]
    assert code == 0 and md["1"]["delta"] is None and md["1"]["eps"] is None  # T = 1: nothing to bound
    assert 0 < md["64"]["delta"] < 2 and md["64"]["eps"] <= 1
    code, out, _ = run(["bounds", "--budget", "1e9", "--horizons", "64", "--json"], capsys)
    assert json.loads(out)["max_delta"]["64"]["delta"] is None  # B* never exceeds 4 (T - 1)
    code, out, _ = run(["bounds", "--budget", "1e9", "--horizons", "64"], capsys)
    assert "any delta" in out and "100" not in out and "7.07" not in out


def test_contradictory_inputs_warn(capsys):
    code, _, err = run(["bounds", "--delta", "1e-4", "--eps", "0", "--horizons", "64"], capsys)
    assert code == 0 and "warning: --eps 0 with --delta" in err
    code, _, err = run(["bounds", "--delta", "1e-4", "--eps", "0.01", "--horizons", "64"], capsys)
    assert code == 0 and "--eps 0.01 exceeds Pinsker" in err
    code, _, err = run(["bounds", *PAPER, "--horizons", "64"], capsys)
    assert code == 0 and "warning" not in err


def test_help_says_what_report_and_write_do(capsys):
    code, out, _ = run(["bounds", "--help"], capsys)
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "(read only; see --write)" in flat and "keeps its rows" in flat


def test_plot(tmp_path, capsys):
    png = tmp_path / "b.png"
    code, _, _ = run(["bounds", *PAPER, "--horizons", "64,256,1024,4096", "--plot", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "no inputs given"),
        (["--delta", "-1"], "--delta -1.0 is invalid"),
        (["--delta", "1e-3", "--tv-seq", "2"], "--tv-seq 2.0 exceeds 1"),
        (["--report", "/nope"], "does not exist"),
        (["--delta", "1e-3", "--horizons", "0"], "positive integers"),
        (["--delta", "1e-3", "--horizons", "1.5"], "positive integers"),
        (["--delta", "1e-3", "--horizons", "64,99999999999999999999"], "is beyond 10,000,000 tokens"),
        (["--budget", "0"], "--budget 0.0 is invalid"),
    ],
)
def test_errors(argv, needle, capsys):
    code, _, err = run(["bounds", *argv], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_bounds_never_imports_torch():
    code = "import sys; from trm_diag.cli import main\ntry: main(['bounds','--delta','1e-4','--json'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules and 'pandas' not in sys.modules, sorted(m for m in sys.modules if m in ('torch','pandas'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_strict_json_and_sensible_defaults(capsys):
    code, out, _ = run(["bounds", "--delta", "10", "--horizons", "64", "--json"], capsys)
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert code == 0 and data["inputs"]["eps"] == 1.0  # Pinsker would say 2.24; a TV is at most 1
    code, out, _ = run(["bounds", "--delta", "1e308", "--kl-seq", "1e308", "--horizons", "64", "--json"], capsys)
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert code == 0 and any(v is None for v in data["bounds"]["64"].values())
    code, _, err = run(["bounds", "--kl-seq", "0.01"], capsys)
    assert code == 2 and "no bound from --kl-seq alone" in err and "--delta" in err
    code, _, err = run(["bounds", "--delta", "1e-4", "--plot", "/no/such/dir/p.png"], capsys)
    assert code == 2 and "does not exist" in err
