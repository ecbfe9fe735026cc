"""Bit-for-bit certification (math/certify.py) against an independent reference: each number's bytes compared
one element at a time (numpy's tobytes), never the code's uint views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trm_diag.math.certify import bitwise_equal, certification, rows_differ


def _rows_differ_ref(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Row i differs when any element's bytes differ (float64 widening for two dtypes: exact)."""
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    if a.dtype == torch.bfloat16:  # numpy has no bfloat16: its 2-byte patterns through int16
        a, b = a.view(torch.int16), b.view(torch.int16)
    x, y = a.numpy(), b.numpy()
    return [any(x[i, j].tobytes() != y[i, j].tobytes() for j in range(x.shape[1])) for i in range(x.shape[0])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_rows_differ_matches_a_per_element_byte_comparison(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 33, generator=g).to(dtype)
    b = a.clone()
    b[1, 5] = (
        torch.nextafter(b[1, 5].float(), torch.tensor(math.inf)).to(dtype) if dtype != torch.bfloat16 else b[1, 5] * 2
    )
    b[3, 0] = -0.0
    a[3, 0] = 0.0  # equal values, different bits: differs
    a[7, 2], b[7, 2] = math.nan, math.nan  # the same NaN: bit-equal
    a[9, 9], b[9, 9] = -math.inf, -math.inf
    got = rows_differ(a, b).tolist()
    assert got == _rows_differ_ref(a, b)
    assert got[1] and got[3] and not got[7] and not got[9] and sum(got) == 2


def test_rows_of_two_dtypes_are_equal_only_where_every_value_is():
    a = torch.tensor([[0.5, -1.25], [0.1, 2.0]], dtype=torch.float32)
    b = a.to(torch.bfloat16)  # 0.5, -1.25 and 2.0 are exact in bf16; 0.1 is not
    assert rows_differ(a, b).tolist() == [False, True] == _rows_differ_ref(a, b)


def test_certification_counts_and_first_place_against_a_byte_reference():
    rng = np.random.default_rng(3)
    n = 200
    a = -rng.exponential(size=n)
    b = a.copy()
    hit = np.sort(rng.choice(n, 17, replace=False))
    b[hit] += rng.normal(scale=1e-6, size=17)
    b[hit[0]] = a[hit[0]]  # not changed after all
    seq_id = np.repeat(np.arange(10), 20)
    pos = np.tile(np.arange(20), 10)
    rows = np.zeros(n, dtype=bool)
    rows[[40, 150]] = True
    tok = {"lp_roll_prefill": a, "lp_train": b, "lp_roll": a + 1.0, "seq_id": seq_id, "pos": pos, "row_differs": rows}
    c = certification(tok, "exact")
    differ = [a[i].tobytes() != b[i].tobytes() for i in range(n)]
    first = differ.index(True)
    assert c["n_tokens_differing"] == sum(differ) == 16
    assert c["first_token_differing"] == {"seq_id": int(seq_id[first]), "pos": int(pos[first])}
    assert c["max_abs_log_ratio"] == max(abs(float(b[i]) - float(a[i])) for i in range(n) if differ[i])
    assert c["n_rows_differing"] == 2 and c["first_row_differing"] == {"seq_id": 2, "pos": 0}
    assert not bitwise_equal(c)
    # the sampled tier compares the engine's recorded value (lp_roll) and has no rows
    s = certification(tok, "sampled")
    assert s["n_tokens_differing"] == n and "n_rows_differing" not in s


def test_equal_pairs_certify_and_a_nan_side_is_infinitely_far():
    a = np.array([-0.5, -1.0, -2.0])
    tok = {"lp_roll_prefill": a, "lp_train": a.copy(), "seq_id": np.zeros(3), "pos": np.arange(3),
           "row_differs": np.zeros(3, dtype=bool)}  # fmt: skip
    c = certification(tok, "exact")
    assert bitwise_equal(c) and c["n_tokens_differing"] == 0 and c["first_token_differing"] is None
    tok["lp_train"] = np.array([-0.5, math.nan, -2.0])
    c = certification(tok, "exact")
    assert c["n_tokens_differing"] == 1 and c["max_abs_log_ratio"] == math.inf
    # no row comparison in an exact report: not certified
    del tok["row_differs"]
    tok["lp_train"] = a.copy()
    c = certification(tok, "exact")
    assert c["n_rows_differing"] is None and not bitwise_equal(c)
