"""The CUDA kernels of cuda/, run on the CPU through a host emulation of CUDA (tests/cuda_host).

g++ compiles the kernel sources of ``cuda/`` with stand-ins for the CUDA headers (a block
runs as threads with barriers; wmma, half and bfloat16 are emulated) and the cupy backend's
``-D`` options, and the backend's own Python code drives them: ``cupy.RawModule`` is replaced by
:class:`EmulatedModule`, so the real build path (``_cupy._kernel``, its lock, the table of
shared-memory sizes read back from the module) and the real launch path (``_cupy._launch``
with the parameter structs) run, through ``cosattn.forward``/``backward``/
``RecurrentState.step`` with ``backend="cupy"``. What this cannot show: timing, real
tensor-core rounding and memory-model effects; tests/test_cupy.py checks those on a GPU. Skipped
when no C++17 compiler is found ($CXX, default g++; $CXXFLAGS are added, e.g.
``-fsanitize=address`` with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cosattn
from cosattn import reference
from cosattn.backends import _cupy

from helpers import (
    BFLOAT16,
    JUNK,
    MASK_KINDS,
    Problem,
    assert_close,
    assert_padding_zero,
    check_absorb,
    check_backward,
    check_forward,
    check_packed_backward,
    check_packed_forward,
    check_pool_step,
    check_prefill,
    check_total,
    make_case,
    make_packed_case,
    make_slots,
    packed_cases,
    packed_lengths,
    pool_steps,
    prefills,
    reference_backward,
    reference_forward,
    split_sequences,
)

HOST = Path(__file__).parent / "cuda_host"
CXX = os.environ.get("CXX", "g++")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F16, BFLOAT16, F32, F64)

# The (dtype, tile width) instances built: widths 16 and 64 for every dtype (head sizes up to the
# width, equal or not), and W = 128 in float32 (several slices of the FMA loops).
INSTANCES = [(d, W) for d in DTYPES for W in (16, 64)] + [(F32, 128)]
# Built too, for the test of the clusters of 4 (the 4 slices of D128 in 16 bits).
CLUSTERS_OF_4 = [(BFLOAT16, 128)]
# (Dk, Dv) drawn for each width: each pair runs on that width (_cupy.width).
HEAD_SIZES = {16: [(16, 16), (1, 1), (5, 7), (16, 9)],
              64: [(64, 64), (33, 16), (48, 48), (20, 40)],
              128: [(128, 128), (65, 100)]}
# Every step instance: a pool or state of float32 or float64 for any input but float64.
STEPS = [(d, s) for d in DTYPES for s in (F32, F64) if not (d == F64 and s == F32)]


def _instance_id(instance: tuple[np.dtype, int]) -> str:
    dtype, W = instance
    return f"{dtype}-W{W}"


def _specs() -> list[_cupy.ModuleSpec]:
    return (_cupy.sweep_specs(INSTANCES + CLUSTERS_OF_4)
            + [_cupy.step_spec(dtype, state) for dtype, state in STEPS])


REGISTRY = """\
#include <cstddef>
#include <cstdio>

#include "forward.cu"
#include "backward.cu"
#include "step.cu"
#include "launch.h"

namespace cosattn {{
alignas(128) unsigned char cosattn_shared[emu::kSharedCapacity];
}}

struct Kernel {{
  const char* expression;
  emu::Launcher launch;
  unsigned long long shared;  // the spec's shared-memory expression, evaluated by the compiler
}};

static const Kernel kKernels[] = {{
{kernels}
}};

struct Field {{
  const char* name;
  std::size_t offset, size;
}};

{structs}

static const Kernel* find(const char* expression) {{
  for (const Kernel& kernel : kKernels) {{
    if (std::strcmp(kernel.expression, expression) == 0) return &kernel;
  }}
  return nullptr;
}}

extern "C" int cosattn_emulated_launch(const char* expression, unsigned grid, unsigned block,
                                       std::size_t shared, void** args) {{
  const Kernel* kernel = find(expression);
  if (kernel == nullptr) return 1;
  try {{
    kernel->launch(grid, block, shared, args);
  }} catch (const std::exception& error) {{
    std::fprintf(stderr, "%s: %s\\n", expression, error.what());
    return 2;
  }}
  return 0;
}}

// The bytes the asynchronous copies of the kernels moved since the last call.
extern "C" unsigned long long cosattn_emulated_copied() {{
  const std::size_t bytes = emu::copied;
  emu::copied = 0;
  return bytes;
}}

extern "C" long long cosattn_emulated_shared(const char* expression) {{
  const Kernel* kernel = find(expression);
  return kernel == nullptr ? -1 : (long long)kernel->shared;
}}

