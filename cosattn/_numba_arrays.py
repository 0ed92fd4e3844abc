"""Numba device arrays as cosattn's native CUDA arrays, for machines where CuPy cannot run.

:func:`cosattn._device.namespace` hands this module out as the array namespace of a CUDA device
when CuPy is missing or sees no GPU, and always under the Numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). It offers the few array-API functions the validation and
allocation code uses (``empty``, ``zeros``, ``astype``, ``copy``, ``permute_dims``), plus the
conversions between Numba arrays and other CUDA arrays (``__cuda_array_interface__``).

Numba's ``DeviceNDArray`` cannot transpose more than two axes; :func:`permute_dims` builds the
strided view over the same memory instead (the simulator's arrays are NumPy arrays inside).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np
from numba import config, cuda


def is_numba_array(x: Any) -> bool:
    """Whether ``x`` is a Numba device array (or the simulator's stand-in for one)."""
    return getattr(type(x), "__cuda_ndarray__", False) is True


def device_index(x: Any) -> int:
    """The CUDA ordinal of the device holding Numba array ``x`` (0 in the simulator)."""
    if config.ENABLE_CUDASIM:
        return 0
    return int(x.gpu_data.context.device.id)


def stream_handle(x: Any) -> int:
    """The raw handle of the stream ``x`` is bound to (0, the default stream, when unbound)."""
    return 0 if x.stream == 0 else int(x.stream)


def from_cuda_array(x: Any) -> Any:
    """A Numba view of any ``__cuda_array_interface__`` array (CuPy, torch); no copy, no sync."""
    return cuda.as_cuda_array(x, sync=False)


def _synchronised(x: Any) -> None:
    if x.stream != 0:
        x.stream.synchronize()


def empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised C-contiguous device array."""
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def zeros(shape: tuple[int, ...], dtype: Any) -> Any:
    """A device array of zeros (written from the host)."""
    return cuda.to_device(np.zeros(shape, dtype=np.dtype(dtype)))


def astype(x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
    """``x`` in ``dtype``, as a new array unless ``copy=False`` and the dtype already matches.

    Copies stay on the device (on ``x``'s stream); so do changes of dtype of 1-D arrays between
    NumPy's bool, integer and float dtypes (``cu_seqlens``, ``state_indices``, counts, ``m``),
    which a small kernel casts: nothing waits for the host. Other changes of dtype (bfloat16)
    go through the host.
    """
    dtype = np.dtype(dtype)
    if dtype == x.dtype:
        if not copy:
            return x
        out = cuda.device_array(x.shape, dtype=dtype, stream=x.stream)
        out.copy_to_device(x, stream=x.stream)
        return out
    if x.ndim == 1 and {x.dtype.kind, dtype.kind} <= set("biuf"):
        out = cuda.device_array(x.shape, dtype=dtype, stream=x.stream)
        if x.shape[0]:
            _cast(np.dtype(x.dtype), dtype)[-(-x.shape[0] // 128), 128, x.stream](x, out)
        return out
    host = x.copy_to_host(stream=x.stream)
    _synchronised(x)
    return cuda.to_device(host.astype(dtype), stream=x.stream)


@functools.cache
def _cast(source: np.dtype, target: np.dtype) -> Any:
    """A kernel ``out[i] = x[i]`` from 1-D ``source`` to 1-D ``target``, compiled on first use."""

    def cast(x: Any, out: Any) -> None:
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = x[i]

    array = [numba.types.Array(numba.from_dtype(d), 1, "A") for d in (source, target)]
    return cuda.jit(tuple(array))(cast)


def copy(x: Any) -> Any:
    """A new device array with the contents of ``x``."""
    return astype(x, x.dtype)


def permute_dims(x: Any, axes: tuple[int, ...]) -> Any:
    """The view of ``x`` with its axes in the order ``axes`` (same memory, permuted strides)."""
    if config.ENABLE_CUDASIM:
        return x.transpose(axes)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape=tuple(x.shape[a] for a in axes),
                         strides=tuple(x.strides[a] for a in axes), dtype=x.dtype,
                         stream=x.stream, gpu_data=x.gpu_data)
