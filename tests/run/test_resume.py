"""Interruption and determinism: a real SIGINT mid-run, --resume, byte-identical reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
DATA = ("tokens.parquet", "sequences.parquet", "bounds.parquet")


def command(model, out, *extra):
    return ["compare", "--model", str(model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "48",
            "--max-new-tokens", "64", "--chunk-prompts", "4", "--samples", "2", "--out", str(out), "-q", *extra]  # fmt: skip


def cli(args):
    return subprocess.Popen([sys.executable, "-m", "trm_diag", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


def wait_for_chunks(p, manifest, n):
    """Wait until the running command has checkpointed n chunks; it must still be running then."""
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["done"]) >= n:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert p.poll() is None, "the run finished before it could be interrupted"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dense_model):
    out = tmp_path_factory.mktemp("ref") / "ref"
    p = cli(command(dense_model, out))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return out


def test_same_command_gives_byte_identical_data(reference, dense_model, tmp_path):
    again = tmp_path / "again"
    p = cli(command(dense_model, again))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    for f in DATA:
        assert (reference / f).read_bytes() == (again / f).read_bytes(), f


def test_sigint_then_resume_gives_the_same_report(reference, dense_model, tmp_path, capsys):
    out = tmp_path / "run"
    p = cli(command(dense_model, out))
    manifest = out / ".trm-partial" / "manifest.json"
    wait_for_chunks(p, manifest, 2)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    assert "--resume" in p.stderr.read()
    done = json.loads(manifest.read_text())["done"]
    assert 2 <= len(done) < 12 and not (out / "summary.json").exists()

    # the partial folder is clearly marked: readers refuse it, and a plain re-run refuses to mix runs
    code, _, err = run_cli(["gate", str(out), "-r", "token.kl.p99 <= 1"], capsys)
    assert code == 2 and "interrupted run" in err
    code, _, err = run_cli(command(dense_model, out), capsys)
    assert code == 2 and "--resume" in err
    code, _, err = run_cli([*command(dense_model, out), "--resume", "--seed", "1"], capsys)
    assert code == 2 and "other settings" in err

    code, _, err = run_cli([*command(dense_model, out), "--resume"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["resumed_chunks"] == len(done) and not (out / ".trm-partial").exists()
    for f in DATA:
        assert (reference / f).read_bytes() == (out / f).read_bytes(), f


def test_resume_without_a_partial_run_is_an_error(dense_model, tmp_path, capsys):
    code, _, err = run_cli([*command(dense_model, tmp_path / "x"), "--resume"], capsys)
    assert code == 2 and "no interrupted run" in err


def test_sigterm_ends_like_ctrl_c_and_the_run_resumes(dense_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--model", str(dense_model), "--rollout", "hf:dtype=bfloat16", "--num-prompts", "24",
            "--max-new-tokens", "32", "--chunk-prompts", "2", "--out", str(out), "-q"]  # fmt: skip
    p = cli(argv)
    wait_for_chunks(p, out / ".trm-partial" / "manifest.json", 1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read()
    assert "terminated." in err and "--resume" in err and "Traceback" not in err
    assert not (out / ".trm-lock").exists()
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["hardware"]["exact_kernels"]
