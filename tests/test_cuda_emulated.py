"""The CUDA kernels of cuda/, run on the CPU through a host emulation of CUDA (tests/cuda_host).

g++ compiles the kernel sources of ``cuda/`` with stand-ins for the CUDA headers (a block
runs as threads with barriers; wmma, half and bfloat16 are emulated), and the cupy backend's own
Python code (shapes, strides, temporaries, launch geometry, shared memory sizes) drives them:
``_cupy._launch`` is replaced by the emulator, everything else is the real path through
``cosattn.forward``/``backward``/``RecurrentState.step`` with ``backend="cupy"``. What this cannot
show: timing, real tensor-core rounding and memory-model effects; tests/test_cupy.py checks those
on a GPU. Skipped when no C++17 compiler is found ($CXX, default g++; $CXXFLAGS are added, e.g.
``-fsanitize=address`` with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
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
    assert_close,
    assert_padding_zero,
    check_absorb,
    check_backward,
    check_forward,
    check_total,
    make_case,
    reference_forward,
)

HOST = Path(__file__).parent / "cuda_host"
CXX = os.environ.get("CXX", "g++")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F16, BFLOAT16, F32, F64)

# The (dtype, head) instances built: the general path and D = 16 for every dtype, and the
# multi-slice specialised tilings D = 64 (tensor cores) and D = 128 (FMA loops).
INSTANCES = [(d, h) for d in DTYPES for h in (16, _cupy.GENERAL)] + [(F16, 64), (F32, 128)]
STEPS = [(F32, F32), (F16, F32), (BFLOAT16, F64), (F64, F64)]


def _instance_id(instance: tuple[np.dtype, int]) -> str:
    dtype, head = instance
    return f"{dtype}-{'general' if head == _cupy.GENERAL else f'D{head}'}"


def _specs() -> list[_cupy.ModuleSpec]:
    specs = [make(dtype, head) for dtype, head in INSTANCES
             for make in (_cupy.forward_spec, _cupy.backward_spec)]
    return specs + [_cupy.step_spec(dtype, state) for dtype, state in STEPS]


REGISTRY = """\
#include "forward.cu"
#include "backward.cu"
#include "step.cu"
#include "launch.h"

namespace cosattn {{
alignas(128) unsigned char cosattn_shared[emu::kSharedCapacity];
}}

static const emu::Entry kEntries[] = {{
{entries}
}};

extern "C" int cosattn_emulated_launch(const char* expression, unsigned grid, unsigned block,
                                       std::size_t shared, void** args) {{
  for (const emu::Entry& entry : kEntries) {{
    if (std::strcmp(entry.expression, expression) == 0) {{
      try {{
        entry.launch(grid, block, shared, args);
      }} catch (const std::exception&) {{
        return 2;
      }}
      return 0;
    }}
  }}
  return 1;
}}
"""

ENTRY = ('  {{"{e}", [](unsigned g, unsigned b, std::size_t s, void** a) {{ '
         'emu::run(&{e}, g, b, s, a); }}}},')


def _build(cache: Path) -> Path:
    expressions = sorted({e for spec in _specs() for e in spec.expressions})
    source = REGISTRY.format(entries="\n".join(ENTRY.format(e=e) for e in expressions))
    kernels = _cupy.source_folder()
    flags = ["-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-fPIC", "-shared", "-w",
             *os.environ.get("CXXFLAGS", "").split(),
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
    return ctypes.CDLL(str(library))


_CTYPES = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


@pytest.fixture
def cupy_on_host(monkeypatch, emulator):
    """Route backend="cupy" to the emulated kernels for NumPy arrays; records the launches."""
    launches = []

    def launch(spec, expression, grid, shared, args, p):
        assert expression in spec.expressions
        launches.append((expression, grid, shared))
        if grid == 0:
            return
        values = [_CTYPES[np.dtype(type(a))](a) for a in args]
        slots = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        status = emulator.cosattn_emulated_launch(expression.encode(), grid, _cupy.THREADS,
                                                  ctypes.c_size_t(shared), slots)
        assert status == 0, f"emulated launch of {expression} failed ({status})"

    monkeypatch.setattr(_cupy, "_launch", launch)
    monkeypatch.setattr(_cupy, "unavailable", lambda: None)
    monkeypatch.setattr(_cupy, "DEVICE", "cpu")
    return launches


@dataclass(frozen=True)
class Problem:
    """One drawn case, small enough for Hypothesis to print."""

    dtype: np.dtype
    B: int
    H: int
    S: int
    Dk: int
    Dv: int
    mask: str
    m: bool
    state: bool
    dstate: bool
    causal: bool
    layout: str
    junk: float | None
    seed: int

    def case(self):
        rng = np.random.default_rng(self.seed)
        return make_case(rng, self.B, self.H, self.S, self.Dk, self.Dv, self.dtype,
                         mask=self.mask, m=self.m, state=self.state, dstate=self.dstate,
                         junk=self.junk)


@st.composite
def problems(draw, instance):
    """A problem for the built ``instance`` (dtype, head): odd sizes, S across chunk boundaries,
    masks, m, states, layouts, and padding that holds NaN, Inf or 1e30 (docs/spec.md, "Bad
    input")."""
    dtype, head = instance
    if head == _cupy.GENERAL:
        Dk, Dv = draw(st.sampled_from([(1, 1), (5, 7), (20, 40), (33, 16), (48, 48), (16, 17)]))
    else:
        Dk = Dv = head
    causal = draw(st.booleans())
    state = causal and draw(st.booleans())
    return Problem(dtype, draw(st.integers(1, 2)), draw(st.integers(1, 3)),
                   draw(st.sampled_from([1, 2, 15, 16, 17, 31, 33, 64, 65, 100])), Dk, Dv,
                   draw(st.sampled_from(MASK_KINDS)), draw(st.booleans()), state,
                   state and draw(st.booleans()), causal, draw(st.sampled_from(["bhsd", "bshd"])),
                   draw(st.sampled_from(JUNK)), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("instance", INSTANCES, ids=_instance_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forward_matches_the_reference(instance, data, cupy_on_host):
    problem = data.draw(problems(instance), label="problem")
    check_forward(problem.case(), causal=problem.causal, layout=problem.layout, backend="cupy")


@pytest.mark.parametrize("instance", INSTANCES, ids=_instance_id)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_backward_matches_the_reference(instance, data, cupy_on_host):
    problem = data.draw(problems(instance), label="problem")
    check_backward(problem.case(), causal=problem.causal, layout=problem.layout, backend="cupy")


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


def test_launch_geometry_and_shared_memory(cupy_on_host):
    """Grids cover B * H * slices; shared memory is what _shared_bytes says for the instance."""
    rng = np.random.default_rng(3)
    c = make_case(rng, 2, 3, 20, 16, 16, F16)
    cosattn.forward(c.q, c.k, c.v, c.m, backend="cupy")
    (expression, grid, shared), = cupy_on_host
    C, SL = _cupy.tiles(F16, 16)
    assert expression == _cupy.forward_spec(F16, 16).expressions[0]
    assert grid == 2 * 3 * (16 // SL)
    assert shared == _cupy._shared_bytes(F16, 16, C, SL)


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
    first = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    again = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
