"""The C kernel on every instruction set the machine's compiler targets: gcc's vectorisation report
says every row loop vectorised, and each target this CPU can run matches a float64 reference."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from trm_diag.kernels import OUTPUTS, native

# targets by machine: a baseline, the wide vector sets, and this CPU
TARGETS = {
    "x86_64": {"x86-64": (), "x86-64-v3": ("avx2", "fma", "bmi2"), "x86-64-v4": ("avx512f", "avx512bw", "avx512vl")},
    "aarch64": {"armv8-a": (), "armv8.2-a+sve": ("sve",)},
}[platform.machine()]


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return {
        f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":")[1].split()
    }


@pytest.mark.parametrize("march", [*TARGETS, "native"])
def test_every_row_loop_vectorises(march):
    """A regression (a conversion with no vector instruction, a branch that does not if-convert) shows
    here: before -fno-trapping-math and the integer-only 2^k, the main pass stayed scalar on AVX2."""
    report = native.vector_report(native._compiler() or "cc", march)
    assert len(report) == 3 and all(report.values()), report


def _reference(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    p, q = lp.exp(), lq.exp()
    rows = torch.arange(len(y))
    return {"kl": (p * (lp - lq)).sum(-1), "kl_rev": (q * (lq - lp)).sum(-1), "tv": 0.5 * (p - q).abs().sum(-1),
            "ent_roll": -(p * lp).sum(-1), "ent_train": -(q * lq).sum(-1), "lp_roll": lp[rows, y],
            "lp_train": lq[rows, y]}  # fmt: skip


@pytest.mark.parametrize("march", [m for m, need in TARGETS.items() if set(need) <= _cpu_flags()])
def test_each_runnable_target_matches_float64(march):
    fn = native.native_rows(march)
    assert fn is not None, f"the C kernel did not build for -march={march}"
    g = torch.Generator().manual_seed(3)
    for V, scale in ((151_936, 4.0), (1_000, 30.0), (37, 1.0)):  # odd widths exercise the vector tails
        a = torch.randn(6, V, generator=g) * scale
        b = a + torch.randn(6, V, generator=g) * 0.03
        y = torch.randint(0, V, (6,), generator=g)
        got, ref = dict(zip(OUTPUTS, fn(a, b, y))), _reference(a, b, y)
        for k in OUTPUTS:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-12, msg=f"{march} {k} V={V}")


def test_a_target_the_compiler_does_not_know_gives_none():
    assert native.native_rows("no-such-cpu") is None
    assert shutil.which(native._compiler() or "cc")
