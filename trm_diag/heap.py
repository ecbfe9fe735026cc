"""The C heap: keep chunk temporaries' pages between chunks, give them back at chosen points.

glibc only (no-ops elsewhere). Two measured effects (bench/RESULTS.md):
- by default glibc maps each large temporary fresh and unmaps it on free, so every eager op on
  a [rows, V] chunk page-faults its output: the eager divergence kernel ran 2.8x slower for
  that alone. :func:`tune_allocator` (called by the CLI at start) raises the mmap and trim
  thresholds so freed chunk buffers are reused;
- served from the heap, temporaries of varying sizes fragment it and the process grows
  although nothing is held, so scoring and report assembly call :func:`release_heap`
  (malloc_trim) between chunks; Arrow is pointed at the same heap (``system`` pool).
"""

from __future__ import annotations

from typing import Any

_LIBC: Any = None


MMAP_THRESHOLD = 32 << 20  # allocations above this (bigger than a row chunk) are still mapped on their own
TRIM_THRESHOLD = 64 << 20  # free memory glibc may keep at the heap's top between ops


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe that this is glibc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def tune_allocator() -> None:
    """Let glibc reuse freed chunk buffers instead of mapping and faulting fresh pages for each op, and
    let Arrow allocate through malloc too (its default mimalloc pool kept ~130 MB more after 20,000
    rollouts' report chunks, which malloc_trim cannot reach)."""
    import os

    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # read when Arrow first allocates
    libc = _libc()
    if libc:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


def release_heap() -> None:
    """malloc_trim(0): hand the heap's free pages back to the OS."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
