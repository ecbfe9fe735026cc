"""`trm_diag.Monitor`: the mismatch of each training step, inside the loop (docs/trend.md).

    from trm_diag import Monitor
    with Monitor(out="runs/exp1", horizons=(4096, 16384)) as mon:
        for step, batch in enumerate(loader):
            ...
            res = mon.update(step, old_log_probs, log_probs, response_mask)  # [B, T] tensors, any device
            loss = (loss_per_seq * res.mask).sum() / res.mask.sum()     # TRM applied, not only watched

The numbers are the sampled tier's report numbers, from the same functions (math/step_metrics.py). One
device-to-host copy per update; the mask goes back to the inputs' device. Imports neither transformers
nor vLLM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trm_diag.config import DEFAULT_HORIZONS, Thresholds, as_dict
from trm_diag.criteria import CRITERIA
from trm_diag.errors import UsageError
from trm_diag.math.step_metrics import DPPO, FIDELITY, INPUTS, LENGTH_EDGES, dppo_token_mask, step_metrics
from trm_diag.math.trend import ACCEPT_CRITERIA, DRIFT_METRICS, SPIKE_METRICS, Flag, TrendConfig, drift_at, is_spike

MASKS = (*CRITERIA, *DPPO)  # what res.mask can apply: a sequence criterion, or DPPO's token mask
DEFAULT_CRITERION = "combined"  # TRM Max+Avg, the paper's runs
HISTORY = ("step", *dict.fromkeys((*SPIKE_METRICS, *DRIFT_METRICS)), *(f"accept_{c}" for c in ACCEPT_CRITERIA))


@dataclass
class MonitorResult:
    """One update's numbers. ``metrics``: the step's row as the run folder keeps it (verl's names where verl
    has them, docs/metrics.md); ``inputs``: the bounds' inputs (delta = the k2 max, a heuristic; D_KL^seq from
    k1 sums); ``bstar``: B* at the observed length ('obs') and each horizon; ``acceptance``: each criterion's
    kept share; ``mask``: the chosen criterion's keep-mask on the inputs' device, [B] bool per sequence (or
    [B, T] for DPPO; a list for ragged inputs); ``flags``: what the trend rules flag at this step."""

    step: int
    criterion: str
    metrics: dict[str, float]
    inputs: dict[str, float]
    bstar: dict[int | str, float]
    acceptance: dict[str, float]
    mask: Any
    flags: list[Flag] = field(default_factory=list)
    seq_ids: Any = None

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]


def _rank(rank: int | None) -> int:
    """rank=, else torch.distributed's, else $RANK, else 0; a non-negative integer (a part named for rank -1, e.g.
    HF's local_rank outside distributed runs, would not be read back)."""
    where = "rank="
    if rank is None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank, where = dist.get_rank(), "torch.distributed's rank"
        else:
            rank, where = os.environ.get("RANK", "0") or "0", "$RANK"
    try:
        r = int(rank)
    except (TypeError, ValueError):
        r = -1
    if r < 0 or isinstance(rank, bool) or (isinstance(rank, float) and rank != r):
        raise UsageError(
            f"Monitor: {where} {rank!r} is not a non-negative integer",
            "pass rank= this process's rank (0 when it is the only one)",
        )
    return r


