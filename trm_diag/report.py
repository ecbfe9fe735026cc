"""Report folder I/O: Parquet tables with self-describing metadata, written atomically.

Every file is first written under a temporary name in the target folder and renamed;
summary.json is renamed last and marks a report as complete (DESIGN.md section 6).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.errors import InputError, UsageError

if TYPE_CHECKING:
    import pandas as pd

META_KEY = b"trm_diag"
REPORT_FILES = ("tokens.parquet", "sequences.parquet", "bounds.parquet", "routing.parquet", "summary.json")
MARKER = "summary.json"
RUN_SPECIFIC = ("timings", "run")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """JSON-safe copy: NaN and inf become null (JSON has no NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and not hasattr(o, "__len__"):
        return _clean(o.item())
    return o


def to_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, default=_json_default, sort_keys=False)


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Create the output folder; refuse to replace an existing report unless overwrite."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output path '{out}' is a file", "pass --out with a folder name")
    if p.is_dir() and any((p / f).exists() for f in REPORT_FILES):
        if not overwrite:
            raise UsageError(f"'{out}' already holds a report", "pass --overwrite, or choose another --out folder")
        (p / MARKER).unlink(missing_ok=True)  # from now on the folder must not look like a complete report
    p.mkdir(parents=True, exist_ok=True)
    return p


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(out: Path, tables: dict[str, pd.DataFrame], summary: dict[str, Any]) -> None:
    """Write tables (name -> DataFrame) and summary.json; summary last, each file atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = out / MARKER
    if marker.exists():
        marker.unlink()  # the folder must never look complete while it is a mix of two runs
    for stale in REPORT_FILES:
        if stale != MARKER and stale.removesuffix(".parquet") not in tables and (out / stale).exists():
            (out / stale).unlink()
    # run-specific facts (timings, resumed chunks) stay in summary.json only, so the same command
    # and seed give byte-identical Parquet files
    meta = to_json({k: v for k, v in summary.items() if k not in RUN_SPECIFIC}).encode()
    for name, df in tables.items():
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: meta})
        _atomic_write(out / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
    _atomic_write(marker, lambda tmp: Path(tmp).write_text(to_json(summary) + "\n"))


def complete_report(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder and summary.json of a complete report; InputError otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"report folder '{path}' does not exist", "run `trm-diag compare --out DIR` first")
    marker = p / MARKER
    if not marker.is_file():
        if (p / ".trm-partial").is_dir():
            raise InputError(
                f"'{path}' holds an interrupted run, not a complete report",
                "finish it with `trm-diag compare ... --resume`",
            )
        raise InputError(f"'{path}' holds no complete report (no summary.json)", "re-run the command that writes it")
    try:
        return p, json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{marker} is not valid JSON ({e.msg})", "re-run the command that writes the report") from None


def load_report(path: str | Path, tables: tuple[str, ...] = ("tokens", "sequences")) -> dict[str, Any]:
    """Read a complete report: {'summary': dict, '<table>': DataFrame ...}."""
    import pandas as pd

    p, summary = complete_report(path)
    out: dict[str, Any] = {"summary": summary}
    for name in tables:
        f = p / f"{name}.parquet"
        if f.is_file():
            out[name] = pd.read_parquet(f)
    return out
