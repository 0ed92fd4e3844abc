"""The CuPy backend: the CUDA C++ kernels of ``cuda/`` compiled at run time by NVRTC.

A kernel is *described* by a :class:`ModuleSpec` (a source file and the template instances to
take from it: :func:`forward_spec`, :func:`backward_spec`, :func:`step_spec`, and
:func:`all_specs` for every one the backend can ask for) and *built* by :func:`_function`, which
compiles a spec with ``cupy.RawModule`` on first use, under a lock, once per device. The source
string has ``common.cuh`` pasted in place of its ``#include``, so CuPy's disk cache key covers
every line that is compiled. The NVRTC test compiles :func:`all_specs` from the same
:func:`source_text` with the same :data:`OPTIONS`.

Kernels run on the caller's stream (``Problem.stream``), temporaries are allocated on it, and
nothing synchronises with the host. Launch geometry and shared memory sizes mirror the kernels:
``THREADS`` is ``kThreads`` of common.cuh, :func:`_shared_bytes` follows ``Shared``, ``STEP_ROWS``
is ``kStepRows`` of step.cu.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._call import BackwardCall, ForwardCall, Problem, StepCall
from .._device import namespace
from .._dtypes import INPUT_DTYPES, STATE_DTYPES, accumulation
from . import ceil_div

DEVICE = "cuda"
# Packed sequences and pools of states wait for the rebuilt kernels: such a call is refused by
# the validation (a RuntimeError pointing to the numba backend) before it reaches this module.
VARLEN = False
INSTALL_HINT = "pip install cosattn[cuda13]"
MIN_CAPABILITY = 80  # wmma on bfloat16 tiles needs sm_80

HEADER = "common.cuh"
SOURCES = ("forward.cu", "backward.cu", "step.cu")
HEADERS_NEEDED = ("cuda_fp16.h", "cuda_bf16.h", "mma.h")
OPTIONS = ("--std=c++17",)  # plus -I for the CUDA headers (include_dirs)

THREADS = 128
STEP_ROWS = 16
STATIC_SHARED_LIMIT = 48 * 1024  # beyond it a kernel must opt in

# Head sizes with their own instances (Dk = Dv = D); any other pair runs the general instance,
# written with head size 0.
SPECIALISED = (16, 32, 64, 128, 256)
GENERAL = 0
HEAD_SIZES = (*SPECIALISED, GENERAL)

CTYPES = dict(zip(INPUT_DTYPES, ("__half", "__nv_bfloat16", "float", "double"), strict=True))

# (chunk C, slice SL) per input itemsize and head size: SL columns of the output per block, chunks
# of C tokens; chosen so that _shared_bytes stays under ~100 KiB (every sm_80+ GPU) except for
# float64 at D = 256 (104 KiB: A100, H100) and large general sizes.
TILES = {
    2: {16: (64, 16), 32: (64, 32), 64: (32, 32), 128: (32, 32), 256: (16, 16), GENERAL: (32, 16)},
    4: {16: (64, 16), 32: (64, 32), 64: (32, 32), 128: (32, 32), 256: (32, 16), GENERAL: (32, 16)},
    8: {16: (32, 16), 32: (32, 32), 64: (32, 32), 128: (16, 32), 256: (16, 16), GENERAL: (16, 16)},
}


@dataclass(frozen=True)
class ModuleSpec:
    """What to compile: one source of ``cuda/`` and the template instances to take from it.

    ``expressions`` are C++ name expressions such as ``cosattn::forward_kernel<float, 64, 64,
    32, 32>``, handed to NVRTC (``name_expressions``) and used to look the kernels up.
    """

    source: str
    expressions: tuple[str, ...]


def _ctype(dtype: Any) -> str:
    return CTYPES[np.dtype(dtype)]


def head_size(Dk: int, Dv: int) -> int:
    """The head-size template argument for ``(Dk, Dv)``: D when specialised, else GENERAL."""
    return Dk if Dk == Dv and Dk in SPECIALISED else GENERAL


def tiles(dtype: Any, D: int) -> tuple[int, int]:
    """``(C, SL)``: the chunk length and the output columns per block."""
    return TILES[np.dtype(dtype).itemsize][D]


def _instance(name: str, dtype: Any, D: int) -> str:
    C, SL = tiles(dtype, D)
    return f"cosattn::{name}<{_ctype(dtype)}, {D}, {D}, {C}, {SL}>"


def forward_spec(dtype: Any, D: int) -> ModuleSpec:
    return ModuleSpec("forward.cu", (_instance("forward_kernel", dtype, D),))


def backward_spec(dtype: Any, D: int) -> ModuleSpec:
    return ModuleSpec("backward.cu", (_instance("values_kernel", dtype, D),
                                      _instance("queries_keys_kernel", dtype, D),
                                      f"cosattn::dm_kernel<{_ctype(accumulation(dtype))}>"))


def step_spec(dtype: Any, state_dtype: Any) -> ModuleSpec:
    return ModuleSpec("step.cu", (f"cosattn::step_kernel<{_ctype(dtype)}, {_ctype(state_dtype)}>",
                                  "cosattn::step_count_kernel"))


def all_specs() -> list[ModuleSpec]:
    """Every module this backend can build (what the NVRTC test compiles)."""
    specs = [make(dtype, head_size) for make in (forward_spec, backward_spec)
             for dtype in INPUT_DTYPES for head_size in HEAD_SIZES]
    specs += [step_spec(dtype, state) for dtype in INPUT_DTYPES for state in STATE_DTYPES
              if not (dtype == np.float64 and state == np.float32)]
    return specs


def source_folder() -> Path:
    """The folder of the CUDA sources: ``cosattn/cuda`` in an installed wheel (package data),
    the top-level ``cuda/`` beside the package in a checkout or an editable install."""
    package = Path(str(importlib.resources.files("cosattn")))
    installed = package / "cuda"
    return installed if installed.is_dir() else package.parent / "cuda"


@functools.cache
def source_text(name: str) -> str:
    """Source ``name`` of :func:`source_folder` with common.cuh pasted in place of its
    ``#include``."""
    folder = source_folder()
    header = folder.joinpath(HEADER).read_text(encoding="utf-8")
    text = folder.joinpath(name).read_text(encoding="utf-8")
    include = f'#include "{HEADER}"'
    if include not in text:
        raise RuntimeError(f"cuda/{name} does not include {HEADER}")
    return text.replace(include, header)


