"""The numba backend without a GPU: its property tests in the Numba CUDA simulator (a
subprocess, so the simulator stays out of this process) and its kernels compiled to PTX."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree

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


def test_property_tests_pass_in_the_simulator(tmp_path):
    """pytest's own verdict on the simulator suite: its exit code and its JUnit report."""
    report = tmp_path / "numba_sim.xml"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         f"--junitxml={report}", str(SIMULATOR_TESTS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    output = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, output
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == 0, output
    assert counts["tests"] - counts["skipped"] >= 20, (counts, output)


def test_unavailable_says_why():
    reason = cosattn.available_backends()["numba"]
    if cuda.is_available():
        assert reason is None
    else:
        assert "GPU" in reason


def _sweep(output, causal, dtype):
    dtype = np.dtype(dtype)
    spec = _numba.sweep_spec(output, causal=causal, dtype=dtype, Dx=64, Dz=64,
                             config=_numba.GPU)
    return kernels.sweep(spec, spec.acc, spec.acc), spec


GPU = _numba.GPU
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
# A deliberate list: the four sweep shapes (forward; dq with its scratch output; dv against
# the sequence with dm; bidirectional) across the dtypes' load/store paths, the state alone
# (cosattn.absorb), and each small kernel.
INSTANCES = {
    "sweep-o-causal-float32": lambda: _sweep("o", True, np.float32),
    "sweep-state-causal-float16": lambda: _sweep("state", True, np.float16),
    "sweep-state-bidirectional-float32": lambda: _sweep("state", False, np.float32),
    "sweep-dq-causal-float16": lambda: _sweep("dq", True, np.float16),
    "sweep-dv-causal-float32": lambda: _sweep("dv", True, np.float32),
    "sweep-o-bidirectional-bfloat16": lambda: _sweep("o", False, BFLOAT16),
    "sweep-dv-bidirectional-float64": lambda: _sweep("dv", False, np.float64),
    "normalise-backward-bfloat16": lambda: (
        kernels.normalise_backward(BFLOAT16, GPU.threads, GPU.lanes), None),
    "normalise-backward-float64": lambda: (
        kernels.normalise_backward(F64, GPU.threads, GPU.lanes), None),
    "step-float32": lambda: (kernels.step(F32, F32, GPU.threads, GPU.lanes), None),
    "step-bfloat16-float64-state": lambda: (
        kernels.step(F64, BFLOAT16, GPU.threads, GPU.lanes), None),
    "count-total": lambda: (kernels.count_total(GPU.threads), None),
    "count-step": lambda: (kernels.COUNT_STEP, None),
    "dm-finish": lambda: (kernels.dm_finish(F32), None),
}

_SHARED = re.compile(r"^\.(?:visible )?\.shared \.align \d+ \.b8 \w+\[(\d+)\];", re.M)


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name", list(INSTANCES))
def test_kernels_compile_to_ptx(monkeypatch, name, cc):
    # Compiling the device functions a kernel calls asks the driver for the current device's
    # compute capability (numba-cuda's Dispatcher.compile_device); answer it without a GPU.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=cc))
    kernel, spec = INSTANCES[name]()
    ptx, _ = cuda.compile_ptx(kernel.function, kernel.signature, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if spec is not None:
        # tiles() sizes the state slice from an estimate of the static shared memory
        static = sum(int(size) for size in _SHARED.findall(ptx))
        estimate = spec.acc.itemsize * kernels._static_elements(spec.C, spec.NT, spec.TD,
                                                                spec.TZ)
        assert 0 < static <= estimate
        assert estimate + spec.shared_bytes(64) <= kernels.SHARED_BYTES


@pytest.mark.parametrize("acc", [np.float32, np.float64])
def test_tiles_fit_shared_memory_or_say_why(acc):
    size = np.dtype(acc).itemsize
    for Dx, Dz in [(1, 1), (64, 64), (128, 48), (160, 160), (512, 512), (1000, 3)]:
        TD, TZ = kernels.tiles(acc, Dx, Dz, GPU.chunk, GPU.threads)
        assert TZ >= 1 and TZ & (TZ - 1) == 0 and TZ <= max(1, 2 * Dz)
        used = size * (kernels._static_elements(GPU.chunk, GPU.threads, TD, TZ) + TZ * Dx)
        assert used <= kernels.SHARED_BYTES
    with pytest.raises(ValueError, match="head size 100000 is too large"):
        kernels.tiles(acc, 100_000, 8, GPU.chunk, GPU.threads)
