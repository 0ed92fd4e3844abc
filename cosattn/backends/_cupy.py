"""The CuPy backend: the CUDA C++ kernels of ``cuda/`` compiled at run time by NVRTC.

A kernel is *described* by a :class:`ModuleSpec` (a source file, the template instances to take
from it and the dynamic shared memory each needs, as a C++ expression: :func:`forward_spec`,
:func:`backward_spec`, :func:`step_spec`, and :func:`all_specs` for what the NVRTC test
compiles) and *built* by :func:`_kernel`, which compiles a spec with ``cupy.RawModule`` on first
use, under a lock, once per process. The source string (:func:`module_text`) has ``common.cuh``
pasted in place of its ``#include``, so CuPy's disk cache key covers every line that is
compiled, and ends with the table ``cosattn_layout`` of the shared-memory sizes, which the build
reads back: the layout has one owner, the kernel's ``Shared`` struct. The numbers Python owns
(threads per block, rows per step block) reach the compiler as ``-D`` options
(:func:`compile_options`); the tile sizes and the clusters are template arguments
(:data:`TILES`, :func:`cluster`).

Every kernel takes one parameter struct (``ForwardParams``, ``BackwardParams``, ``StepParams``
of ``cuda/common.cuh``), filled here in one place each (:func:`_forward_params`,
:func:`_backward_params`, :func:`_step_params`) as a NumPy structured scalar of the matching
dtype (:data:`PARAMS`): CuPy passes it to the kernel by value.

Kernels run on the caller's stream (``Problem.stream``), temporaries are allocated on it, and
nothing synchronises with the host after a module is built: packed sequences (``cu_seqlens``)
and a pool's slots (``state_indices``) are read by the kernels on the device, and a pool is
read and written in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.resources
import math
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._call import BackwardCall, ForwardCall, Problem, StepCall
from .._device import namespace
from .._dtypes import INPUT_DTYPES, STATE_DTYPES
from . import ceil_div, packed_tokens

DEVICE = "cuda"
# Packed sequences (cu_seqlens) and pools of states (state_indices): the kernels read the
# offsets and slots on the device (common.cuh, Span).
VARLEN = True
INSTALL_HINT = "pip install cosattn[cuda13]"
MIN_CAPABILITY = 80  # wmma on bfloat16 tiles needs sm_80

HEADER = "common.cuh"
SOURCES = ("forward.cu", "backward.cu", "step.cu")
HEADERS_NEEDED = ("cuda_fp16.h", "cuda_bf16.h", "cuda_pipeline_primitives.h", "mma.h")
OPTIONS = ("--std=c++17",)  # plus the -D of DEFINES and -I for the CUDA headers (include_dirs)
LAYOUT_TABLE = "cosattn_layout"  # the per-module table of dynamic shared memory (module_text)

THREADS = 128  # threads per block of every kernel (kThreads of common.cuh)
STEP_ROWS = 16  # rows of kv per block of the step kernel (kStepRows)
DEFINES = {"COSATTN_THREADS": THREADS, "COSATTN_STEP_ROWS": STEP_ROWS}
STATIC_SHARED_LIMIT = 48 * 1024  # beyond it a kernel must opt in
# The sequence split of the forward (forward_plan): blocks wanted per SM, the fewest chunks a
# segment has, and the SMs assumed where no device says (an H100 SXM or H200 has 132).
BLOCKS_PER_SM = 2
MIN_SEGMENT_CHUNKS = 4
SMS = 132
MAX_CLUSTER = 8  # the largest thread-block cluster every sm_90 GPU takes (cluster)

# Tile widths W with their own sweep instances: (Dk, Dv) runs on the smallest W >= max(Dk, Dv),
# or, past the last, on W = max(Dk, Dv) rounded up to WIDE_STEP (compiled when first asked for;
# WIDE_EXAMPLE is the one the NVRTC test builds). Widths are compile-time constants in every
# instance; columns past Dk or Dv are zero.
WIDTHS = (16, 32, 64, 128, 256)
WIDE_STEP = 64
WIDE_EXAMPLE = 320

# Variants of the kernels that the GPU check times against each other (benchmarks/
# gpu_variants.py), each the default with one design choice changed: how the float16/bfloat16
# products are taken, as the parameter `passes` of the sweeps (common.cuh): three passes over
# hi/lo splits of every scaled tile (the default), or the raw q/k tiles in one pass with their
# row factors applied outside the products ("raw-qk"); and whether the slices of a head share
# their tiles through thread-block clusters (the default, :func:`cluster`) or each fetches
# whole tiles ("no-clusters", other instances of the same kernels). The losers are deleted once
# they are measured.
VARIANTS = ("three-pass", "raw-qk", "no-clusters")
PASSES = {"three-pass": 3, "raw-qk": 1, "no-clusters": 3}
_variant = contextvars.ContextVar("cosattn_cupy_variant", default=VARIANTS[0])


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Run the cupy backend's calls made inside the block with kernel variant ``name``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; the cupy backend has {VARIANTS}")
    token = _variant.set(name)
    try:
        yield
    finally:
        _variant.reset(token)


CTYPES = dict(zip(INPUT_DTYPES, ("__half", "__nv_bfloat16", "float", "double"), strict=True))

# (chunk C, slice SL) per input itemsize and tile width: SL columns of the output per block,
# chunks of C tokens; chosen so that a block's shared memory stays under ~100 KiB (every sm_80+
# GPU) except for float64 at W = 256 (104 KiB: A100, H100) and wider tiles. "wide": W > 256.
TILES = {
    2: {16: (64, 16), 32: (64, 32), 64: (32, 32), 128: (32, 32), 256: (16, 16), "wide": (16, 16)},
    4: {16: (64, 16), 32: (64, 32), 64: (32, 32), 128: (32, 32), 256: (32, 16), "wide": (16, 16)},
    8: {16: (32, 16), 32: (32, 32), 64: (32, 32), 128: (16, 32), 256: (16, 16), "wide": (16, 16)},
}


@dataclass(frozen=True)
class ModuleSpec:
    """What to compile: one source of ``cuda/``, the template instances to take from it, and
    for each the dynamic shared memory its launches need, as a C++ constant expression, and its
    thread-block cluster.

    ``expressions`` are C++ name expressions such as ``cosattn::forward_kernel<float, 64, 32,
    32, 1>``, handed to NVRTC (``name_expressions``) and used to look the kernels up; ``shared``
    holds, in the same order, expressions such as ``cosattn::Shared<float, 64, 32, 32>::kBytes``
    (``"0"`` for none), evaluated by the compiler into the module's table (:func:`module_text`);
    ``clusters`` the blocks per cluster, a template argument of the kernel that declares it to
    the compiler on sm_90 (1: none; the host emulation of the tests runs clusters by it).
    """

    source: str
    expressions: tuple[str, ...]
    shared: tuple[str, ...]
    clusters: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.expressions) == len(self.shared) == len(self.clusters):
            raise ValueError("one shared-memory expression and cluster per kernel expression")


def _ctype(dtype: Any) -> str:
    return CTYPES[np.dtype(dtype)]


def width(Dk: int, Dv: int) -> int:
    """The tile width W of the sweep instance that runs head sizes ``(Dk, Dv)``."""
    D = max(Dk, Dv)
    for W in WIDTHS:
        if D <= W:
            return W
    return ceil_div(D, WIDE_STEP) * WIDE_STEP


def tiles(dtype: Any, W: int) -> tuple[int, int]:
    """``(C, SL)``: the chunk length and the output columns per block at tile width ``W``."""
    return TILES[np.dtype(dtype).itemsize][W if W in WIDTHS else "wide"]


def cluster(dtype: Any, W: int) -> int:
    """G, the blocks of the sweeps' thread-block clusters at tile width ``W`` (common.cuh,
    "clusters"): the slices of a (sequence, h, segment) that share their Q and K tiles, so that
    these are read from global memory once per chunk. For 16-bit tiles of the WIDTHS the largest
    power of two up to MAX_CLUSTER (the portable cluster size) that divides W / SL; 1 for float
    and double, whose tile rows are not whole 16-byte pieces, for wider tiles, whose
    queries_keys_kernel has no register left for the cluster's reads (it would spill), and in
    the variant "no-clusters"."""
    if np.dtype(dtype).itemsize != 2 or W not in WIDTHS or _variant.get() == "no-clusters":
        return 1
    _, SL = tiles(dtype, W)
    return math.gcd(W // SL, MAX_CLUSTER)


def slices(dtype: Any, W: int, D: int) -> int:
    """A sweep's blocks per (sequence, h, segment) over D columns of output (Dv for the forward
    and values_kernel, Dk for queries_keys_kernel): one per SL columns, rounded up to a whole
    number of clusters (the blocks past D own no columns)."""
    _, SL = tiles(dtype, W)
    G = cluster(dtype, W)
    return ceil_div(ceil_div(D, SL), G) * G


def _sweep(names: tuple[str, ...], dtype: Any,
           W: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """The expressions of sweep kernels ``names`` at width ``W`` (template arguments T, W, C, SL
    and the cluster G of the variant in use), their shared memory and their clusters."""
    C, SL = tiles(dtype, W)
    G = cluster(dtype, W)
    args = f"{_ctype(dtype)}, {W}, {C}, {SL}"
    return (tuple(f"cosattn::{name}<{args}, {G}>" for name in names),
            (f"cosattn::Shared<{args}>::kBytes",) * len(names), (G,) * len(names))


def forward_spec(dtype: Any, W: int) -> ModuleSpec:
    sweeps, shared, clusters = _sweep(("forward_kernel",), dtype, W)
    ctype = _ctype(dtype)
    return ModuleSpec("forward.cu", (*sweeps, f"cosattn::scan_kernel<{ctype}>",
                                     f"cosattn::count_kernel<{ctype}>"),
                      (*shared, "0", "cosattn::kCountShared"), (*clusters, 1, 1))


def backward_spec(dtype: Any, W: int) -> ModuleSpec:
    sweeps, shared, clusters = _sweep(("values_kernel", "queries_keys_kernel"), dtype, W)
    return ModuleSpec("backward.cu", (*sweeps, f"cosattn::dm_kernel<{_ctype(dtype)}>"),
                      (*shared, "0"), (*clusters, 1))


def step_spec(dtype: Any, state_dtype: Any) -> ModuleSpec:
    args = f"{_ctype(dtype)}, {_ctype(state_dtype)}"
    return ModuleSpec("step.cu", (f"cosattn::step_kernel<{args}>",
                                  f"cosattn::step_count_kernel<{_ctype(dtype)}>"),
                      (f"cosattn::kStepShared<{_ctype(state_dtype)}>", "0"), (1, 1))


def sweep_specs(instances: Iterable[tuple[Any, int]]) -> list[ModuleSpec]:
    """The forward and backward modules of the ``(dtype, W)`` instances in every variant, each
    module once (variants that differ only at run time share their modules)."""
    specs = []
    for name in VARIANTS:
        with variant(name):
            specs += [make(dtype, W) for dtype, W in instances
                      for make in (forward_spec, backward_spec)]
    return list(dict.fromkeys(specs))


def all_specs() -> list[ModuleSpec]:
    """Every module of the widths up to 256 and one wider (WIDE_EXAMPLE) in every variant, and
    the step for each input and state dtype: what the NVRTC test compiles."""
    specs = sweep_specs([(dtype, W) for dtype in INPUT_DTYPES
                         for W in (*WIDTHS, WIDE_EXAMPLE)])
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


def module_text(spec: ModuleSpec) -> str:
    """What NVRTC compiles for ``spec``: :func:`source_text` and the table of the dynamic shared
    memory of its kernels, in the order of ``spec.expressions``, computed by the compiler."""
    table = ", ".join(f"(unsigned long long)({e})" for e in spec.shared)
    return (f"{source_text(spec.source)}\n"
            f'extern "C" __constant__ unsigned long long {LAYOUT_TABLE}[] = {{{table}}};\n')


@functools.cache
def include_dirs() -> tuple[str, ...] | None:
    """Folders holding the CUDA headers of HEADERS_NEEDED, or None when one is missing.

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
    """NVRTC's options: OPTIONS, DEFINES as -D, and -I for the CUDA headers."""
    return (OPTIONS + tuple(f"-D{name}={value}" for name, value in DEFINES.items())
            + tuple(f"-I{folder}" for folder in include_dirs() or ()))


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
_modules: dict[ModuleSpec, tuple[Any, tuple[int, ...]]] = {}


