"""The exact tier under a memory budget (vLLM rollout, real engine): rows beyond the budget wait on disk,
the report does not change by a bit, a killed run leaves no file, and a disk too small is refused first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
KV = "kv_cache_memory_bytes=268435456"
TABLES = ("tokens.parquet", "sequences.parquet", "bounds.parquet", "breakdowns.parquet")
RUN = ["--rollout", f"vllm:dtype=bfloat16,{KV}", "--train", "hf:dtype=float32", "--num-prompts", "6",
       "--max-new-tokens", "24", "-q"]  # fmt: skip


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_tiny_budget_spills_and_gives_the_in_ram_report_byte_for_byte(tmp_path, dense_model, capsys):
    """Budget 0: every rollout row goes to disk and comes back; the tables are the same bytes and summary.json
    differs only in the run's own facts (timings, run.memory)."""
    reports = {}
    for name, budget in (("ram", "1GiB"), ("disk", "0")):
        out = tmp_path / name
        code, _, err = run_cli(["compare", "--model", str(dense_model), *RUN, "--memory-budget", budget,
                                "--out", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        reports[name] = out
    ram, disk = (_summary(reports[k]) for k in ("ram", "disk"))
    tokens = ram["metrics"]["n_tokens"]
    assert ram["run"]["memory"]["mode"] == "paired in flight" and ram["run"]["memory"]["spilled_bytes"] == 0
    m = disk["run"]["memory"]
    assert m["mode"] == "spilled" and m["held_peak_bytes"] == 0 and m["budget_from"] == "option"
    assert m["spilled_bytes"] == tokens * 2048 * 2  # every response row, bfloat16 logits at V = 2,048
    assert m["peak_rss_bytes"] > 0 and m["spill_s"] >= 0
    for table in TABLES:
        assert (reports["ram"] / table).read_bytes() == (reports["disk"] / table).read_bytes(), table
    for s in (ram, disk):
        for key in ("timings", "run"):
            s.pop(key)
    assert ram == disk


def _spill_fds(pid: int, spill: Path) -> list[str]:
    """The files of the spill folder that process pid holds open."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(spill)):
                found.append(target)
    except OSError:
        pass
    return found


def test_a_run_killed_while_spilling_leaves_no_file_and_resumes(tmp_path, dense_model, capsys):
    """SIGKILL while rows wait on disk: nothing is left under the folder's names (the files were unlinked when
    opened), and the same command with --resume finishes with no spill folder left. Reads the run's open files
    in /proc (Linux, as CI)."""
    assert Path("/proc/self/fd").is_dir(), "this test reads /proc/PID/fd (Linux)"
    out = tmp_path / "r"
    spill = out / ".trm-partial" / "spill"
    argv = ["compare", "--model", str(dense_model), *RUN, "--num-prompts", "48", "--max-new-tokens", "64",
            "--memory-budget", "0", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "trm_diag", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    held: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not held and proc.poll() is None and time.monotonic() < deadline:
            held = _spill_fds(proc.pid, spill)
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert held, f"the run never held a spill file open: {err.decode()[-2000:]}"
    assert all(h.endswith("(deleted)") for h in held)  # no name to leave behind
    assert spill.is_dir() and list(spill.iterdir()) == []  # killed mid-chunk: still nothing there
    assert not (out / "summary.json").exists()
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert not (out / ".trm-partial").exists() and _summary(out)["run"]["memory"]["mode"] == "spilled"


def test_rows_beyond_the_budget_that_do_not_fit_on_disk_are_refused_before_generation(
    tmp_path, dense_model, capsys, monkeypatch
):
    """One line naming the need and the free space, exit 2, and the --out folder never made."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 30))  # all of it kept spare
    out = tmp_path / "r"
    code, _, err = run_cli(["compare", "--model", str(dense_model), *RUN, "--memory-budget", "0", "--out", str(out)],
                           capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "beyond --memory-budget" in line and "needs up to" in line and "1.0 GiB free" in line
    assert "4,096 bytes per token at V = 2,048" in line and "raise --memory-budget" in line
    assert not out.exists()
