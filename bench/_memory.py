"""Peak resident-memory growth of a call, sampled every 2 ms (shared by the bench scripts)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra MiB over the RSS at the call's start)."""
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    return out, dt, max(0, peak[0] - base) / 2**20
