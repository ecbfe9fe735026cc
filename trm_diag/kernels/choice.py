"""Which exact-tier kernel runs: the name (validated without importing torch, so the CLI checks
TRM_DIAG_KERNEL before any work) and the function it maps to on a device.

``auto`` picks by measurement: the first time a machine needs the exact tier, every kernel available
on the device is timed on the same small block, and the fastest is cached per CPU (or GPU) next to
the built C library, so later runs read the choice back. ``decisions()`` says what was chosen and why
(summary.json: hardware.kernel_choice).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
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
# Below that width, where the measured best is inductor, auto mode compiles once this process has spent this
# many entries (rows x V) in the eager kernel: ~1.5 s of eager work on 2 cores, about what a first compile
# costs, so a run never pays more than twice the best choice made in hindsight (the ski-rental rule).
COMPILE_AFTER_ENTRIES = 1 << 28
EAGER_ENTRIES = [0]  # eager work done by this process (rows x V)
# the measurement: every available kernel on the same block of peaked random logits, best of several
# alternating rounds (a few milliseconds each once built; the first inductor compile takes seconds, once)
MEASURE_ROWS, MEASURE_VOCAB, MEASURE_ROUNDS = 16, 32_768, 5
_DECIDED: dict[str, dict[str, Any]] = {}  # device type -> the measured choice, once per process


def _candidates(device: Any) -> dict[str, Callable]:
    """The kernels that can run on ``device``, by name (native only on a CPU where it builds)."""
    from trm_diag.kernels.compiled import compiled_rows
    from trm_diag.kernels.eager import fused_rows

    out: dict[str, Callable] = {}
    if device.type == "cpu":
        from trm_diag.kernels.native import native_rows

        if (fn := native_rows()) is not None:
            out["native"] = fn
    if (fn := compiled_rows()) is not None:
        out["inductor"] = fn
    out["eager"] = fused_rows
    return out


def _device_text(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from trm_diag.kernels.native import cpu_model

    return f"{cpu_model()} ({platform.machine()})"


def _cache_file(device: Any) -> Path:
    """Where the choice for this device, torch and kernel source is cached (beside the C library)."""
    import torch

    from trm_diag.kernels.native import SOURCE, _cpu, cache_dir

    ident = _cpu() if device.type == "cpu" else _device_text(device)
    key = "\0".join([device.type, ident, platform.machine(), torch.__version__, SOURCE.read_text()])
    return cache_dir() / "kernels" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measure(device: Any) -> dict[str, float]:
    """Rows per second of every available kernel on ``device`` over MEASURE_ROWS x MEASURE_VOCAB rows
    (each built or compiled first, then the best of MEASURE_ROUNDS alternating rounds)."""
    import torch

    from trm_diag.kernels import compiled

    g = torch.Generator().manual_seed(0)
    a = torch.randn(MEASURE_ROWS, MEASURE_VOCAB, generator=g) * 4
    b = (a + torch.randn(MEASURE_ROWS, MEASURE_VOCAB, generator=g) * 0.02).to(device)
    a = a.to(device)
    y = torch.zeros(MEASURE_ROWS, dtype=torch.long, device=device)
    fns = _candidates(device)
    for fn in fns.values():
        fn(a[:2], b[:2], y[:2])  # build / compile / warm up
    if "inductor" in fns and compiled._COMPILED.get("fn") is None:  # it failed to compile: eager in disguise
        del fns["inductor"]
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(MEASURE_ROUNDS):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn(a, b, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: MEASURE_ROWS / max(dt, 1e-9) for name, dt in best.items()}


def measured_choice(device: Any) -> dict[str, Any]:
    """The fastest kernel on ``device``, measured once per machine and cached (cache file, then memory):
    {'kernel', 'rows_per_s', 'block', 'device', 'cache', 'why'}."""
    if device.type in _DECIDED:
        return _DECIDED[device.type]
    path = _cache_file(device)
    try:
        decided = json.loads(path.read_text())  # the same text as the run that measured: reports stay reproducible
    except (OSError, ValueError, KeyError):
        speed = measure(device)
        pick = max(speed, key=speed.get)
        rates = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(speed.items(), key=lambda kv: -kv[1]))
        text = _device_text(device)
        decided = {
            "kernel": pick,
            "rows_per_s": {k: round(v, 1) for k, v in speed.items()},
            "block": [MEASURE_ROWS, MEASURE_VOCAB],
            "device": text,
            "cache": str(path),
            "why": f"auto: measured the fastest on {text} ({MEASURE_ROWS} rows x {MEASURE_VOCAB:,}, rows/s: {rates})",
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(decided, indent=1))
            os.replace(tmp, path)  # concurrent shards: the last writer wins, every reader sees a whole file
        except OSError:
            pass  # a read-only cache: measured again by the next process
    _DECIDED[device.type] = decided
    return decided


def decisions() -> dict[str, dict[str, Any]]:
    """The exact-tier kernel of this process per device type and why: TRM_DIAG_KERNEL when it names one,
    else what auto measured (empty when the exact tier never ran)."""
    asked = kernel_name()
    if asked != "auto":
        return {"any": {"kernel": asked, "why": f"TRM_DIAG_KERNEL={asked}"}}
    return {k: {"kernel": v["kernel"], "why": v["why"]} for k, v in _DECIDED.items()}


def kernel_for(vocab_width: int, device: Any, kernel: str | None = None) -> tuple[str, Callable]:
    """(name, fn(a, b, y) -> [len(OUTPUTS), n]) of the kernel to run, by name or TRM_DIAG_KERNEL (default
    auto): native = the C kernel (CPU only), inductor = torch.compile of the eager kernel (any device),
    eager = torch ops. auto: the measured fastest on this device (measured_choice); where that is
    inductor, eager below COMPILE_MIN_VOCAB columns until COMPILE_AFTER_ENTRIES eager entries are done (a
    first compile takes seconds). Unavailable kernels fall back to inductor, then eager; all agree to ~1e-8."""
    from trm_diag.kernels.compiled import compiled_rows
    from trm_diag.kernels.eager import fused_rows

    name = kernel_name(kernel)
    if name == "auto":
        name = measured_choice(device)["kernel"]
        if name == "inductor" and vocab_width < COMPILE_MIN_VOCAB and EAGER_ENTRIES[0] < COMPILE_AFTER_ENTRIES:
            name = "eager"
    if name == "native" and device.type == "cpu":
        from trm_diag.kernels.native import native_rows

        if (fn := native_rows()) is not None:
            return "native", fn
    fn = None if name == "eager" else compiled_rows()
    return ("inductor", fn) if fn is not None else ("eager", fused_rows)
