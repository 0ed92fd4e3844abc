"""Every CUDA C++ kernel instance of the cupy backend compiles to cubin with NVRTC (no GPU needed).

The sources, the instance list and the options are the backend's own (``_cupy.source_text``,
``_cupy.all_specs``, ``_cupy.compile_options``: the headers come from NVIDIA's nvrtc and crt
wheels found by ``cuda.pathfinder``), plus the two options CuPy's RawModule adds, so what this
compiles is what runs. The instances of one source are compiled as one NVRTC program per target,
the programs two at a time in worker processes.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
from cuda.bindings import nvrtc

from cosattn.backends import _cupy

ARCHS = ("sm_80", "sm_90")
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space")  # RawModule's own options
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
COST = {"backward.cu": 0, "forward.cu": 1, "step.cu": 2}  # longest first


def _expressions(source: str) -> list[str]:
    return sorted({e for spec in _cupy.all_specs() if spec.source == source
                   for e in spec.expressions})


def _checked(result: tuple) -> tuple:
    if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {result[0]}")
    return result[1:]


def compile_cubin(source: str, arch: str) -> dict:
    """Compile every instance of ``source`` for ``arch``: the cubin, log and lowered names."""
    expressions = _expressions(source)
    (program,) = _checked(nvrtc.nvrtcCreateProgram(_cupy.source_text(source).encode(),
                                                   source.encode(), 0, [], []))
    try:
        for e in expressions:
            _checked(nvrtc.nvrtcAddNameExpression(program, e.encode()))
        options = [*_cupy.compile_options(), *CUPY_ADDS, f"--gpu-architecture={arch}"]
        (status,) = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
        (size,) = _checked(nvrtc.nvrtcGetProgramLogSize(program))
        log = b" " * size
        _checked(nvrtc.nvrtcGetProgramLog(program, log))
        result = {"ok": status == nvrtc.nvrtcResult.NVRTC_SUCCESS,
                  "log": log.rstrip(b"\0 ").decode(errors="replace"), "cubin": b"", "names": {}}
        if result["ok"]:
            (size,) = _checked(nvrtc.nvrtcGetCUBINSize(program))
            cubin = b" " * size
            _checked(nvrtc.nvrtcGetCUBIN(program, cubin))
            result["cubin"] = cubin
            result["names"] = {e: _checked(nvrtc.nvrtcGetLoweredName(program, e.encode()))[0]
                               for e in expressions}
        return result
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _params(item: pytest.Item) -> dict:
    callspec = getattr(item, "callspec", None)
    return {} if callspec is None else callspec.params


@pytest.fixture(scope="module")
def builds(request):
    """The selected (source, arch) programs, compiled two at a time in worker processes."""
    selected = [_params(item) for item in request.session.items if item.module is request.module]
    jobs = sorted({(p["source"], p["arch"]) for p in selected if "source" in p},
                  key=lambda job: COST[job[0]])
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        yield {job: pool.submit(compile_cubin, *job) for job in jobs}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", _cupy.SOURCES)
def test_every_instance_compiles_to_cubin(builds, source, arch):
    result = builds[(source, arch)].result()
    assert result["ok"], f"NVRTC failed on cuda/{source} for {arch}:\n{result['log']}"
    assert "warning" not in result["log"].lower(), result["log"]
    cubin = result["cubin"]
    assert cubin[:4] == ELF_MAGIC
    assert int.from_bytes(cubin[18:20], "little") == EM_CUDA
    expressions = _expressions(source)
    assert sorted(result["names"]) == expressions
    for e, lowered in result["names"].items():
        assert lowered.startswith(b"_Z"), (e, lowered)
        assert lowered in cubin, f"{e} ({lowered!r}) is missing from the cubin"


def test_instance_list_covers_every_dtype_and_head_size():
    """The deliberate list: 4 dtypes x (5 specialised head sizes + the general path) per sweep
    kernel, and the recurrent step for every input dtype and allowed state dtype."""
    forward = _expressions("forward.cu")
    assert len(forward) == 4 * 6
    for ctype in ("__half", "__nv_bfloat16", "float", "double"):
        for head in (*_cupy.SPECIALISED, _cupy.GENERAL):
            assert any(e.startswith(f"cosattn::forward_kernel<{ctype}, {head}, {head},")
                       for e in forward)
    backward = _expressions("backward.cu")
    assert len(backward) == 2 * 4 * 6 + 2
    assert len(_expressions("step.cu")) == 7 + 1
