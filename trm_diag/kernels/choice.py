"""Which exact-tier kernel runs: the name (validated without importing torch, so the CLI checks
TRM_DIAG_KERNEL before any work) and the function it maps to on a device."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from trm_diag.errors import UsageError

KERNELS = ("auto", "native", "inductor", "eager")


def kernel_name(kernel: str | None = None) -> str:
    """The kernel asked for: `kernel`, else TRM_DIAG_KERNEL, else auto; a UsageError names a bad value."""
    name = (kernel or os.environ.get("TRM_DIAG_KERNEL", "") or "auto").strip().lower()
    if name not in KERNELS:
        raise UsageError(
            f"TRM_DIAG_KERNEL={name!r} is not a kernel", f"set it to one of {', '.join(KERNELS)}, or unset it"
        )
    return name


COMPILE_MIN_VOCAB = 16_384  # auto mode compiles the kernel from this width up (Llama-2 32,000 to Qwen 151,936)
# Below that width, auto mode compiles once this process has spent this many entries (rows x V) in the
# eager kernel: ~1.5 s of eager work on 2 cores, about what a first compile costs, so a run never pays
# more than twice the best choice made in hindsight (the ski-rental rule), and short runs never compile.
COMPILE_AFTER_ENTRIES = 1 << 28
EAGER_ENTRIES = [0]  # eager work done by this process (rows x V)


def kernel_for(vocab_width: int, device: Any, kernel: str | None = None) -> tuple[str, Callable]:
    """(name, fn(a, b, y) -> [len(OUTPUTS), n]) of the kernel to run, by name or TRM_DIAG_KERNEL (default
    auto): native = the C kernel (CPU only; ~1.7x inductor), inductor = torch.compile of the eager kernel
    (any device), eager = torch ops. auto: native on CPU; elsewhere, or without a C compiler, inductor
    from COMPILE_MIN_VOCAB columns or once COMPILE_AFTER_ENTRIES eager entries are done (a first compile
    takes seconds), eager before that. Unavailable kernels fall back in that order; all agree to ~1e-8."""
    from trm_diag.kernels.compiled import compiled_rows
    from trm_diag.kernels.eager import fused_rows

    name = kernel_name(kernel)
    if name in ("auto", "native") and device.type == "cpu":
        from trm_diag.kernels.native import native_rows

        if (fn := native_rows()) is not None:
            return "native", fn
    eager_first = name == "auto" and vocab_width < COMPILE_MIN_VOCAB and EAGER_ENTRIES[0] < COMPILE_AFTER_ENTRIES
    fn = None if name == "eager" or eager_first else compiled_rows()
    return ("inductor", fn) if fn is not None else ("eager", fused_rows)
