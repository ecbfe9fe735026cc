"""Report folder I/O: Parquet tables with self-describing metadata, written atomically.

Tables are streamed row group by row group into temporary files in the target folder and
renamed when complete; summary.json is written last and marks a report as complete
(docs/design.md section 6).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trm_diag.errors import InputError
from trm_diag.heap import release_heap
from trm_diag.report.outputs import MARKER, REPORT_FILES, unfinished
from trm_diag.schema import SEQUENCE_COLUMNS, SUMMARY_FIELDS, tier_columns
from trm_diag.tiers import FIDELITIES

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

META_KEY = b"trm_diag"
RUN_SPECIFIC = ("timings", "run")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


INFINITIES = "infinite_values"  # summary.json: JSON has no inf, so infinite values are null there and listed here


def _clean(o: Any, path: str = "", found: dict[str, str] | None = None) -> Any:
    """JSON-safe copy: NaN and inf become null (JSON has no NaN); the paths of infinities go to ``found``."""
    if isinstance(o, float):
        if math.isinf(o) and found is not None:
            found[path] = "inf" if o > 0 else "-inf"
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v, f"{path}/{k}", found) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v, f"{path}/{i}", found) for i, v in enumerate(o)]
    if hasattr(o, "item") and not hasattr(o, "__len__"):
        return _clean(o.item(), path, found)
    return o


def to_json(obj: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens). For a dict, infinite values are null and their paths
    ('/metrics/token_kl_max': 'inf') are listed under INFINITIES, so readers can restore them."""
    found: dict[str, str] = {}
    clean = _clean(obj, "", found)
    if found and isinstance(clean, dict):
        clean[INFINITIES] = found
    return json.dumps(clean, indent=2, default=_json_default, sort_keys=False, allow_nan=False)


def restore_infinities(summary: dict[str, Any], where: str) -> dict[str, Any]:
    """Put back the infinite values that :func:`to_json` listed (an infinite KL is a value, not a gap)."""
    listed = summary.pop(INFINITIES, {})
    bad = InputError(f"{where}: '{INFINITIES}' is damaged", "re-run the command that writes the report")
    if not isinstance(listed, dict):
        raise bad
    for path, sign in listed.items():
        keys = str(path).split("/")[1:]
        node: Any = summary
        try:
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node[k]
            last = int(keys[-1]) if isinstance(node, list) else keys[-1]
            if sign not in ("inf", "-inf") or node[last] is not None:
                raise bad
            node[last] = float(sign)
        except (KeyError, IndexError, ValueError, TypeError):
            raise bad from None
    return summary


def _publish(tmp: str, path: Path) -> None:
    """Rename a finished temporary file into place with the usual permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


ROW_GROUP_BYTES = 16 << 20  # Arrow bytes buffered per Parquet row group (~80k token rows)


class _TableSink:
    """One table written row group by row group to a temporary file in the report folder."""

    def __init__(self, path: Path, meta: bytes) -> None:
        self.path, self.meta = path, meta
        self.tmp: str | None = None
        self.writer: Any = None
        self.schema: Any = None
        self.buffer: list[Any] = []
        self.rows = self.bytes = 0

    def add(self, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        if self.writer is None:  # the first piece fixes the schema; later pieces are cast to it
            self.schema = table.schema.with_metadata({**(table.schema.metadata or {}), META_KEY: self.meta})
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.buffer.append(table.cast(self.schema))
        self.rows += table.num_rows
        self.bytes += table.nbytes
        if self.bytes >= ROW_GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=max(self.rows, 1))
            self.buffer, self.rows, self.bytes = [], 0, 0
            release_heap()

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def discard(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            if self.tmp and os.path.exists(self.tmp):
                os.unlink(self.tmp)


def write_tables(out: Path, parts: Iterable[tuple[str, pd.DataFrame]], summary: dict[str, Any]) -> None:
    """Stream (table name, rows) pieces into OUT/<name>.parquet, then rename every table into place.

    Rows are written in row groups as they come, so memory holds one piece at a time. summary.json
    is removed first and written by :func:`write_summary` after this: a folder never looks complete
    while it mixes two runs, and a failure leaves no table behind under its final name.
    """
    marker = out / MARKER
    if marker.exists():
        marker.unlink()
    # run-specific facts (timings, resumed chunks) stay in summary.json only, so the same command
    # and seed give byte-identical Parquet files
    meta = to_json({k: v for k, v in summary.items() if k not in RUN_SPECIFIC}).encode()
    sinks: dict[str, _TableSink] = {}
    try:
        for name, df in parts:
            if name not in sinks:
                sinks[name] = _TableSink(out / f"{name}.parquet", meta)
            sinks[name].add(df)
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.discard()
        raise
    for stale in REPORT_FILES:
        if stale != MARKER and stale.removesuffix(".parquet") not in sinks and (out / stale).exists():
            (out / stale).unlink()
    for sink in sinks.values():
        _publish(sink.tmp, sink.path)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json, written last: it marks the report complete."""
    atomic_write(out / MARKER, lambda tmp: Path(tmp).write_text(to_json(summary) + "\n"))


