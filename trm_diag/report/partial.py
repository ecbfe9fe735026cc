"""Chunk checkpoints of a running `compare`, so an interrupted run can be resumed.

Each finished chunk of prompts is saved under ``OUT/.trm-partial/`` as Parquet files
(rollouts, token columns, MoE routing) and recorded in ``manifest.json`` with a
fingerprint of the run's settings. The final report is always assembled from the stored
chunks, so a resumed run and an uninterrupted one produce the same bytes. Parquet and
JSON only: nothing stored here can run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from trm_diag.errors import InputError, UsageError
from trm_diag.heap import release_heap
from trm_diag.math.moe import RoutingComparison
from trm_diag.report.outputs import PARTIAL_DIR
from trm_diag.report.row_store import clear_spill
from trm_diag.report.tables import atomic_write
from trm_diag.report.token_extras import TOKEN_EXTRAS
from trm_diag.types import Rollout, Scored

MANIFEST = "manifest.json"
SPILL_DIR = "spill"  # rows beyond the memory budget, while a run holds them


def run_fingerprint(settings: dict[str, Any], files: list[str]) -> str:
    """sha256 of the run's settings and of the input files' bytes."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


class PartialStore:
    """The chunks of one run saved so far; refuses to mix runs with different settings."""

    def __init__(
        self, out_dir: Path, fingerprint: str, n_chunks: int, resume: bool, overwrite: bool = False,
        command: str = "compare",
    ) -> None:  # fmt: skip
        self.dir = out_dir / PARTIAL_DIR
        self.fingerprint = fingerprint
        self.n_chunks = n_chunks
        self.command = command  # who resumes it (outputs.UNFINISHED): readers of the folder name that command
        if resume:
            m = self.check_resumable(out_dir, fingerprint, n_chunks)
            self.done = set(m["done"])
            self.generated = set(m.get("generated", [])) - self.done
            self.kernels = set(m.get("kernels", []))
        else:
            if self.dir.exists():  # the caller checked: --overwrite, or a folder with no interrupted run
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            self.done = set()
            self.generated: set[int] = set()
            self.kernels: set[str] = set()  # exact-tier kernels that scored the saved chunks
            self._write_manifest()
        self._base: list[int] | None = None
        self._tokens: Any = None  # pyarrow dataset over the chunks' token files, for column()

    @staticmethod
    def check_resumable(out_dir: Path, fingerprint: str, n_chunks: int) -> dict[str, Any]:
        """The manifest of the interrupted run in out_dir, if it was started with these settings and inputs
        (reads only: called before any work)."""
        manifest = out_dir / PARTIAL_DIR / MANIFEST
        try:
            m = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise UsageError(f"there is no interrupted run to resume in '{out_dir}'", "drop --resume") from None
        except (OSError, ValueError):
            m = None
        if not isinstance(m, dict) or not isinstance(m.get("done"), list):
            raise UsageError(f"the interrupted run in '{out_dir}' is damaged", "pass --overwrite to start again")
        if m.get("fingerprint") != fingerprint or m.get("n_chunks") != n_chunks:
            raise UsageError(
                f"the interrupted run in '{out_dir}' was started with other settings or inputs",
                "resume with exactly the same command, or pass --overwrite to start again",
            )
        return m

    def _write_manifest(self) -> None:
        body = {
            "command": self.command,
            "fingerprint": self.fingerprint,
            "n_chunks": self.n_chunks,
            "done": sorted(self.done),
            "generated": sorted(self.generated),  # rollouts saved, not yet scored (engines that swap)
            "kernels": sorted(self.kernels),
            "complete": False,
        }
        atomic_write(self.dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1)))

    def _path(self, i: int, kind: str) -> Path:
        return self.dir / f"chunk-{i:05d}.{kind}.parquet"

    def save_generated(self, i: int, rollouts: list[Rollout]) -> None:
        """Store chunk i's rollouts before they are scored (two vLLM engines run one after the other:
        every chunk is generated first, then scored), so memory stays one chunk and Ctrl-C loses little."""
        _write(self._path(i, "generated"), _rollout_frame(rollouts))
        self.generated.add(i)
        self._write_manifest()
        release_heap()

    def generated_rollouts(self, i: int) -> list[Rollout]:
        """The rollouts saved by save_generated, seq ids 0, 1, ... as generate() numbers them."""
        if i not in self.generated:
            raise InputError(f"chunk {i} of the run was never generated in {self.dir}", "resume the run with --resume")
        return _rollouts_from(self._path(i, "generated"), 0)

    def save(self, i: int, scored: Scored) -> None:
        """Store chunk i atomically, then mark it done (with the exact-tier kernels that scored it)."""
        rolls = _rollout_frame(scored.rollouts)
        tokens = pd.DataFrame(
            {k: np.concatenate([c[k] for c in scored.columns]) for k in scored.columns[0]} if scored.columns else {}
        )
        tokens["local_seq"] = np.repeat(np.arange(len(scored.columns)), [len(c["pos"]) for c in scored.columns])
        _write(self._path(i, "rollouts"), rolls)
        _write(self._path(i, "tokens"), tokens)
        if scored.routing:
            _write(self._path(i, "routing"), _routing_frame(scored))
        self.done.add(i)
        self.generated.discard(i)
        self.kernels.update(scored.kernels)
        self._write_manifest()
        self._path(i, "generated").unlink(missing_ok=True)
        release_heap()  # a chunk's temporaries are gone: give their pages back (heap.py)

    # ---- ChunkSource (assemble.py): the report is assembled from the stored chunks, one at a time
    def _check(self, i: int) -> None:
        if i not in self.done:
            raise InputError(f"chunk {i} of the run is missing in {self.dir}", "resume the run with --resume")

    def _bases(self) -> list[int]:
        """Global seq id of each chunk's first rollout."""
        if self._base is None:
            import pyarrow.parquet as pq

            counts = []
            for i in range(self.n_chunks):
                self._check(i)
                counts.append(pq.read_metadata(self._path(i, "rollouts")).num_rows)
            self._base = [0, *np.cumsum(counts).tolist()][:-1]
        return self._base

    def rollouts(self, i: int) -> list[Rollout]:
        """The rollouts of chunk i, with global seq ids."""
        self._check(i)
        return _rollouts_from(self._path(i, "rollouts"), self._bases()[i])

    def chunk(self, i: int) -> Scored:
        """Chunk i: rollouts, token columns and routing, with global seq ids."""
        import pyarrow.parquet as pq

        rollouts = self.rollouts(i)
        base = self._bases()[i]
        tokens = pq.read_table(self._path(i, "tokens"))
        arrays = {c: tokens.column(c).to_numpy() for c in tokens.column_names}
        local = arrays.pop("local_seq")
        bounds = np.searchsorted(local, np.arange(len(rollouts) + 1))  # rows are stored sequence after sequence
        columns = []
        for j in range(len(rollouts)):
            cols = {c: a[bounds[j] : bounds[j + 1]] for c, a in arrays.items()}
            cols["seq_id"] = np.full(len(cols["pos"]), base + j, dtype=np.int64)
            columns.append(cols)
        rpath = self._path(i, "routing")
        routing = _routing_from_frame(pd.read_parquet(rpath), base) if rpath.is_file() else []
        return Scored(rollouts, columns, routing)

    def column(self, name: str) -> np.ndarray:
        """One token column over all chunks (global seq ids for seq_id), read by one dataset scan."""
        if self._tokens is None:
            import pyarrow.dataset as ds

            self._bases()  # every chunk is there
            self._tokens = ds.dataset([str(self._path(i, "tokens")) for i in range(self.n_chunks)], format="parquet")
        if name == "seq_id":
            return np.concatenate(
                [
                    frag.to_table(columns=["local_seq"]).column(0).to_numpy() + base
                    for frag, base in zip(self._tokens.get_fragments(), self._bases())
                ]
            )
        return self._tokens.to_table(columns=[name], use_threads=False).column(0).to_numpy()

    def column_names(self) -> tuple[str, ...]:
        import pyarrow.parquet as pq

        self._check(0)
        return tuple(c for c in pq.read_schema(self._path(0, "tokens")).names if c != "local_seq")

    def spill_dir(self) -> Path:
        """The folder the run's rollout rows spill to (report/row_store.py), emptied of whatever a killed
        run left there; it goes with the rest of this store at the end."""
        folder = self.dir / SPILL_DIR
        clear_spill(folder)
        return folder

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


