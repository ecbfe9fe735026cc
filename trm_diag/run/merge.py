"""`trm-diag merge`: combine shard reports into one, recomputing every statistic from the rows.

The shards are read back as a stream of chunks of the scored form the pipeline assembles
from, in (prompt_idx, sample_idx) order, and assembled again: quantiles, maxima, bounds and
masks come from the union of the rows, never from averaging per-shard numbers. Only the
keys of each shard and an index of where each sequence's rows lie stay in memory; token rows
are read chunk by chunk (and one column at a time for quantiles), so peak memory does not
grow with the number of rollouts. Shards must come from the same command (same specs,
sampling, thresholds, fidelity) and must not overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from trm_diag.config import DEFAULT_HORIZONS, DEFAULT_VIEW, SamplingConfig, Thresholds
from trm_diag.errors import InputError, UsageError
from trm_diag.math.moe import RoutingComparison
from trm_diag.report.assemble import CARRIED, assemble, report_parts
from trm_diag.report.diff import setup_differences
from trm_diag.report.html_report import write_html_or_warn
from trm_diag.report.outputs import check_out_dir, claim_out_dir
from trm_diag.report.tables import (
    complete_report,
    read_schema,
    read_table,
    unreadable,
    write_summary,
    write_tables,
)
from trm_diag.types import Rollout, Scored

CHUNK = 64  # merged rollouts per chunk, as compare's default --chunk-prompts
SEQUENCE_FIELDS = ("prompt_token_ids", "response_token_ids", "finish_reason", *CARRIED)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ranges [start, start + count) concatenated, without a Python loop."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return (np.repeat(starts - (ends - counts), counts) + np.arange(total)).astype(np.int64)


class _Rows:
    """Where each sequence's rows lie in one report table (grouped by seq_id), and reads of them
    by row group, so a chunk reads only the row groups that hold its rows."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        seq = read_table(path, columns=["seq_id"]).column(0).to_numpy()
        self.order = None if np.all(seq[1:] >= seq[:-1]) else np.argsort(seq, kind="stable")
        keys = seq if self.order is None else seq[self.order]
        self.ids, self.starts, self.counts = np.unique(keys, return_index=True, return_counts=True)
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.metadata.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: dict[tuple[int, tuple[str, ...] | None], Any] = {}

    def spans(self, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first position in grouped order, row count) per sequence; count 0 when it has no rows."""
        if not len(self.ids):
            return np.zeros(len(seq_ids), np.int64), np.zeros(len(seq_ids), np.int64)
        i = np.minimum(np.searchsorted(self.ids, seq_ids), len(self.ids) - 1)
        has = self.ids[i] == seq_ids
        return np.where(has, self.starts[i], 0), np.where(has, self.counts[i], 0)

    def in_grouped_order(self, column: np.ndarray) -> np.ndarray:
        """A whole column of the file, its rows grouped by sequence (as `spans` counts them)."""
        return column if self.order is None else column[self.order]

    def read_spans(self, starts: np.ndarray, counts: np.ndarray, columns: list[str] | None = None) -> Any:
        """The rows of these sequences, sequence after sequence (a pyarrow Table)."""
        grouped = _ranges(starts, counts)
        return self.read(grouped if self.order is None else self.order[grouped], columns)

    def read(self, positions: np.ndarray, columns: list[str] | None = None) -> Any:
        """The rows at these file positions, in this order (a pyarrow Table). The row groups of the
        last read are kept: chunks walk through a shard in order, so the next read mostly reuses them."""
        import pyarrow as pa

        g = np.searchsorted(self.group_starts, positions, side="right") - 1
        groups = np.unique(g).tolist()
        try:
            tables = [self._group(k, columns) for k in groups]
        except (OSError, ValueError) as e:
            raise unreadable(self.path, e) from None
        self._cache = {key: t for key, t in self._cache.items() if key[0] in groups}
        if not tables:  # sequences without rows (empty responses)
            schema = self.file.schema_arrow
            return schema.empty_table().select(columns or schema.names)
        base = np.zeros(len(self.group_starts), np.int64)  # where each group starts in the concatenation
        base[groups] = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])[:-1]])
        return pa.concat_tables(tables).take(positions - self.group_starts[g] + base[g])

    def _group(self, k: int, columns: list[str] | None) -> Any:
        key = (k, tuple(columns) if columns else None)
        if key not in self._cache:
            self._cache[key] = self.file.read_row_group(k, columns=columns)
        return self._cache[key]


class _Shard:
    """One shard report: its summary, the keys of its sequences, and row indexes of its tables."""

    def __init__(self, path: str) -> None:
        p, self.summary = complete_report(path)
        if self.summary.get("command") not in ("compare", "score"):
            raise InputError(f"'{path}' is not a compare or score report", "merge the shard reports of one command")
        self.path = path
        keys = read_table(p / "sequences.parquet", columns=["seq_id", "prompt_idx", "sample_idx"])
        self.seq_id, self.prompt_idx, self.sample_idx = (keys.column(i).to_numpy() for i in range(3))
        self.sequences = _Rows(p / "sequences.parquet")
        self.tokens = _Rows(p / "tokens.parquet")
        self.routing = _Rows(p / "routing.parquet") if (p / "routing.parquet").is_file() else None
        names = read_schema(p / "sequences.parquet").names
        self.sequence_fields = [f for f in SEQUENCE_FIELDS if f in names]


def _comparison(t: Any) -> RoutingComparison:
    """One sequence's routing rows (layer, pos, experts, margins, flip) as a RoutingComparison."""
    layer, pos = t.column("layer").to_numpy(), t.column("pos").to_numpy()
    order = np.lexsort((pos, layer))
    layers, T = (int(layer.max()) + 1, int(pos.max()) + 1) if len(layer) else (0, 0)

    def col(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = t.column(name).to_numpy(zero_copy_only=False)[order]
        arr = np.stack(values) if values.dtype == object else values
        return torch.tensor(arr, dtype=dtype)

    er, et = col("experts_roll").reshape(layers, T, -1), col("experts_train").reshape(layers, T, -1)
    mr, mt = col("margin_roll", torch.float32).reshape(layers, T), col("margin_train", torch.float32).reshape(layers, T)
    return RoutingComparison(er, et, mr, mt, col("flip").reshape(layers, T))


class ShardChunks:
    """The shards' rollouts in (prompt_idx, sample_idx) order as a ChunkSource (assemble.py),
    with new seq ids 0, 1, ...; raises UsageError when two shards hold the same rollout."""

    def __init__(self, shards: list[_Shard]) -> None:
        self.shards = shards
        which = np.concatenate([np.full(len(s.seq_id), k) for k, s in enumerate(shards)])
        local = np.concatenate([np.arange(len(s.seq_id)) for s in shards])
        prompt = np.concatenate([s.prompt_idx for s in shards]).astype(np.int64)
        sample = np.concatenate([s.sample_idx for s in shards]).astype(np.int64)
        order = np.lexsort((which, sample, prompt))
        self.which, self.local = which[order], local[order]
        self.prompt, self.sample = prompt[order], sample[order]
        dup = np.flatnonzero((np.diff(self.prompt) == 0) & (np.diff(self.sample) == 0))
        if len(dup):
            i = dup[0] + 1
            where = shards[self.which[i]].path
            if self.which[i] == self.which[i - 1]:
                raise UsageError(
                    f"prompt {self.prompt[i]} sample {self.sample[i]} appears twice in '{where}'",
                    "merge reports whose rollouts have distinct (prompt_idx, sample_idx)",
                )
            raise UsageError(
                f"prompt {self.prompt[i]} sample {self.sample[i]} appears in two shards (again in '{where}')",
                "merge disjoint shards",
            )
        self.n = len(order)
        self.n_chunks = (self.n + CHUNK - 1) // CHUNK
        self.kernels = {k for s in shards for k in (s.summary.get("hardware") or {}).get("exact_kernels") or ()}
        self._gather: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    def column_names(self) -> tuple[str, ...]:
        return tuple(read_schema(self.shards[0].tokens.path).names)

    def chunk(self, i: int) -> Scored:
        lo, hi = i * CHUNK, min(self.n, (i + 1) * CHUNK)
        rollouts: list[Rollout | None] = [None] * (hi - lo)
        columns: list[dict[str, np.ndarray] | None] = [None] * (hi - lo)
        routing: list[tuple[int, RoutingComparison]] = []
        for k, shard in enumerate(self.shards):
            mine = np.flatnonzero(self.which[lo:hi] == k)
            if not len(mine):
                continue
            seq_ids = shard.seq_id[self.local[lo:hi][mine]]
            seq_rows = shard.sequences.read_spans(*shard.sequences.spans(seq_ids), shard.sequence_fields).to_pydict()
            starts, counts = shard.tokens.spans(seq_ids)
            tok = shard.tokens.read_spans(starts, counts)
            arrays = {c: tok.column(c).to_numpy(zero_copy_only=False) for c in tok.column_names}
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for j, slot in enumerate(mine):
                new_id = lo + int(slot)
                cols = {c: a[bounds[j] : bounds[j + 1]] for c, a in arrays.items()}
                if len(cols["pos"]) > 1 and np.any(np.diff(cols["pos"]) < 0):
                    cols = {c: a[np.argsort(cols["pos"], kind="stable")] for c, a in cols.items()}
                cols["seq_id"] = np.full(len(cols["pos"]), new_id, dtype=np.int64)
                extra = {f: seq_rows[f][j] for f in CARRIED if f in seq_rows}
                rollouts[slot] = Rollout(
                    new_id, int(self.prompt[new_id]), int(self.sample[new_id]),
                    [int(x) for x in seq_rows["prompt_token_ids"][j]], [int(x) for x in seq_rows["response_token_ids"][j]],
                    cols["lp_roll"].tolist(), str(seq_rows["finish_reason"][j]), extra,
                )  # fmt: skip
                columns[slot] = cols
            if shard.routing is not None:
                rstarts, rcounts = shard.routing.spans(seq_ids)
                rt = shard.routing.read_spans(rstarts, rcounts)
                for slot, start, count in zip(mine, np.cumsum(rcounts) - rcounts, rcounts):
                    if count:
                        routing.append((lo + int(slot), _comparison(rt.slice(int(start), int(count)))))
        routing.sort(key=lambda x: x[0])
        return Scored(rollouts, columns, routing)  # type: ignore[arg-type]

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(row of each merged token in the shards' grouped columns, concatenated; tokens per merged sequence)."""
        if self._gather is None:
            offsets = np.cumsum([0] + [int(s.tokens.counts.sum()) for s in self.shards])
            starts, counts = np.zeros(self.n, np.int64), np.zeros(self.n, np.int64)
            for k, shard in enumerate(self.shards):
                at = np.flatnonzero(self.which == k)
                s, c = shard.tokens.spans(shard.seq_id[self.local[at]])
                starts[at], counts[at] = s + offsets[k], c
            self._gather, self._counts = _ranges(starts, counts), counts
        return self._gather, self._counts  # type: ignore[return-value]

    def column(self, name: str) -> np.ndarray:
        gather, counts = self._layout()
        if name == "seq_id":
            return np.repeat(np.arange(self.n, dtype=np.int64), counts)
        parts = [
            s.tokens.in_grouped_order(read_table(s.tokens.path, columns=[name]).column(0).to_numpy())
            for s in self.shards
        ]
        return np.concatenate(parts)[gather]


def _split(shard: Any, path: str) -> tuple[int, int] | None:
    """A summary's 'shard' ("I/N") as (I, N); None for a report run without --shard."""
    if shard is None:
        return None
    i, _, n = str(shard).partition("/")
    try:
        pair = int(i), int(n)
    except ValueError:
        pair = (-1, 0)
    if not 0 <= pair[0] < pair[1]:
        raise InputError(f"'{path}': summary.json names shard {shard!r}, not I/N", "re-run that shard")
    return pair


def shard_coverage(shards: list[tuple[str, dict[str, Any]]], partial: bool = False) -> dict[str, Any]:
    """Which shards of one --shard I/N split the (path, summary) pairs are, for summary.json's 'coverage';
    UsageError for a set with a shard missing (unless ``partial``), twice, or from another split."""
    split = [(path, _split(summary.get("shard"), path)) for path, summary in shards]
    sharded = [(path, pair) for path, pair in split if pair is not None]
    if not sharded:  # reports run without --shard (score reports of split files): coverage unknown
        return {"split": None, "shards": [], "missing": [], "complete": None, "partial": partial}
    plain = next((path for path, pair in split if pair is None), None)
    first, (i0, n) = sharded[0]
    made = next((s.get("merged_from") for path, s in shards if path == plain), None)
    if plain is not None and isinstance(made, list):  # a merged report has no --shard of its own
        was = ", ".join(str(m.get("report")) for m in made if isinstance(m, dict))
        raise UsageError(
            f"'{plain}' is a merged report (of {was}), not a shard of the split '{first}' belongs to",
            "merge the shard reports it was made from together with the others",
        )
    if plain is not None:
        raise UsageError(
            f"'{plain}' was run without --shard, while '{first}' is shard {i0}/{n}",
            "merge the shard reports of one --shard I/N split",
        )
    seen: dict[int, str] = {}
    for path, (i, m) in sharded:
        if m != n:
            raise UsageError(
                f"'{path}' is shard {i}/{m} but '{first}' is shard {i0}/{n}: the reports come from different splits",
                "merge the shards of one --shard I/N split (the same N)",
            )
        if i in seen:
            raise UsageError(f"shard {i}/{n} is given twice ('{seen[i]}', '{path}')", "pass each shard's report once")
        seen[i] = path
    missing = [f"{i}/{n}" for i in range(n) if i not in seen]
    if missing and not partial:
        raise UsageError(
            f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: the reports cover {len(seen)} of {n} shards",
            "pass every shard's report, or --partial to merge these alone (the report then covers their prompts only)",
        )
    if not missing:  # a whole split: shard i holds prompts i, i + N, ... of the same prompts
        counts = {
            i: int((summary.get("prompts") or {}).get("count", 0)) for (_, summary), (_, (i, _)) in zip(shards, sharded)
        }
        total = sum(counts.values())
        odd = next((i for i in range(n) if counts[i] != len(range(i, total, n))), None)
        if odd is not None:
            raise UsageError(
                f"'{seen[odd]}' (shard {odd}/{n}) holds {counts[odd]} prompt(s), but {n} shards of {total} prompts "
                f"give it {len(range(odd, total, n))}: the shards ran over different prompts",
                "merge the shards of one command (the same --prompts and --num-prompts)",
            )
    shards_given = [f"{i}/{n}" for i in sorted(seen)]
    return {"split": n, "shards": shards_given, "missing": missing, "complete": not missing, "partial": partial}


def run_merge(
    reports: list[str], out: str, overwrite: bool = False, warn: Any = lambda message: None, partial: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Merge shard reports into ``out``; returns the folder and its summary. The shards of a --shard I/N
    split must all be there (``partial``: merge those given, and say so); an empty shard adds no rows."""
    if len(reports) < 2:
        raise UsageError("merge needs at least two reports", "pass every shard's report folder")
    if any(Path(r).resolve() == Path(out).resolve() for r in reports):
        raise UsageError(f"--out '{out}' is one of the reports being merged", "write the merged report to a new folder")
    out_dir = check_out_dir(out, overwrite=overwrite, inputs=reports)  # reads only, before the inputs pass
    shards = [_Shard(r) for r in reports]
    first = shards[0].summary
    for shard in shards[1:]:
        found = setup_differences(first, shard.summary)
        if found:
            what = found[0]
            raise UsageError(
                f"'{shard.path}' used another {what} than '{reports[0]}'"
                if what.endswith(" backend")
                else f"'{shard.path}' differs from '{reports[0]}' in {what}",
                "merge shards of one command only",
            )
    coverage = shard_coverage([(s.path, s.summary) for s in shards], partial)
    if coverage["missing"]:
        warn(
            f"merged {len(coverage['shards'])} of {coverage['split']} shards (missing {', '.join(coverage['missing'])}, "
            "--partial): the report covers their prompts only"
        )
    filled = [s for s in shards if len(s.seq_id)]  # a shard of no prompts has no rows to read
    if not filled:
        raise UsageError("every report given holds no rollouts", "merge the shards that hold prompts as well")
    first = filled[0].summary
    source = ShardChunks(filled)
    from trm_diag.backends import load_tokenizer
    from trm_diag.report.id_tokenizer import IdTokenizer

    model = first["train"].get("model")  # None: a report of recorded log-probs, made without a model
    try:
        tokenizer = load_tokenizer(model) if model else IdTokenizer()
    except (OSError, ValueError) as e:  # a moved model, or a relative path read from another folder
        where = "" if Path(model).is_absolute() else "; a relative path is read from the folder merge runs in"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(
            f"cannot load the tokenizer of the shards' model '{model}' ({reason}){where}",
            "run merge where the model path the shards record resolves (for a relative one: the folder compare ran in)",
        ) from None
    routing_info = first.get("routing") or {}
    moe = (routing_info["num_experts"], routing_info["experts_per_token"]) if "num_experts" in routing_info else None
    header = {
        "rollout": first["rollout"],
        "train": first["train"],
        "prompts": {"count": sum(s.summary.get("prompts", {}).get("count", 0) for s in shards)},
        "merged_from": [{"report": str(s.path), "shard": s.summary.get("shard")} for s in shards],
        "coverage": coverage,
        "horizons": first.get("horizons"),
        "routing_note": routing_info.get("reason"),
    }
    try:
        recorded = {k: v for k, v in first["sampling"].items() if v is not None}  # score records no generation
        sampling, thresholds = SamplingConfig(**recorded), Thresholds(**first["thresholds"])
    except (TypeError, AttributeError, UsageError) as e:
        raise InputError(f"'{filled[0].path}': summary.json has damaged settings ({e})", "re-run that shard") from None
    assembled = assemble(
        source, command=first["command"], fidelity=first["fidelity"], sampling=sampling, thresholds=thresholds,
        horizons=tuple(first.get("horizons") or DEFAULT_HORIZONS), tokenizer=tokenizer,
        width=first["vocab"]["logits_width"], moe=moe, header=header, warn=warn,
        view=first.get("view", DEFAULT_VIEW),
    )  # fmt: skip
    assembled.summary["timings"] = {}
    with claim_out_dir(out_dir, overwrite=overwrite, warn=warn):
        write_tables(out_dir, report_parts(assembled), assembled.summary)
        write_html_or_warn(out_dir, assembled.summary, warn)
        write_summary(out_dir, assembled.summary)
    return out_dir, assembled.summary
