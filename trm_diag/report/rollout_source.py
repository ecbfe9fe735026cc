"""Where `score`'s rows come from: a rollout file, a framework's dump (report/dumps/), or a quoted glob of
either; the format named, detected from the suffix or the layout. Rows come out as read, unchecked
(rollouts_io.py checks them)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trm_diag.errors import InputError, UsageError
from trm_diag.report.dumps import DUMP_FORMATS, dump_rows
from trm_diag.report.dumps import detect as detect_dump
from trm_diag.report.rows import iter_jsonl, iter_parquet


@dataclass(frozen=True)
class RolloutSource:
    """What `score` reads: a rollout file or a framework's dump (report/dumps/), in a format named or
    detected, and whether pickled dumps may be read (they can run code when loaded)."""

    path: Path
    format: str | None = None  # INPUT_FORMATS; None: by suffix, or detected for a folder / a dump file
    allow_pickle: bool = False

    def __str__(self) -> str:
        return str(self.path)


INPUT_FORMATS = ("jsonl", "parquet", *DUMP_FORMATS)


def as_source(path: str | Path | RolloutSource) -> RolloutSource:
    return path if isinstance(path, RolloutSource) else RolloutSource(Path(path))


GLOB_CHARS = frozenset("*?[")


def _natural(path: Path) -> list:
    """Sort key that orders step_2 before step_10."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(path))]


COMPRESSED = {".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zst": "unzstd", ".zip": "unzip"}
MAX_MATCHES = 100_000  # a glob matching more is a mistake ('/**/*'), not a run's steps


def matches(src: RolloutSource) -> list[Path]:
    """The paths a source names: itself, or the matches of a glob pattern (``'dump/rollout_data/*.pt'``, quoted
    so the shell passes it on) in natural order, so the steps of a run come in order."""
    if src.path.exists() or not GLOB_CHARS & set(str(src.path)):
        return [src.path]
    return list(_glob(src.path))


def forget_globs() -> None:
    """Drop the remembered matches: a new run sees the steps written since the last one."""
    _glob.cache_clear()


@functools.lru_cache(maxsize=8)
def _glob(path: Path) -> tuple[Path, ...]:
    """The matches of a pattern, once per run (every reader of the source asks again; forget_globs starts over)."""
    if "**" in str(path):
        raise InputError(
            f"'{path}' is a recursive pattern (**)", "name the steps' folder, e.g. 'RUN/rollout_data/*.pt'"
        )
    anchor = Path(path.anchor) if path.is_absolute() else Path()
    pattern = str(path.relative_to(anchor)) if path.is_absolute() else str(path)
    evals = "eval" in pattern  # slime's eval steps (eval_N.pt) only when the pattern names them
    found = []
    for p in anchor.glob(pattern):
        if evals or not p.name.startswith("eval_"):
            found.append(p)
        if len(found) > MAX_MATCHES:
            raise InputError(f"'{path}' matches over {MAX_MATCHES:,} paths", "narrow the pattern to the run's steps")
    if not found:
        raise InputError(f"'{path}' matches no file", "check the pattern (quote it so the shell passes it on)")
    return tuple(sorted(found, key=_natural))


def input_format(src: RolloutSource) -> str:
    """The format `score` reads ``src`` in: the one named, else by suffix, else the dump detected; every file a
    glob matches in the same format."""
    found = matches(src)
    if found != [src.path]:
        formats = {p: input_format(replace(src, path=p)) for p in found}
        if len(set(formats.values())) > 1:
            kinds = ", ".join(f"{p.name}: {f}" for p, f in list(formats.items())[:3])
            raise InputError(f"'{src.path}' matches files in several formats ({kinds})", "match files of one format")
        return formats[found[0]]
    if src.format is not None:
        if src.format not in INPUT_FORMATS:
            raise UsageError(f"--format {src.format} is unknown", f"use one of: {', '.join(INPUT_FORMATS)}")
        return src.format
    suffix = src.path.suffix.lower()
    if src.path.is_file() and suffix in (".jsonl", ".json"):
        return "jsonl"
    if src.path.is_file() and suffix == ".parquet":
        return "parquet"
    if not src.path.exists():
        raise InputError(f"rollout file '{src.path}' does not exist", "pass a .jsonl or .parquet file, or a dump")
    if suffix in COMPRESSED:
        raise InputError(
            f"'{src.path}' is a compressed file ({suffix}): trm-diag reads plain .jsonl or .parquet",
            f"decompress it first (e.g. {COMPRESSED[suffix]} '{src.path}'), or export Parquet (compressed inside)",
        )
    found = detect_dump(src.path)
    if found is None and src.path.is_dir():
        kinds = sorted({p.suffix.lower() for p in src.path.iterdir() if p.suffix.lower() in (".jsonl", ".parquet")})
        if kinds:
            raise InputError(
                f"'{src.path}' is a folder of rollout files, not a dump trm-diag knows",
                f"pass its files as a quoted glob, e.g. '{src.path / ('*' + kinds[0])}'",
            )
    if found is None:
        what = "a folder" if src.path.is_dir() else f"a '{suffix}' file"
        raise InputError(
            f"'{src.path}' is {what} in no format trm-diag reads",
            f"pass a .jsonl or .parquet rollout file, or a dump of {', '.join(DUMP_FORMATS)} (--format names it)",
        )
    return found


def source_rows(src: RolloutSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from a rollout file or a dump, read as they are needed."""
    fmt = input_format(src)
    found = matches(src)
    if found != [src.path]:
        for p in found:
            yield from source_rows(replace(src, path=p, format=fmt))
        return
    path = src.path
    if fmt in DUMP_FORMATS:
        yield from dump_rows(path, fmt, src.allow_pickle)
        return
    if not path.is_file():
        raise InputError(f"rollout file '{path}' does not exist", "pass a .jsonl or .parquet file")
    suffix = ".parquet" if fmt == "parquet" else ".jsonl"
    if suffix in (".jsonl", ".json"):
        if _starts_with_array(path):
            raise InputError(
                f"'{path}' holds a JSON array: rollout files are JSONL, one object per line",
                f"convert it, e.g. jq -c '.[]' '{path}' > rollouts.jsonl",
            )
        for where, obj in iter_jsonl(path):
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object", "write one object per rollout")
            yield where, obj
    elif suffix == ".parquet":
        yield from iter_parquet(path)
    else:
        raise InputError(f"unsupported rollout file type '{suffix}' ({path})", "use .jsonl or .parquet")


def _starts_with_array(path: Path) -> bool:
    """Whether a JSON file's first character (past a byte-order mark and whitespace) opens an array."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False  # iter_jsonl names the problem
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"["


def rename(raw: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """A row with ``mapping`` ({source: canonical}) applied: a field --map names comes from its mapped column only,
    so a column of the file that already has the field's name (a padded ``response_ids`` next to ``output_ids``)
    never wins over the one asked for."""
    targets = set(mapping.values())
    return {mapping.get(k, k): v for k, v in raw.items() if k in mapping or k not in targets}


def first_row(src: RolloutSource, mapping: dict[str, str]) -> dict[str, Any] | None:
    """The input's first row with ``mapping`` applied, unchecked (None for an empty input): enough to tell what
    the input carries before choosing how to score it."""
    for _, raw in source_rows(src):
        return rename(raw, mapping)
    return None
