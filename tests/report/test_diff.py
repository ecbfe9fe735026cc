"""`trm-diag diff`: a report against itself changes nothing; against another run the signs are right;
signed metrics compare by magnitude; B* only at one T; float noise reads as unchanged; every setup
difference is warned about (refused with --strict)."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from tests.helpers import main_exit, run_cli


def _report(root, model, name, rollout, *extra):
    out = root / name
    assert main_exit(["compare", "--model", str(model), "--rollout", rollout, "--num-prompts", "6",
                      "--max-new-tokens", "16", "--out", str(out), "-q", *extra]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory, dense_model):
    root = tmp_path_factory.mktemp("diff")
    bf16 = _report(root, dense_model, "bf16", "hf:dtype=bfloat16", "--save-rollouts", str(root / "r.jsonl"))
    return bf16, _report(root, dense_model, "fp32", "hf:dtype=float32")


def _rows(path, keep=None, cut=None):
    """The rollouts saved by the bf16 compare, the first ``keep`` of them, responses cut to ``cut`` tokens."""
    rows = [json.loads(x) for x in path.read_text().splitlines()][:keep]
    per_token = ("response_ids", "rollout_logprobs", "topk_logprobs")
    return [{k: (v[:cut] if k in per_token else v) for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def scored(reports, tmp_path_factory, dense_model):
    """Score reports of the saved rollouts (no rollout engine): a base one and one variant per setup."""
    root = tmp_path_factory.mktemp("scored")
    saved = reports[0].parent / "r.jsonl"
    files = {"all": _rows(saved), "first4": _rows(saved, keep=4), "cut8": _rows(saved, cut=8)}
    # rollouts that record no temperature: a --temperature for them is a setting, not a contradiction
    files["untempered"] = [{k: v for k, v in r.items() if k != "temperature"} for r in files["all"]]
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    variants = {
        "base": ("all", []),
        "thresholds": ("all", ["--trm-max", "0.1"]),
        "prompts": ("first4", []),
        "sampling": ("untempered", ["--temperature", "0.9"]),
        "train": ("all", ["--train", "hf:dtype=bfloat16"]),
        "shorter": ("cut8", []),
    }
    out = {}
    for name, (file, extra) in variants.items():
        out[name] = root / name
        argv = ["score", str(root / f"{file}.jsonl"), "--model", str(dense_model), "--out", str(out[name]), "-q"]
        assert main_exit([*argv, *extra]) == 0
    return out


def _edited(src, dst, change):
    """A copy of report ``src`` whose summary metrics are ``change(name, value)``."""
    shutil.copytree(src, dst)
    summary = json.loads((dst / "summary.json").read_text())
    summary["metrics"] = {k: change(k, v) for k, v in summary["metrics"].items()}
    (dst / "summary.json").write_text(json.dumps(summary))
    return dst


def _diff_json(argv, capsys):
    code, out, err = run_cli(["diff", *map(str, argv), "--format", "json"], capsys)
    assert code == 0, err
    return json.loads(out), err


def test_a_report_against_itself_changes_nothing(reports, capsys):
    code, out, err = run_cli(["diff", str(reports[0]), str(reports[0]), "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["comparable"] and not err and data["differences"] == []
    assert data["rows"] and all(r["direction"] in ("same", None) for r in data["rows"])
    code, text, _ = run_cli(["diff", str(reports[0]), str(reports[0])], capsys)
    assert code == 0 and "0 better, 0 worse" in text


def test_the_signs_of_two_runs(reports, capsys):
    bf16, fp32 = reports  # rollout in float32 against a float32 trainer: no mismatch at all
    code, out, err = run_cli(["diff", str(bf16), str(fp32), "--format", "json"], capsys)
    data = json.loads(out)
    rows = {r["metric"]: r for r in data["rows"]}
    assert code == 0
    kl = rows["token kl mean"]
    assert kl["b"] < kl["a"] and kl["direction"] == "better" and kl["change"] == pytest.approx(kl["b"] - kl["a"])
    assert rows["B* at the observed length"]["direction"] == "better"
    # the rollout backend is what this diff compares: named, not warned about
    assert data["comparable"] and not err and len(data["changes"]) == 1
    assert re.match(r"rollout backend: hf:.*dtype=bfloat16 -> hf:.*dtype=float32$", data["changes"][0])
    code, out, _ = run_cli(["diff", str(fp32), str(bf16), "--format", "json"], capsys)
    assert {r["metric"]: r for r in json.loads(out)["rows"]}["token kl mean"]["direction"] == "worse"


def test_acceptance_prints_as_a_percentage(reports, capsys):
    code, text, _ = run_cli(["diff", str(reports[0]), str(reports[1])], capsys)
    data, _ = _diff_json([reports[0], reports[1]], capsys)
    accept = {r["metric"]: r for r in data["rows"]}["accepted by TRM-Max"]
    line = next(x for x in text.splitlines() if "accepted by TRM-Max" in x)
    cells = [c.strip() for c in line.split("│")[1:-1]]  # metric, A, B, change, direction
    assert code == 0 and cells[1] == f"{100 * accept['a']:.1f}%" and cells[2] == f"{100 * accept['b']:.1f}%"
    assert cells[3] == f"{100 * (accept['b'] - accept['a']):+.1f} pp"


@pytest.mark.parametrize("name", ["kl", "chi2_token", "chi2_seq"])
def test_signed_metrics_compare_by_magnitude(scored, tmp_path, name, capsys):
    """+1e-4 -> -5e-3 is a 50x larger mismatch: worse, whatever the sign; the way back is better."""
    small = _edited(scored["base"], tmp_path / "small", lambda k, v: 1e-4 if k == name else v)
    large = _edited(scored["base"], tmp_path / "large", lambda k, v: -5e-3 if k == name else v)
    data, _ = _diff_json([small, large], capsys)
    row = {r["metric"]: r for r in data["rows"]}[name]
    assert row["direction"] == "worse" and row["better"] == "nearer 0"
    assert row["change"] == pytest.approx(-5.1e-3, rel=1e-12)
    assert row["relative"] == pytest.approx(5e-3 / 1e-4 - 1.0, rel=1e-12)  # of the magnitudes
    data, _ = _diff_json([large, small], capsys)
    assert {r["metric"]: r for r in data["rows"]}[name]["direction"] == "better"
    code, text, _ = run_cli(["diff", str(small), str(large)], capsys)
    line = next(x for x in text.splitlines() if f"│ {name} (signed)" in x)
    assert code == 0 and "worse" in line and "better" not in line


def test_b_star_is_compared_at_one_T(scored, monkeypatch, capsys):
    """Reports observed at T = 16 and T = 8: their headline B* are shown, not compared; both are
    computed at each T, as `bounds --report` computes them."""
    base, shorter = scored["base"], scored["shorter"]
    data, err = _diff_json([base, shorter], capsys)
    assert not err and data["comparable"]  # shorter responses alone are no setup difference
    rows = {r["metric"]: r for r in data["rows"]}
    first = rows["B* at the observed length"]
    assert first["direction"] is None and first["change"] is None and first["T"] == [16, 8]
    reference = {}
    for side, path in (("a", base), ("b", shorter)):
        code, out, _ = run_cli(["bounds", "--report", str(path), "--horizons", "8,16", "--json"], capsys)
        assert code == 0
        reference[side] = {int(T): b["unified"] for T, b in json.loads(out)["bounds"].items()}
    assert first["a"] == pytest.approx(reference["a"][16], rel=1e-12)
    assert first["b"] == pytest.approx(reference["b"][8], rel=1e-12)
    for T in (8, 16):
        row = rows[f"B* at T = {T}"]
        a, b = reference["a"][T], reference["b"][T]
        assert row["T"] == [T, T] and row["a"] == pytest.approx(a, rel=1e-12)
        assert row["b"] == pytest.approx(b, rel=1e-12)
        assert row["direction"] == ("better" if b < a else "worse")
    from trm_diag.cli.app import out_console

    monkeypatch.setattr(out_console, "width", 200)  # one table row per line
    code, text, _ = run_cli(["diff", str(base), str(shorter)], capsys)
    assert code == 0 and "B* at the observed length (A: T = 16, B: T = 8)" in text


@pytest.mark.parametrize("size", [1e-10, 1e-7])
def test_float_noise_reads_as_unchanged(scored, tmp_path, size, capsys):
    """Every metric moved by `size` relative (float32 rounding is ~6e-8): nothing better or worse at
    the default 1e-6; with --same-below 0 each moved value is labelled; a 1e-3 move is labelled."""

    def scale(f):
        return lambda k, v: v * f if isinstance(v, float) else v

    base = scored["base"]
    noisy = _edited(base, tmp_path / "noisy", scale(1 + size))
    data, _ = _diff_json([base, noisy], capsys)
    assert all(r["direction"] in ("same", None) for r in data["rows"]) and data["same_below"] == 1e-6
    data, _ = _diff_json([base, noisy, "--same-below", "0"], capsys)
    moved = [r for r in data["rows"] if r["a"] and r["metric"].startswith(("token", "kl", "k3", "chi2", "log"))]
    assert moved and all(r["direction"] in ("better", "worse") for r in moved)
    worse = _edited(base, tmp_path / "worse", scale(1 + 1e-3))
    rows = {r["metric"]: r for r in _diff_json([base, worse], capsys)[0]["rows"]}
    kl = rows["token kl_hi mean"]
    assert kl["direction"] == "worse" and kl["relative"] == pytest.approx(1e-3, rel=1e-9)
    accept = next(r for r in rows.values() if r["unit"] == "fraction" and r["a"])
    assert accept["direction"] == "better"


@pytest.mark.parametrize("value", ["-1", "nan", "1.5"])
def test_same_below_must_be_a_relative_size(reports, value, capsys):
    code, out, err = run_cli(["diff", str(reports[0]), str(reports[0]), f"--same-below={value}"], capsys)
    assert code == 2 and not out and "--same-below" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_sequences_table_without_prompts_is_refused(scored, tmp_path, capsys):
    """The prompts are compared from sequences.parquet: a table without them is a damaged report."""
    import pyarrow.parquet as pq

    damaged = shutil.copytree(scored["base"], tmp_path / "damaged")
    table = pq.read_table(damaged / "sequences.parquet")
    pq.write_table(table.drop_columns(["prompt_token_ids"]), damaged / "sequences.parquet")
    code, out, err = run_cli(["diff", str(scored["base"]), str(damaged)], capsys)
    assert code == 2 and not out and "lacks the column(s) prompt_token_ids" in err and "Traceback" not in err


SETUPS = {
    "thresholds": ["thresholds (trm_max 0.05 vs 0.1"],
    "prompts": ["the prompts (6 vs 4 distinct, 4 in common)"],
    "sampling": ["sampling (temperature 1.0 vs 0.9)", "the compared distribution"],
}


@pytest.mark.parametrize("variant", sorted(SETUPS))
def test_setup_differences_warn_and_strict_refuses(scored, variant, capsys):
    base, other = scored["base"], scored[variant]
    data, err = _diff_json([base, other], capsys)
    assert not data["comparable"] and all(any(s in d for d in data["differences"]) for s in SETUPS[variant])
    assert err.startswith("warning:") and all(s in err for s in SETUPS[variant])
    code, out, err = run_cli(["diff", str(base), str(other), "--strict"], capsys)
    assert code == 2 and not out and all(s in err for s in SETUPS[variant]) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_another_view_and_horizons_warn_and_no_b_star_row_vanishes(reports, dense_model, tmp_path, capsys):
    replay = _report(tmp_path, dense_model, "replay", "hf:dtype=bfloat16", "--view", "replay", "--horizons", "512,2048")
    capsys.readouterr()  # compare's summary
    data, err = _diff_json([reports[0], replay], capsys)
    assert "the view (pipeline vs replay)" in err and "horizons (1024, 4096, 16384 vs 512, 2048" in err
    rows = {r["metric"]: r for r in data["rows"]}
    for T in (512, 1024, 2048, 4096, 16384):  # either report's horizons: both sides computed there
        row = rows[f"B* at T = {T:,}"]
        assert row["a"] is not None and row["b"] is not None and math.isfinite(row["a"]) and row["direction"]
    code, _, err = run_cli(["diff", str(reports[0]), str(replay), "--strict"], capsys)
    assert code == 2 and "the view (pipeline vs replay)" in err


def test_backends_are_named_not_warned_and_merge_shares_the_checks(scored, tmp_path, capsys):
    data, err = _diff_json([scored["base"], scored["train"]], capsys)
    assert data["comparable"] and not err
    assert len(data["changes"]) == 1 and re.match(r"train backend: hf:.*float32 -> hf:.*bfloat16$", data["changes"][0])
    code, _, err = run_cli(["diff", str(scored["base"]), str(scored["train"]), "--strict"], capsys)
    assert code == 0 and not err
    code, _, err = run_cli(["merge", str(scored["base"]), str(scored["thresholds"]), "--out", str(tmp_path / "m")],
                           capsys)  # fmt: skip
    assert code == 2 and "differs from" in err and "in thresholds" in err and not (tmp_path / "m").exists()
    code, _, err = run_cli(["merge", str(scored["base"]), str(scored["train"]), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "used another train backend than" in err


def test_reports_of_other_models_warn_or_are_refused(reports, moe_model, tmp_path, capsys):
    other = _report(tmp_path, moe_model, "moe", "hf:dtype=bfloat16")
    code, _, err = run_cli(["diff", str(reports[0]), str(other)], capsys)
    assert code == 0 and "warning" in err and "differ in" in err
    code, _, err = run_cli(["diff", str(reports[0]), str(other), "--strict"], capsys)
    assert code == 2 and "differ in" in err


def test_b_star_rows_say_when_d_kl_seq_was_estimated_another_way(scored):
    """Two sampled-tier summaries of one run, one written when D_KL^seq was the plain k1 mean: B* differs with
    no change of the run, and each B* row says why; two summaries estimated alike get no such note."""
    from trm_diag.report.diff import diff_summaries

    s = json.loads((scored["base"] / "summary.json").read_text())
    new = {**s, "fidelity": "sampled"}
    new["bound_inputs"] = {**s["bound_inputs"], "source": {"kl_seq": "estimate (upper one-sided 95% Student-t ..."}}
    old = {**new, "bound_inputs": {**new["bound_inputs"], "source": {"kl_seq": "estimate (k1 mean over 8 ..."}}}
    rows = [r for r in diff_summaries(old, new)["rows"] if r["metric"].startswith("B*")]
    assert rows and all("D_KL^seq is the k1 mean in A, its upper 95% value in B" in r["note"] for r in rows)
    same = [r for r in diff_summaries(new, new)["rows"] if r["metric"].startswith("B*")]
    assert not any("D_KL^seq" in (r["note"] or "") for r in same)