@functools.cache
def include_dirs() -> tuple[str, ...] | None:
    """Folders holding cuda_fp16.h, cuda_bf16.h and mma.h, or None when they are missing.

    They come from NVIDIA's wheels (``nvidia-cuda-nvrtc``, ``nvidia-cuda-crt``: the folder
    ``nvidia/cu13/include`` of site-packages), a conda environment or a CUDA toolkit, as found
    by ``cuda.pathfinder``.
    """
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        return None
    found: list[str] = []
    for lib in ("cudart", "nvrtc"):
        try:
            folder = find_nvidia_header_directory(lib)
        except RuntimeError:  # a cuda.pathfinder that does not know the name
            continue
        if folder is not None and folder not in found:
            found.append(folder)
    complete = all(any(os.path.exists(os.path.join(f, h)) for f in found) for h in HEADERS_NEEDED)
    return tuple(found) if complete else None


def compile_options() -> tuple[str, ...]:
    return OPTIONS + tuple(f"-I{folder}" for folder in include_dirs() or ())


@functools.cache
def unavailable() -> str | None:
    """Why this backend cannot run here (None when it can)."""
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy cannot be imported ({exc}): {INSTALL_HINT}"
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return f"NVRTC not found ({exc}): {INSTALL_HINT}"
    if include_dirs() is None:
        return f"CUDA headers ({', '.join(HEADERS_NEEDED)}) not found: {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no CUDA device ({exc})"
    if count == 0:
        return "no CUDA device"
    if all(_capability(i) < MIN_CAPABILITY for i in range(count)):
        return f"no GPU of compute capability {MIN_CAPABILITY // 10}.{MIN_CAPABILITY % 10} or newer"
    return None


