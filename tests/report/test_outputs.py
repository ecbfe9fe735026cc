"""Output paths and the report folder's lock: checked before any work, nothing touched on refusal."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from trm_diag.errors import UsageError
from trm_diag.report.outputs import LOCK, check_out_dir, check_output_file, claim_out_dir


def report(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("summary.json", "tokens.parquet", "sequences.parquet"):
        (folder / f).write_text(f"old {f}")
    return {f: (folder / f).read_text() for f in ("summary.json", "tokens.parquet", "sequences.parquet")}


def test_a_finished_report_is_never_resumed_or_replaced_without_overwrite(tmp_path):
    before = report(tmp_path / "r")
    with pytest.raises(UsageError, match="nothing to resume.*finished report"):
        check_out_dir(tmp_path / "r", overwrite=False, resume=True)
    with pytest.raises(UsageError, match="already holds a report"):
        check_out_dir(tmp_path / "r", overwrite=False)
    assert {f: (tmp_path / "r" / f).read_text() for f in before} == before
    with pytest.raises(UsageError, match="no interrupted run"):
        check_out_dir(tmp_path / "new", overwrite=False, resume=True)


def test_bad_places_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="lies below the file"):
        check_out_dir(tmp_path / "file" / "out", overwrite=False)
    with pytest.raises(UsageError, match="is a file"):
        check_out_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(UsageError, match="folder .* does not exist"):
        check_output_file(tmp_path / "missing" / "r.jsonl", "--save-rollouts")
    with pytest.raises(UsageError, match="is also an input"):
        check_output_file(tmp_path / "file", "--save-rollouts", inputs=[tmp_path / "file"])
    with pytest.raises(UsageError, match="is a folder"):
        check_output_file(tmp_path, "--output")


def test_a_live_run_holds_the_folder(tmp_path):
    out = tmp_path / "r"
    with claim_out_dir(out, overwrite=False, warn=print):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match="in use by a running trm-diag"):
            check_out_dir(out, overwrite=True)
        with pytest.raises(UsageError, match="in use by a running trm-diag"):
            with claim_out_dir(out, overwrite=True, warn=print):
                pass
        assert (out / LOCK).exists()  # the refused second claim did not take the first one's lock
    assert not (out / LOCK).exists()


def test_a_stale_lock_is_named_and_replaced_and_leftover_temporaries_go(tmp_path):
    out = tmp_path / "r"
    report(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "1"}))
    (out / ".tokens.parquet.abc.tmp").write_text("half a table")
    check_out_dir(out, overwrite=True)  # a dead run's lock does not block
    said = []
    with claim_out_dir(out, overwrite=True, warn=said.append):
        assert not (out / "summary.json").exists()  # overwriting: the old report stops looking complete
        assert not (out / ".tokens.parquet.abc.tmp").exists()
    assert said and f"pid {dead.pid}" in said[0] and "stale lock" in said[0]


def sweep_folder(folder, arm="hf-dtype-float32", interrupted=True):
    """A sweep as sweep.py leaves it: its files and one arm report (with locate's files); interrupted: also
    its unfinished run and an arm of that run it was scoring. Plus files of the user's own beside and inside."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"command": "sweep", "arms": {arm: {"status": "done"}}}))
    for f in ("sweep.parquet", "rollouts.parquet"):
        (folder / f).write_text(f"old {f}")
    for f in ("summary.json", "tokens.parquet", "sequences.parquet", "report.html", "locate.json", "locate.parquet"):
        (folder / arm).mkdir(exist_ok=True)
        (folder / arm / f).write_text(f"old {f}")
    if interrupted:
        (folder / ".trm-partial").mkdir()
        (folder / ".trm-partial" / "manifest.json").write_text(json.dumps({"fingerprint": "run-1"}))
        (folder / "half-arm" / ".trm-partial").mkdir(parents=True)
        (folder / "half-arm" / ".trm-partial" / "manifest.json").write_text(json.dumps({"fingerprint": "run-1"}))
    (folder / "notes.txt").write_text("mine")
    (folder / "mine").mkdir()
    (folder / "mine" / "tokens.parquet").write_text("a table of mine, in a folder no sweep wrote")
    (folder / arm / "plot.png").write_text("mine too")
    return folder


def test_overwrite_clears_every_kind_of_output_and_nothing_else(tmp_path):
    """Over a sweep, a report's --overwrite leaves no sweep file, arm report or locate file behind; the
    user's files stay, also inside an arm folder (which then stays too)."""
    with pytest.raises(UsageError, match="already holds a sweep"):
        check_out_dir(sweep_folder(tmp_path / "finished", interrupted=False), overwrite=False)
    out = sweep_folder(tmp_path / "s")
    check_out_dir(out, overwrite=True)
    with claim_out_dir(out, overwrite=True, warn=print):
        pass
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["hf-dtype-float32", "hf-dtype-float32/plot.png", "mine", "mine/tokens.parquet", "notes.txt"]
    # a report with locate's files, overwritten: all of it goes
    report(tmp_path / "r")
    for f in ("report.html", "locate.json", "locate.parquet", "breakdowns.parquet", "rollouts.parquet"):
        (tmp_path / "r" / f).write_text("old")
    with claim_out_dir(tmp_path / "r", overwrite=True, warn=print):
        pass
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["rollouts.parquet"]  # not a sweep: not ours


def test_an_input_among_what_overwrite_clears_is_refused(tmp_path):
    out = sweep_folder(tmp_path / "s")
    for src in (out / "rollouts.parquet", out / "hf-dtype-float32" / "tokens.parquet"):
        with pytest.raises(UsageError, match="lies in --out"):
            check_out_dir(out, overwrite=True, inputs=[src])
    check_out_dir(out, overwrite=True, inputs=[out / "notes.txt", out / "mine" / "tokens.parquet"])
    with pytest.raises(UsageError, match="no interrupted run to resume"):  # --resume wins over --overwrite
        check_out_dir(tmp_path / "new", overwrite=True, resume=True)


def test_a_real_sweep_and_report_overwrite_each_other_cleanly(dense_model, tmp_path, capsys):
    """sweep --overwrite on a compare report (with locate.json), then compare --overwrite on that sweep."""
    from tests.helpers import run_cli

    out = tmp_path / "o"
    fast = ["--model", str(dense_model), "--num-prompts", "2", "--max-new-tokens", "4", "--out", str(out), "-q"]
    code, _, err = run_cli(["compare", "--rollout", "hf:dtype=float32", *fast], capsys)
    assert code == 0, err
    (out / "locate.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["sweep", "--rollout", "hf:dtype=bfloat16", "--arm", "hf:dtype=float32", "--reference",
                            "none", "--overwrite", *fast], capsys)  # fmt: skip
    assert code == 0, err
    arms = [d.name for d in out.iterdir() if d.is_dir()]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "rollouts.parquet", "summary.json", "sweep.parquet", *arms]
    )
    code, _, err = run_cli(["score", str(out / "rollouts.parquet"), "--overwrite", *fast[:2], *fast[-3:]], capsys)
    assert code == 2 and "lies in --out" in err and (out / "rollouts.parquet").is_file()
    code, _, err = run_cli(["compare", "--rollout", "hf:dtype=float32", "--overwrite", *fast], capsys)
    assert code == 0, err
    assert not any((out / a).exists() for a in arms) and not (out / "sweep.parquet").exists()
    assert not (out / "rollouts.parquet").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["command"] == "compare"
