"""The numba backend without a GPU: its property tests in the Numba CUDA simulator (a
subprocess, so the simulator stays out of this process) and its kernels compiled to PTX."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import cosattn

from helpers import BFLOAT16

numba = pytest.importorskip("numba")
cuda = pytest.importorskip("numba.cuda")
_numba = pytest.importorskip("cosattn.backends._numba")
kernels = pytest.importorskip("cosattn.backends._numba_kernels")

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR_TESTS = Path(__file__).resolve().parent / "numba_sim"


def test_property_tests_pass_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(SIMULATOR_TESTS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    output = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, output
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 20, output
    assert "failed" not in run.stdout and "error" not in run.stdout.lower(), output


def test_unavailable_says_why():
    reason = cosattn.available_backends()["numba"]
    if cuda.is_available():
        assert reason is None
    else:
        assert "GPU" in reason


def _array(dtype, ndim):
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "A")


def _scalar(dtype):
    return numba.from_dtype(np.dtype(dtype))


def _bits(dtype):
    """What kernels see of an input dtype: bfloat16 arrays arrive as their uint16 bits."""
    return np.dtype(np.uint16) if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype)


def _acc(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _sweep(output, causal, dtype, dm=False):
    spec = _numba.sweep_spec(output, causal=causal, dtype=dtype, Dx=64, Dz=64, dm=dm,
                             config=_numba.GPU)
    io, acc = _bits(dtype), _acc(dtype)
    out = acc if spec.out_acc else io
    types = ([_array(io, 4)] * 3 + [_array(out, 4)] + [_array(acc, 4)] * 2
             + [_array(np.bool_, 2), _array(acc, 1), _array(np.int64, 1), _array(io, 4),
                _array(acc, 3)] + [numba.types.boolean] * 5 + [_scalar(acc)])
    return kernels.sweep_kernel(spec), tuple(types), spec


def _normalise(dtype):
    kernel = kernels.normalise_backward_kernel(_acc(dtype).name, np.dtype(dtype) == BFLOAT16,
                                               _numba.GPU.threads, _numba.GPU.lanes)
    io, acc = _bits(dtype), _acc(dtype)
    return kernel, (_array(acc, 4), _array(io, 4), _array(io, 4), _scalar(acc)), None


def _step(dtype):
    acc, io = _acc(dtype), _bits(dtype)
    kernel = kernels.step_kernel(acc.name, np.dtype(dtype) == BFLOAT16, _numba.GPU.threads,
                                 _numba.GPU.lanes)
    types = (_array(acc, 4), _array(np.int64, 1), *[_array(io, 3)] * 4, _array(acc, 1),
             _array(np.bool_, 1), numba.types.boolean, numba.types.boolean, _scalar(acc))
    return kernel, types, None


def _counts():
    types = (_array(np.int64, 1), _array(np.bool_, 2), _array(np.int64, 1), numba.types.int64,
             numba.types.boolean, numba.types.boolean)
    return kernels.count_total_kernel(_numba.GPU.threads), types, None


def _count_step():
    types = (_array(np.int64, 1), _array(np.bool_, 1), numba.types.boolean)
    return kernels.count_step_kernel, types, None


def _dm():
    f32 = np.float32
    return kernels.dm_finish_kernel("float32"), (_array(f32, 3), _array(f32, 1),
                                                 _array(f32, 1)), None


# A deliberate list: the four sweep shapes (forward; dq with its scratch output; dv against
# the sequence with dm; bidirectional) across the dtypes' load/store paths, and each small kernel.
INSTANCES = {
    "sweep-o-causal-float32": lambda: _sweep("o", True, np.float32),
    "sweep-dq-causal-float16": lambda: _sweep("dq", True, np.float16),
    "sweep-dv-causal-float32-dm": lambda: _sweep("dv", True, np.float32, dm=True),
    "sweep-o-bidirectional-bfloat16": lambda: _sweep("o", False, BFLOAT16),
    "sweep-dv-bidirectional-float64-dm": lambda: _sweep("dv", False, np.float64, dm=True),
    "normalise-backward-bfloat16": lambda: _normalise(BFLOAT16),
    "normalise-backward-float64": lambda: _normalise(np.float64),
    "step-float32": lambda: _step(np.float32),
    "step-bfloat16": lambda: _step(BFLOAT16),
    "count-total": _counts,
    "count-step": _count_step,
    "dm-finish": _dm,
}

_SHARED = re.compile(r"^\.(?:visible )?\.shared \.align \d+ \.b8 \w+\[(\d+)\];", re.M)


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name", list(INSTANCES))
def test_kernels_compile_to_ptx(monkeypatch, name, cc):
    # Compiling the device functions a kernel calls asks the driver for the current device's
    # compute capability (numba-cuda's Dispatcher.compile_device); answer it without a GPU.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=cc))
    kernel, types, spec = INSTANCES[name]()
    ptx, _ = cuda.compile_ptx(kernel.py_func, types, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if spec is not None:
        # tiles() sizes the state slice from an estimate of the static shared memory
        static = sum(int(size) for size in _SHARED.findall(ptx))
        estimate = np.dtype(spec.acc).itemsize * kernels._static_elements(spec.C, spec.NT,
                                                                         spec.TD, spec.TZ)
        assert 0 < static <= estimate
        assert estimate + spec.shared_bytes(64) <= kernels.SHARED_BYTES