def _as_2d(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise UsageError(
            f"Monitor.update: {name} is a {type(x).__name__}", "pass a torch tensor [B, T] or a list of 1-D tensors"
        )
    if x.dim() != 2:
        raise UsageError(
            f"Monitor.update: {name} has shape {tuple(x.shape)}", "pass [B, T] tensors (or a list of 1-D tensors)"
        )
    return x


class Monitor:
    """Per-step mismatch of a training loop, logged to a run folder that `trm-diag trend` and `gate` read.

    out: the run folder (None: nothing written); thresholds: Thresholds or a dict of its fields; horizons: the
    T's of B*; criterion: the mask ``res.mask`` applies (trm_max, trm_avg, combined, ln_trm, ser, dppo_tv,
    dppo_kl); rank: this process's rank (default: torch.distributed's, else $RANK, else 0; each rank writes its
    own parts, readers merge them); cpu_threads: torch's CPU threads while an update computes (default 1: at a
    step's size intra-op threads cost more than they give, and on a busy host far more; None leaves torch's)."""

    def __init__(
        self,
        out: str | Path | None = None,
        thresholds: Thresholds | dict[str, float] | None = None,
        horizons: tuple[int, ...] | list[int] = DEFAULT_HORIZONS,
        *,
        criterion: str = DEFAULT_CRITERION,
        rank: int | None = None,
        trend: TrendConfig | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        if isinstance(thresholds, dict):
            bad = sorted(set(thresholds) - set(Thresholds.__dataclass_fields__))
            if bad:
                raise UsageError(
                    f"Monitor: unknown threshold '{bad[0]}'", f"use {', '.join(Thresholds.__dataclass_fields__)}"
                )
            thresholds = Thresholds(**thresholds)
        self.thresholds = thresholds or Thresholds()
        if criterion not in MASKS:
            raise UsageError(f"Monitor: criterion '{criterion}' is unknown", f"use one of: {', '.join(MASKS)}")
        hs = tuple(int(h) for h in horizons)
        if not hs or any(h < 1 for h in hs):
            raise UsageError(
                f"Monitor: horizons {tuple(horizons)} must be positive integers", "e.g. horizons=(4096, 16384)"
            )
        self.horizons, self.criterion, self.rank = hs, criterion, _rank(rank)
        self.trend = trend or TrendConfig()
        self.cpu_threads = cpu_threads
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY}
        self.writer = None
        self.attempt = 1
        self.closed = False
        # the step being logged: (step, n_layers, lengths, token columns) of its updates so far, so that consecutive
        # updates of one step (micro-batches, gradient accumulation) log the whole step, not the last piece
        self._current: tuple[int, int, np.ndarray, dict[str, np.ndarray]] | None = None
        if out is not None:
            from trm_diag.report.run_log import RunWriter, read_run

            meta = {"thresholds": as_dict(self.thresholds), "horizons": list(hs), "criterion": criterion,
                    "fidelity": FIDELITY, "length_edges": list(LENGTH_EDGES)}  # fmt: skip
            self.writer = RunWriter(out, self.rank, meta)
            self.out = self.writer.root
            mine = read_run(self.out).by_rank
            if not mine.empty:  # this rank's rows, one per step (a step written twice: its latest row)
                mine = mine[mine["rank"] == self.rank].sort_values(["step", "written"], kind="stable")
                mine = mine.drop_duplicates("step", keep="last")
            if not mine.empty:  # a continued run: the trend rules see its earlier steps
                self.attempt = int(mine["attempt"].max()) + 1 if "attempt" in mine else 2
                for k in HISTORY:
                    self.history[k] = [float(v) for v in mine[k]] if k in mine else [float("nan")] * len(mine)

    # ------------------------------------------------------------------ inputs
    def _flat(self, lp_roll: Any, lp_train: Any, mask: Any, kept_mass: Any, routed: tuple[Any, Any]) -> tuple:
        """(lengths [B], token arrays {name: [N] float64}, layout) with one device-to-host copy."""
        ragged = isinstance(lp_roll, (list, tuple))
        if ragged:
            if not isinstance(lp_train, (list, tuple)) or len(lp_train) != len(lp_roll):
                raise UsageError(
                    "Monitor.update: logp_rollout is a list, logp_train is not one of the same length",
                    "pass two lists of 1-D tensors, one per sequence",
                )
            if not lp_roll:
                raise UsageError("Monitor.update: no sequences", "pass at least one sequence")
            for i, (a, b) in enumerate(zip(lp_roll, lp_train)):
                if (
                    not isinstance(a, torch.Tensor)
                    or not isinstance(b, torch.Tensor)
                    or a.dim() != 1
                    or a.shape != b.shape
                ):
                    raise UsageError(
                        f"Monitor.update: sequence {i}'s log-probs are not two 1-D tensors of one length",
                        "pass matching 1-D tensors per sequence",
                    )
            lengths = [int(a.shape[0]) for a in lp_roll]
            device = lp_roll[0].device
            parts = {"lp_roll": torch.cat(list(lp_roll)), "lp_train": torch.cat(list(lp_train))}
            if kept_mass is not None:
                if (
                    not isinstance(kept_mass, (list, tuple))
                    or len(kept_mass) != len(lengths)
                    or any(
                        not isinstance(k, torch.Tensor) or tuple(k.shape) != (n,) for k, n in zip(kept_mass, lengths)
                    )
                ):
                    raise UsageError(
                        "Monitor.update: kept_mass is not a list of 1-D tensors of the log-probs' lengths",
                        "pass the sampler's kept mass per token, one 1-D tensor per sequence",
                    )
                parts["kept_mass"] = torch.cat(list(kept_mass))
            flips = _flips(*routed, ragged=True)
            if flips is not None:
                parts["route_flips"] = flips
            names = list(parts)
            host = _to_host(parts, names, device)
            n = sum(lengths)
            cols = {k: host[i * n : (i + 1) * n].numpy() for i, k in enumerate(names)}
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for k in ("lp_roll", "lp_train"):
                _refuse_bad_logprobs(k, cols[k], offsets=offsets)
            return np.asarray(lengths, dtype=np.int64), cols, ("ragged", lengths, device)
        lp_roll, lp_train = _as_2d(lp_roll, "logp_rollout"), _as_2d(lp_train, "logp_train")
        if lp_roll.shape != lp_train.shape:
            raise UsageError(
                f"Monitor.update: logp_rollout {tuple(lp_roll.shape)} and logp_train {tuple(lp_train.shape)} differ in shape",
                "pass both sides' log-probs of the same tokens, [B, T]",
            )
        B, T = lp_roll.shape
        if B == 0:
            raise UsageError("Monitor.update: no sequences (B = 0)", "pass at least one sequence")
        if mask is None:
            mask = torch.ones_like(lp_roll, dtype=torch.bool)
        elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UsageError(
                f"Monitor.update: mask {shape} is not [B, T] = {(B, T)}",
                "pass the response mask of the log-probs, [B, T]",
            )
        parts = {"lp_roll": lp_roll, "lp_train": lp_train, "mask": mask}
        if kept_mass is not None:
            if not isinstance(kept_mass, torch.Tensor) or tuple(kept_mass.shape) != (B, T):
                shape = tuple(kept_mass.shape) if isinstance(kept_mass, torch.Tensor) else type(kept_mass).__name__
                raise UsageError(
                    f"Monitor.update: kept_mass {shape} is not [B, T] = {(B, T)}",
                    "pass the sampler's kept mass per token, [B, T]",
                )
            parts["kept_mass"] = kept_mass
        flips = _flips(*routed, ragged=False, shape=(B, T))
        if flips is not None:
            parts["route_flips"] = flips
        names = list(parts)
        device = lp_roll.device
        host = _to_host(parts, names, device)
        full = host.numpy().reshape(len(names), B, T)
        keep = full[names.index("mask")] != 0
        lengths = keep.sum(axis=1).astype(np.int64)
        for k in ("lp_roll", "lp_train"):  # padding may hold anything; the response's tokens may not
            _refuse_bad_logprobs(k, full[names.index(k)], keep=keep)
        cols = {k: full[i][keep] for i, k in enumerate(names) if k != "mask"}  # row-major: sequence after sequence
        return lengths, cols, ("padded", keep, device)

    # ------------------------------------------------------------------ update
    def update(
        self,
        step: int,
        logp_rollout: Any,
        logp_train: Any,
        mask: Any = None,
        *,
        seq_ids: Any = None,
        kept_mass: Any = None,
        routed_rollout: Any = None,
        routed_train: Any = None,
        advantages: Any = None,
    ) -> MonitorResult:
        """Score one step's batch: log-probs of the sampled tokens from the sampler (logp_rollout) and the trainer
        (logp_train), [B, T] with the response mask [B, T] (or lists of 1-D tensors, one per sequence). kept_mass
        (same layout): the sampler's kept mass M_t under top-p / top-k; routed_rollout / routed_train [B, T, layers,
        k] (or per sequence [T, layers, k]): MoE expert ids per token; advantages [B] or [B, T]: the direction
        DPPO's mask tests. Logs the step's row when the Monitor has a folder."""
        if self.closed:
            raise UsageError(
                "Monitor.update after close()", "open a new Monitor on the same folder to continue the run"
            )
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise UsageError(f"Monitor.update: step {step!r} is not a non-negative integer", "pass the training step")
        step = int(step)
        lengths, cols, layout = self._flat(logp_rollout, logp_train, mask, kept_mass, (routed_rollout, routed_train))
        if seq_ids is not None and len(seq_ids) != len(lengths):
            raise UsageError(
                f"Monitor.update: {len(seq_ids)} seq_ids for {len(lengths)} sequences", "pass one id per sequence"
            )
        n_layers = _n_layers(routed_rollout)
        all_lengths, all_cols = lengths, cols
        prev = self._current
        again = prev is not None and prev[0] == step and prev[1] == n_layers and set(prev[3]) == set(cols)
        if again:  # another piece of the step just logged: the row is the step's batch so far
            all_lengths = np.concatenate([prev[2], lengths])
            all_cols = {k: np.concatenate([prev[3][k], cols[k]]) for k in cols}
        self._current = (step, n_layers, all_lengths, all_cols)
        with _cpu_threads(self.cpu_threads):
            row, seqs, tok, buckets = step_metrics(
                all_cols["lp_roll"], all_cols["lp_train"], all_lengths, self.thresholds, self.horizons,
                kept_mass=all_cols.get("kept_mass"), route_flips=all_cols.get("route_flips"), n_layers=n_layers,
            )  # fmt: skip
        if again:  # this piece's sequences and tokens are the last ones: its mask is theirs
            n_seq, n_tok = len(lengths), int(lengths.sum())
            seqs = {k: v[len(v) - n_seq :] for k, v in seqs.items() if len(v) == len(all_lengths)}
            tok = {k: v[len(v) - n_tok :] for k, v in tok.items() if len(v) == int(all_lengths.sum())}
        row = {"step": step, "attempt": self.attempt, "time": time.time(), **row}
        keep = self._mask(seqs, tok, layout, advantages, lengths)
        flags = self._flags(row, replace=again)
        if self.writer is not None:
            self.writer.append(row, buckets)
        inputs = {k: row[k] for k in INPUTS}
        bstar: dict[int | str, float] = {"obs": row["bstar_obs"], **{T: row[f"bstar@{T}"] for T in self.horizons}}
        acceptance = {c: row[f"accept_{c}"] for c in CRITERIA}
        return MonitorResult(step, self.criterion, row, inputs, bstar, acceptance, keep, flags, seq_ids)

    def _mask(self, seqs: dict, tok: dict, layout: tuple, advantages: Any, lengths: np.ndarray) -> Any:
        kind, shape, device = layout
        if self.criterion not in DPPO:
            keep = torch.from_numpy(np.ascontiguousarray(seqs[f"accept_{self.criterion}"], dtype=bool))
            return keep.to(device)
        adv = None
        if advantages is not None:  # per sequence [B] or per token [B, T] -> per flat token
            a = (
                advantages.detach().double().cpu().numpy()
                if isinstance(advantages, torch.Tensor)
                else np.asarray(advantages, np.float64)
            )
            B = len(lengths)
            if a.ndim == 2 and a.shape[1] == 1:  # [B, 1], as a loss broadcasts it
                a = a[:, 0]
            if a.ndim == 1 and a.shape[0] == B:
                adv = np.repeat(a, lengths)
            elif kind == "padded" and a.shape == shape.shape:
                adv = a[shape]
            else:
                want = f"[B] = [{B}]" if kind == "ragged" else f"[B] = [{B}] or [B, T] = {list(shape.shape)}"
                raise UsageError(
                    f"Monitor.update: advantages {tuple(a.shape)} are not {want}",
                    "pass one advantage per sequence (or per token for [B, T] inputs)",
                )
        flat = dppo_token_mask(tok, self.thresholds, self.criterion, adv)
        if kind == "padded":
            out = np.ones(shape.shape, dtype=bool)
            out[shape] = flat
            return torch.from_numpy(out).to(device)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [torch.from_numpy(flat[a:b].copy()).to(device) for a, b in zip(offsets[:-1], offsets[1:])]

    def _flags(self, row: dict[str, Any], replace: bool = False) -> list[Flag]:
        """The trend rules at this step, against this rank's earlier steps (docs/trend.md); replace: the row is
        the step of the last update, grown by another piece."""
        if replace:
            for k in HISTORY:
                self.history[k].pop()
        elif self.history["step"] and self.history["step"][-1] >= row["step"]:
            # a job resumed from an earlier checkpoint: the steps from here on were abandoned, they are no history
            kept = [i for i, s in enumerate(self.history["step"]) if s < row["step"]]
            self.history = {k: [v[i] for i in kept] for k, v in self.history.items()}
        for k in HISTORY:
            self.history[k].append(float(row.get(k, float("nan"))))
        steps = np.asarray(self.history["step"], dtype=np.int64)
        i = len(steps) - 1
        out = []
        for m in SPIKE_METRICS:
            v = np.asarray(self.history[m])
            hit, z, med = is_spike(v, i, self.trend)
            if hit:
                out.append(Flag("spike", m, row["step"], row["step"], float(v[i]), {"z": z, "median": med},
                                f"step {row['step']}: {m} {v[i]:.3g} against a trailing median {med:.3g} (robust z {z:.3g})"))  # fmt: skip
        for m in DRIFT_METRICS:
            d = drift_at(steps, np.asarray(self.history[m]), i, self.trend)
            if d is not None:
                out.append(Flag("drift", m, row["step"], row["step"], float(row[m]), d,
                                f"step {row['step']}: {m} rises {d['per_100_steps']:.3g} per 100 steps"))  # fmt: skip
        for c in ACCEPT_CRITERIA:
            v = row.get(f"accept_{c}", float("nan"))
            if v < self.trend.acceptance:
                out.append(Flag("acceptance", f"accept_{c}", row["step"], row["step"], float(v), {},
                                f"step {row['step']}: accept_{c} {v:.1%} is below {self.trend.acceptance:.0%}"))  # fmt: skip
        return out

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Compact this rank's parts; later updates are refused. Safe to call twice."""
        if not self.closed and self.writer is not None:
            self.writer.compact()
            self.writer.release()
        self.closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to n for the block, then the caller's count again (None: left as it is)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _n_layers(routed: Any) -> int:
    if routed is None:
        return 0
    x = routed[0] if isinstance(routed, (list, tuple)) else routed
    return int(x.shape[-2])


def _flips(rr: Any, rt: Any, *, ragged: bool, shape: tuple[int, int] | None = None) -> torch.Tensor | None:
    """Layers whose expert set differs, per token ([B, T] or flat [N]), computed where the ids live."""
    if rr is None and rt is None:
        return None
    if rr is None or rt is None:
        raise UsageError(
            "Monitor.update: routed_rollout and routed_train come together", "pass both sides' expert ids, or neither"
        )
    if ragged:
        rr, rt = torch.cat(list(rr)), torch.cat(list(rt))  # (N, layers, k)
    if rr.shape != rt.shape or rr.dim() != (3 if ragged else 4) or (shape is not None and tuple(rr.shape[:2]) != shape):
        want = "[N, layers, k] per sequence" if ragged else "[B, T, layers, k]"
        raise UsageError(
            f"Monitor.update: routed_rollout {tuple(rr.shape)} and routed_train {tuple(rt.shape)} are not both {want}",
            "pass each side's expert ids per token and layer",
        )
    a = rr.sort(dim=-1).values
    b = rt.to(rr.device).sort(dim=-1).values
    return (a != b).any(dim=-1).sum(dim=-1)  # (..., ) layers flipped per token


def _to_host(parts: dict[str, torch.Tensor], names: list[str], device: Any) -> torch.Tensor:
    """The inputs as one flat float64 host tensor: one device-to-host copy. Detached: a loop passes the trainer's
    log-probs with their graph, and the Monitor only reads them."""
    return torch.cat([parts[k].detach().reshape(-1).to(device=device, dtype=torch.float64) for k in names]).cpu()


def _bad_logprob(x: np.ndarray) -> np.ndarray:
    """A log-prob no sampled token can have: NaN or +inf (-inf is a token one side gives probability 0)."""
    return np.isnan(x) | (x == np.inf)


def _refuse_bad_logprobs(name: str, x: np.ndarray, *, keep: Any = None, offsets: Any = None) -> None:
    """UsageError when a response token's log-prob is NaN or +inf (its numbers would be dropped from the row or
    make it infinite). x: [B, T] with the response mask ``keep``, or flat [N] with the sequences' ``offsets``."""
    bad = _bad_logprob(x) if keep is None else _bad_logprob(x) & keep
    if not bad.any():
        return
    if keep is not None:
        seq, pos = (int(v) for v in np.argwhere(bad)[0])
        value = x[seq, pos]
    else:
        i = int(np.flatnonzero(bad)[0])
        seq = int(np.searchsorted(offsets, i, "right")) - 1
        pos, value = i - int(offsets[seq]), x[i]
    side = "logp_rollout" if name == "lp_roll" else "logp_train"
    raise UsageError(
        f"Monitor.update: {side} is {value} at {int(bad.sum())} response token(s) (first: sequence {seq}, "
        f"position {pos})",
        "mask those positions out (mask = 0), or find where the NaN / inf comes from",
    )