// sizeof(struct), or the offset and size of one of its fields; -1 when unknown.
extern "C" long long cosattn_emulated_layout(const char* name, const char* field, int size) {{
{layouts}
  return -1;
}}
"""

KERNEL = ('  {{"{e}", [](unsigned g, unsigned b, std::size_t s, void** a) {{ '
          'emu::run(&{e}, g, b, s, a, {cluster}); }}, (unsigned long long)({shared})}},')

# Each parameter struct is checked in every dtype it is instantiated with.
STRUCT = """\
using {alias} = cosattn::{name}<{ctype}>;
static const Field k{alias}[] = {{
{fields}
}};"""

LAYOUT = """\
  if (std::strcmp(name, "{alias}") == 0) {{
    if (field == nullptr) return sizeof({alias});
    for (const Field& f : k{alias}) {{
      if (std::strcmp(f.name, field) == 0) return size ? f.size : f.offset;
    }}
  }}"""


def _struct_alias(name: str, dtype: np.dtype) -> str:
    return f"{name}_{_cupy.CTYPES[dtype].strip('_')}"


def _registry() -> str:
    kernels = sorted({kernel for spec in _specs()
                      for kernel in zip(spec.expressions, spec.shared, spec.clusters,
                                        strict=True)})
    structs, layouts = [], []
    for name, dtype in _cupy.PARAMS.items():
        for input_dtype in DTYPES:
            alias = _struct_alias(name, input_dtype)
            fields = "\n".join(f'  {{"{f}", offsetof({alias}, {f}), sizeof({alias}::{f})}},'
                               for f in dtype.names)
            structs.append(STRUCT.format(alias=alias, name=name,
                                         ctype=_cupy.CTYPES[input_dtype], fields=fields))
            layouts.append(LAYOUT.format(alias=alias))
    return REGISTRY.format(kernels="\n".join(KERNEL.format(e=e, shared=shared, cluster=cluster)
                                             for e, shared, cluster in kernels),
                           structs="\n\n".join(structs), layouts="\n".join(layouts))


def _build(cache: Path) -> Path:
    source = _registry()
    kernels = _cupy.source_folder()
    flags = ["-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-fPIC", "-shared", "-w",
             *os.environ.get("CXXFLAGS", "").split(),
             *(f"-D{name}={value}" for name, value in _cupy.DEFINES.items()),
             "-include", str(HOST / "emulation.h"), f"-I{HOST}", f"-I{kernels}"]
    digest = hashlib.sha256(source.encode())
    for folder in (HOST, kernels):
        for path in sorted(folder.glob("*.[ch]*")) + sorted(folder.glob("*.cu")):
            digest.update(path.read_bytes())
    digest.update(" ".join(flags[:-3]).encode())
    library = cache / f"emulated-{digest.hexdigest()[:16]}.so"
    if not library.exists():
        registry = cache / "registry.cpp"
        registry.write_text(source)
        partial = library.with_suffix(".tmp")
        subprocess.run([CXX, *flags, str(registry), "-o", str(partial)], check=True,
                       capture_output=True, text=True)
        partial.replace(library)
    return library


@pytest.fixture(scope="module")
def emulator(request, tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) for the CUDA host emulation")
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    folder = tmp_path_factory.mktemp("cuda_host") if cache is None else cache.mkdir("cuda_host")
    try:
        library = _build(folder)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{CXX} could not build the CUDA host emulation:\n{exc.stderr[-3000:]}")
    library = ctypes.CDLL(str(library))
    library.cosattn_emulated_shared.restype = ctypes.c_longlong
    library.cosattn_emulated_copied.restype = ctypes.c_ulonglong
    library.cosattn_emulated_layout.restype = ctypes.c_longlong
    library.cosattn_emulated_layout.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    return library


class EmulatedKernel:
    """What ``RawModule.get_function`` returns: a launch runs the kernel in the emulation, one
    launch at a time (the emulation has one set of blocks, fibers and shared memory)."""

    device = threading.Lock()

    def __init__(self, emulator: ctypes.CDLL, expression: str, launches: list):
        self.emulator, self.expression, self.launches = emulator, expression, launches
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0) -> None:
        (params,) = args  # one parameter struct, passed by value
        assert params.dtype in _cupy.PARAMS.values(), params.dtype
        assert block == (_cupy.THREADS,)
        if shared_mem > _cupy.STATIC_SHARED_LIMIT:
            assert self.max_dynamic_shared_size_bytes >= shared_mem
        self.launches.append((self.expression, grid[0], shared_mem))
        data = ctypes.create_string_buffer(params.tobytes(), params.dtype.itemsize)
        slots = (ctypes.c_void_p * 1)(ctypes.addressof(data))
        with self.device:
            status = self.emulator.cosattn_emulated_launch(
                self.expression.encode(), grid[0], block[0], ctypes.c_size_t(shared_mem), slots)
        assert status == 0, f"emulated launch of {self.expression} failed ({status})"


class EmulatedTable:
    """What ``RawModule.get_global("cosattn_layout")`` returns: the module's table of shared
    memory, as the compiler evaluated the spec's expressions."""

    def __init__(self, values: list[int]):
        self.values = np.array(values, dtype=np.uint64)

    def copy_to_host(self, pointer: int, size: int) -> None:
        assert size == self.values.nbytes
        ctypes.memmove(pointer, self.values.ctypes.data, size)


