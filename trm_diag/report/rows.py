"""Row-oriented input files (JSONL, Parquet) with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed value) per non-blank line, read line by line; location is 'FILE:LINE'."""
    fix = "check the file's permissions and encoding"
    try:
        f = path.open(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first line
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e}", fix) from None
    with f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:  # JSONDecodeError, or json's own limits (an integer of over 4,300 digits)
                    why = getattr(e, "msg", str(e).split(";")[0])
                    raise InputError(f"{path}:{n}: not valid JSON ({why})", "write one JSON object per line") from None
                yield f"{path}:{n}", value
        except UnicodeDecodeError as e:
            raise InputError(f"cannot read '{path}': {e}", fix) from None


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """Every (location, parsed value) of a JSONL file (see iter_jsonl)."""
    return list(iter_jsonl(path))


def iter_parquet(path: Path, need_one_of: tuple[str, ...] = (), batch_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    """(location, row dict) per row, read batch by batch; location is 'FILE row N'."""
    import pyarrow.parquet as pq

    fix = "check that the file is valid Parquet"
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"cannot read Parquet file '{path}': {e}", fix) from None
    if need_one_of and not any(c in f.schema_arrow.names for c in need_one_of):
        raise InputError(
            f"'{path}' has none of the columns {', '.join(need_one_of)}", "rename the column (or use --map)"
        )
    n = 0
    batches = f.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            raise InputError(f"cannot read Parquet file '{path}': {e}", fix) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield f"{path} row {n}", row
            n += 1


def read_parquet(path: Path, need_one_of: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Every (location, row dict) of a Parquet file (see iter_parquet)."""
    return list(iter_parquet(path, need_one_of))
