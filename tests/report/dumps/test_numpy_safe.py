"""A dump's pickle may build numpy's shared built-in numeric dtypes and their scalars, nothing else: a fresh
object dtype (np.dtype('O', False, True) plus a __setstate__) would make numpy read file bytes as object
pointers (a segfault seen before this guard)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from trm_diag.report.dumps import skyrl, slime
from trm_diag.report.dumps._numpy_safe import builtin_dtype, numeric_scalar


class EvilDtype:
    def __reduce__(self):
        return (np.dtype, ("O", False, True), (3, "|", None, None, None, -1, -1, 0))


def test_only_builtin_numeric_dtypes_and_scalars():
    assert builtin_dtype("f4", False, True) is np.dtype("f4")  # the shared instance, whatever the copy flag
    assert numeric_scalar(np.dtype("f8"), np.float64(0.5).tobytes()) == 0.5
    for spec in ("O", "V8", "S4", "U2", [("a", "O")]):
        with pytest.raises(pickle.UnpicklingError):
            builtin_dtype(spec)
    with pytest.raises(pickle.UnpicklingError):
        numeric_scalar(np.dtype("f8"), b"\x00" * 3)


def test_skyrl_unpickler_refuses_a_fresh_object_dtype():
    data = pickle.dumps({"dtype": EvilDtype(), "real": np.float64(0.25)})
    with pytest.raises(pickle.UnpicklingError, match="numpy dtype 'O'"):
        skyrl._Unpickler(io.BytesIO(data)).load()
    assert skyrl._Unpickler(io.BytesIO(pickle.dumps({"x": np.float32(1.5)}))).load() == {"x": 1.5}


def test_slime_loader_refuses_a_fresh_object_dtype(tmp_path):
    bad, good = tmp_path / "bad.pt", tmp_path / "good.pt"
    torch.save({"samples": [], "dtype": EvilDtype()}, bad)
    torch.save({"samples": [], "reward": np.float64(0.75), "experts": np.arange(6, dtype=np.int32).reshape(2, 3)}, good)
    with torch.serialization.safe_globals(slime._numpy_globals()):
        with pytest.raises(pickle.UnpicklingError, match="numpy dtype 'O'"):
            torch.load(bad, weights_only=True)
        ok = torch.load(good, weights_only=True)
    assert ok["reward"] == 0.75 and ok["experts"].tolist() == [[0, 1, 2], [3, 4, 5]]
