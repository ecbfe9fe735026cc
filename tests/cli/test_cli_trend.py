"""`trm-diag trend` and `gate RUN`: exit codes, the flags printed with their actions, JSON, a `score` report
of a multi-step dump read as a run, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import run_cli
from tests.run.test_monitor import batch


@pytest.fixture(scope="module")
def spiky_run(tmp_path_factory):
    """30 steps of noise with a stale step at 20."""
    from trm_diag import Monitor

    out = tmp_path_factory.mktemp("trend") / "run"
    with Monitor(out=out, horizons=(1024, 4096)) as mon:
        for step in range(30):
            mon.update(step, *batch(step, 0.1 if step == 20 else 0.01))
    return out


def test_trend_prints_the_metrics_and_flags_the_stale_step(spiky_run, capsys):
    code, out, err = run_cli(["trend", str(spiky_run)], capsys)
    assert code == 0, err
    assert "30 step(s)" in out and "B*@4096" in out and "by response length" in out
    assert "spike: step 20:" in out and "action: check weight sync / staleness" in out
    code, out, _ = run_cli(["trend", str(spiky_run), "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["n_steps"] == 30 and [f["step"] for f in doc["flags"] if f["kind"] == "spike"] == [20]
    assert doc["steps"][-1]["step"] == 29 and "bstar@1024" in doc["steps"][0]


def test_gate_over_a_run(spiky_run, capsys, tmp_path):
    ok = ["-r", "trend.last.k3_kl.mean <= 1e-3", "-r", "trend.max.abs_log_ratio.p99 <= 1", "-r", "trend.steps == 30"]
    code, out, err = run_cli(["gate", str(spiky_run), *ok], capsys)
    assert code == 0, out + err
    code, out, _ = run_cli(["gate", str(spiky_run), "-r", "trend.flags == 0", "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["rules"][0]["value"] >= 1 and "step 20" in doc["rules"][0]["note"]
    code, out, _ = run_cli(
        ["gate", str(spiky_run), "-r", "trend.flags.spike == 1", "-r", "trend.flags.drift == 0"], capsys
    )
    assert code == 0, out
    code, _, err = run_cli(["gate", str(spiky_run), "-r", "trend.last.k3_kll <= 1"], capsys)
    assert code == 2 and "unknown metric 'trend.last.k3_kll'" in err and "trend.last.k3_kl" in err
    code, _, err = run_cli(["gate", str(spiky_run), "-r", "trend.max.kl.p99 <= 1"], capsys)  # no per-token KL
    assert code == 2 and "no per-token KL" in err and "use trend.max.k1.p99 (k1 = -log ratio per token)" in err
    code, _, err = run_cli(["gate", str(spiky_run), "-r", "trend.flags <= 1", "--baseline", str(spiky_run)], capsys)
    assert code == 2 and "not a run" in err
    code, out, _ = run_cli(["gate", str(spiky_run), "--list-metrics", "--format", "json"], capsys)
    assert code == 0 and "trend.max.bstar@4096" in json.loads(out)


def test_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["trend", str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["trend", str(tmp_path / "empty")], capsys)
    assert code == 2 and "neither a run folder" in err
    code, _, err = run_cli(["trend", str(tmp_path), "--format", "xml"], capsys)
    assert code == 2 and "--format xml" in err


def test_a_damaged_run_part_is_one_line(spiky_run, tmp_path, capsys):
    """A step part overwritten after it was renamed into place (a disk error, a truncated copy): trend and gate
    name the file and the fix, exit 2, and the folder is left as it is."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(spiky_run, run)
    part = sorted((run / "steps").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for argv in (["trend", str(run)], ["gate", str(run), "-r", "trend.flags == 0"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, out + err
        assert f"run part '{part}' is unreadable" in err and "remove that file and read again" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert part.stat().st_size > 0


@pytest.fixture(scope="module")
def step_report(dense_model, tmp_path_factory):
    """A `score` report of a rollout file whose rows carry a training step (3 steps of 4 sequences)."""
    from tests.helpers import main_exit

    tmp_path = tmp_path_factory.mktemp("steps")
    rng = np.random.default_rng(0)
    rows = []
    for step in range(3):
        for i in range(4):
            resp = rng.integers(3, 1000, size=6 + i).tolist()
            lps = (-rng.random(len(resp)) * 4).tolist()
            rows.append({"prompt_ids": [5, 6, 7], "response_ids": resp, "rollout_logprobs": lps, "step": step,
                         "prompt_idx": i, "sample_idx": step})  # fmt: skip
    f = tmp_path / "dump.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = tmp_path / "rep"
    assert main_exit(["score", str(f), "--model", str(dense_model), "--out", str(rep), "-q"]) == 0
    return rep


def test_trend_reads_a_score_report_of_a_multi_step_dump(step_report, capsys):
    """A rollout file whose rows carry a training step, scored by `score`: trend's rows per step are Monitor's
    numbers on the same tokens, and agree with summary.json's own `steps`."""
    import pandas as pd

    from trm_diag import Monitor

    rep = step_report
    code, out, err = run_cli(["trend", str(rep), "--format", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    summary = json.loads((rep / "summary.json").read_text())
    assert doc["source"] == "score" and [s["step"] for s in doc["steps"]] == [0, 1, 2]
    for mine, theirs in zip(doc["steps"], summary["steps"]):
        assert mine["kl"] == pytest.approx(theirs["kl"], rel=1e-12)
        assert mine["accept_trm_max"] == theirs["accept_trm_max"]
        assert mine["n_tokens"] == theirs["n_tokens"]
    tok = pd.read_parquet(rep / "tokens.parquet")
    seqs = pd.read_parquet(rep / "sequences.parquet")
    ids = seqs[seqs["step"] == 1]["seq_id"]
    one = tok[tok["seq_id"].isin(ids)].sort_values(["seq_id", "pos"])
    lists = [torch.tensor(g[c].to_numpy()) for c in ("lp_roll", "lp_train") for _, g in one.groupby("seq_id")]
    n = len(ids)
    res = Monitor(horizons=tuple(doc["horizons"])).update(1, lists[:n], lists[n:])
    for k, v in doc["steps"][1].items():
        if k in res.metrics and isinstance(v, float) and k != "time":
            assert res.metrics[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k


def test_trend_on_a_report_without_steps_is_one_line(step_report, tmp_path, capsys):
    """A report whose sequences carry no training step (one policy pair, or a dump without steps): trend and
    gate's trend.* rules say so and how to get one, exit 2."""
    import shutil

    import pyarrow.parquet as pq

    rep = tmp_path / "rep"
    shutil.copytree(step_report, rep)
    seqs = pq.read_table(rep / "sequences.parquet")
    pq.write_table(seqs.drop_columns(["step"]), rep / "sequences.parquet")
    for argv in (["trend", str(rep)], ["gate", str(rep), "-r", "trend.flags == 0"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, out + err
        assert f"report '{rep}' has no training steps (sequences.parquet has no 'step' column)" in err
        assert "multi-step dump" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_show_of_a_run_prints_what_trend_prints(spiky_run, capsys):
    """`show RUN` on a Monitor folder: the same text and JSON as `trend RUN`, and a Markdown table with the flag."""
    for extra in ([], ["--format", "json"]):
        code, trend_out, err = run_cli(["trend", str(spiky_run), *extra], capsys)
        assert code == 0, err
        code, show_out, err = run_cli(["show", str(spiky_run), *extra], capsys)
        assert code == 0 and not err and show_out == trend_out
    code, md, err = run_cli(["show", str(spiky_run), "--format", "markdown"], capsys)
    assert code == 0, err
    assert md.startswith(f"## trm-diag trend: run `{spiky_run}`") and "- **spike**: step 20:" in md
    rows = [line for line in md.splitlines() if line.startswith("| 20 |")]
    assert len(rows) == 1 and rows[0].endswith("| spike |")


def test_html_page_of_a_run(spiky_run, tmp_path, capsys):
    """`trend RUN --html` (and `show RUN --html`) write RUN/report.html: self-contained, the metrics versus step
    as figures, the flag with its action, every step in the table; the run's own files untouched."""
    import re
    import shutil

    run = tmp_path / "run"
    shutil.copytree(spiky_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = run_cli(["trend", str(run), "--html"], capsys)
    page = run / "report.html"
    assert code == 0 and not out and f"wrote {page}" in err
    html = page.read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 4  # |lr|, KL, acceptance, B*
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "spike: step 20:" in html and "check weight sync / staleness" in html
    steps = re.findall(r'<tr><td class="l">(\d+)</td>', html)
    assert steps == [str(s) for s in range(30)] and re.search(r'<td class="l">20</td>.*?<td class="">spike</td>', html)
    assert {p: p.read_bytes() for p in before} == before  # the run's files as they were
    page.unlink()
    code, _, err = run_cli(["show", str(run), "--html"], capsys)
    assert code == 0 and page.is_file() and page.read_text() == html
    code, out, _ = run_cli(["trend", str(run)], capsys)
    assert code == 0 and "30 step(s)" in out  # the page is no part of the run's data


def test_html_page_of_a_score_report_leaves_its_report_html(step_report, tmp_path, capsys):
    """A `score` report's steps page is trend.html: the report's own report.html stays as it was."""
    import shutil

    rep = tmp_path / "rep"
    shutil.copytree(step_report, rep)
    own = (rep / "report.html").read_bytes()
    code, _, err = run_cli(["trend", str(rep), "--html"], capsys)
    assert code == 0 and f"wrote {rep / 'trend.html'}" in err
    assert (rep / "report.html").read_bytes() == own
    html = (rep / "trend.html").read_text()
    assert "score report" in html and html.count('<img src="data:image/png;base64,') == 4