SPENT = tuple(k for k in TOKEN_EXTRAS if k != "loss_mask")  # per-token extras scoring consumed


def _rollout_frame(rollouts: list[Rollout]) -> pd.DataFrame:
    """One row per rollout: ids, log-probs, finish reason and extras (as JSON)."""
    return pd.DataFrame(
        {
            "prompt_idx": [r.prompt_idx for r in rollouts],
            "sample_idx": [r.sample_idx for r in rollouts],
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "response_ids": [r.response_ids for r in rollouts],
            "lp_roll": [r.lp_roll for r in rollouts],
            "finish_reason": [r.finish_reason for r in rollouts],
            "extra_json": [json.dumps(_jsonable(r.extra)) for r in rollouts],
        }
    )


def _rollouts_from(path: Path, base: int) -> list[Rollout]:
    """The rollouts of a frame written by _rollout_frame, seq ids base, base + 1, ..."""
    import pyarrow.parquet as pq

    d = pq.read_table(path).to_pydict()
    out = []
    for j in range(len(d["prompt_idx"])):
        extra = json.loads(d["extra_json"][j])
        if "topk" in extra:
            extra["topk"] = [{int(k): float(v) for k, v in e.items()} for e in extra["topk"]]
        if "loss_mask" in extra:
            extra["loss_mask"] = np.asarray(extra["loss_mask"], dtype=bool)
        out.append(
            Rollout(
                base + j,
                d["prompt_idx"][j],
                d["sample_idx"][j],
                d["prompt_ids"][j],
                d["response_ids"][j],
                d["lp_roll"][j],
                d["finish_reason"][j],
                extra,
            )  # fmt: skip
        )
    return out


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
    """Extras as JSON; a dump's per-token fields are spent once scored (the loss mask stays: the report maps
    positions through it)."""
    out = {k: v for k, v in extra.items() if k not in SPENT}
    if "loss_mask" in out:
        out["loss_mask"] = [bool(x) for x in out["loss_mask"]]
    if "topk" in out:
        out["topk"] = [{str(k): v for k, v in d.items()} for d in out["topk"]]
    return out


