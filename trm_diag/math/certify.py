"""Bit-for-bit certification of a pair meant to be identical: which sampled-token log-probs and which full
rows of the two sides are not bit-equal, how far apart they are, and where the first difference sits.

Two numbers are bit-equal when their IEEE-754 bit patterns are the same (so -0.0 differs from 0.0 and a NaN
equals the same NaN); numbers of two float widths are compared after an exact widening to float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where rows are compared: the gate and `show` read certificates without it
    import torch

ROW_DIFFERS = "row_differs"  # token column (exact tier): the two sides' full rows at that position are not bit-equal
# which sampled-token log-probs the certificate compares, per tier: both computed alike (float64, one kernel)
# from each side's full rows in the exact tier; the engine's recorded value against the trainer's otherwise
PAIRS = {"exact": ("lp_roll_prefill", "lp_train"), "topk": ("lp_roll", "lp_train"), "sampled": ("lp_roll", "lp_train")}
COMPARED = {
    "exact": "the sampled token's log-prob from each side's full rows (a teacher-forced pass of each engine), "
    "computed alike in float64; and the full rows as each backend hands them",
    "topk": "the engine's recorded log-prob of the sampled token against the training side's",
    "sampled": "the engine's recorded log-prob of the sampled token against the training side's",
}


def rows_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) bool: row i of a (n, V) is not bit-equal to row i of b (n, V); rows of two dtypes are widened to
    float64 first (exact), so they are equal only where every value, and the sign of every zero, agree."""
    import torch

    b = b.to(a.device)
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return (a.contiguous().view(bits) != b.contiguous().view(bits)).any(dim=-1).cpu()  # (n,)


def _first(mask: np.ndarray, seq_id: np.ndarray, pos: np.ndarray) -> dict[str, int] | None:
    """(sequence, position) of the first True of mask in report order, None when there is none."""
    hit = np.flatnonzero(mask)
    return None if not len(hit) else {"seq_id": int(seq_id[hit[0]]), "pos": int(pos[hit[0]])}


def certification(tokens: Mapping[str, Any], fidelity: str) -> dict[str, Any]:
    """summary.json `certification`: n_tokens, n_tokens_differing (sampled-token log-probs not bit-equal),
    max_abs_log_ratio (over the same pair; inf where one side is NaN), first_token_differing, and in the exact
    tier n_rows_differing and first_row_differing (None where the token table has no row comparison)."""
    roll, train = PAIRS[fidelity]
    a = np.ascontiguousarray(np.asarray(tokens[roll], dtype=np.float64))
    b = np.ascontiguousarray(np.asarray(tokens[train], dtype=np.float64))
    seq_id, pos = np.asarray(tokens["seq_id"]), np.asarray(tokens["pos"])
    differs = a.view(np.uint64) != b.view(np.uint64)
    with np.errstate(invalid="ignore"):
        gap = np.abs(b[differs] - a[differs])
    gap = np.where(np.isnan(gap), math.inf, gap)  # a NaN on one side: as far apart as can be
    out: dict[str, Any] = {
        "compared": COMPARED[fidelity],
        "log_probs": [roll, train],
        "n_tokens": int(len(a)),
        "n_tokens_differing": int(differs.sum()),
        "max_abs_log_ratio": float(gap.max()) if len(gap) else 0.0,
        "first_token_differing": _first(differs, seq_id, pos),
    }
    if fidelity == "exact":
        rows = np.asarray(tokens[ROW_DIFFERS], dtype=bool) if ROW_DIFFERS in tokens else None
        out["n_rows_differing"] = None if rows is None else int(rows.sum())
        out["first_row_differing"] = None if rows is None else _first(rows, seq_id, pos)
    return out


def bitwise_equal(cert: Mapping[str, Any]) -> bool:
    """Every compared number bit-equal: no differing token, no differing row (exact tier), a zero log ratio."""
    rows_equal = cert.get("n_rows_differing") == 0 if "n_rows_differing" in cert else True  # None: not compared
    return cert.get("n_tokens_differing") == 0 and cert.get("max_abs_log_ratio") == 0 and rows_equal
