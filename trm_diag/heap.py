"""Give freed memory back to the operating system (glibc only; a no-op elsewhere).

glibc raises its mmap threshold after the first large free, so later large temporaries (row
chunks of logits, token columns) come from the heap and fragment it: the process keeps
growing although nothing is held. Scoring and report assembly call :func:`release_heap`
between chunks (measured in bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

_LIBC: Any = None


def release_heap() -> None:
    """malloc_trim(0): hand the heap's free pages back to the OS."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe that this is glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
