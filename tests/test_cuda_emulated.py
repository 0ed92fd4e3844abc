"""The CUDA kernels of cuda/, run on the CPU through a host emulation of CUDA (tests/cuda_host).

g++ compiles the kernel sources of ``cosattn.cuda`` with stand-ins for the CUDA headers (a block
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
import importlib.resources
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cosattn
from cosattn.backends import _cupy

from helpers import (
    BFLOAT16,
    assert_close,
    case_id,
    make_case,
    reference_backward,
    reference_forward,
)

HOST = Path(__file__).parent / "cuda_host"
CXX = os.environ.get("CXX", "g++")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

# (dtype, B, H, S, Dk, Dv): each runs one template instance of forward and backward. Specialised
# sizes (D = 16) and general ones (odd, Dk != Dv, several slices), S past one chunk and not a
# multiple of it.
SHAPES = [
    (F32, 2, 2, 70, 16, 16),
    (F32, 1, 2, 45, 5, 7),
    (F64, 2, 1, 37, 16, 16),
    (F64, 1, 2, 21, 33, 20),
    (F16, 2, 1, 70, 16, 16),
    (F16, 1, 2, 40, 20, 40),
    (BFLOAT16, 1, 2, 70, 16, 16),
    (BFLOAT16, 2, 1, 33, 9, 18),
]
STEPS = [(F32, F32), (F16, F32), (BFLOAT16, F64), (F64, F64)]


def _specs() -> list[_cupy.ModuleSpec]:
    specs = []
    for dtype, _, _, _, Dk, Dv in SHAPES:
        head = _cupy.head_of(Dk, Dv)
        specs += [_cupy.forward_spec(dtype, head), _cupy.backward_spec(dtype, head)]
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
    kernels = Path(str(importlib.resources.files("cosattn.cuda")))
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


def _ids(shape):
    dtype, B, H, S, Dk, Dv = shape
    return f"{dtype.name}-{case_id(B, H, S, Dk, Dv)}"


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_forward_and_backward_match_the_reference(shape, cupy_on_host):
    dtype, B, H, S, Dk, Dv = shape
    rng = np.random.default_rng(S * 1000 + Dk * 10 + Dv)
    for causal, mask, m, state in [(True, "right", True, True), (True, "inner", False, False),
                                   (False, "left", True, False), (False, "none", False, False)]:
        c = make_case(rng, B, H, S, Dk, Dv, dtype, mask=mask, m=m, state=state, dstate=state)
        what = f"causal={causal} mask={mask} m={m} state={state}"
        kw = dict(causal=causal, mask=c.mask, backend="cupy")
        if state:
            kw["state"] = cosattn.RecurrentState(c.kv0, c.count0)
        o = cosattn.forward(c.q, c.k, c.v, c.m, return_state=state, **kw)
        o_ref, kv_ref, count_ref = reference_forward(c, causal)
        if state:
            o, out_state = o
            assert_close(out_state.kv, kv_ref, dtype, f"kv {what}")
            np.testing.assert_array_equal(out_state.count, count_ref)
        assert o.dtype == dtype
        assert_close(o, o_ref, dtype, f"o {what}")
        grads = cosattn.backward(c.do, c.q, c.k, c.v, c.m, dstate=c.dkv, **kw)
        refs = reference_backward(c, causal)
        for name, got, ref in zip(("dq", "dk", "dv", "dm", "dkv0"), grads, refs, strict=False):
            if ref is None:
                assert got is None, name
            else:
                assert_close(got, ref, dtype, f"{name} {what}")


def test_bshd_layout_and_strided_views(cupy_on_host):
    """Transposed (bshd) inputs and outputs go through element strides, nothing is copied."""
    rng = np.random.default_rng(7)
    c = make_case(rng, 2, 3, 40, 16, 16, F32, mask="inner")
    q, k, v, do = (x.transpose(0, 2, 1, 3).copy() for x in (c.q, c.k, c.v, c.do))
    o = cosattn.forward(q, k, v, c.m, mask=c.mask, layout="bshd", backend="cupy")
    assert o.shape == q.shape
    o_ref, _, _ = reference_forward(c)
    assert_close(o.transpose(0, 2, 1, 3), o_ref, F32, "o bshd")
    dq, dk, dv, dm = cosattn.backward(do, q, k, v, c.m, mask=c.mask, layout="bshd",
                                      backend="cupy")
    for got, ref, name in zip((dq, dk, dv), reference_backward(c)[:3], "qkv", strict=True):
        assert_close(got.transpose(0, 2, 1, 3), ref, F32, f"d{name} bshd")
    assert_close(dm, reference_backward(c)[3], F32, "dm bshd")


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


def test_results_are_the_same_bits_from_run_to_run(cupy_on_host):
    rng = np.random.default_rng(5)
    c = make_case(rng, 1, 2, 45, 5, 7, F32, mask="inner")
    first = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    again = cosattn.backward(c.do, c.q, c.k, c.v, c.m, mask=c.mask, backend="cupy")
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
