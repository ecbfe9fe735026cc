"""Row-oriented input files (JSONL, Parquet) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError


def read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed value) per non-blank line; location is 'FILE:LINE'."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read '{path}': {e}", "check the file's permissions and encoding") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})", "write one JSON object per line") from None
    return out


def read_parquet(path: Path, need_one_of: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(location, row dict) per row; location is 'FILE row N'."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"cannot read Parquet file '{path}': {e}", "check that the file is valid Parquet") from None
    if need_one_of and not any(c in table.column_names for c in need_one_of):
        raise InputError(
            f"'{path}' has none of the columns {', '.join(need_one_of)}", "rename the column (or use --map)"
        )
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]
