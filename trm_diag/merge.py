"""`trm-diag merge`: combine shard reports into one, recomputing every statistic from the rows.

Each shard's tokens.parquet, sequences.parquet and routing.parquet are read back into the
scored form the pipeline assembles from, ordered by (prompt_idx, sample_idx), and
assembled again: quantiles, maxima, bounds and masks come from the union of the rows,
never from averaging per-shard numbers. Shards must come from the same command (same
specs, sampling, thresholds, fidelity) and must not overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from trm_diag.assemble import Scored, assemble, report_parts
from trm_diag.backends.base import Rollout
from trm_diag.config import SamplingConfig, Thresholds
from trm_diag.errors import InputError, UsageError
from trm_diag.moe import RoutingComparison
from trm_diag.report import complete_report, prepare_out_dir, read_table, write_summary, write_tables

MUST_MATCH = ("fidelity", "sampling", "thresholds", "compared_distribution")


def _read(path: str) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    p, summary = complete_report(path)
    if summary.get("command") not in ("compare", "score"):
        raise InputError(f"'{path}' is not a compare or score report", "merge the shard reports of one command")
    routing = read_table(p / "routing.parquet").to_pandas() if (p / "routing.parquet").is_file() else None
    tokens, sequences = (read_table(p / f"{t}.parquet").to_pandas() for t in ("tokens", "sequences"))
    return summary, tokens, sequences, routing


def _comparisons(routing: pd.DataFrame) -> dict[int, RoutingComparison]:
    out = {}
    for seq_id, g in routing.sort_values(["seq_id", "layer", "pos"]).groupby("seq_id", sort=False):
        layers, T = int(g["layer"].max()) + 1, int(g["pos"].max()) + 1
        er = torch.tensor(np.stack(g["experts_roll"].to_numpy())).reshape(layers, T, -1)
        et = torch.tensor(np.stack(g["experts_train"].to_numpy())).reshape(layers, T, -1)
        mr = torch.tensor(g["margin_roll"].to_numpy(), dtype=torch.float32).reshape(layers, T)
        mt = torch.tensor(g["margin_train"].to_numpy(), dtype=torch.float32).reshape(layers, T)
        out[int(seq_id)] = RoutingComparison(er, et, mr, mt, torch.tensor(g["flip"].to_numpy()).reshape(layers, T))
    return out


def run_merge(reports: list[str], out: str, overwrite: bool = False, warn: Any = print) -> tuple[Path, dict[str, Any]]:
    """Merge shard reports into ``out``; returns the folder and its summary."""
    if len(reports) < 2:
        raise UsageError("merge needs at least two reports", "pass every shard's report folder")
    shards = [_read(r) for r in reports]
    first = shards[0][0]
    for path, (summary, *_rest) in zip(reports[1:], shards[1:]):
        for key in MUST_MATCH:
            if summary.get(key) != first.get(key):
                raise UsageError(f"'{path}' differs from '{reports[0]}' in {key}", "merge shards of one command only")
        for side in ("rollout", "train"):
            if summary[side].get("spec") != first[side].get("spec"):
                raise UsageError(
                    f"'{path}' used another {side} backend than '{reports[0]}'", "merge shards of one command only"
                )
    out_dir = prepare_out_dir(out, overwrite)
    items: list[tuple[tuple[int, int], Rollout, dict[str, np.ndarray], RoutingComparison | None]] = []
    seen: set[tuple[int, int]] = set()
    for path, (_summary, tokens, seqs, routing) in zip(reports, shards):
        by_seq = {int(k): g for k, g in tokens.groupby("seq_id", sort=False)}
        comps = _comparisons(routing) if routing is not None else {}
        for row in seqs.itertuples(index=False):
            key = (int(row.prompt_idx), int(row.sample_idx))
            if key in seen:
                raise UsageError(
                    f"prompt {key[0]} sample {key[1]} appears in two shards (again in '{path}')",
                    "merge disjoint shards",
                )
            seen.add(key)
            g = by_seq.get(int(row.seq_id), tokens.iloc[:0]).sort_values("pos")
            extra = {k: getattr(row, k) for k in ("reward", "advantage") if hasattr(row, k)}
            rollout = Rollout(0, key[0], key[1], [int(x) for x in row.prompt_token_ids], [int(x) for x in row.response_token_ids],
                              g["lp_roll"].tolist(), str(row.finish_reason), extra)  # fmt: skip
            cols = {c: g[c].to_numpy() for c in tokens.columns}
            items.append((key, rollout, cols, comps.get(int(row.seq_id))))
    items.sort(key=lambda it: it[0])
    rollouts, columns, routing_parts = [], [], []
    for new_id, (_, rollout, cols, comp) in enumerate(items):
        rollout.seq_id = new_id
        cols["seq_id"] = np.full(len(cols["pos"]), new_id, dtype=np.int64)
        rollouts.append(rollout)
        columns.append(cols)
        if comp is not None:
            routing_parts.append((new_id, comp))
    from transformers import AutoTokenizer

    model = first["train"]["model"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    routing_info = first.get("routing") or {}
    moe = (routing_info["num_experts"], routing_info["experts_per_token"]) if "num_experts" in routing_info else None
    header = {
        "rollout": first["rollout"],
        "train": first["train"],
        "prompts": {"count": sum(s[0].get("prompts", {}).get("count", 0) for s in shards)},
        "merged_from": [{"report": str(r), "shard": s[0].get("shard")} for r, s in zip(reports, shards)],
        "horizons": first.get("horizons"),
        "routing_note": routing_info.get("reason"),
    }
    assembled = assemble(
        Scored(rollouts, columns, routing_parts), command=first["command"], fidelity=first["fidelity"],
        sampling=SamplingConfig(**first["sampling"]), thresholds=Thresholds(**first["thresholds"]),
        horizons=tuple(first.get("horizons") or (1024, 4096, 16384)), tokenizer=tokenizer,
        width=first["vocab"]["logits_width"], moe=moe, header=header, warn=warn,
    )  # fmt: skip
    assembled.summary["timings"] = {}
    write_tables(out_dir, report_parts(assembled), assembled.summary)
    write_summary(out_dir, assembled.summary)
    return out_dir, assembled.summary
