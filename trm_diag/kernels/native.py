"""The exact-tier kernel in C (rows_kernel.c), built once per machine and loaded with ctypes.

Why: inductor's fused kernel keeps [rows, V] intermediates in memory between its passes; the C
kernel works one row at a time, so a row stays in cache (bench/divergence_kernel.py). The library is
built with the system C compiler (CC, else cc, gcc or clang) for this CPU (-march=native; another
target such as x86-64-v3 = AVX2 on request) into TRM_DIAG_CACHE (default ~/.cache/trm-diag), keyed
by the source, flags and CPU, in ~0.2 s the first time; without a compiler, native_rows() is None
and callers use inductor or eager torch ops instead (same values to ~1e-8 relative).
:func:`vector_report` says which row loops the compiler vectorised for a target.
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
# -fno-trapping-math lets the clamps of exp_f / exp_d if-convert: without it AVX2 (no masked ops) keeps
# the main pass scalar, 4x slower; the kernel never reads floating-point exception flags
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
_LOADED: dict[str, Callable | None] = {}  # target -> kernel (None: cannot be built here)


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


def cpu_model() -> str:
    """This CPU's model name, as /proc/cpuinfo gives it (else what platform knows)."""
    name = _cpu().split("flags", 1)[0].partition(":")[2].strip()
    return name or platform.processor() or platform.machine()


def library_path(cc: str, march: str = "native") -> Path:
    """The cached library's path for this source, compiler, flags, target and CPU."""
    parts = [cc, *FLAGS, f"-march={march}", platform.machine(), _cpu()]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(parts).encode())
    return cache_dir() / "kernels" / f"rows-{key.hexdigest()[:16]}.so"


def _build(march: str) -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None or not sys.platform.startswith("linux"):  # OpenMP flags differ elsewhere (Apple clang)
        return None
    path = library_path(cc, march)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent shards: atomic replace
            out = Path(tmp) / path.name
            cmd = [cc, *FLAGS, f"-march={march}", str(SOURCE), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            os.replace(out, path)
    lib = ctypes.CDLL(str(path))  # libgomp is torch's, already loaded: one OpenMP thread pool
    lib.trm_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.trm_rows.restype = None
    lib.trm_output_names.restype = ctypes.c_char_p
    names = tuple(lib.trm_output_names().decode().split(","))
    if names != OUTPUTS:  # a programming error: the C kernel and kernels.OUTPUTS disagree
        raise RuntimeError(f"rows_kernel.c writes {names}, kernels.OUTPUTS says {OUTPUTS}")
    return lib


def native_rows(march: str = "native") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The C kernel as fn(a, b, y) -> [len(OUTPUTS), n] float64 (as kernels/eager.fused_rows) for CPU
    rows a, b [n, V] and token ids y [n], built for ``march`` (default: this CPU); None where it cannot
    be built (no compiler, not Linux, a target the compiler does not know)."""
    if march not in _LOADED:
        try:
            lib = _build(march)
        except (OSError, subprocess.SubprocessError):
            lib = None
        _LOADED[march] = None if lib is None else _caller(lib)
    return _LOADED[march]


def row_loops() -> list[int]:
    """Source lines of the kernel's row loops (each `#pragma omp simd`): the loops that must vectorise."""
    lines = SOURCE.read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines) if line.strip().startswith("#pragma omp simd")]


def vector_report(cc: str, march: str) -> dict[int, bool]:
    """Row loop line -> whether ``cc`` vectorised its body for ``-march=march`` (gcc's -fopt-info-vec
    report on the loop's statement lines, after the pragma: 'loop vectorized' and no 'couldn't vectorize'
    or 'not vectorized'; the pragma's own line reports the loop that combines the SIMD lanes).
    Compiles to /dev/null; raises subprocess.CalledProcessError if the compiler fails."""
    cmd = [cc, *FLAGS, f"-march={march}", "-fopt-info-vec-all", str(SOURCE), "-o", os.devnull, "-lm"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stderr
    seen: dict[int, list[str]] = {}
    for line in text.splitlines():
        head, _, rest = line.partition(": ")
        parts = head.rsplit(":", 2)
        if len(parts) == 3 and parts[0].endswith(SOURCE.name) and parts[1].isdigit():
            seen.setdefault(int(parts[1]), []).append(rest)
    out = {}
    for loop in row_loops():
        notes = [n for ln in range(loop + 1, loop + 4) for n in seen.get(ln, [])]
        ok = any(n.startswith("optimized: loop vectorized") for n in notes)
        out[loop] = ok and not any("couldn't vectorize" in n or "not vectorized" in n for n in notes)
    return out


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