def complete_report(path: str | Path, tables: bool = True) -> tuple[Path, dict[str, Any]]:
    """The folder and summary.json of a complete, well-formed report; InputError naming what is wrong.
    tables=False: the tables are only checked to be whole Parquet files (their footer), without
    importing the Parquet stack, for readers of summary.json alone; call check_tables before reading one."""
    p = Path(path)
    if p.is_file():  # a file of a report (its summary.json) given for the report
        raise InputError(f"'{path}' is a file, not a report folder", f"pass the folder that holds it: '{p.parent}'")
    if not p.is_dir():
        raise InputError(f"report folder '{path}' does not exist", "run `trm-diag compare --out DIR` first")
    marker = p / MARKER
    if not marker.is_file():
        state = unfinished(p)  # a live run (its lock), or an interrupted compare, score or sweep
        if state is not None:
            raise InputError(f"'{path}' holds {state[0]}, not a complete report", state[1])
        raise InputError(f"'{path}' holds no complete report (no summary.json)", "re-run the command that writes it")
    fix = "re-run the command that writes the report"
    try:
        summary = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{marker} is not valid JSON ({e.msg})", fix) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {marker} ({e})", fix) from None
    if isinstance(summary, dict) and summary.get("command") == "sweep":
        raise InputError(
            f"'{path}' holds a sweep, not a report",
            f"read one arm's report ({path}/<arm>), sweep.parquet, or `trm-diag show {path}`",
        )
    check_summary(summary, str(marker))
    restore_infinities(summary, str(marker))
    if tables:
        check_tables(p, summary)
    else:
        for name in ("tokens", "sequences"):
            _check_footer(p / f"{name}.parquet")
    return p, summary


def read_sweep(path: str | Path) -> dict[str, Any] | None:
    """The summary.json of a finished sweep folder, or None when the folder holds no sweep."""
    try:
        summary = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("command") == "sweep" else None


def _check_footer(f: Path) -> None:
    """A whole Parquet file ends with its magic bytes: a cheap check that needs no Parquet reader."""
    try:
        with open(f, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            whole = fh.read(4) == b"PAR1"
    except OSError as e:
        raise unreadable(f, e) from None
    if not whole:
        raise unreadable(f, ValueError("no Parquet footer"))


def check_tables(p: Path, summary: dict[str, Any]) -> None:
    """Every column readers rely on is in tokens.parquet and sequences.parquet (schemas only, no rows)."""
    fix = "re-run the command that writes the report"
    for name, columns in (("tokens", tier_columns(summary["fidelity"])), ("sequences", SEQUENCE_COLUMNS)):
        f = p / f"{name}.parquet"
        missing = [c for c in columns if c not in read_schema(f).names]
        if missing:
            raise InputError(
                f"'{f}' lacks the column(s) {', '.join(missing)} (a report of an older trm-diag, or damaged)", fix
            )


def check_summary(summary: Any, where: str) -> None:
    """summary.json's layout: an object with the fields every reader relies on, of the right types."""
    fix = "re-run the command that writes the report"
    if not isinstance(summary, dict):
        raise InputError(f"{where} is not a JSON object", fix)
    for key, kind in SUMMARY_FIELDS.items():
        if not isinstance(summary.get(key), kind):
            what = "missing" if key not in summary else f"not a JSON {'object' if kind is dict else 'string'}"
            raise InputError(f"{where}: '{key}' is {what}", fix)
    if summary["fidelity"] not in FIDELITIES:
        raise InputError(f"{where}: unknown fidelity '{summary['fidelity']}'", fix)
    odd = next((k for k, v in summary["metrics"].items() if not _is_number(v)), None)
    if odd is not None:
        raise InputError(f"{where}: metric '{odd}' is not a number", fix)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def unreadable(path: Path, e: Exception) -> InputError:
    """The one-line error for a report file that is missing or cannot be read."""
    if not path.is_file():
        return InputError(f"report file '{path}' is missing", "re-run the command that writes the report")
    why = (str(e).splitlines() or [type(e).__name__])[0].removeprefix(f"Could not open Parquet input source '{path}': ")
    return InputError(f"cannot read report file '{path}' ({why})", "re-run the command that writes the report")


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One report table (or some of its columns); a missing or damaged file is an InputError, not a traceback."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise unreadable(path, e) from None


def read_schema(path: Path) -> pa.Schema:
    """The Parquet schema of one report table (no rows read); InputError when missing or damaged."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None


def load_report(path: str | Path, tables: tuple[str, ...] = ("tokens", "sequences")) -> dict[str, Any]:
    """Read a complete report: {'summary': dict, '<table>': DataFrame ...}."""
    p, summary = complete_report(path)
    out: dict[str, Any] = {"summary": summary}
    for name in tables:
        f = p / f"{name}.parquet"
        if f.is_file():
            out[name] = read_table(f).to_pandas()
    return out


def worst_rows(path: Path, summary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The n sequences with the largest score the tier's TRM-Max tests, from sequences.parquet
    (seq_id, prompt_idx, sample_idx, length, score, response_text)."""
    from trm_diag.tiers import TIERS

    key = TIERS[summary["fidelity"]].trm_max
    cols = ["seq_id", "prompt_idx", "sample_idx", "length", key, "response_text"]
    names = read_schema(path / "sequences.parquet").names
    t = read_table(path / "sequences.parquet", columns=[c for c in cols if c in names]).to_pylist()
    t = [r for r in t if r.get("length")]
    t.sort(key=lambda r: (r.get(key) is None or r[key] != r[key], -(r.get(key) or 0.0)))  # NaN last
    return [{**{c: r.get(c) for c in cols if c != key}, "score": r.get(key), "score_name": key} for r in t[:n]]