def _layout(module: Any, spec: ModuleSpec) -> tuple[int, ...]:
    """The module's table of dynamic shared memory, one entry per expression of ``spec``.

    Read from the device once, when the module is built (a copy on the legacy default stream,
    like the build itself).
    """
    values = np.zeros(len(spec.shared), dtype=np.uint64)
    module.get_global(LAYOUT_TABLE).copy_to_host(values.ctypes.data, values.nbytes)
    return tuple(int(v) for v in values)


def _kernel(spec: ModuleSpec, expression: str, device: int) -> tuple[Any, int]:
    """The compiled kernel ``expression`` of ``spec`` and the dynamic shared memory its launches
    need, built under a lock on first use.

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
        built = _modules.get(spec)
        if built is None:
            module = cupy.RawModule(code=module_text(spec), options=compile_options(),
                                    name_expressions=spec.expressions)
            built = _modules[spec] = (module, _layout(module, spec))
        module, layout = built
        return module.get_function(expression), layout[spec.expressions.index(expression)]


@functools.cache
def _sm_count(device: int) -> int:
    """The SMs of ``device`` (the sequence split fills them)."""
    import cupy

    return int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])


@functools.cache
def _shared_limit(device: int) -> int:
    """The most dynamic shared memory a block may opt in to on ``device``."""
    import cupy

    return int(cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


def _launch(launch: Launch, params: Any, p: Problem) -> None:
    """Run ``launch`` with its parameter struct on blocks of THREADS threads on the current
    stream."""
    if launch.grid == 0:
        return
    device = p.device.index
    kernel, shared = _kernel(launch.spec, launch.expression, device)
    if shared > STATIC_SHARED_LIMIT:
        limit = _shared_limit(device)
        if shared > limit:
            raise ValueError(
                f"{launch.expression} needs {shared} bytes of shared memory per block for these "
                f"head sizes; cuda:{device} offers {limit}. Use the numpy backend for them"
            )
        kernel.max_dynamic_shared_size_bytes = shared
    kernel((launch.grid,), (THREADS,), (params,), shared_mem=shared)


def _stream(p: Problem) -> contextlib.AbstractContextManager[Any]:
    """The caller's stream as the current CuPy stream (and where temporaries are allocated)."""
    if p.device.kind != "cuda":
        return contextlib.nullcontext()
    import cupy

    current = cupy.cuda.get_current_stream()
    if p.stream is None or p.stream == current.ptr:
        return current
    return cupy.cuda.ExternalStream(p.stream, p.device.index)


