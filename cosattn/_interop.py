"""Arrays in and out of cosattn.

Any DLPack array becomes a *native* array without a copy: a NumPy array on the CPU, a CuPy array
on a CUDA device. Where CuPy cannot run (not installed, no GPU it can see, or the Numba CUDA
simulator), CUDA arrays are Numba device arrays instead (:mod:`cosattn._numba_arrays`), imported
through ``__cuda_array_interface__``. Results go back to the caller's framework through that
framework's importer. bfloat16 crosses DLPack as 16-bit integers, since NumPy has no DLPack code
for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._dtypes import BFLOAT16, INPUT_DTYPES

FLOAT_DTYPES = INPUT_DTYPES

_DLPACK_CPU, _DLPACK_CUDA = 1, 2


@dataclass(frozen=True)
class Device:
    """Where an array lives: ``kind`` is ``"cpu"`` or ``"cuda"``; ``index`` the CUDA ordinal."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


@dataclass(frozen=True)
class Imported:
    """A caller's array seen as a native one: ``array`` is a NumPy or CuPy array sharing its memory.

    ``framework`` names the caller's framework, which results are returned to; ``stream`` is the
    raw CUDA stream handle the caller is working on (None on the CPU).
    """

    array: Any
    framework: str
    device: Device
    stream: int | None = None


