"""The only numpy constructors a dump's pickle may call: dtypes that are numpy's shared built-in numeric ones
(their state cannot be changed by a pickle's BUILD), and scalars of those dtypes. A pickle can otherwise ask
numpy for a fresh dtype copy, give it object fields through ``__setstate__`` and make numpy read file bytes as
object pointers (a crash, or worse)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex: no object, void or string fields


def builtin_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """np.dtype(spec) for a built-in numeric spec only (numpy pickles dtypes as dtype(spec, align, copy)); the
    copy flag is ignored, so the shared instance comes back and a pickle's state for it is ignored."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"asks for a numpy dtype from {type(spec).__name__}")
    try:
        dt = np.dtype(spec)
    except TypeError as e:
        raise pickle.UnpicklingError(f"asks for the numpy dtype {spec!r} ({e})") from None
    if dt.isbuiltin != 1 or dt.kind not in NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"asks for the numpy dtype {spec!r}, which a dump never holds")
    return dt


def numeric_scalar(dtype: Any, data: Any = None) -> Any:
    """A numpy scalar (numpy pickles them as scalar(dtype, bytes)) of a built-in numeric dtype only."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]

    if not isinstance(dtype, np.dtype) or dtype.isbuiltin != 1 or dtype.kind not in NUMERIC_KINDS:
        raise pickle.UnpicklingError("asks for a numpy scalar of a dtype a dump never holds")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("asks for a numpy scalar from bytes that do not fit its dtype")
    return scalar(dtype, data)
