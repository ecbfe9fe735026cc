"""Which exact-tier kernel to run: the name's validation, without importing torch (the CLI checks
TRM_DIAG_KERNEL before any work; divergence.kernel_for maps the name to a function)."""

from __future__ import annotations

import os

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
