"""Arrays in and out of cosattn.

Any DLPack array becomes a *native* array without a copy: a NumPy array on the CPU, a CuPy array
on a CUDA device. Results go back to the caller's framework through that framework's importer.
bfloat16 crosses DLPack as 16-bit integers, since NumPy has no DLPack code for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))

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
        import cupy

        array = cupy.from_dlpack(bits)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        device = Device("cuda", x.device.index)
        return Imported(array.view(BFLOAT16) if bf16 else array, "torch", device, stream)
    raise ValueError(f"{name} is a torch tensor on {x.device}; cosattn runs on cpu and cuda")


def _jax_import(x: Any, name: str) -> Imported:
    (device,) = x.devices()
    if device.platform == "cpu":
        return Imported(np.asarray(x), "jax", CPU)
    if device.platform in ("gpu", "cuda"):
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

        return Imported(x, "cupy", Device("cuda", x.device.id), cupy.cuda.get_current_stream().ptr)
    if root == "torch":
        return _torch_import(x, name)
    if root in ("jax", "jaxlib"):
        return _jax_import(x, name)
    if hasattr(x, "__dlpack_device__"):
        kind, index = x.__dlpack_device__()
        if kind == _DLPACK_CPU:
            return Imported(np.from_dlpack(x), "numpy", CPU)
        if kind == _DLPACK_CUDA:
            import cupy

            return Imported(cupy.from_dlpack(x), "cupy", Device("cuda", index), None)
        raise ValueError(f"{name} lives on DLPack device type {kind}; cosattn runs on cpu and cuda")
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, or any DLPack array such as torch or JAX), "
        f"got {type(x).__name__}"
    )


def export_array(array: Any, framework: str) -> Any:
    """Hand a native result back to ``framework`` (the inverse of :func:`import_array`)."""
    if framework in ("numpy", "cupy"):
        return array
    bf16 = array.dtype == BFLOAT16
    bits = array.view(np.int16) if bf16 else array
    if framework == "torch":
        import torch

        out = torch.from_dlpack(bits)
        return out.view(torch.bfloat16) if bf16 else out
    if framework == "jax":
        import jax.numpy as jnp

        if isinstance(array, np.ndarray):
            return jnp.asarray(array)
        return jnp.from_dlpack(array)
    raise ValueError(f"unknown framework {framework!r}")


def namespace(device: Device) -> Any:
    """The array module for ``device``: NumPy on the CPU, CuPy on CUDA."""
    if device.kind == "cpu":
        return np
    import cupy

    return cupy


def on_device(device: Device) -> contextlib.AbstractContextManager[Any]:
    """A context that makes ``device`` current (CuPy's device context on CUDA)."""
    if device.kind == "cpu":
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(device.index)