# ------------------------------------------------------------------------------- launches


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the module, the kernel, the number of blocks, whether it is the
    sequence split's first pass (``ForwardParams.states_only``), and, in the backward's split,
    which segments' states a forward.cu launch forms (``STATES``; None: a backward.cu launch)."""

    spec: ModuleSpec
    expression: str
    grid: int
    states_only: bool = False
    states: str | None = None


@dataclass(frozen=True)
class Plan:
    """A forward's or a backward's launches, and how the sequence is cut: ``segments``
    segments of ``segment_chunks`` chunks (one segment: no split)."""

    launches: list[Launch]
    segments: int
    segment_chunks: int


# The backward's segment states (backward.cu): those of its forward-order sweeps (Σ ṽᵀ k̂, the
# forward's), and those of its reverse sweeps (Σ do q̂ᵀ, summed from the last segment).
STATES = ("kv", "dkv")


def _segments(rows: int, S: int, C: int, sms: int) -> tuple[int, int]:
    """``(segments, segment_chunks)``: how a sweep of ``rows`` blocks per segment over sequences
    of S tokens in chunks of C is cut (the sequence split, forward.cu): one segment when the
    rows give each of ``sms`` SMs BLOCKS_PER_SM blocks, else enough segments of at least
    MIN_SEGMENT_CHUNKS chunks to do so."""
    chunks = ceil_div(S, C)
    wanted = ceil_div(BLOCKS_PER_SM * sms, max(rows, 1))
    segments = max(1, min(wanted, chunks // MIN_SEGMENT_CHUNKS))
    segment_chunks = max(1, ceil_div(chunks, segments))  # S = 0: one empty segment
    return max(1, ceil_div(chunks, segment_chunks)), segment_chunks


def forward_plan(dtype: Any, N: int, H: int, S: int, Dk: int, Dv: int,
                 sms: int = SMS, *, output: bool = True, total: bool = False) -> Plan:
    """A block per (sequence, h, segment, slice of SL columns of Dv: :func:`slices`),
    for N sequences of at most S tokens (N batch rows of S, or the N sequences of a packed row
    of S). When N * H * slices blocks would leave ``sms`` SMs with fewer than BLOCKS_PER_SM
    blocks each, each sequence is split into segments of at least MIN_SEGMENT_CHUNKS chunks,
    enough of them to give every SM that many (forward.cu): forward_kernel forming the
    segments' states (``states_only``) and scan_kernel run first. Packed, the lengths stay on
    the device, so every sequence gets the segments of S; those past its end are empty.

    ``output`` False: the state alone (o null, cosattn.absorb); split, it is the first two
    launches (scan_kernel writes kv_out), else forward_kernel alone. ``total`` (bidirectional,
    kv0 the whole sequence's sum, total=): every segment starts from kv0, so the split has
    neither the segments' states nor the scan."""
    W = width(Dk, Dv)
    spec = forward_spec(dtype, W)
    main, scan, _ = spec.expressions
    C, _ = tiles(dtype, W)
    rows = N * H * slices(dtype, W, Dv)
    segments, segment_chunks = _segments(rows, S, C, sms)
    launches = [Launch(spec, main, rows * segments)]
    if segments > 1 and not (total and output):
        states = [Launch(spec, main, rows * segments, states_only=True),
                  Launch(spec, scan, ceil_div(N * H * Dv * Dk, THREADS))]
        launches = [*states, *launches] if output else states
    return Plan(launches, segments, segment_chunks)


def count_launch(dtype: Any, N: int, Dk: int, Dv: int) -> Launch:
    """count_kernel, a block per sequence: the outgoing counts, after the sweeps (forward.cu),
    from the module the sweeps of ``(Dk, Dv)`` come from."""
    spec = forward_spec(dtype, width(Dk, Dv))
    return Launch(spec, spec.expressions[2], N)


def backward_plan(dtype: Any, N: int, H: int, S: int, Dk: int, Dv: int, sms: int = SMS, *,
                  with_m: bool, total: bool = False) -> Plan:
    """The backward's launches (see backward.cu) for N sequences (batch rows, or the sequences
    of a packed row): values_kernel per (sequence, h, segment, slice of Dv), queries_keys_kernel
    per (sequence, h, segment, slice of Dk) (:func:`slices`), and dm_kernel over the heads
    when ``m`` is given. The sequence is cut as the forward cuts it (:func:`_segments`), for the
    kernel with fewer slices; split, forward.cu's forward_kernel (``states_only``) and
    scan_kernel form first the incoming states of each segment for the forward-order sweeps,
    then for the reverse ones (``STATES``), except with ``total`` (bidirectional given kv0 and
    dkv, the whole sums: every segment starts from them)."""
    W = width(Dk, Dv)
    spec = backward_spec(dtype, W)
    values, queries_keys, dm = spec.expressions
    C, _ = tiles(dtype, W)
    nsv, nsk = slices(dtype, W, Dv), slices(dtype, W, Dk)
    segments, segment_chunks = _segments(N * H * min(nsv, nsk), S, C, sms)
    launches = []
    if segments > 1 and not total:
        forward = forward_spec(dtype, W)
        main, scan, _ = forward.expressions
        for states in STATES:
            launches += [Launch(forward, main, N * H * nsv * segments, True, states),
                         Launch(forward, scan, ceil_div(N * H * Dv * Dk, THREADS), False, states)]
    launches += [Launch(spec, values, N * H * nsv * segments),
                 Launch(spec, queries_keys, N * H * nsk * segments)]
    if with_m:
        launches.append(Launch(spec, dm, ceil_div(H, THREADS)))
    return Plan(launches, segments, segment_chunks)


def step_launches(dtype: Any, state_dtype: Any, B: int, H: int, Dv: int) -> list[Launch]:
    """The step's launches: step_kernel per (b, h, group of STEP_ROWS rows of kv), then
    step_count_kernel over the batch rows."""
    spec = step_spec(dtype, state_dtype)
    update, advance = spec.expressions
    return [Launch(spec, update, B * H * ceil_div(Dv, STEP_ROWS)),
            Launch(spec, advance, ceil_div(B, THREADS))]


# ----------------------------------------------------------------------------- parameters


def _struct(pointers: tuple[str, ...], ints: tuple[str, ...],
            strides: tuple[tuple[str, int], ...], tail: tuple[tuple[str, str], ...]) -> np.dtype:
    fields = ([(name, np.uint64) for name in pointers] + [(name, np.int64) for name in ints]
              + [(name, np.int64, (n,)) for name, n in strides] + list(tail))
    return np.dtype(fields, align=True)


def _strided(n: int, *names: str) -> tuple[tuple[str, int], ...]:
    return tuple((name, n) for name in names)


# The NumPy dtypes of the parameter structs of cuda/common.cuh (field for field; the emulated
# tests compare offsets and sizes with the C++ layout).
PARAMS = {
    "ForwardParams": _struct(
        ("q", "k", "v", "o", "m", "mask", "kv0", "count0", "kv_out", "count_out",
         "segment_states", "cu_seqlens", "state_indices", "has_initial"),
        ("B", "H", "S", "Dk", "Dv", "N", "P", "segments", "segment_chunks", "states_only",
         "reverse", "passes", "state_wide", "count_stride"),
        (*_strided(4, "q_stride", "k_stride", "v_stride", "o_stride", "kv0_stride",
                   "kv_out_stride"), ("mask_stride", 2)),
        (("eps", np.float64), ("causal", np.int64))),
    "BackwardParams": _struct(
        ("q", "k", "v", "dout", "dq", "dk", "dv", "m", "mask", "kv0", "count0", "dkv", "dkv0",
         "dq_part", "dk_part", "dm_part", "dm", "cu_seqlens", "kv_states", "dkv_states"),
        ("B", "H", "S", "Dk", "Dv", "N", "nsv", "passes", "segments", "segment_chunks"),
        (*_strided(4, "q_stride", "k_stride", "v_stride", "do_stride", "dq_stride",
                   "dk_stride", "dv_stride"), ("mask_stride", 2)),
        (("eps", np.float64), ("causal", np.int64))),
    "StepParams": _struct(
        ("q", "k", "v", "o", "kv", "count", "m", "mask", "state_indices", "has_initial"),
        ("B", "H", "Dk", "Dv", "P"),
        (*_strided(3, "q_stride", "k_stride", "v_stride", "o_stride"), ("kv_stride", 4)),
        (("mask_stride", np.int64), ("count_stride", np.int64), ("eps", np.float64))),
}


def _params(struct: str, **values: Any) -> np.void:
    """A parameter struct as a NumPy structured scalar; every field must be given."""
    dtype = PARAMS[struct]
    if set(values) != set(dtype.names):
        raise TypeError(f"{struct}: fields {sorted(set(dtype.names) ^ set(values))} differ")
    params = np.zeros((), dtype=dtype)
    for name, value in values.items():
        params[name] = value
    return params[()]


def _ptr(x: Any) -> int:
    """A device pointer; 0 (null) for None. (NumPy arrays: the host emulation test.)"""
    if x is None:
        return 0
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    return x.data.ptr


def _strides(x: Any, n: int) -> tuple[int, ...]:
    """Element strides of ``x``; n zeros for None."""
    if x is None:
        return (0,) * n
    size = x.dtype.itemsize
    if any(s % size for s in x.strides):
        raise ValueError(f"strides {x.strides} are not multiples of the itemsize {size}")
    return tuple(s // size for s in x.strides)


def _forward_params(call: ForwardCall, plan: Plan, states_only: bool, count_stride: int,
                    **arrays: Any) -> np.void:
    """``o`` None (the state alone, cosattn.absorb): o is null and k stands in for the q the
    kernel does not read. Bidirectional, ``kv0`` and ``count0`` are the whole sequence's sum and
    count (total=). ``arrays``: count0, kv_out, count_out, segment_states, cu_seqlens,
    state_indices, has_initial (None where absent); kv0 is the call's own, read in place."""
    p = call.p
    q = call.k if call.q is None else call.q
    return _params("ForwardParams", q=_ptr(q), k=_ptr(call.k), v=_ptr(call.v),
                   o=_ptr(call.o), m=_ptr(call.m), mask=_ptr(call.mask), kv0=_ptr(call.kv0),
                   **{name: _ptr(x) for name, x in arrays.items()},
                   B=p.B, H=p.H, S=p.S, Dk=p.Dk, Dv=p.Dv, N=call.N,
                   P=call.kv0.shape[0] if call.pooled else call.N, segments=plan.segments,
                   segment_chunks=plan.segment_chunks, states_only=int(states_only), reverse=0,
                   passes=PASSES[_variant.get()], state_wide=int(p.state_dtype == np.float64),
                   count_stride=count_stride, q_stride=_strides(q, 4),
                   k_stride=_strides(call.k, 4), v_stride=_strides(call.v, 4),
                   o_stride=_strides(call.o, 4), kv0_stride=_strides(call.kv0, 4),
                   kv_out_stride=_strides(arrays["kv_out"], 4),
                   mask_stride=_strides(call.mask, 2), eps=p.eps, causal=int(p.causal))


def _backward_params(call: BackwardCall, plan: Plan, nsv: int, **temporaries: Any) -> np.void:
    """``temporaries``: kv0, count0, dkv (contiguous copies), dkv0, dq_part, dk_part, dm_part,
    dm, cu_seqlens, kv_states, dkv_states (None where absent)."""
    p = call.p
    return _params("BackwardParams", q=_ptr(call.q), k=_ptr(call.k), v=_ptr(call.v),
                   dout=_ptr(call.do), dq=_ptr(call.dq), dk=_ptr(call.dk), dv=_ptr(call.dv),
                   m=_ptr(call.m), mask=_ptr(call.mask),
                   **{name: _ptr(x) for name, x in temporaries.items()},
                   B=p.B, H=p.H, S=p.S, Dk=p.Dk, Dv=p.Dv, N=call.N, nsv=nsv,
                   passes=PASSES[_variant.get()], segments=plan.segments,
                   segment_chunks=plan.segment_chunks,
                   q_stride=_strides(call.q, 4), k_stride=_strides(call.k, 4),
                   v_stride=_strides(call.v, 4), do_stride=_strides(call.do, 4),
                   dq_stride=_strides(call.dq, 4), dk_stride=_strides(call.dk, 4),
                   dv_stride=_strides(call.dv, 4), mask_stride=_strides(call.mask, 2),
                   eps=p.eps, causal=int(p.causal))


def _states_params(call: BackwardCall, plan: Plan, launch: Launch, kv0: Any, count0: Any,
                   dkv: Any, dkv0: Any, states: Any, cu_seqlens: Any) -> np.void:
    """ForwardParams for the backward's split: forward_kernel (states_only) and scan_kernel
    forming each segment's incoming state into ``states``. ``launch.states`` "kv": Σ ṽᵀ k̂ from
    kv0, as the forward forms it; "dkv": Σ do q̂ᵀ from dkv, with do as v (unscaled: no m, so w
    is 1 on real rows), q as k, summed from the last segment (reverse), its total into dkv0.
    q is not read (k stands in for it)."""
    p = call.p
    grads = launch.states == "dkv"
    k, v = (call.q, call.do) if grads else (call.k, call.v)
    state0, state_out = (dkv, dkv0) if grads else (kv0, None)
    return _params("ForwardParams", q=_ptr(k), k=_ptr(k), v=_ptr(v), o=0,
                   m=0 if grads else _ptr(call.m), mask=_ptr(call.mask), kv0=_ptr(state0),
                   count0=0 if grads else _ptr(count0), kv_out=_ptr(state_out), count_out=0,
                   segment_states=_ptr(states), cu_seqlens=_ptr(cu_seqlens), state_indices=0,
                   has_initial=0, B=p.B, H=p.H, S=p.S, Dk=p.Dk, Dv=p.Dv, N=call.N, P=call.N,
                   segments=plan.segments, segment_chunks=plan.segment_chunks,
                   states_only=int(launch.states_only), reverse=int(grads),
                   passes=PASSES[_variant.get()], state_wide=int(p.acc == np.float64),
                   count_stride=1, q_stride=_strides(k, 4), k_stride=_strides(k, 4),
                   v_stride=_strides(v, 4), o_stride=(0,) * 4, kv0_stride=_strides(state0, 4),
                   kv_out_stride=_strides(state_out, 4), mask_stride=_strides(call.mask, 2),
                   eps=p.eps, causal=int(p.causal))


def _step_params(call: StepCall, state_indices: Any, has_initial: Any) -> np.void:
    """``state_indices``, ``has_initial``: the call's, contiguous (None where absent)."""
    p = call.p
    return _params("StepParams", q=_ptr(call.q), k=_ptr(call.k), v=_ptr(call.v),
                   o=_ptr(call.o), kv=_ptr(call.kv), count=_ptr(call.count), m=_ptr(call.m),
                   mask=_ptr(call.mask), state_indices=_ptr(state_indices),
                   has_initial=_ptr(has_initial), B=p.B, H=p.H, Dk=p.Dk, Dv=p.Dv,
                   P=call.kv.shape[0], q_stride=_strides(call.q, 3),
                   k_stride=_strides(call.k, 3), v_stride=_strides(call.v, 3),
                   o_stride=_strides(call.o, 3), kv_stride=_strides(call.kv, 4),
                   mask_stride=_strides(call.mask, 1)[0],
                   count_stride=_strides(call.count, 1)[0], eps=p.eps)


def _contiguous(xp: Any, x: Any, dtype: Any) -> Any:
    return None if x is None else xp.ascontiguousarray(x, dtype=dtype)


# ------------------------------------------------------------------------------- backend


def _sequences(xp: Any, call: ForwardCall | StepCall | BackwardCall) -> dict[str, Any]:
    """The arrays that name sequences and slots, contiguous on the device (None where absent):
    the kernels index them directly."""
    wanted = {"cu_seqlens": np.int64, "state_indices": np.int64, "has_initial": np.bool_}
    return {name: _contiguous(xp, getattr(call, name, None), dtype)
            for name, dtype in wanted.items()}


def _untouched_slots(xp: Any, call: ForwardCall) -> Any:
    """A prefill's ``state_indices`` with -1 for the sequences that have no real token and
    start from their slot: like padding entries they leave the slot bit for bit (docs/spec.md,
    "State pools"; adding their zero products would turn -0.0 into +0.0, and a float64 slot
    would pass through the float32 state), and their outputs, all masked, are +0 either way.
    Formed on the device."""
    empty = packed_tokens(xp, call.cu_seqlens, call.mask, call.p.S) == 0
    start = call.state_indices >= 0
    if call.has_initial is not None:
        start &= call.has_initial
    return xp.where(start & empty, -1, call.state_indices)


def forward(call: ForwardCall) -> tuple[Any, Any] | None:
    """With ``call.o`` None the same kernel forms the state alone (q is not read: k stands in
    for it). A pool's prefill reads and writes the pool's slots in place: the outgoing states
    go where the incoming ones came from."""
    p, kv0 = call.p, call.kv0
    xp = namespace(p.device)
    N = call.N
    with _stream(p):
        if call.pooled:
            call = replace(call, state_indices=_untouched_slots(xp, call))
        kv_out, count_out = kv0, call.count0
        count_stride = _strides(count_out, 1)[0] if call.pooled else 1
        if not call.pooled:
            kv_out = count_out = None
            if call.want_state:
                kv_out = xp.empty((N, p.H, p.Dv, p.Dk), dtype=p.state_dtype)
                count_out = xp.empty(N, dtype=np.int64)
        plan = forward_plan(p.dtype, N, p.H, p.S, p.Dk, p.Dv, _sm_count(p.device.index),
                            output=call.o is not None, total=not p.causal and kv0 is not None)
        # Without tokens or heads there is nothing to sweep, except in a pool, whose sweeps also
        # zero the slots of sequences that do not start from them.
        sweeps = p.H * p.Dk * p.Dv > 0 and (p.S > 0 or call.pooled)
        launches = list(plan.launches) if sweeps else []
        if not sweeps:
            if call.o is not None:
                call.o[...] = 0
            if kv_out is not None and not call.pooled:
                kv_out[...] = 0 if kv0 is None else kv0
        if count_out is not None:
            launches.append(count_launch(p.dtype, N, p.Dk, p.Dv))
        segment_states = None
        if plan.segments > 1 and sweeps:
            segment_states = xp.empty((N, p.H, plan.segments, p.Dv, p.Dk), dtype=p.acc)
        count0 = call.count0 if call.pooled else _contiguous(xp, call.count0, np.int64)
        arrays = dict(count0=count0, kv_out=kv_out, count_out=count_out,
                      segment_states=segment_states, **_sequences(xp, call))
        for launch in launches:
            _launch(launch, _forward_params(call, plan, launch.states_only, count_stride,
                                            **arrays), p)
        if call.pooled or not call.want_state:
            return None
        return kv_out, count_out


def backward(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, m = call.p, call.kv0, call.m
    xp = namespace(p.device)
    N = call.N
    with _stream(p):
        if p.S == 0 or N * p.H * p.Dk * p.Dv == 0:
            call.dq[...] = 0
            call.dk[...] = 0
            call.dv[...] = 0
            dm = None if m is None else xp.zeros(p.H, dtype=p.acc)
            if kv0 is None or not p.causal:
                return dm, None
            return dm, xp.zeros_like(kv0) if call.dkv is None else call.dkv.astype(kv0.dtype)
        _, SL = tiles(p.dtype, width(p.Dk, p.Dv))
        nsv, nsk = ceil_div(p.Dv, SL), ceil_div(p.Dk, SL)
        # Bidirectional with kv0 (total=): kv0 and dkv are the whole sums every segment takes.
        total = not p.causal and kv0 is not None
        plan = backward_plan(p.dtype, N, p.H, p.S, p.Dk, p.Dv, _sm_count(p.device.index),
                             with_m=m is not None, total=total)
        # Partial sums of q̂ · dq̂ and k̂ · dk̂ over slices of Dv, when a block of the second kernel
        # holds a slice of Dk only (see backward.cu).
        dq_part = dk_part = None
        if nsk > 1:
            dq_part = xp.empty((nsv, p.B, p.H, p.S), dtype=p.acc)
            dk_part = xp.empty((nsv, p.B, p.H, p.S), dtype=p.acc)
        dm_part = dm = None
        if m is not None:
            dm_part = xp.empty((N, p.H, nsv, plan.segments), dtype=p.acc)
            dm = xp.empty(p.H, dtype=p.acc)
        # dkv0 for an incoming state only (causal); bidirectional, kv0 is total=
        dkv0 = (None if kv0 is None or not p.causal
                else xp.empty((N, p.H, p.Dv, p.Dk), dtype=p.acc))
        split = {name: None for name in STATES}
        if plan.segments > 1 and not total:
            split = {name: xp.empty((N, p.H, plan.segments, p.Dv, p.Dk), dtype=p.acc)
                     for name in STATES}
        arrays = dict(kv0=_contiguous(xp, kv0, p.acc),
                      count0=_contiguous(xp, call.count0, np.int64),
                      dkv=_contiguous(xp, call.dkv, p.acc), dkv0=dkv0,
                      cu_seqlens=_sequences(xp, call)["cu_seqlens"])
        params = _backward_params(call, plan, nsv, dq_part=dq_part, dk_part=dk_part,
                                  dm_part=dm_part, dm=dm, **arrays,
                                  **{f"{name}_states": x for name, x in split.items()})
        for launch in plan.launches:
            if launch.states is None:
                _launch(launch, params, p)
            else:
                _launch(launch, _states_params(call, plan, launch, states=split[launch.states],
                                               **arrays), p)
        return dm, None if dkv0 is None else dkv0.astype(kv0.dtype, copy=False)


def step(call: StepCall) -> None:
    """A pool's step updates the named slots of the pool in place."""
    p = call.p
    xp = namespace(p.device)
    with _stream(p):
        sequences = _sequences(xp, call)
        params = _step_params(call, sequences["state_indices"], sequences["has_initial"])
        for launch in step_launches(p.dtype, call.kv.dtype, p.B, p.H, p.Dv):
            _launch(launch, params, p)
