"""Where arrays live, and the native arrays cosattn computes on there.

On the CPU native arrays are NumPy arrays. On a CUDA device they are CuPy arrays where CuPy sees
a GPU, else Numba device arrays (:mod:`cosattn._numba_arrays`: no CuPy, or the Numba CUDA
simulator). That choice is made once, by :func:`cuda_native`; everything else asks it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Device:
    """Where an array lives: ``kind`` is ``"cpu"`` or ``"cuda"``; ``index`` the CUDA ordinal."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


class CupyNative:
    """CUDA arrays as CuPy arrays."""

    name = "cupy"

    @property
    def namespace(self) -> Any:
        import cupy

        return cupy

    def adopt(self, x: Any, name: str) -> Any:
        """``x`` (any CUDA array: DLPack or ``__cuda_array_interface__``) as CuPy, no copy."""
        import cupy

        if isinstance(x, cupy.ndarray):
            return x
        return cupy.from_dlpack(x) if hasattr(x, "__dlpack__") else cupy.asarray(x)

    def context(self, index: int) -> contextlib.AbstractContextManager[Any]:
        import cupy

        return cupy.cuda.Device(index)


class NumbaNative:
    """CUDA arrays as Numba device arrays, where CuPy cannot run."""

    name = "numba"

    @property
    def namespace(self) -> Any:
        from . import _numba_arrays

        return _numba_arrays

    def adopt(self, x: Any, name: str) -> Any:
        """``x`` (a ``__cuda_array_interface__`` array) as a Numba array, no copy."""
        from . import _numba_arrays

        if _numba_arrays.is_numba_array(x):
            return x
        if not hasattr(x, "__cuda_array_interface__"):
            raise ValueError(
                f"{name} is a {type(x).__module__}.{type(x).__name__} CUDA array: importing it "
                "needs CuPy (pip install cosattn[cuda13])"
            )
        return _numba_arrays.from_cuda_array(x)

    def context(self, index: int) -> contextlib.AbstractContextManager[Any]:
        from numba import cuda

        return cuda.gpus[index]


@functools.cache
def cuda_native() -> CupyNative | NumbaNative:
    """What native CUDA arrays are here: CuPy's when CuPy sees a GPU, else Numba's."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return NumbaNative()
    try:
        import cupy
    except ImportError:
        return NumbaNative()
    return CupyNative() if cupy.cuda.is_available() else NumbaNative()


def namespace(device: Device) -> Any:
    """The array module for ``device``: NumPy on the CPU, CuPy or :mod:`._numba_arrays` on CUDA."""
    if device.kind == "cpu":
        import numpy

        return numpy
    return cuda_native().namespace


def on_device(device: Device) -> contextlib.AbstractContextManager[Any]:
    """A context that makes ``device`` current (nothing to do on the CPU)."""
    if device.kind == "cpu":
        return contextlib.nullcontext()
    return cuda_native().context(device.index)