def _root_module(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


@functools.cache
def cuda_library() -> str:
    """What native CUDA arrays are here: ``"cupy"`` when CuPy sees a GPU, else ``"numba"``."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "numba"
    try:
        import cupy
    except ImportError:
        return "numba"
    return "cupy" if cupy.cuda.is_available() else "numba"


def _numba_import(bits: Any, framework: str, index: int, stream: int | None,
                  bf16: bool) -> Imported:
    """Import a ``__cuda_array_interface__`` array (bfloat16 as int16 ``bits``) as a Numba one."""
    from . import _numba_arrays

    array = _numba_arrays.from_cuda_array(bits)
    return Imported(array.view(BFLOAT16) if bf16 else array, framework, Device("cuda", index),
                    stream)


def _is_numba(x: Any) -> bool:
    return _root_module(x) == "numba" and getattr(type(x), "__cuda_ndarray__", False) is True


def _torch_import(x: Any, name: str) -> Imported:
    import torch

    if x.requires_grad:
        raise ValueError(
            f"{name} requires grad: cosattn does not record autograd, pass {name}.detach() "
            "(examples/torch_autograd.py wraps forward/backward in a torch.autograd.Function)"
        )
    bf16 = x.dtype == torch.bfloat16
    bits = x.view(torch.int16) if bf16 else x
    if x.device.type == "cpu":
        array = np.from_dlpack(bits)
        return Imported(array.view(BFLOAT16) if bf16 else array, "torch", CPU)
    if x.device.type == "cuda":
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if cuda_library() == "numba":
            return _numba_import(bits, "torch", x.device.index, stream, bf16)
        import cupy

        array = cupy.from_dlpack(bits)
        device = Device("cuda", x.device.index)
        return Imported(array.view(BFLOAT16) if bf16 else array, "torch", device, stream)
    raise ValueError(f"{name} is a torch tensor on {x.device}; cosattn runs on cpu and cuda")


def _jax_import(x: Any, name: str) -> Imported:
    (device,) = x.devices()
    if device.platform == "cpu":
        return Imported(np.asarray(x), "jax", CPU)
    if device.platform in ("gpu", "cuda"):
        if cuda_library() == "numba":
            raise ValueError(
                f"{name} is a JAX CUDA array: importing it needs CuPy (cosattn[cuda13])"
            )
        import cupy

        return Imported(cupy.from_dlpack(x), "jax", Device("cuda", device.id), None)
    raise ValueError(f"{name} is a JAX array on {device.platform}; cosattn runs on cpu and cuda")


def import_array(x: Any, name: str) -> Imported:
    """See ``x`` as a native array without copying it; ``name`` is used in error messages."""
    if isinstance(x, np.ndarray):
        return Imported(x, "numpy", CPU)
    root = _root_module(x)
    if root == "cupy":
        import cupy

        stream = cupy.cuda.get_current_stream().ptr
        if cuda_library() == "numba":
            bf16 = x.dtype == BFLOAT16
            return _numba_import(x.view(np.int16) if bf16 else x, "cupy", x.device.id, stream, bf16)
        return Imported(x, "cupy", Device("cuda", x.device.id), stream)
    if _is_numba(x):
        return _numba_array_import(x)
    if root == "torch":
        return _torch_import(x, name)
    if root in ("jax", "jaxlib"):
        return _jax_import(x, name)
    if hasattr(x, "__dlpack_device__"):
        kind, index = x.__dlpack_device__()
        if kind == _DLPACK_CPU:
            return Imported(np.from_dlpack(x), "numpy", CPU)
        if kind == _DLPACK_CUDA:
            if cuda_library() == "numba":
                if not hasattr(x, "__cuda_array_interface__"):
                    raise ValueError(
                        f"{name} is a DLPack CUDA array: importing it needs CuPy (cosattn[cuda13])"
                    )
                return _numba_import(x, "numba", index, None, False)
            import cupy

            return Imported(cupy.from_dlpack(x), "cupy", Device("cuda", index), None)
        raise ValueError(f"{name} lives on DLPack device type {kind}; cosattn runs on cpu and cuda")
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, or any DLPack array such as torch or JAX), "
        f"got {type(x).__name__}"
    )


def _numba_array_import(x: Any) -> Imported:
    """A Numba device array: native as it is, or seen by CuPy where CuPy runs."""
    from . import _numba_arrays

    device = Device("cuda", _numba_arrays.device_index(x))
    stream = _numba_arrays.stream_handle(x)
    if cuda_library() == "numba":
        return Imported(x, "numba", device, stream)
    import cupy

    bf16 = x.dtype == BFLOAT16
    array = cupy.asarray(x.view(np.int16) if bf16 else x)
    return Imported(array.view(BFLOAT16) if bf16 else array, "numba", device, stream)


def export_array(array: Any, framework: str) -> Any:
    """Hand a native result back to ``framework`` (the inverse of :func:`import_array`)."""
    numba_native = _is_numba(array)
    if framework == "numpy" or framework == ("numba" if numba_native else "cupy"):
        return array
    bf16 = array.dtype == BFLOAT16
    bits = array.view(np.int16) if bf16 else array
    if framework == "torch":
        import torch

        out = torch.as_tensor(bits) if numba_native else torch.from_dlpack(bits)
        return out.view(torch.bfloat16) if bf16 else out
    if framework in ("cupy", "numba"):
        if framework == "cupy":
            import cupy

            out = cupy.asarray(bits)
        else:
            from . import _numba_arrays

            out = _numba_arrays.from_cuda_array(bits)
        return out.view(BFLOAT16) if bf16 else out
    if framework == "jax":
        import jax.numpy as jnp

        if isinstance(array, np.ndarray):
            return jnp.asarray(array)
        return jnp.from_dlpack(array)
    raise ValueError(f"unknown framework {framework!r}")


def namespace(device: Device) -> Any:
    """The array module for ``device``: NumPy on the CPU, CuPy or :mod:`._numba_arrays` on CUDA."""
    if device.kind == "cpu":
        return np
    if cuda_library() == "numba":
        from . import _numba_arrays

        return _numba_arrays
    import cupy

    return cupy


def on_device(device: Device) -> contextlib.AbstractContextManager[Any]:
    """A context that makes ``device`` current (CuPy's or Numba's device context on CUDA)."""
    if device.kind == "cpu":
        return contextlib.nullcontext()
    if cuda_library() == "numba":
        from numba import cuda

        return cuda.gpus[device.index]
    import cupy

    return cupy.cuda.Device(device.index)
