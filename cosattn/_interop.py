"""Arrays in and out of cosattn, through DLPack (or ``__cuda_array_interface__``).

Any caller's array becomes a *native* array without a copy (:mod:`cosattn._device` says which
kind); results go back to the caller's framework through that framework's importer. bfloat16
crosses as 16-bit integers, since NumPy has no DLPack code for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._device import CPU, Device, cuda_native
from ._dtypes import BFLOAT16

_DLPACK_CPU, _DLPACK_CUDA = 1, 2


@dataclass(frozen=True)
class Imported:
    """A caller's array seen as a native one (``array`` shares its memory).

    ``framework`` names the caller's framework, which results are returned to; ``stream`` is the
    raw CUDA stream handle the caller is working on (None on the CPU, or when unknown).
    """

    array: Any
    framework: str
    device: Device
    stream: int | None = None


def _root_module(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _is_numba(x: Any) -> bool:
    return _root_module(x) == "numba" and getattr(type(x), "__cuda_ndarray__", False) is True


def _bits(x: Any, bf16: bool) -> Any:
    return x.view(np.int16) if bf16 else x


def _on_cuda(bits: Any, name: str, framework: str, index: int, stream: int | None,
             bf16: bool = False) -> Imported:
    """Import a CUDA array as a native one; a bfloat16 array arrives as its int16 ``bits``."""
    array = cuda_native().adopt(bits, name)
    return Imported(array.view(BFLOAT16) if bf16 else array, framework, Device("cuda", index),
                    stream)


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
        return _on_cuda(bits, name, "torch", x.device.index, stream, bf16)
    raise ValueError(f"{name} is a torch tensor on {x.device}; cosattn runs on cpu and cuda")


def _jax_import(x: Any, name: str) -> Imported:
    (device,) = x.devices()
    if device.platform == "cpu":
        return Imported(np.asarray(x), "jax", CPU)
    if device.platform in ("gpu", "cuda"):
        return _on_cuda(x, name, "jax", device.id, None)
    raise ValueError(f"{name} is a JAX array on {device.platform}; cosattn runs on cpu and cuda")


def import_array(x: Any, name: str) -> Imported:
    """See ``x`` as a native array without copying it; ``name`` is used in error messages."""
    if isinstance(x, np.ndarray):
        return Imported(x, "numpy", CPU)
    root = _root_module(x)
    if root == "cupy":
        import cupy

        bf16 = x.dtype == BFLOAT16
        return _on_cuda(_bits(x, bf16), name, "cupy", x.device.id,
                        cupy.cuda.get_current_stream().ptr, bf16)
    if _is_numba(x):
        from . import _numba_arrays

        bf16 = x.dtype == BFLOAT16
        return _on_cuda(_bits(x, bf16), name, "numba", _numba_arrays.device_index(x),
                        _numba_arrays.stream_handle(x), bf16)
    if root == "torch":
        return _torch_import(x, name)
    if root in ("jax", "jaxlib"):
        return _jax_import(x, name)
    if hasattr(x, "__dlpack_device__"):
        kind, index = x.__dlpack_device__()
        if kind == _DLPACK_CPU:
            return Imported(np.from_dlpack(x), "numpy", CPU)
        if kind == _DLPACK_CUDA:
            return _on_cuda(x, name, cuda_native().name, index, None)
        raise ValueError(f"{name} lives on DLPack device type {kind}; cosattn runs on cpu and cuda")
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, or any DLPack array such as torch or JAX), "
        f"got {type(x).__name__}"
    )


def export_array(array: Any, framework: str) -> Any:
    """Hand a native result back to ``framework`` (the inverse of :func:`import_array`)."""
    native = "numpy" if isinstance(array, np.ndarray) else cuda_native().name
    if framework in ("numpy", native):
        return array
    bf16 = array.dtype == BFLOAT16
    bits = _bits(array, bf16)
    if framework == "torch":
        import torch

        out = torch.as_tensor(bits) if native == "numba" else torch.from_dlpack(bits)
        return out.view(torch.bfloat16) if bf16 else out
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array) if native == "numpy" else jnp.from_dlpack(array)
    if framework == "cupy":
        import cupy

        out = cupy.asarray(bits)
    elif framework == "numba":
        from . import _numba_arrays

        out = _numba_arrays.from_cuda_array(bits)
    else:
        raise ValueError(f"unknown framework {framework!r}")
    return out.view(BFLOAT16) if bf16 else out
