"""Every CUDA C++ kernel instance of the cupy backend compiles to cubin with NVRTC (no GPU needed),
and its machine code for sm_90 is what a bandwidth-bound kernel's should be.

The sources, the instance list and the options are the backend's own (``_cupy.module_text``,
``_cupy.all_specs``, ``_cupy.compile_options``: the headers come from NVIDIA's nvrtc and crt
wheels found by ``cuda.pathfinder``), plus the two options CuPy's RawModule adds, so what this
compiles is what runs (``benchmarks.cuda_resources.compile_cubin``). The instances of one source
are compiled as one NVRTC program per target, the programs two at a time in worker processes.
The sm_90 cubins are then read with cuobjdump (the ``nvidia-cuda-cuobjdump`` wheel): resources,
the shared-memory table the backend reads back, and SASS instruction counts (docs/design.md,
"Reading the compiled code"). Checks of targets the kernels do not meet yet are
``xfail(strict=True)``, with today's figure in the reason.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import ml_dtypes
import numpy as np
import pytest

from benchmarks import cuda_resources
from cosattn.backends import _cupy

ARCHS = ("sm_80", "sm_90")
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
COST = {"backward.cu": 0, "forward.cu": 1, "step.cu": 2}  # longest first
SWEEPS = ("forward_kernel", "values_kernel", "queries_keys_kernel")
MAIN = (*SWEEPS, "step_kernel")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _expressions(source: str) -> list[str]:
    return list(cuda_resources.source_spec(source).expressions)


def _params(item: pytest.Item) -> dict:
    callspec = getattr(item, "callspec", None)
    return {} if callspec is None else callspec.params


@pytest.fixture(scope="module")
def builds(request):
    """The (source, arch) programs the selected tests need, compiled two at a time in worker
    processes."""
    jobs = set()
    for item in request.session.items:
        if item.module is request.module:
            params = _params(item)
            if "arch" in params:
                jobs.add((params["source"], params["arch"]))
            if "sm90" in getattr(item, "fixturenames", ()):
                jobs.update((source, "sm_90") for source in _cupy.SOURCES)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        yield {job: pool.submit(cuda_resources.compile_cubin, *job)
               for job in sorted(jobs, key=lambda job: COST[job[0]])}


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
    assert sorted(result["names"]) == sorted(expressions)
    for e, lowered in result["names"].items():
        assert lowered.startswith("_Z"), (e, lowered)
        assert lowered.encode() in cubin, f"{e} ({lowered!r}) is missing from the cubin"
    # The table the backend reads back: a number for every kernel whose spec names a layout.
    spec = cuda_resources.source_spec(source)
    for e, layout in zip(spec.expressions, spec.shared, strict=True):
        assert (result["shared"][e] > 0) == (layout != "0"), (e, layout, result["shared"][e])


def test_instance_list_covers_every_dtype_and_width():
    """The deliberate list: 4 dtypes x (5 widths + one wide) per sweep kernel, and for the
    16-bit widths with clusters (64, 128, 256) their instances without (the variant
    "no-clusters"), and the recurrent step for every input dtype and allowed state dtype."""
    forward = _expressions("forward.cu")
    assert len(forward) == 4 * 6 + 2 * 3 + 2 * 4  # and scan_kernel and count_kernel per dtype
    for ctype in ("__half", "__nv_bfloat16", "float", "double"):
        for W in (*_cupy.WIDTHS, _cupy.WIDE_EXAMPLE):
            assert any(e.startswith(f"cosattn::forward_kernel<{ctype}, {W},") for e in forward)
    assert len(_expressions("backward.cu")) == 2 * (4 * 6 + 2 * 3) + 4
    assert len(_expressions("step.cu")) == 7 + 4


# ------------------------------------------------------------------------ compiled code


@pytest.fixture(scope="module")
def sm90(builds):
    """Per kernel instance for sm_90: resources (cuobjdump -res-usage), dynamic shared memory
    (the module's table), blocks per cluster (cuobjdump -elf), opcodes (cuobjdump -sass)."""
    kernels = {}
    for source in _cupy.SOURCES:
        result = builds[(source, "sm_90")].result()
        assert result["ok"], result["log"]
        usage = cuda_resources.resource_usage(result["cubin"])
        code = cuda_resources.sass(result["cubin"])
        clusters = cuda_resources.clusters(result["cubin"])
        for e, lowered in result["names"].items():
            kernels[e] = {**usage[lowered], "dynamic_shared": result["shared"][e],
                          "cluster": clusters.get(lowered, 1), "opcodes": code[lowered]}
    return kernels


def _family(sm90: dict, family: str) -> dict:
    return {e: k for e, k in sm90.items() if e.startswith(f"cosattn::{family}<")}


@functools.cache
def _counts(opcodes: tuple[str, ...]) -> dict[str, int]:
    return cuda_resources.sass_counts(list(opcodes))


SIXTEEN_BIT = ("__half", "__nv_bfloat16")


@pytest.mark.parametrize("family", MAIN)
def test_no_local_memory_in_the_main_kernels(sm90, family):
    for e, k in _family(sm90, family).items():
        counts = _counts(tuple(k["opcodes"]))
        assert (k["stack"], k["local"]) == (0, 0), e
        assert counts["local loads (LDL)"] == counts["local stores (STL)"] == 0, e


@pytest.mark.parametrize("family", MAIN)
def test_memory_is_addressed_by_its_space(sm90, family):
    """No generic stores, and no generic loads but the 16-byte reads of another block's shared
    memory in a cluster (ld.shared::cluster has no LDS form on sm_90): this block's shared memory
    through LDS/LDSM/STS, global memory through LDG/STG (bfloat16 fragments too: common.cuh,
    load_tile)."""
    for e, k in _family(sm90, family).items():
        counts = _counts(tuple(k["opcodes"]))
        assert counts["generic stores (ST)"] == 0, e
        generic = [op for op in k["opcodes"] if op == "LD" or op.startswith("LD.E")]
        if k["cluster"] == 1:
            assert generic == [], e
        else:
            assert generic and all(op == "LD.E.128" for op in generic), (e, set(generic))


@pytest.mark.parametrize("family", MAIN)
def test_tiles_and_states_move_in_16_byte_accesses(sm90, family):
    """Every main kernel has 128-bit global loads or asynchronous copies (it falls back to
    narrower ones where strides or alignment forbid 16 bytes); the step stores its state rows
    16 bytes at a time too."""
    for e, k in _family(sm90, family).items():
        counts = _counts(tuple(k["opcodes"]))
        wide = counts["global loads 128-bit (LDG.128)"] + counts["async copies (LDGSTS)"]
        assert wide > 0, e
        if family == "step_kernel":
            assert any(op.startswith("STG") and ".128" in op for op in k["opcodes"]), e


@pytest.mark.parametrize("family", SWEEPS)
def test_sweep_tiles_stream_through_asynchronous_copies(sm90, family):
    """The sweeps fetch their tiles by cp.async (LDGSTS) into shared stages, commit each chunk's
    copies as a group (LDGDEPBAR) and wait for them (DEPBAR); 16-bit tiles 16 bytes a copy
    (common.cuh, Block::fetch and Block::walk)."""
    for e, k in _family(sm90, family).items():
        ops = k["opcodes"]
        assert _counts(tuple(ops))["async copies (LDGSTS)"] > 0, e
        assert "LDGDEPBAR" in ops and any(op.startswith("DEPBAR") for op in ops), e
        if e.split("<")[1].split(",")[0] in SIXTEEN_BIT:
            assert any(op.startswith("LDGSTS") and ".128" in op for op in ops), e


def _occupancy(k: dict) -> dict:
    return cuda_resources.occupancy(k["registers"], k["shared"], k["dynamic_shared"],
                                    _cupy.THREADS)


@pytest.mark.parametrize("family", SWEEPS)
def test_16_bit_D128_sweeps_keep_two_blocks_and_eight_warps_per_sm(sm90, family):
    """In clusters and without (the variant "no-clusters")."""
    for ctype in ("__half", "__nv_bfloat16"):
        instances = [(e, k) for e, k in _family(sm90, family).items()
                     if e.startswith(f"cosattn::{family}<{ctype}, 128,")]
        assert sorted(k["cluster"] for _, k in instances) == [1, 4]
        for e, k in instances:
            occupancy = _occupancy(k)
            assert occupancy["blocks_per_sm"] >= 2 and occupancy["warps_per_sm"] >= 8, (
                e, occupancy)


def test_the_step_keeps_eight_blocks_per_sm(sm90):
    """The step moves its state once: compiled for 10 resident blocks per SM with a float32
    state and 8 with a float64 one, with no spills (test_no_local_memory_in_the_main_kernels)."""
    for e, k in _family(sm90, "step_kernel").items():
        wanted = 10 if e.endswith(", float>") else 8
        assert _occupancy(k)["blocks_per_sm"] >= wanted, (e, _occupancy(k))


def test_a_long_sequence_of_few_heads_fills_the_gpu():
    """B1 H8 D128 S64k: the forward's launches give every SM of an H200 at least 2 blocks (264):
    the sequence split."""
    plan = _cupy.forward_plan(BF16, 1, 8, 65536, 128, 128)
    assert plan.segments > 1
    sweeps = [launch for launch in plan.launches if "scan_kernel" not in launch.expression]
    assert min(launch.grid for launch in sweeps) >= 2 * cuda_resources.SM90["sms"]


def test_a_long_sequence_of_few_heads_fills_the_gpu_in_the_backward():
    """B1 H8 D128 S64k: every sweep of the backward (its own kernels and the forward_kernel
    passes forming its segments' states) gives every SM of an H200 at least 2 blocks."""
    plan = _cupy.backward_plan(BF16, 1, 8, 65536, 128, 128, with_m=True)
    assert plan.segments > 1
    sweeps = [launch for launch in plan.launches
              if not any(k in launch.expression for k in ("scan_kernel", "dm_kernel"))]
    assert len(sweeps) == 4
    assert min(launch.grid for launch in sweeps) >= 2 * cuda_resources.SM90["sms"]


@pytest.mark.parametrize("ctype", SIXTEEN_BIT)
def test_q_and_k_are_read_once_per_head_and_chunk(sm90, ctype):
    """The forward and the backward at D128 in 16 bits: the 4 slices of a (b, h, segment) are
    consecutive blocks declared to the compiler as one cluster (the cubin's
    EIATTR_CTA_PER_CLUSTER), which reads each chunk of the Q and K operands (q and k in the
    forward) once, a quarter per block, and shares the rest through distributed shared memory:
    cluster barriers and 16-byte reads of the other blocks' shared memory in the machine code
    (tests/test_cuda_emulated.py counts the bytes copied)."""
    dtype = np.dtype(np.float16) if ctype == "__half" else BF16
    G = _cupy.cluster(dtype, 128)
    assert G == _cupy.slices(dtype, 128, 128) == 4
    plans = (_cupy.forward_plan(dtype, 8, 16, 16384, 128, 128),
             _cupy.backward_plan(dtype, 8, 16, 16384, 128, 128, with_m=False))
    launches = [launch for plan in plans for launch in plan.launches]
    assert [launch.expression.split("<")[0] for launch in launches] == [
        f"cosattn::{family}" for family in SWEEPS]
    for launch in launches:
        assert launch.grid == 8 * 16 * G and launch.expression.endswith(f", {G}>")
        k = sm90[launch.expression]
        assert k["cluster"] == G
        ops = k["opcodes"]
        assert "UCGABAR_ARV" in ops and "UCGABAR_WAIT" in ops
        assert _counts(tuple(ops))["generic loads (LD)"] > 0


def test_every_kernel_declares_the_cluster_its_spec_names(sm90):
    """The clusters the backend launches by (``ModuleSpec.clusters``) are the ones the compiler
    was told: for the sweeps of 16-bit tiles of several slices up to W = 256, 2 to 8 blocks
    dividing the slices (1 in the variant "no-clusters"); 1 (no cluster) for every other
    kernel."""
    for spec in _cupy.all_specs():
        for e, G in zip(spec.expressions, spec.clusters, strict=True):
            assert sm90[e]["cluster"] == G, (e, sm90[e]["cluster"], G)
    for name in _cupy.VARIANTS:
        with _cupy.variant(name):
            specs = [make(dtype, W) for make in (_cupy.forward_spec, _cupy.backward_spec)
                     for dtype in (np.float16, BF16, np.float32, np.float64)
                     for W in (*_cupy.WIDTHS, _cupy.WIDE_EXAMPLE)]
        for spec in specs:
            for e, G in zip(spec.expressions, spec.clusters, strict=True):
                ctype, *args = e.split("<")[1].rstrip(">").split(", ")
                sweep = e.split("<")[0] in (f"cosattn::{f}" for f in SWEEPS)
                if sweep and ctype in SIXTEEN_BIT and name != "no-clusters":
                    W, _, SL, _ = map(int, args)
                    assert (G > 1) == (SL < W <= 256) and G <= 8 and W // SL % G == 0, e
                else:
                    assert G == 1, e
