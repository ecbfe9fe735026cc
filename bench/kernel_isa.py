"""The C kernel on every instruction-set family: does each row loop vectorise, and is it accurate?

    .venv/bin/python bench/kernel_isa.py

For each target the installed compilers know (x86-64 baseline / AVX2 / AVX-512 with gcc; aarch64
NEON / SVE with aarch64-linux-gnu-gcc when installed: apt install gcc-aarch64-linux-gnu qemu-user):
gcc's vectorisation report per row loop (trm_diag.kernels.native.vector_report), then each target's
outputs on the same random rows against a float64 torch reference, run natively where this CPU
can, and under qemu-aarch64 (emulated: accuracy only, no timing) for aarch64. Speed on this CPU:
bench/divergence_kernel.py.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from trm_diag.kernels import OUTPUTS, native

HARNESS = r"""
#include <stdio.h>
#include "%s"
int main(int argc, char **argv) {
    long n, V; FILE *f = fopen(argv[1], "rb"); fread(&n, 8, 1, f); fread(&V, 8, 1, f);
    float *a = malloc(4 * n * V), *b = malloc(4 * n * V); int64_t *y = malloc(8 * n); double *o = malloc(56 * n);
    fread(a, 4, n * V, f); fread(b, 4, n * V, f); fread(y, 8, n, f); fclose(f);
    trm_rows(a, b, y, n, V, o);
    f = fopen(argv[2], "wb"); fwrite(o, 8, 7 * n, f); fclose(f); return 0;
}
"""
TARGETS = [("gcc", "x86-64"), ("gcc", "x86-64-v3"), ("gcc", "x86-64-v4"), ("gcc", "native"),
           ("aarch64-linux-gnu-gcc", "armv8-a"), ("aarch64-linux-gnu-gcc", "armv8.2-a+sve")]  # fmt: skip


def reference(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    p, q, r = lp.exp(), lq.exp(), torch.arange(len(y))
    cols = [(p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1), 0.5 * (p - q).abs().sum(-1), -(p * lp).sum(-1),
            -(q * lq).sum(-1), lp[r, y], lq[r, y]]  # fmt: skip
    return torch.stack(cols).numpy()


def run_target(cc: str, march: str, a, b, y, tmp: Path) -> np.ndarray | None:
    """The kernel's outputs [7, n] for this target: natively through ctypes, aarch64 under qemu."""
    if cc == "gcc":
        fn = native.native_rows(march)
        return None if fn is None else fn(a, b, y).numpy()
    if not shutil.which("qemu-aarch64"):
        return None
    src, exe, inp, out = tmp / "h.c", tmp / f"h-{march}", tmp / "in.bin", tmp / "out.bin"
    src.write_text(HARNESS % native.SOURCE)
    subprocess.run([cc, "-O3", f"-march={march}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-static",
                    str(src), "-o", str(exe), "-lm"], check=True, capture_output=True)  # fmt: skip
    n, V = a.shape
    inp.write_bytes(
        np.array([n, V], np.int64).tobytes() + a.numpy().tobytes() + b.numpy().tobytes() + y.numpy().tobytes()
    )
    cpu = "max,sve=on" if "sve" in march else "max"
    subprocess.run(["qemu-aarch64", "-cpu", cpu, str(exe), str(inp), str(out)], check=True, timeout=600)
    return np.frombuffer(out.read_bytes(), np.float64).reshape(7, n)


def main() -> None:
    print(f"host: {platform.machine()}, kernel loops at lines {native.row_loops()} of {native.SOURCE.name}")
    g = torch.Generator().manual_seed(0)
    V = 151_936 + 5  # an odd width: vector tails run too
    a = torch.randn(8, V, generator=g) * 4
    a[:2] *= 6
    b = a + torch.randn(8, V, generator=g) * 0.02
    y = torch.randint(0, V, (8,), generator=g)
    ref = reference(a, b, y)
    print(f"\n{'compiler':<24}{'-march':<16}{'row loops vectorised':<24}{'max rel err vs float64':>24}  how run")
    with tempfile.TemporaryDirectory() as tmp:
        for cc, march in TARGETS:
            if not shutil.which(cc):
                print(f"{cc:<24}{march:<16}{'(compiler not installed)':<24}")
                continue
            try:
                report = native.vector_report(cc, march)
            except subprocess.CalledProcessError:
                print(f"{cc:<24}{march:<16}{'(target unknown)':<24}")
                continue
            loops = " ".join(f"{line}:{'yes' if ok else 'NO'}" for line, ok in report.items())
            try:
                got = run_target(cc, march, a, b, y, Path(tmp))
            except (OSError, subprocess.SubprocessError) as e:
                got, how = None, f"could not run ({type(e).__name__})"
            else:
                how = "native" if cc == "gcc" else "qemu-aarch64 (emulated)"
            err = "-" if got is None else f"{float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12))):.1e}"
            print(f"{cc:<24}{march:<16}{loops:<24}{err:>24}  {how if got is not None else 'not run'}")
    print(f"\noutputs: {', '.join(OUTPUTS)}")


if __name__ == "__main__":
    main()
