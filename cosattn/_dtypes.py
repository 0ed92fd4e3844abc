"""The dtypes cosattn takes and the precision it computes in (docs/spec.md, "Numbers")."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
INPUT_DTYPES = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)
STATE_DTYPES = (FLOAT32, FLOAT64)


def accumulation(dtype: Any) -> np.dtype:
    """What sums and states are kept in: float64 for float64 inputs, else float32."""
    return FLOAT64 if np.dtype(dtype) == FLOAT64 else FLOAT32


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype NumPy knows, bfloat16 included."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == BFLOAT16