@functools.cache
def _capability(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


# ------------------------------------------------------------------------------------ build

_lock = threading.Lock()
_modules: dict[ModuleSpec, Any] = {}


def _kernel(spec: ModuleSpec, expression: str, device: int) -> Any:
    """The compiled kernel ``expression`` of ``spec``, built under a lock on first use.

    A ``cupy.RawModule`` compiles its source once (and keeps the binary in CuPy's disk cache);
    CuPy loads it on each device that runs it.
    """
    import cupy

    if _capability(device) < MIN_CAPABILITY:
        raise RuntimeError(
            f"the cupy backend needs compute capability {MIN_CAPABILITY // 10}."
            f"{MIN_CAPABILITY % 10} or newer; cuda:{device} has {_capability(device)}"
        )
    with _lock:
        module = _modules.get(spec)
        if module is None:
            module = _modules[spec] = cupy.RawModule(
                code=source_text(spec.source), options=compile_options(),
                name_expressions=spec.expressions)
        return module.get_function(expression)


def _launch(spec: ModuleSpec, expression: str, grid: int, shared: int, args: tuple,
            p: Problem) -> None:
    """Run ``expression`` on ``grid`` blocks of THREADS threads on the current stream."""
    if grid == 0:
        return
    kernel = _kernel(spec, expression, p.device.index)
    if shared > STATIC_SHARED_LIMIT:
        import cupy

        limit = cupy.cuda.Device(p.device.index).attributes["MaxSharedMemoryPerBlockOptin"]
        if shared > limit:
            raise ValueError(
                f"{expression} needs {shared} bytes of shared memory per block for these head "
                f"sizes; cuda:{p.device.index} offers {limit}. Use the numpy backend for them"
            )
        kernel.max_dynamic_shared_size_bytes = shared
    kernel((grid,), (THREADS,), args, shared_mem=shared)


def _stream(p: Problem) -> contextlib.AbstractContextManager[Any]:
    """The caller's stream as the current CuPy stream (and where temporaries are allocated)."""
    if p.device.kind != "cuda":
        return contextlib.nullcontext()
    import cupy

    current = cupy.cuda.get_current_stream()
    if p.stream is None or p.stream == current.ptr:
        return current
    return cupy.cuda.ExternalStream(p.stream, p.device.index)


# ----------------------------------------------------------------------------- arguments


def _ptr(x: Any) -> np.uint64:
    """A device pointer argument; null for None. (NumPy arrays: the host emulation test.)"""
    if x is None:
        return np.uint64(0)
    if isinstance(x, np.ndarray):
        return np.uint64(x.ctypes.data)
    return np.uint64(x.data.ptr)


def _strides(x: Any, n: int) -> tuple[np.int64, ...]:
    """Element strides of ``x``; n zeros for None."""
    if x is None:
        return (np.int64(0),) * n
    size = x.dtype.itemsize
    if any(s % size for s in x.strides):
        raise ValueError(f"strides {x.strides} are not multiples of the itemsize {size}")
    return tuple(np.int64(s // size) for s in x.strides)


def _ints(*values: int) -> tuple[np.int64, ...]:
    return tuple(np.int64(v) for v in values)


def _round16(n: int) -> int:
    return ceil_div(n, 16) * 16


def _shared_bytes(dtype: Any, DqP: int, C: int, SL: int) -> int:
    """Dynamic shared memory of a sweep block: ``Shared<T, C, SL>`` of common.cuh."""
    dtype = np.dtype(dtype)
    t = dtype.itemsize
    a = 8 if dtype == np.float64 else 4
    mma = t == 2
    pad_t, pad_a = (8, 4) if mma else (1, 1)
    sizes = [C * (DqP + pad_t) * t, C * (DqP + pad_t) * t, C * (SL + pad_t) * t,
             C * (C + pad_a) * a, C * (SL + pad_a) * a, SL * (DqP + pad_a) * a]
    if mma:  # probabilities, the state's two parts, the low parts of q, k, v, probabilities
        sizes += [C * (C + pad_t) * t, SL * (DqP + pad_t) * t, SL * (DqP + pad_t) * t,
                  C * (DqP + pad_t) * t, C * (DqP + pad_t) * t, C * (SL + pad_t) * t,
                  C * (C + pad_t) * t]
    sizes += [7 * C * a, 32 * a, 8 * a, 40 * 8]
    return sum(ceil_div(s, 128) * 128 for s in sizes)


def _contiguous(xp: Any, x: Any, dtype: Any) -> Any:
    return None if x is None else xp.ascontiguousarray(x, dtype=dtype)


def _mask_strides(mask: Any) -> tuple[np.int64, ...]:
    return _strides(mask, 2)


# ------------------------------------------------------------------------------- backend


def forward(call: ForwardCall) -> tuple[Any, Any] | None:
    p, kv0, mask = call.p, call.kv0, call.mask
    xp = namespace(p.device)
    with _stream(p):
        count = None
        if call.want_state:
            count = xp.zeros(p.B, dtype=np.int64) if call.count0 is None else call.count0.copy()
            count += p.S if mask is None else mask.sum(axis=1, dtype=np.int64)
        if p.S == 0 or p.B * p.H * p.Dk * p.Dv == 0:
            call.o[...] = 0
            if not call.want_state:
                return None
            kv = xp.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
            return kv, count
        D = head_size(p.Dk, p.Dv)
        spec = forward_spec(p.dtype, D)
        C, SL = tiles(p.dtype, D)
        kv_out = xp.empty((p.B, p.H, p.Dv, p.Dk), dtype=p.acc) if call.want_state else None
        args = (_ptr(call.q), _ptr(call.k), _ptr(call.v), _ptr(call.o), _ptr(call.m), _ptr(mask),
                _ptr(_contiguous(xp, kv0, p.acc)), _ptr(_contiguous(xp, call.count0, np.int64)),
                _ptr(kv_out), *_ints(p.B, p.H, p.S, p.Dk, p.Dv), *_strides(call.q, 4),
                *_strides(call.k, 4), *_strides(call.v, 4), *_strides(call.o, 4),
                *_mask_strides(mask), p.acc.type(p.eps), np.int64(p.causal))
        _launch(spec, spec.expressions[0], p.B * p.H * ceil_div(p.Dv, SL),
                _shared_bytes(p.dtype, _round16(p.Dk), C, SL), args, p)
        if not call.want_state:
            return None
        return kv_out.astype(p.state_dtype, copy=False), count


def backward(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, m, mask = call.p, call.kv0, call.m, call.mask
    q, k, v, do, dq, dk, dv = call.q, call.k, call.v, call.do, call.dq, call.dk, call.dv
    xp = namespace(p.device)
    with _stream(p):
        if p.S == 0 or p.B * p.H * p.Dk * p.Dv == 0:
            dq[...] = 0
            dk[...] = 0
            dv[...] = 0
            dm = None if m is None else xp.zeros(p.H, dtype=p.acc)
            if kv0 is None:
                return dm, None
            return dm, xp.zeros_like(kv0) if call.dkv is None else call.dkv.astype(kv0.dtype)
        D = head_size(p.Dk, p.Dv)
        spec = backward_spec(p.dtype, D)
        values, queries_keys, dm_reduce = spec.expressions
        C, SL = tiles(p.dtype, D)
        nsv, nsk = ceil_div(p.Dv, SL), ceil_div(p.Dk, SL)
        kv0c = _contiguous(xp, kv0, p.acc)
        dkvc = _contiguous(xp, call.dkv, p.acc)
        count0c = _contiguous(xp, call.count0, np.int64)
        # Partial sums of q̂ · dq̂ and k̂ · dk̂ over slices of Dv, when a block of the second kernel
        # holds a slice of Dk only (see backward.cu).
        dq_part = dk_part = None
        if nsk > 1:
            dq_part = xp.empty((nsv, p.B, p.H, p.S), dtype=p.acc)
            dk_part = xp.empty((nsv, p.B, p.H, p.S), dtype=p.acc)
        dm_part = None if m is None else xp.empty((p.B, p.H, nsv), dtype=p.acc)
        dkv0 = None if kv0 is None else xp.empty((p.B, p.H, p.Dv, p.Dk), dtype=p.acc)
        sizes = _ints(p.B, p.H, p.S, p.Dk, p.Dv)
        tail = (*_mask_strides(mask), p.acc.type(p.eps), np.int64(p.causal))
        _launch(spec, values, p.B * p.H * nsv,
                _shared_bytes(p.dtype, _round16(p.Dk), C, SL),
                (_ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(dv), _ptr(m), _ptr(mask),
                 _ptr(kv0c), _ptr(count0c), _ptr(dkvc), _ptr(dkv0), _ptr(dq_part),
                 _ptr(dk_part), _ptr(dm_part), *sizes, *_strides(q, 4), *_strides(k, 4),
                 *_strides(v, 4), *_strides(do, 4), *_strides(dv, 4), *tail), p)
        _launch(spec, queries_keys, p.B * p.H * nsk,
                _shared_bytes(p.dtype, _round16(p.Dv), C, SL),
                (_ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(dq), _ptr(dk), _ptr(m), _ptr(mask),
                 _ptr(kv0c), _ptr(count0c), _ptr(dkvc), _ptr(dq_part), _ptr(dk_part), *sizes,
                 np.int64(nsv), *_strides(q, 4), *_strides(k, 4), *_strides(v, 4),
                 *_strides(do, 4), *_strides(dq, 4), *_strides(dk, 4), *tail), p)
        dm = None
        if m is not None:
            dm = xp.empty(p.H, dtype=p.acc)
            _launch(spec, dm_reduce, ceil_div(p.H, THREADS), 0,
                    (_ptr(dm_part), _ptr(m), _ptr(dm), *_ints(p.B, p.H, nsv)), p)
        return dm, None if dkv0 is None else dkv0.astype(kv0.dtype, copy=False)


def step(call: StepCall) -> None:
    p, kv, count, mask = call.p, call.kv, call.count, call.mask
    state_dtype = np.dtype(kv.dtype)
    spec = step_spec(p.dtype, state_dtype)
    update, advance = spec.expressions
    with _stream(p):
        _launch(spec, update, p.B * p.H * ceil_div(p.Dv, STEP_ROWS),
                (2 * p.Dk + THREADS // 32) * state_dtype.itemsize,
                (_ptr(call.q), _ptr(call.k), _ptr(call.v), _ptr(call.o), _ptr(kv), _ptr(count),
                 _ptr(call.m), _ptr(mask), *_ints(p.B, p.H, p.Dk, p.Dv), *_strides(call.q, 3),
                 *_strides(call.k, 3), *_strides(call.v, 3), *_strides(call.o, 3),
                 *_strides(kv, 4), *_strides(mask, 1), state_dtype.type(p.eps)), p)
        _launch(spec, advance, ceil_div(p.B, THREADS), 0,
                (_ptr(count), _ptr(mask), np.int64(p.B), *_strides(mask, 1)), p)