class EmulatedModule:
    """Stands in for ``cupy.RawModule``: checks what it is given and counts its builds."""

    emulator: ctypes.CDLL
    launches: list
    builds: list
    delay = 0.0  # seconds a build takes (the concurrent first-use test)

    def __init__(self, *, code: str, options: tuple, name_expressions: tuple):
        assert options == _cupy.compile_options()
        assert f"{_cupy.LAYOUT_TABLE}[]" in code
        self.expressions = name_expressions
        self.builds.append(name_expressions)
        time.sleep(self.delay)

    def get_function(self, expression: str) -> EmulatedKernel:
        assert expression in self.expressions
        return EmulatedKernel(self.emulator, expression, self.launches)

    def get_global(self, name: str) -> EmulatedTable:
        assert name == _cupy.LAYOUT_TABLE
        values = [self.emulator.cosattn_emulated_shared(e.encode()) for e in self.expressions]
        assert min(values) >= 0, "an expression the emulation was not built with"
        return EmulatedTable(values)


@pytest.fixture
def cupy_on_host(monkeypatch, emulator):
    """Route backend="cupy" to the emulated kernels for NumPy arrays through the backend's own
    build and launch code; returns the launches (expression, grid, shared memory)."""
    cupy = pytest.importorskip("cupy")
    launches: list = []
    module = type("Module", (EmulatedModule,), {"emulator": emulator, "launches": launches,
                                                "builds": []})
    monkeypatch.setattr(cupy, "RawModule", module)
    monkeypatch.setattr(_cupy, "_modules", {})
    monkeypatch.setattr(_cupy, "_capability", lambda device: 90)
    monkeypatch.setattr(_cupy, "_shared_limit", lambda device: 227 * 1024)
    monkeypatch.setattr(_cupy, "_sm_count", lambda device: _cupy.SMS)
    monkeypatch.setattr(_cupy, "unavailable", lambda: None)
    monkeypatch.setattr(_cupy, "DEVICE", "cpu")
    return launches


@st.composite
def problems(draw, instance):
    """A problem for the built ``instance`` (dtype, width): odd sizes, S across chunk boundaries,
    masks, m, states, layouts, and padding that holds NaN, Inf or 1e30 (docs/spec.md, "Bad
    input")."""
    dtype, W = instance
    Dk, Dv = draw(st.sampled_from(HEAD_SIZES[W]))
    causal = draw(st.booleans())
    state = causal and draw(st.booleans())
    return Problem(dtype, draw(st.integers(1, 2)), draw(st.integers(1, 3)),
                   draw(st.sampled_from([1, 2, 15, 16, 17, 31, 33, 64, 65, 100])), Dk, Dv,
                   draw(st.sampled_from(MASK_KINDS)), draw(st.booleans()), state,
                   state and draw(st.booleans()), causal, draw(st.sampled_from(["bhsd", "bshd"])),
                   draw(st.sampled_from(JUNK)), draw(st.integers(0, 2**32 - 1)))


# Every instance in the default variant; the 16-bit ones in every variant of the backend.
RUNS = [(instance, variant) for instance in INSTANCES
        for variant in (_cupy.VARIANTS if instance[0].itemsize == 2 else _cupy.VARIANTS[:1])]


def _run_id(run: tuple) -> str:
    (instance, variant) = run
    return f"{_instance_id(instance)}-{variant}"


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forward_matches_the_reference(run, data, cupy_on_host):
    instance, variant = run
    problem = data.draw(problems(instance), label="problem")
    with _cupy.variant(variant):
        check_forward(problem.case(), causal=problem.causal, layout=problem.layout,
                      backend="cupy", out=data.draw(st.booleans(), label="out"))


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_backward_matches_the_reference(run, data, cupy_on_host):
    instance, variant = run
    problem = data.draw(problems(instance), label="problem")
    with _cupy.variant(variant):
        check_backward(problem.case(), causal=problem.causal, layout=problem.layout,
                       backend="cupy", out=data.draw(st.booleans(), label="out"))