def _write(path: Path, df: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _routing_frame(scored: Scored) -> pd.DataFrame:
    rows: dict[str, list] = {"local_seq": [], "layers": [], "T": [], "k": [], "experts_roll": [], "experts_train": [],
                             "margin_roll": [], "margin_train": []}  # fmt: skip
    index = {r.seq_id: j for j, r in enumerate(scored.rollouts)}
    for seq_id, c in scored.routing:
        layers, T, k = c.experts_roll.shape
        rows["local_seq"].append(index[seq_id])
        rows["layers"].append(layers)
        rows["T"].append(T)
        rows["k"].append(k)
        rows["experts_roll"].append(c.experts_roll.reshape(-1).tolist())
        rows["experts_train"].append(c.experts_train.reshape(-1).tolist())
        rows["margin_roll"].append(c.margin_roll.reshape(-1).tolist())
        rows["margin_train"].append(c.margin_train.reshape(-1).tolist())
    return pd.DataFrame(rows)


def _routing_from_frame(df: pd.DataFrame, base: int) -> list[tuple[int, RoutingComparison]]:
    out = []
    for row in df.itertuples(index=False):
        shape3, shape2 = (row.layers, row.T, row.k), (row.layers, row.T)
        er = torch.tensor(list(row.experts_roll), dtype=torch.long).reshape(shape3)
        et = torch.tensor(list(row.experts_train), dtype=torch.long).reshape(shape3)
        # NaN margins (an engine's recorded experts come without its router logits) are stored as nulls
        mr = torch.tensor([np.nan if x is None else x for x in row.margin_roll], dtype=torch.float32).reshape(shape2)
        mt = torch.tensor(list(row.margin_train), dtype=torch.float32).reshape(shape2)
        out.append((base + int(row.local_seq), RoutingComparison(er, et, mr, mt, (er != et).any(dim=-1))))
    return out
