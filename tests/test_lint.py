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


def test_import_layers_hold():
    """The layer contracts of pyproject.toml ([tool.importlinter]): cli -> run -> backends | report -> math ->
    kernels -> leaves; only cli imports typer/rich, only backends transformers/vllm (docs/architecture.md)."""
    p = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr
    assert "0 broken" in p.stdout
