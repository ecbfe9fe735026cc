"""The exact-tier kernel in C (rows_kernel.c), built once per machine and loaded with ctypes.

Why: inductor's fused kernel keeps [rows, V] intermediates in memory between its passes; the C
kernel works one row at a time, so a row stays in cache, and runs about 1.7x faster on CPU
(bench/divergence_kernel.py). The library is built with the system C compiler (CC, else cc, gcc
or clang) for this CPU (-march=native) into TRM_DIAG_CACHE (default ~/.cache/trm-diag), keyed by
the source, flags and CPU, in ~0.2 s the first time; without a compiler, native_rows() is None
and callers use inductor or eager torch ops instead (same values to ~1e-8 relative).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from trm_diag.kernels import OUTPUTS

SOURCE = Path(__file__).with_name("rows_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
_LOADED: dict[str, Callable | None] = {}


def cache_dir() -> Path:
    """Where built kernels live: TRM_DIAG_CACHE, else $XDG_CACHE_HOME/trm-diag, else ~/.cache/trm-diag."""
    root = os.environ.get("TRM_DIAG_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trm-diag"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu() -> str:
    """The CPU's model and feature flags: a library built with -march=native runs only where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags"))


def library_path(cc: str) -> Path:
    """The cached library's path for this source, compiler, flags and CPU."""
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join([cc, *FLAGS, platform.machine(), _cpu()]).encode())
    return cache_dir() / "kernels" / f"rows-{key.hexdigest()[:16]}.so"


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None or not sys.platform.startswith("linux"):  # OpenMP flags differ elsewhere (Apple clang)
        return None
    path = library_path(cc)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent shards: atomic replace
            out = Path(tmp) / path.name
            subprocess.run(
                [cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=300
            )
            os.replace(out, path)
    lib = ctypes.CDLL(str(path))  # libgomp is torch's, already loaded: one OpenMP thread pool
    lib.trm_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.trm_rows.restype = None
    lib.trm_output_names.restype = ctypes.c_char_p
    names = tuple(lib.trm_output_names().decode().split(","))
    if names != OUTPUTS:  # a programming error: the C kernel and kernels.OUTPUTS disagree
        raise RuntimeError(f"rows_kernel.c writes {names}, kernels.OUTPUTS says {OUTPUTS}")
    return lib


def native_rows() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The C kernel as fn(a, b, y) -> [len(OUTPUTS), n] float64 (as kernels/eager.fused_rows) for CPU
    rows a, b [n, V] and token ids y [n]; None where it cannot be built (no compiler, not Linux)."""
    if "fn" not in _LOADED:
        try:
            lib = _build()
        except (OSError, subprocess.SubprocessError):
            lib = None
        _LOADED["fn"] = None if lib is None else _caller(lib)
    return _LOADED["fn"]


def _caller(lib: ctypes.CDLL) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def rows(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = a.to(torch.float32).contiguous()
        b = b.to(torch.float32).contiguous()
        y = y.to(torch.int64).contiguous()
        n, v = a.shape
        if b.shape != a.shape or y.shape != (n,):
            raise ValueError(f"shape mismatch {tuple(a.shape)}, {tuple(b.shape)}, {tuple(y.shape)}")
        out = torch.empty((len(OUTPUTS), n), dtype=torch.float64)
        if n:
            if int(y.min()) < 0 or int(y.max()) >= v:  # the C code reads a[y] unchecked
                raise IndexError(f"token ids must lie in [0, {v}), got [{int(y.min())}, {int(y.max())}]")
            lib.trm_rows(a.data_ptr(), b.data_ptr(), y.data_ptr(), n, v, out.data_ptr())
        return out

    return rows
