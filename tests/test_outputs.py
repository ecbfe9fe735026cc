"""Output paths and the report folder's lock: checked before any work, nothing touched on refusal."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from trm_diag.errors import UsageError
from trm_diag.outputs import LOCK, check_out_dir, check_output_file, claim_out_dir


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
