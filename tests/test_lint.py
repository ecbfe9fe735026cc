"""Lint and format are part of the test command, so CI enforces them (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    p = ruff("check", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_format():
    p = ruff("format", "--check", ".")
    assert p.returncode == 0, p.stdout + p.stderr
