"""torch.compile of the eager kernel: three fused passes per row, any device; eager if it cannot compile."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trm_diag.kernels.eager import fused_rows

_COMPILED: dict[str, Callable | None] = {}


def compiled_rows() -> Callable | None:
    """torch.compile of fused_rows, rows dynamic so any chunk runs it; None if unavailable."""
    if "fn" not in _COMPILED:
        compiled = torch.compile(fused_rows, dynamic=False)

        def guarded(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor):
            try:
                for t in (a, b, y):  # one kernel for every row count (V stays static: vectorised rows)
                    torch._dynamo.mark_dynamic(t, 0)
                return compiled(a, b, y)
            except Exception:  # no C++ toolchain or an inductor failure: eager from now on
                _COMPILED["fn"] = None
                return fused_rows(a, b, y)

        _COMPILED["fn"] = guarded
    return _COMPILED["fn"]
