"""One side's full rows of every response token, kept on disk (a sweep scores the rollouts once per side).

A raw row-major file of [tokens, V] scores (float32, or float64 for a float64 reference) plus a JSON
sidecar written last, which marks the file complete. Response r owns rows offsets[r]..offsets[r+1]; reads
are memory-mapped, so memory stays one batch whatever the number of tokens or arms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trm_diag.report.tables import atomic_write
from trm_diag.types import TensorRows, TokenRows


def offsets_of(lengths: list[int]) -> np.ndarray:
    """Row offsets [n + 1] of responses with these lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def bytes_needed(tokens: int, width: int, dtype: str) -> int:
    return tokens * width * np.dtype(dtype).itemsize


class RowWriter:
    """Writes rows response by response (in order), then ``finish`` marks the file complete."""

    def __init__(self, path: Path, lengths: list[int], width: int, dtype: str) -> None:
        self.path, self.width, self.dtype = Path(path), width, dtype
        self.offsets = offsets_of(lengths)
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        rows = max(int(self.offsets[-1]), 1)
        self._mm = np.memmap(self.path, dtype=dtype, mode="w+", shape=(rows, width))
        self.normalized: bool | None = None

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def put(self, index: int, rows: TokenRows, step: int = 256) -> None:
        """Store response ``index``'s scores (a few rows at a time, so no [T, V] copy is made)."""
        a = int(self.offsets[index])
        self.normalized = bool(rows.normalized)
        for s in range(0, rows.length, step):
            block = rows.scores(s, min(rows.length, s + step))
            self._mm[a + s : a + s + block.shape[0]] = block.to(getattr(torch, self.dtype)).cpu().numpy()

    def finish(self) -> None:
        self._mm.flush()
        del self._mm
        body = {"width": self.width, "dtype": self.dtype, "offsets": self.offsets.tolist(),
                "normalized": bool(self.normalized)}  # fmt: skip
        atomic_write(self.meta_path, lambda tmp: Path(tmp).write_text(json.dumps(body)))


class RowReader:
    """The rows of a complete RowWriter file, as TokenRows per response."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta = json.loads(self.path.with_suffix(".json").read_text())
        self.width, self.dtype = int(meta["width"]), str(meta["dtype"])
        self.offsets = np.asarray(meta["offsets"], dtype=np.int64)
        self.normalized = bool(meta["normalized"])
        rows = max(int(self.offsets[-1]), 1)
        self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(rows, self.width))

    @staticmethod
    def complete(path: Path) -> bool:
        return Path(path).is_file() and Path(path).with_suffix(".json").is_file()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def scores(self, index: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Scores [stop - start, V] of response ``index`` (a copy: the file stays read-only)."""
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        stop = b - a if stop is None else stop
        return torch.from_numpy(np.array(self._mm[a + start : a + stop]))

    def rows(self, index: int) -> TokenRows:
        """Response ``index``'s rows as TokenRows, as the side's backend gave them."""
        return TensorRows(self.scores(index), normalized=self.normalized)