@pytest.mark.parametrize("instance", INSTANCES, ids=_instance_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=6)
@given(data=st.data())
def test_absorb_and_total_match_the_reference(instance, data, cupy_on_host):
    """The state alone (o null: the forward kernel's accumulate), and the global sweeps given
    the whole sequence's sum and count (total=) on the two parts of a cut sequence."""
    problem = data.draw(problems(instance), label="problem")
    case = problem.case()
    check_absorb(case, causal=problem.causal, layout=problem.layout, backend="cupy",
                 rng=np.random.default_rng(problem.seed))
    if not problem.causal:
        cut = data.draw(st.integers(0, problem.S), label="cut")
        check_total(case, cut, layout=problem.layout, backend="cupy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_entries_zero_rows_and_long_sequences(dtype, cupy_on_host):
    """Entries at the bound of docs/spec.md (1e2 in 16-bit, 1e3 otherwise), a row of padding
    only, and enough chunks for the state to grow: 16-bit tiles see a scaled state. Rows of zeros
    (|x| < eps) too, except in float16, where their gradient dx̂ / eps overflows."""
    rng = np.random.default_rng(1)
    case = make_case(rng, 2, 1, 300, 16, 16, dtype, mask="right", state=True, dstate=True,
                     scale=1e2 if dtype.itemsize == 2 else 1e3)
    case.mask[0] = False
    if dtype != F16:
        for name in ("q", "k"):
            getattr(case, name)[1, 0, 5] = 0
            case.f64[name][1, 0, 5] = 0
    check_forward(case, causal=True, backend="cupy")
    check_backward(case, causal=True, backend="cupy")


def test_launch_geometry_and_shared_memory(cupy_on_host, emulator):
    """Grids cover B * H * slices; the shared memory of a launch is the kernel's own layout size
    (Shared<...>::kBytes, read back from the module), which its carving fits (the emulation
    stops a kernel that writes past it)."""
    rng = np.random.default_rng(3)
    c = make_case(rng, 2, 3, 20, 16, 16, F16)
    cosattn.forward(c.q, c.k, c.v, c.m, backend="cupy")
    (expression, grid, shared), = cupy_on_host
    _, SL = _cupy.tiles(F16, 16)
    spec = _cupy.forward_spec(F16, 16)
    assert expression == spec.expressions[0]
    assert grid == 2 * 3 * (16 // SL)
    assert shared == emulator.cosattn_emulated_shared(expression.encode()) > 0


@pytest.mark.parametrize(("dtype", "D"), [(F16, 64), (BFLOAT16, 64), (BFLOAT16, 128)],
                         ids=str)
def test_a_cluster_reads_q_and_k_once_per_head_and_chunk(dtype, D, cupy_on_host, emulator):
    """16-bit D64 and D128: the G = 2 or 4 slices of a (b, h) are a cluster (common.cuh,
    "clusters"); each block fetches its share of a chunk's Q and K rows and reads the others'
    from their shared memory. So the forward's copies move q, k and v from global memory once
    each, and each of the backward's four sweeps moves its three operands once: q, k, v and do
    three times each (each slice fetching whole tiles would move the Q and K operands G
    times)."""
    rng = np.random.default_rng(5)
    c = make_case(rng, 2, 3, 100, D, D, dtype, mask="inner")
    inputs = c.q.nbytes + c.k.nbytes + c.v.nbytes
    emulator.cosattn_emulated_copied()
    out = cosattn.forward(c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    assert emulator.cosattn_emulated_copied() == inputs
    grads = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    assert emulator.cosattn_emulated_copied() == 3 * (inputs + c.do.nbytes)
    G = _cupy.cluster(dtype, D)
    assert G == D // 32
    assert [(e.rsplit(", ", 1)[1], grid) for e, grid, _ in cupy_on_host[:3]] == [
        (f"{G}>", 2 * 3 * G)] * 3
    assert_close(out, reference_forward(c)[0], dtype, "o")
    for name, g, r in zip(("dq", "dk", "dv"), grads, reference_backward(c), strict=False):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("struct", list(_cupy.PARAMS))
def test_parameter_structs_have_the_cpp_layout(struct, emulator):
    """The NumPy dtype a launch fills is the C++ struct, field for field, in every dtype."""
    dtype = _cupy.PARAMS[struct]
    for input_dtype in DTYPES:
        alias = _struct_alias(struct, input_dtype).encode()
        assert emulator.cosattn_emulated_layout(alias, None, 0) == dtype.itemsize, alias
        for name in dtype.names:
            field, offset = dtype.fields[name][:2]
            assert emulator.cosattn_emulated_layout(alias, name.encode(), 0) == offset, name
            assert emulator.cosattn_emulated_layout(alias, name.encode(), 1) == field.itemsize


def test_first_use_from_many_threads_builds_each_module_once(cupy_on_host):
    """8 threads make their first calls at once: the real build path under its lock compiles
    each module once (the fake RawModule takes 50 ms to build), nobody deadlocks, and every
    thread gets the same bits."""
    EmulatedModule.delay = 0.05
    try:
        rng = np.random.default_rng(7)
        c = make_case(rng, 1, 2, 20, 16, 16, F32, mask="inner")
        results: dict[int, tuple] = {}
        start = threading.Barrier(8)

        def work(i: int) -> None:
            start.wait()
            o = cosattn.forward(c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
            grads = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
            results[i] = (o, *grads)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a first use deadlocked"
        builds = type(_cupy._modules[_cupy.forward_spec(F32, 16)][0]).builds
        assert sorted(builds) == sorted([_cupy.forward_spec(F32, 16).expressions,
                                         _cupy.backward_spec(F32, 16).expressions])
        assert sorted(results) == list(range(8))
        for i in range(1, 8):
            for a, b in zip(results[0], results[i], strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        EmulatedModule.delay = 0.0


SPLITS = [(F16, 16), (BFLOAT16, 64), (F32, 16), (F64, 64)]


@pytest.mark.parametrize("instance", SPLITS, ids=_instance_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=10)
@given(data=st.data())
def test_the_sequence_split_matches_the_reference(instance, data, cupy_on_host, monkeypatch):
    """With a GPU of many SMs (so that every call is split) and segments of one chunk, the
    forward runs forward_kernel for the segments' states, scan_kernel, and forward_kernel per
    segment from its incoming state: the same outputs and state as the reference, padding junk
    included. The state alone (absorb: the first two launches) and the bidirectional forward
    and backward given the whole sum (total=: every segment from it) too."""
    monkeypatch.setattr(_cupy, "_sm_count", lambda device: 10**6)
    monkeypatch.setattr(_cupy, "MIN_SEGMENT_CHUNKS", 1)
    problem = data.draw(problems(instance), label="problem")
    cupy_on_host.clear()
    case = problem.case()
    check_forward(case, causal=problem.causal, layout=problem.layout, backend="cupy")
    C, _ = _cupy.tiles(problem.dtype, instance[1])
    if problem.S > C:
        assert any("scan_kernel" in e for e, _, _ in cupy_on_host)
    check_absorb(case, causal=problem.causal, layout=problem.layout, backend="cupy",
                 rng=np.random.default_rng(problem.seed))
    if not problem.causal:
        cut = data.draw(st.integers(0, problem.S), label="cut")
        check_total(case, cut, layout=problem.layout, backend="cupy")


# The backward's split in every dtype, the 16-bit instances in every variant.
BACKWARD_SPLITS = [(instance, variant) for instance in SPLITS
                   for variant in (_cupy.VARIANTS if instance[0].itemsize == 2
                                   else _cupy.VARIANTS[:1])]


@pytest.mark.parametrize("run", BACKWARD_SPLITS, ids=_run_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=10)
@given(data=st.data())
def test_the_backward_split_matches_the_reference(run, data, cupy_on_host, monkeypatch):
    """With segments of one chunk, the backward forms each segment's incoming states first
    (forward_kernel states_only and scan_kernel: for the forward-order sweeps from kv0, then for
    the reverse ones from dkv, summed from the last segment, dkv0 their total), then runs
    values_kernel and queries_keys_kernel per segment: dq, dk, dv, dkv0 and dm (summed over the
    segments) as the reference's, causal and bidirectional, with kv0, dkv, m, masks and junk."""
    instance, variant = run
    monkeypatch.setattr(_cupy, "_sm_count", lambda device: 10**6)
    monkeypatch.setattr(_cupy, "MIN_SEGMENT_CHUNKS", 1)
    problem = data.draw(problems(instance), label="problem")
    cupy_on_host.clear()
    with _cupy.variant(variant):
        check_backward(problem.case(), causal=problem.causal, layout=problem.layout,
                       backend="cupy")
    C, _ = _cupy.tiles(problem.dtype, instance[1])
    if problem.S > C:
        assert sum("scan_kernel" in e for e, _, _ in cupy_on_host) == len(_cupy.STATES)


def test_the_split_plans_of_absorb_and_total():
    """The state alone split is forward_kernel (states_only) and scan_kernel, which writes
    kv_out; a bidirectional forward given the whole sum (total=) split is forward_kernel alone,
    every segment starting from kv0; unsplit, both are forward_kernel alone."""
    args = (F32, 1, 1, 1 << 16, 64, 64)
    whole = _cupy.forward_plan(*args)
    assert whole.segments > 1 and len(whole.launches) == 3
    state = _cupy.forward_plan(*args, output=False)
    assert [launch.states_only for launch in state.launches] == [True, False]
    assert "scan_kernel" in state.launches[1].expression
    (total,) = _cupy.forward_plan(*args, total=True).launches
    assert not total.states_only and total.grid == whole.launches[-1].grid
    for kw in ({"output": False}, {"total": True}):
        (launch,) = _cupy.forward_plan(F32, 64, 64, 256, 64, 64, **kw).launches
        assert not launch.states_only


def test_the_split_plans_of_the_backward():
    """Split, the backward forms the segments' states of its forward-order sweeps, then of its
    reverse ones, with the forward's kernels, before its own; given the whole sums (total=) it
    runs its own kernels alone, every segment from them. It is cut as the forward is."""
    args = (F32, 1, 1, 1 << 16, 64, 64)
    plan = _cupy.backward_plan(*args, with_m=True)
    assert plan.segments == _cupy.forward_plan(*args).segments > 1
    assert [(launch.states, launch.states_only) for launch in plan.launches] == [
        ("kv", True), ("kv", False), ("dkv", True), ("dkv", False), (None, False),
        (None, False), (None, False)]
    total = _cupy.backward_plan(*args, with_m=False, total=True)
    assert total.segments == plan.segments
    assert total.launches == plan.launches[4:6]
    whole = _cupy.backward_plan(F32, 64, 64, 256, 64, 64, with_m=False)
    assert whole.segments == 1 and len(whole.launches) == 2


def test_step_matches_the_forward(cupy_on_host):
    """Steps from a zero state give the causal forward's outputs and state, masks included."""
    rng = np.random.default_rng(11)
    for dtype, state_dtype in STEPS:
        c = make_case(rng, 2, 3, 9, 16, 12, dtype, mask="inner")
        state = cosattn.RecurrentState.zeros(2, 3, 16, 12, dtype=state_dtype)
        outs = [state.step(c.q[:, :, t], c.k[:, :, t], c.v[:, :, t], c.m, mask=c.mask[:, t],
                           backend="cupy") for t in range(9)]
        o_ref, kv_ref, count_ref = reference_forward(c)
        assert_close(np.stack(outs, axis=2), o_ref, dtype, f"step o {dtype} {state_dtype}")
        assert_close(state.kv, kv_ref, dtype, f"step kv {dtype} {state_dtype}")
        assert state.kv.dtype == state_dtype
        np.testing.assert_array_equal(state.count, count_ref)


@pytest.mark.parametrize("Dk", [300, 301])
def test_steps_with_q_and_k_wider_than_a_staged_piece(Dk, cupy_on_host):
    """Dk past the step block's piece of q̂ and k̂ in shared memory (kStepPiece = 256 columns):
    two pieces, the state rows moved 16 bytes at a time (Dk = 300) or one entry at a time
    (Dk = 301)."""
    rng = np.random.default_rng(13)
    for dtype, state_dtype in ((F32, F32), (BFLOAT16, F64)):
        c = make_case(rng, 1, 2, 3, Dk, 20, dtype, mask="inner")
        state = cosattn.RecurrentState.zeros(1, 2, Dk, 20, dtype=state_dtype)
        outs = [state.step(c.q[:, :, t], c.k[:, :, t], c.v[:, :, t], c.m, mask=c.mask[:, t],
                           backend="cupy") for t in range(3)]
        o_ref, kv_ref, count_ref = reference_forward(c)
        what = f"step Dk {Dk} {dtype} {state_dtype}"
        assert_close(np.stack(outs, axis=2), o_ref, dtype, f"o: {what}")
        assert_close(state.kv, kv_ref, dtype, f"kv: {what}")
        np.testing.assert_array_equal(state.count, count_ref)


@pytest.mark.parametrize(("dtype", "state_dtype"), STEPS,
                         ids=[f"{d}-state-{s}" for d, s in STEPS])
def test_masked_steps_leave_the_state_bit_for_bit(dtype, state_dtype, cupy_on_host):
    """A masked row's q_t, k_t, v_t may hold anything (NaN, Inf, 1e30): its kv (-0.0 entries
    included) and count keep their bytes, its output is +0, and the real rows are what they would
    be with zeros there (docs/spec.md, "Bad input")."""
    B, H, Dk, Dv = 4, 2, 16, 20  # Dv over two groups of rows of the step kernel
    mask = np.array([True, False, True, False])
    for junk in JUNK[1:]:
        rng = np.random.default_rng(17)
        q, k = (rng.standard_normal((B, H, Dk)).astype(dtype) for _ in range(2))
        v = rng.standard_normal((B, H, Dv)).astype(dtype)
        m = rng.uniform(-2, 2, size=H).astype(np.float32)
        kv0 = rng.standard_normal((B, H, Dv, Dk)).astype(state_dtype)
        kv0[..., ::3] = -0.0
        count0 = rng.integers(0, 50, size=B).astype(np.int64)
        o_ref, kv_ref, count_ref = reference.forward(
            *(np.array(x, np.float64)[:, :, None] for x in (q, k, v)), m.astype(np.float64),
            mask=mask[:, None], kv0=kv0.astype(np.float64), count0=count0)
        with np.errstate(over="ignore"):  # 1e30 is Inf in float16
            for x in (q, k, v):
                x[~mask] = junk
        state = cosattn.RecurrentState(kv0.copy(), count0.copy())
        o = state.step(q, k, v, m, mask=mask, backend="cupy")
        what = f"step {dtype} {state_dtype} junk {junk}"
        assert state.kv[~mask].tobytes() == kv0[~mask].tobytes(), what
        assert state.count[~mask].tobytes() == count0[~mask].tobytes(), what
        assert_padding_zero(o[:, :, None], mask[:, None], what)
        assert_close(o[mask], o_ref[mask, :, 0], dtype, f"o: {what}")
        assert_close(state.kv[mask], kv_ref[mask], dtype, f"kv: {what}")
        np.testing.assert_array_equal(state.count, count_ref)


def test_results_are_the_same_bits_from_run_to_run(cupy_on_host):
    rng = np.random.default_rng(5)
    c = make_case(rng, 1, 2, 45, 5, 7, F32, mask="inner")
    for split in (False, True):
        with split_sequences(split):
            first = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
            again = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)


# --- packed sequences and pools of states ------------------------------------------------------

# The head sizes of both widths built for every dtype, and sequence lengths around their chunks
# (32 and 64 tokens): boundaries inside chunks, on their edges and across them.
PACKED_HEADS = st.sampled_from(HEAD_SIZES[16] + HEAD_SIZES[64])
PACKED_LENGTHS = packed_lengths(sorted({_cupy.tiles(d, W)[0] for d, W in INSTANCES}), 100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(data=st.data())
def test_packed_calls_match_the_reference(dtype, data, cupy_on_host):
    """forward and backward with cu_seqlens against the reference's unpack/pack definition:
    empty and one-token sequences, junk in the padding inside them, states per sequence, and
    the sequence split restarting at every sequence."""
    pc, causal, layout = data.draw(packed_cases(PACKED_LENGTHS, PACKED_HEADS, (dtype,)),
                                   label="packed")
    split = data.draw(st.booleans(), label="split")
    cupy_on_host.clear()
    with split_sequences(split):
        check_packed_forward(pc, causal=causal, layout=layout, backend="cupy")
        check_packed_backward(pc, causal=causal, layout=layout, backend="cupy")
    C, _ = _cupy.tiles(dtype, _cupy.width(pc.q.shape[3], pc.v.shape[3]))
    if split and pc.cu_seqlens[-1] > C:
        assert any("scan_kernel" in e for e, _, _ in cupy_on_host)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(data=st.data())
def test_prefill_matches_the_reference(dtype, data, cupy_on_host):
    """A pool's prefill in place: random slots, -1 entries (junk in their tokens), reused slots
    that hold NaN and start from zero, float32 or float64 pools; the other slots keep their
    bits."""
    pc, slots, layout = data.draw(prefills(PACKED_LENGTHS, PACKED_HEADS, (dtype,)),
                                  label="prefill")
    with split_sequences(data.draw(st.booleans(), label="split")):
        check_prefill(pc, slots, layout=layout, backend="cupy",
                      out=data.draw(st.booleans(), label="out"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15)
@given(data=st.data())
def test_pool_step_matches_the_reference(dtype, data, cupy_on_host):
    check_pool_step(**data.draw(pool_steps(PACKED_HEADS, (dtype,)), label="step"),
                    backend="cupy")


@pytest.mark.parametrize("lengths", [[0], [0, 0, 0], [1], [64, 0, 1, 63, 129]],
                         ids=lambda lengths: "L" + "_".join(map(str, lengths)))
def test_empty_sequences_and_prompts(lengths, cupy_on_host):
    """Sequences without tokens (T = 0 included) pass their state through; in a pool, an empty
    prompt that does not start from its slot leaves a zero state there."""
    rng = np.random.default_rng(len(lengths))
    pc = make_packed_case(rng, lengths, 2, 5, 3, F32, mask=True, state=True, dstate=True)
    for causal in (True, False):
        check_packed_forward(pc, causal=causal, backend="cupy")
        check_packed_backward(pc, causal=causal, backend="cupy")
    slots = make_slots(rng, len(lengths), len(lengths) + 2, 2, 5, 3, F32, padding=False)
    slots.initial[0] = False
    check_prefill(pc, slots, backend="cupy")


def test_no_sequences_at_all(cupy_on_host):
    x = np.zeros((1, 2, 0, 4), np.float32)
    o, state = cosattn.forward(x, x, x, cu_seqlens=np.zeros(1, np.int64), return_state=True,
                               backend="cupy")
    assert o.shape == (1, 2, 0, 4) and state.kv.shape == (0, 2, 4, 4)
    *grads, dm = cosattn.backward(x, x, x, x, np.zeros(2), cu_seqlens=np.zeros(1, np.int32),
                                  backend="cupy")
    assert [g.shape for g in grads] == [(1, 2, 0, 4)] * 3
    np.testing.assert_array_equal(dm, 0)


def test_packed_launches_one_block_per_sequence_and_reads_the_pool_in_place(cupy_on_host):
    """N sequences launch N * H * slices blocks (the lengths stay on the device), then
    count_kernel per sequence; a prefill's kernels get the pool's own arrays, no copies."""
    pc = make_packed_case(np.random.default_rng(9), [20, 0, 7], 3, 16, 16, F16, mask=True)
    cosattn.forward(pc.q, pc.k, pc.v, pc.m, mask=pc.mask, cu_seqlens=pc.cu_seqlens,
                    return_state=True, backend="cupy")
    _, SL = _cupy.tiles(F16, 16)
    spec = _cupy.forward_spec(F16, 16)
    assert [(e, grid) for e, grid, _ in cupy_on_host] == [
        (spec.expressions[0], 3 * 3 * (16 // SL)), (spec.expressions[2], 3)]
    pool = cosattn.StatePool.zeros(5, 3, 16, 16)
    kv, count = pool.kv, pool.count
    seen = []
    original = _cupy._forward_params

    def spy(call, *args, **kwargs):
        seen.append((call.kv0, kwargs["kv_out"], kwargs["count_out"]))
        return original(call, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cupy, "_forward_params", spy)
        pool.prefill(pc.q, pc.k, pc.v, pc.m, mask=pc.mask, cu_seqlens=pc.cu_seqlens,
                     state_indices=np.array([4, -1, 0]), backend="cupy")
    assert seen and all(a is kv and b is kv and c is count for a, b, c in seen)
    assert pool.kv is kv and pool.count is count
    np.testing.assert_array_equal(count, [int(pc.mask[0, 20:].sum()), 0, 0, 0,
                                          int(pc.mask[0, :20].sum())])


def test_a_failed_pool_call_changes_nothing(cupy_on_host):
    """Bad slots, a bad out= and bad offsets are refused before any launch, the pool bit for
    bit as it was."""
    rng = np.random.default_rng(10)
    pc = make_packed_case(rng, [3, 0, 7], 2, 4, 4, F32)
    slots = make_slots(rng, 3, 4, 2, 4, 4, F32)
    pool = cosattn.StatePool(slots.kv.copy(), slots.count.copy())
    before = pool.kv.tobytes(), pool.count.tobytes()
    token = np.ones((2, 2, 4), np.float32)
    failures = [
        (lambda: pool.prefill(pc.q, pc.k, pc.v, cu_seqlens=pc.cu_seqlens,
                              state_indices=np.array([0, 4, 1]), backend="cupy"),
         ValueError, r"state_indices must lie in -1..P-1"),
        (lambda: pool.prefill(pc.q, pc.k, pc.v, cu_seqlens=np.array([0, 7, 5, 10]),
                              state_indices=np.array([0, 1, 2]), backend="cupy"),
         ValueError, "cu_seqlens must not decrease"),
        (lambda: pool.step(token, token, token, state_indices=np.array([2, 2]), backend="cupy"),
         ValueError, "names slot 2 more than once"),
        (lambda: pool.step(token, token, token, state_indices=np.array([1, -1]),
                           out=np.empty((2, 2, 4), np.float64), backend="cupy"),
         TypeError, "out must have the dtype of v_t"),
    ]
    for call, error, pattern in failures:
        with pytest.raises(error, match=pattern):
            call()
        assert (pool.kv.tobytes(), pool.count.tobytes()) == before
    assert not cupy_on_host


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_gpu_smoke_checks_pass(dtype, cupy_on_host):
    """benchmarks/gpu_smoke.py, what compute-sanitizer runs on a GPU (packed sequences and a
    pool included), passes on the emulated kernels."""
    from benchmarks import _harness, gpu_smoke

    Dk, Dv = gpu_smoke.HEADS[1]
    errors = gpu_smoke.check(np, "cupy", dtype, Dk, Dv)
    assert any(name.startswith("prefill") for name in errors)
    bad = {n: e for n, e in errors.items() if not e <= _harness.SPEC_TOL[dtype]}
    assert not bad
