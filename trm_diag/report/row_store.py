"""Rollout rows under a memory budget: in RAM up to the budget, beyond it in files on disk.

The exact tier needs the rollout engine's full rows ([T, V] per response) until the training side's
rows of the same tokens are ready. :class:`RowStore` hands out one :class:`RowBlock` per response: a
RAM tensor while the rows held in RAM stay under the budget, else a file in the spill folder. Files are
unlinked as soon as they are opened (``tempfile.TemporaryFile``), so the disk space comes back when the
block is dropped, and a killed run leaves no file behind; :func:`clear_spill` also removes any named
file left there. Files are written and read by position (pwrite / preadv), not memory-mapped: mapped
pages count in the process's resident memory, which the budget bounds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from trm_diag.errors import UsageError

GiB = 1 << 30
DEFAULT_BUDGET = 1 * GiB
BUDGET_ENV = "TRM_DIAG_MEMORY_BUDGET"
DISK_MARGIN = 1 * GiB  # left free on the spill disk
STAGE_BYTES = 64 << 20  # rows copied off a GPU per piece on their way to a file
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}  # fmt: skip


def parse_bytes(text: str, where: str) -> int:
    """'4GiB', '512M', '1.5g', '1000000' -> bytes (binary units); UsageError naming ``where`` otherwise."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not value >= 0 or value != value or value == float("inf"):
        raise UsageError(
            f"{where} '{text}' is not a size", "write a size such as 4GiB, 512MiB or 0 (0: every row goes to disk)"
        )
    return int(value)


def resolve_budget(option: int | None) -> tuple[int, str]:
    """(bytes, where it came from): the option's, else $TRM_DIAG_MEMORY_BUDGET, else the default."""
    if option is not None:
        if option < 0:
            raise UsageError(f"--memory-budget {option} is negative", "give a size such as 4GiB (0: every row to disk)")
        return int(option), "option"
    env = os.environ.get(BUDGET_ENV)
    if env:
        return parse_bytes(env, BUDGET_ENV), "environment"
    return DEFAULT_BUDGET, "default"


def clear_spill(folder: Path) -> int:
    """Remove what a killed run left in the spill folder (and create it); returns the files removed."""
    folder = Path(folder)
    stale = list(folder.iterdir()) if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return len(stale)


def check_disk(need: int, folder: Path, what: str, fix: str) -> None:
    """Refuse in one line, before any work, when ``need`` bytes would not fit on the disk of ``folder``
    (its nearest existing parent) with DISK_MARGIN to spare."""
    if need <= 0:
        return
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if need > free - DISK_MARGIN:
        raise UsageError(
            f"{what} needs up to {need / GiB:.1f} GiB on disk, but '{p}' has {free / GiB:.1f} GiB free "
            f"(1 GiB kept spare)",
            fix,
        )


class RowStore:
    """Allocates row blocks: RAM while the rows held there stay within ``budget`` bytes, else a file in
    ``spill_dir``. Keeps the account the summary reports (peak held in RAM, bytes and seconds spilled)."""

    def __init__(self, budget: int, spill_dir: Path) -> None:
        self.budget, self.spill_dir = int(budget), Path(spill_dir)
        self.held = 0  # bytes of live RAM blocks
        self.held_peak = 0
        self.spilled_bytes = 0
        self.spilled_blocks = 0
        self.spill_s = 0.0
        self._lock = threading.Lock()

    def allocate(self, rows: int, width: int, dtype: torch.dtype) -> RowBlock:
        """A block for ``rows`` rows of ``width`` values; RAM or disk by the budget."""
        size = rows * width * torch.empty(0, dtype=dtype).element_size()
        with self._lock:
            in_ram = self.held + size <= self.budget
            if in_ram:
                self.held += size
                self.held_peak = max(self.held_peak, self.held)
        if in_ram:
            block: RowBlock = RamBlock(rows, width, dtype)
            weakref.finalize(block, self._free, size)
            return block
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.spilled_blocks += 1
        return FileBlock(rows, width, dtype, self)

    def _free(self, size: int) -> None:
        with self._lock:
            self.held -= size

    def stats(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "held_peak_bytes": self.held_peak,
            "spilled_bytes": self.spilled_bytes,
            "spilled_responses": self.spilled_blocks,
            "spill_s": round(self.spill_s, 3),
        }


class RowBlock:
    """Rows [rows, width] of one response, written piece by piece and read back by row range."""

    rows: int
    width: int
    dtype: torch.dtype

    def write(self, start: int, piece: torch.Tensor) -> None: ...

    def read(self, start: int, stop: int) -> torch.Tensor: ...


class RamBlock(RowBlock):
    def __init__(self, rows: int, width: int, dtype: torch.dtype) -> None:
        self.rows, self.width, self.dtype = rows, width, dtype
        self.data = torch.empty((rows, width), dtype=dtype)

    def write(self, start: int, piece: torch.Tensor) -> None:
        self.data[start : start + piece.shape[0]].copy_(piece)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype, bfloat16 included), without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class FileBlock(RowBlock):
    """Rows in an unlinked temporary file of the spill folder: gone when the block is dropped."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, store: RowStore) -> None:
        self.rows, self.width, self.dtype, self.store = rows, width, dtype, store
        self.row_bytes = width * torch.empty(0, dtype=dtype).element_size()
        self.file = tempfile.TemporaryFile(dir=store.spill_dir, prefix="rows-")  # noqa: SIM115 - closed with the block

    def write(self, start: int, piece: torch.Tensor) -> None:
        t0 = time.perf_counter()
        step = max(1, STAGE_BYTES // self.row_bytes)
        for s in range(0, piece.shape[0], step):
            host = piece[s : s + step].to("cpu", self.dtype).contiguous()
            buf, offset = _bytes_view(host), (start + s) * self.row_bytes
            while len(buf):
                n = os.pwrite(self.file.fileno(), buf, offset)
                buf, offset = buf[n:], offset + n
            self.store.spilled_bytes += host.numel() * host.element_size()
        self.store.spill_s += time.perf_counter() - t0

    def read(self, start: int, stop: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty((stop - start, self.width), dtype=self.dtype)
        buf, offset = _bytes_view(out), start * self.row_bytes
        while len(buf):
            n = os.preadv(self.file.fileno(), [buf], offset)
            if n <= 0:
                raise OSError(f"rows file ended early at byte {offset}")
            buf, offset = buf[n:], offset + n
        self.store.spill_s += time.perf_counter() - t0
        return out
