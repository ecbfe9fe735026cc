"""`trm-diag bounds`: parameter mode, measured mode, inverse view, JSON, plot, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers import run_cli

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


def test_measured_mode_writes_bounds_parquet(tmp_path, dense_model, capsys):
    rep = tmp_path / "rep"
    code, _, _ = run(["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--out", str(rep),
                      "--num-prompts", "6", "--max-new-tokens", "16", "-q"], capsys)  # fmt: skip
    assert code == 0
    code, out, _ = run(["bounds", "--report", str(rep), "--horizons", "100,200", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    s = json.loads((rep / "summary.json").read_text())
    assert data["inputs"]["delta"] == pytest.approx(s["bound_inputs"]["delta"])
    b = pd.read_parquet(rep / "bounds.parquet")
    assert set(b["T"]) == {100, 200} and b["sources"].str.contains("measured").all()
    (rep / "tokens.parquet").write_text("damaged")
    code, _, err = run(["bounds", "--report", str(rep)], capsys)
    assert code == 2 and "cannot read report file" in err and "Traceback" not in err


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
