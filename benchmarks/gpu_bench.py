"""GPU benchmark: cosattn's GPU backends side by side with the alternatives, in one run.

For every shape (B, H, S, D) and dtype, each implementation is warmed up, run once to read its
peak device memory, then timed with CUDA events (the L2 cache flushed before each run) and
reported by its median, with the bandwidth it achieves over the fewest bytes the operation must
move (read q, k, v, write o; plus read q, k, v, do, write dq, dk, dv for the backward), as a
fraction of the device-to-device copy bandwidth measured in the same run.

Implementations: ``cosattn:cupy`` and ``cosattn:numba`` (the public API with ``backend=``); the
paper's appendix-A cumulative-sum form and the quadratic masked form (``benchmarks.baselines`` on
CuPy); softmax attention through ``torch.nn.functional.scaled_dot_product_attention`` (causal,
FlashAttention for 16-bit inputs; another operation, for scale) when torch is importable; and
Cottention as a user of flash-linear-attention must run it, when ``fla`` is importable: q and k
L2-normalised and v scaled by the stabiliser in torch, then ``chunk_linear_attn(scale=1,
normalize=False)``, all inside the timed call, on inputs in fla's (B, S, H, D) layout. A case
whose estimated memory is over 90% of the free device memory is recorded as skipped.

The step benchmark runs many back-to-back :meth:`cosattn.RecurrentState.step` calls: with
B*H = 1024 and D = 128 (a 64 MiB float32 state, larger than L2) it reports the bandwidth of the
state's bytes (read and written once per step); with B = 1, H = 16 it reports the device time per
step (the steps queued behind a spinning kernel, so the GPU runs them back to back) and the host
time per Python ``step`` call. The targets of issue 11 are evaluated from the results.

``--device cpu`` runs the same code with NumPy (the ``numpy`` backend, wall-clock timing,
tracemalloc peaks) at tiny sizes: a dry run for machines without a GPU.

Run from the repository root::

    python -m benchmarks.gpu_bench                  # bf16, B8 H16 D128 S 2k-64k, B1 H8 S64k
    python -m benchmarks.gpu_bench --quick          # S 16k and B1 H8 S64k only
    python -m benchmarks.gpu_bench --device cpu     # dry run without a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import inspect
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import cosattn
from cosattn import reference

from . import _harness as hx
from . import baselines

MODULE = "benchmarks.gpu_bench"
MODES = ("fwd", "fwdbwd")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}
BASELINES = ("appendix", "quadratic", "sdpa", "fla")
TORCH_IMPLS = ("sdpa", "fla")
MEMORY_FRACTION = 0.9  # of the free device memory a case may plan to use
SLOW_CALL_S = 1.0  # a first call slower than this is the only warm-up call

# The shapes of issue 11, (B, H, S, D): the ones its targets name first, so that a run cut short
# by a time limit has them.
TARGET_SHAPES = ((8, 16, 16384, 128), (8, 16, 8192, 128), (1, 8, 65536, 128))
STEP_SHAPES = ((64, 16, 128), (1, 16, 128))  # (B, H, D): B*H = 1024, and one sequence
# Default sizes per (device, quick).
PROFILES: dict[tuple[str, bool], dict[str, Any]] = {
    ("cuda", False): {"shapes": TARGET_SHAPES + tuple((8, 16, S, 128)
                                                      for S in (2048, 4096, 32768, 65536)),
                      "dtypes": ("bfloat16",), "repeats": 10, "warmup": 2, "steps": 500,
                      "step_shapes": STEP_SHAPES},
    ("cuda", True): {"shapes": (TARGET_SHAPES[0], TARGET_SHAPES[2]), "dtypes": ("bfloat16",),
                     "repeats": 5, "warmup": 1, "steps": 100, "step_shapes": STEP_SHAPES},
    ("cpu", False): {"shapes": ((1, 2, 64, 16), (1, 2, 128, 16), (2, 2, 256, 16)),
                     "dtypes": ("bfloat16", "float32"), "repeats": 3, "warmup": 1, "steps": 50,
                     "step_shapes": ((8, 4, 16), (1, 4, 16))},
    ("cpu", True): {"shapes": ((1, 2, 64, 16), (2, 2, 128, 16)),
                    "dtypes": ("bfloat16", "float32"), "repeats": 1, "warmup": 1, "steps": 10,
                    "step_shapes": ((8, 4, 16), (1, 4, 16))},
}


# ---------------------------------------------------------------- arithmetic (unit-tested)

def min_bytes(mode: str, B: int, H: int, S: int, Dk: int, Dv: int, itemsize: int) -> int:
    """The fewest bytes an implementation must move: each input read once, each output written.

    Forward: read q, k (Dk) and v (Dv), write o (Dv). Forward + backward adds the backward's read
    of q, k, v, do and write of dq, dk, dv. The (H,) ``m`` and ``dm`` are negligible.
    """
    rows = B * H * S
    fwd = rows * (2 * Dk + 2 * Dv) * itemsize
    if mode == "fwd":
        return fwd
    if mode == "fwdbwd":
        return fwd + rows * (4 * Dk + 3 * Dv) * itemsize
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def step_state_bytes(B: int, H: int, Dk: int, Dv: int) -> int:
    """Bytes one step must read and write at least: the float32 state ``kv``, once each way."""
    return 2 * B * H * Dv * Dk * 4


def bandwidth(nbytes: int, seconds: float, copy_bytes_per_s: float | None) -> dict[str, Any]:
    """Achieved bytes/s and its fraction of the measured copy bandwidth."""
    achieved = nbytes / seconds
    fraction = None if not copy_bytes_per_s else achieved / copy_bytes_per_s
    return {"bytes_per_s": achieved, "fraction_of_copy": fraction}


def needed_bytes(impl: str, mode: str, B: int, H: int, S: int, D: int, dtype: Any) -> int:
    """Estimated device memory of one case beyond its inputs (q, k, v, do).

    The baselines of :mod:`benchmarks.baselines` bring their own estimate. For cosattn, SDPA
    and fla it is a lower bound, the outputs (o; dq, dk, dv) plus, for fla, its (B, S, H, D)
    copies of q, k, v, do and the torch-side normalised and scaled tensors (and their
    gradients): a case over it cannot fit, a case under it may still run out of memory, which is
    then recorded as an error.
    """
    if impl in baselines.FORMS:
        return baselines.needed_bytes(impl, mode, B, H, S, D, D, dtype)
    tensor = B * H * S * D * np.dtype(dtype).itemsize
    outputs = 1 if mode == "fwd" else 4
    extra = 0 if impl != "fla" else 4 + (3 if mode == "fwd" else 6)
    return (outputs + extra) * tensor


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"8x16x16384x128"`` as ``(B, H, S, D)``."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is BxHxSxD, four positive integers: {text!r}")
    B, H, S, D = map(int, parts)
    return B, H, S, D


def shape_label(B: int, H: int, S: int, D: int) -> str:
    return f"B{B} H{H} S{S} D{D}"


# ---------------------------------------------------------------- runtimes

class CpuRuntime:
    """The dry path: NumPy arrays, the numpy backend, wall-clock time, tracemalloc peaks."""

    name = "cpu"
    xp = np
    backends = ("numpy",)

    def sync(self) -> None:
        """Nothing to wait for: NumPy is synchronous."""

    def time_one(self, fn: Callable[[], Any]) -> float:
        return hx.wall_time(fn)

    def peak_extra(self, fn: Callable[[], Any], uses_torch: bool) -> dict[str, Any]:
        if uses_torch:
            return {"peak_extra_bytes": None, "peak_method": "not measured (torch on CPU)"}
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            fn()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        return {"peak_extra_bytes": peak, "peak_method": "tracemalloc"}

    def free_bytes(self) -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("cannot read MemAvailable from /proc/meminfo")

    def copy_bandwidth(self) -> dict[str, Any]:
        n = 1 << 27
        a = np.ones(n, dtype=np.uint8)
        b = np.empty_like(a)
        np.copyto(b, a)
        times = [hx.wall_time(lambda: np.copyto(b, a)) for _ in range(5)]
        t = float(np.median(times))
        return {"bytes": n, "median_s": t, "bytes_per_s": 2 * n / t,
                "method": "numpy.copyto of 128 MiB, read + write counted"}

    def device_info(self) -> dict[str, Any]:
        return {"device": hx.machine_info()["cpu"], "kind": "cpu (dry run)"}

    def step_device_time(self, loop: Callable[[], None], host_seconds: float
                         ) -> tuple[float, bool | None]:
        """Seconds of ``loop()``; on the CPU the device is the host (queued: None)."""
        return hx.wall_time(loop), None


class CudaRuntime:
    """CuPy arrays on the current CUDA device, CUDA events, memory-pool and driver peaks."""

    name = "cuda"
    backends = ("cupy", "numba")

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.cupy = cupy
        self.props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.start = cupy.cuda.Event()
        self.end = cupy.cuda.Event()
        l2 = int(self.props.get("l2CacheSize", 50 << 20))
        self.scratch = cupy.empty(max(4 * l2, 256 << 20), dtype=cupy.uint8)
        self.torch = _optional("torch")
        if self.torch is not None and not self.torch.cuda.is_available():
            self.torch = None
        self.spin = cupy.RawKernel(r"""
            extern "C" __global__ void spin(unsigned long long ns) {
                unsigned long long start, now;
                asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
                do {
                    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
                } while (now - start < ns);
            }""", "spin")

    def sync(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def flush_cache(self) -> None:
        """Overwrite L2 so no input is still cached from the previous run."""
        self.scratch.fill(1)

    def time_one(self, fn: Callable[[], Any]) -> float:
        self.flush_cache()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3

    def _release(self) -> None:
        self.sync()
        self.cupy.get_default_memory_pool().free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def peak_extra(self, fn: Callable[[], Any], uses_torch: bool) -> dict[str, Any]:
        """Pool high-water marks (CuPy's pool, torch's allocator) and the drop in free memory.

        The CuPy pool is emptied first, so its size after the call is the most it held at once
        (it only asks the driver for more when no cached block fits). Memory allocated outside
        both pools (e.g. by Numba) shows only in the driver's free memory while still held.
        """
        self._release()
        pool = self.cupy.get_default_memory_pool()
        pool_base = pool.total_bytes()
        torch_base = 0
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()
            torch_base = self.torch.cuda.memory_allocated()
        free_before = self.cupy.cuda.runtime.memGetInfo()[0]
        result = fn()
        self.sync()
        free_after = self.cupy.cuda.runtime.memGetInfo()[0]
        del result
        pool_peak = pool.total_bytes() - pool_base
        torch_peak = 0 if self.torch is None else (
            self.torch.cuda.max_memory_allocated() - torch_base)
        driver = free_before - free_after
        self._release()
        return {"peak_extra_bytes": max(pool_peak + torch_peak, driver),
                "pool_peak_bytes": pool_peak, "torch_peak_bytes": torch_peak,
                "driver_drop_bytes": driver,
                "peak_method": "max(CuPy pool + torch high-water, drop in free device memory)"}

    def free_bytes(self) -> int:
        self._release()
        return int(self.cupy.cuda.runtime.memGetInfo()[0])

    def copy_bandwidth(self) -> dict[str, Any]:
        """Median of 10 device-to-device copies of up to 2 GiB (a quarter of free memory)."""
        n = min(2 << 30, self.free_bytes() // 4)
        a = self.cupy.ones(n, dtype=self.cupy.uint8)
        b = self.cupy.empty_like(a)

        def copy() -> None:
            b.data.copy_from_device_async(a.data, n)

        copy()
        times = [self.time_one(copy) for _ in range(10)]
        t = float(np.median(times))
        return {"bytes": n, "median_s": t, "bytes_per_s": 2 * n / t,
                "method": "cudaMemcpyAsync device to device, read + write counted, CUDA events"}

    def device_info(self) -> dict[str, Any]:
        rt = self.cupy.cuda.runtime
        name = self.props["name"]
        info = {
            "device": name.decode() if isinstance(name, bytes) else name,
            "kind": "cuda",
            "compute_capability": f"{self.props['major']}.{self.props['minor']}",
            "multiprocessors": self.props.get("multiProcessorCount"),
            "l2_bytes": self.props.get("l2CacheSize"),
            "memory_bytes": self.props.get("totalGlobalMem"),
            "driver_api": rt.driverGetVersion(),
            "runtime_api": rt.runtimeGetVersion(),
        }
        if shutil.which("nvidia-smi"):
            query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit"
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                 capture_output=True, text=True, check=False)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        return info

    def step_device_time(self, loop: Callable[[], None], host_seconds: float
                         ) -> tuple[float, bool | None]:
        """Device seconds of ``loop()``, its launches queued behind a spinning kernel.

        The kernel spins for twice the host time the loop takes, so by the time it ends every
        launch of the loop is queued and the GPU runs them back to back, free of host gaps.
        The flag is False when the host could not queue the whole loop while the kernel spun
        (a step that waits for the device, or a full launch queue): host gaps may then be in.
        """
        spin_s = 2 * host_seconds + 1e-5
        self.sync()
        self.spin((1,), (1,), (np.uint64(spin_s * 1e9),))
        self.start.record()
        queued_in = hx.wall_time(loop)
        self.end.record()
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3, queued_in < spin_s


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "torch",
                 "flash-linear-attention", "fla-core", "ml_dtypes"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = _optional("torch")
    if torch is not None:
        out["torch.version.cuda"] = torch.version.cuda
    return out


# ---------------------------------------------------------------- implementations

def device_normal(xp: Any, shape: tuple[int, ...], dtype: Any, seed: int = 0) -> Any:
    """N(0, 1) samples of ``shape`` in ``dtype``, drawn on ``xp``'s device.

    bfloat16 on a GPU is rounded from float32 through its bit pattern (to nearest, ties to
    even), so no bfloat16 arithmetic is asked of the array library; the result is a view with
    ml_dtypes' bfloat16 dtype, as cosattn's own arrays are.
    """
    dtype = np.dtype(dtype)
    x = xp.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    if xp is np or dtype != DTYPES["bfloat16"]:
        return x.astype(dtype)
    u = x.view(xp.uint32)
    bits = ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).astype(xp.uint16)
    del x, u
    return bits.view(xp.int16).view(dtype)


def device_empty(xp: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised array on ``xp``'s device (bfloat16 allocated as int16 and viewed)."""
    dtype = np.dtype(dtype)
    if xp is np or dtype != DTYPES["bfloat16"]:
        return xp.empty(shape, dtype=dtype)
    return xp.empty(shape, dtype=np.int16).view(dtype)


def to_torch(x: Any) -> Any:
    """A torch view of a NumPy or CuPy array (DLPack; bfloat16 crosses as int16 bits)."""
    import torch

    if x.dtype == DTYPES["bfloat16"]:
        return torch.from_dlpack(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def _fla_attention() -> Callable[..., Any]:
    """Cottention through fla on (B, S, H, D) tensors: normalise, scale, chunk_linear_attn."""
    import torch
    import torch.nn.functional as F
    from fla.ops.linear_attn import chunk_linear_attn

    extra = ({"head_first": False}
             if "head_first" in inspect.signature(chunk_linear_attn).parameters else {})

    def attention(q: Any, k: Any, v: Any, m: Any) -> Any:
        S = q.shape[1]
        counts = torch.arange(1, S + 1, device=q.device, dtype=torch.float32)
        w = counts[:, None] ** -torch.sigmoid(m.float())[None, :]  # (S, H)
        qh = F.normalize(q, dim=-1, eps=1e-12)
        kh = F.normalize(k, dim=-1, eps=1e-12)
        vt = v * w[None, :, :, None].to(v.dtype)
        o, _ = chunk_linear_attn(qh, kh, vt, scale=1.0, normalize=False, **extra)
        return o

    return attention


def _sdpa_attention(flash: bool) -> Callable[..., Any]:
    """Causal softmax attention on (B, H, S, D) tensors; FlashAttention only when ``flash``."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(q: Any, k: Any, v: Any, m: Any) -> Any:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attention


def torch_layout(impl: str) -> str:
    """The layout a torch implementation takes its q, k, v, do and gives its results in."""
    return "bshd" if impl == "fla" else "bhsd"


def impl_names(backends: Sequence[str], baseline_names: Sequence[str]) -> list[str]:
    return [f"cosattn:{b}" for b in backends] + list(baseline_names)


def unavailable_reason(impl: str, runtime: Any) -> str | None:
    if impl.startswith("cosattn:"):
        return cosattn.available_backends().get(impl.split(":", 1)[1], "unknown backend")
    if impl in baselines.FORMS:
        return None
    if _optional("torch") is None:
        return "torch is not importable"
    if impl == "fla":
        if runtime.name != "cuda":
            return "flash-linear-attention runs on CUDA only"
        if _optional("fla.ops.linear_attn") is None:
            return "fla (package fla-core / flash-linear-attention) is not importable"
    if runtime.name == "cuda" and runtime.torch is None:
        return "torch has no CUDA device"
    return None


def make_case(impl: str, mode: str, x: dict[str, Any], runtime: Any) -> Callable[[], Any]:
    """A no-argument call running ``impl`` on the inputs ``x`` (q, k, v, do, m).

    Torch implementations get torch views of the inputs made here, outside the call; fla gets
    (B, S, H, D) copies, its own layout, so the call holds only what a user of fla runs.
    """
    q, k, v, do, m = (x[n] for n in ("q", "k", "v", "do", "m"))
    xp = runtime.xp
    if impl.startswith("cosattn:"):
        backend = impl.split(":", 1)[1]
        if mode == "fwd":
            return lambda: cosattn.forward(q, k, v, m, backend=backend)
        return lambda: (cosattn.forward(q, k, v, m, backend=backend),
                        cosattn.backward(do, q, k, v, m, backend=backend))
    if impl in baselines.FORMS:
        fwd = getattr(baselines, f"{impl}_forward")
        bwd = getattr(baselines, f"{impl}_backward")
        if mode == "fwd":
            return lambda: fwd(xp, q, k, v, m)
        return lambda: (fwd(xp, q, k, v, m), bwd(xp, do, q, k, v, m))
    import torch

    t = {n: to_torch(x[n]) for n in ("q", "k", "v", "do", "m")}
    if impl == "fla":
        attention = _fla_attention()
        t.update({n: t[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "do")})
    else:
        attention = _sdpa_attention(flash=runtime.name == "cuda" and q.dtype.itemsize == 2)
    if mode == "fwd":
        def forward() -> Any:
            with torch.no_grad():
                return attention(t["q"], t["k"], t["v"], t["m"])

        return forward
    leaves = [t[n].detach().requires_grad_(True) for n in ("q", "k", "v")]

    def forward_backward() -> Any:
        o = attention(*leaves, t["m"])
        return o, torch.autograd.grad(o, leaves, t["do"])

    return forward_backward


def make_inputs(xp: Any, B: int, H: int, S: int, D: int, dtype: np.dtype, seed: int = 0
                ) -> dict[str, Any]:
    """q, k, v, do ~ N(0, 1) in ``dtype`` (B, H, S, D) on ``xp``'s device; m = 0.5 (H,)."""
    x = {n: device_normal(xp, (B, H, S, D), dtype, seed + i)
         for i, n in enumerate(("q", "k", "v", "do"))}
    x["m"] = xp.full((H,), 0.5, dtype=np.float32)
    return x


# ---------------------------------------------------------------- the runs

def run_case(runtime: Any, impl: str, mode: str, x: dict[str, Any], copy_bw: float | None,
             args: argparse.Namespace) -> dict[str, Any]:
    B, H, S, D = x["q"].shape
    dtype = np.dtype(x["q"].dtype)
    record: dict[str, Any] = {"kind": "attention", "impl": impl, "mode": mode, "S": S, "D": D,
                              "dtype": dtype.name, "B": B, "H": H}
    reason = unavailable_reason(impl, runtime)
    if reason is not None:
        return record | {"status": "unavailable", "reason": reason}
    needed = needed_bytes(impl, mode, B, H, S, D, dtype)
    budget = int(MEMORY_FRACTION * runtime.free_bytes())
    if needed > budget:
        return record | hx.skipped(needed, budget)
    try:
        fn = make_case(impl, mode, x, runtime)
        first = runtime.time_one(fn)
        if first < SLOW_CALL_S:  # a slow call is warm after one run; don't repeat it for nothing
            for _ in range(args.warmup - 1):
                fn()
        runtime.sync()
        peak = runtime.peak_extra(fn, uses_torch=impl in TORCH_IMPLS)
        times = hx.repeat_timed(fn, runtime.time_one, repeats=args.repeats,
                                min_repeats=min(args.repeats, args.min_repeats),
                                max_seconds=args.max_seconds)
    except Exception as exc:  # a failing case is a result too (out of memory, no kernel, ...)
        with contextlib.suppress(Exception):
            runtime.free_bytes()
        return record | {"status": "error", "needed_bytes": needed,
                         "reason": f"{type(exc).__name__}: {exc}"[:500]}
    stats = hx.summary(times)
    moved = min_bytes(mode, B, H, S, D, D, dtype.itemsize)
    return (record | {"status": "ok", "needed_bytes": needed, "min_bytes": moved} | peak | stats
            | bandwidth(moved, stats["median_s"], copy_bw))


def run_step(runtime: Any, impl: str, B: int, H: int, D: int, dtype: np.dtype, steps: int,
             copy_bw: float | None) -> dict[str, Any]:
    """Back-to-back ``RecurrentState.step`` calls into one reused output buffer."""
    record: dict[str, Any] = {"kind": "step", "impl": impl, "B": B, "H": H, "D": D,
                              "dtype": dtype.name, "steps": steps}
    reason = unavailable_reason(impl, runtime)
    if reason is not None:
        return record | {"status": "unavailable", "reason": reason}
    backend = impl.split(":", 1)[1]
    xp = runtime.xp
    try:
        q, k, v = (device_normal(xp, (B, H, D), dtype, seed) for seed in range(3))
        m = xp.full((H,), 0.5, dtype=np.float32)
        out = device_empty(xp, (B, H, D), dtype)
        state = cosattn.RecurrentState.zeros(B, H, D, D, like=q)

        def loop() -> None:
            for _ in range(steps):
                state.step(q, k, v, m, out=out, backend=backend)

        loop()  # warm-up (compiles kernels)
        runtime.sync()
        start = time.perf_counter()
        loop()
        host = time.perf_counter() - start
        runtime.sync()
        device, queued = runtime.step_device_time(loop, host)
    except Exception as exc:  # recorded, like an attention case
        return record | {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    per_step = device / steps
    state_bytes = step_state_bytes(B, H, D, D)
    return (record | {"status": "ok", "device_time_per_step_s": per_step,
                      "host_time_per_call_s": host / steps, "steps_queued_ahead": queued,
                      "state_bytes_per_step": state_bytes}
            | bandwidth(state_bytes, per_step, copy_bw))


def agreement(runtime: Any, backends: Sequence[str], baseline_names: Sequence[str]
              ) -> dict[str, Any]:
    """Each implementation of Cottention against the float64 reference, once, at a small size.

    B=1, H=2, S=100, D=64 in float32 with ``m``; SDPA is another operation and is not checked.
    fla runs its matrix products in TF32 or lower: its errors are recorded, not bounded.
    """
    B, H, S, D = 1, 2, 100, 64
    x = make_inputs(runtime.xp, B, H, S, D, np.dtype(np.float32), seed=3)
    host = {n: np.asarray(_to_host(a), dtype=np.float64) for n, a in x.items()}
    o_ref, _, _ = reference.forward(host["q"], host["k"], host["v"], host["m"])
    dq, dk, dv, _, _ = reference.backward(host["do"], host["q"], host["k"], host["v"], host["m"])
    refs = (o_ref, dq, dk, dv)
    cases = []
    for impl in impl_names(backends, [b for b in baseline_names if b != "sdpa"]):
        reason = unavailable_reason(impl, runtime)
        if reason is not None:
            cases.append({"impl": impl, "status": "unavailable", "reason": reason})
            continue
        try:
            o, grads = make_case(impl, "fwd", x, runtime)(), make_case(impl, "fwdbwd", x,
                                                                         runtime)()[-1]
            got = [_to_host(g) for g in (o, *grads[:3])]
            if torch_layout(impl) == "bshd":
                got = [g.transpose(0, 2, 1, 3) for g in got]
            errors = {n: hx.rel_err(g, r)
                      for n, g, r in zip(("o", "dq", "dk", "dv"), got, refs, strict=True)}
        except Exception as exc:  # recorded
            cases.append({"impl": impl, "status": "error",
                          "reason": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        bound = None if impl == "fla" else hx.SPEC_TOL[np.dtype(np.float32)]
        cases.append({"impl": impl, "status": "ok", "errors": errors, "bound": bound,
                      "ok": bound is None or max(errors.values()) <= bound})
    return {"shape": {"B": B, "H": H, "S": S, "D": D}, "dtype": "float32", "cases": cases,
            "ok": all(c.get("ok", True) for c in cases if c["status"] == "ok")}


def _to_host(a: Any) -> np.ndarray:
    """A NumPy float64 copy of a NumPy, CuPy or torch array."""
    if hasattr(a, "detach"):
        return a.detach().float().cpu().numpy().astype(np.float64)
    if hasattr(a, "get"):
        a = a.view(np.int16).get().view(a.dtype) if a.dtype == DTYPES["bfloat16"] else a.get()
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- targets (issue 11)

def check_targets(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets of issue 11 from the records of one run.

    Each check has a value (None when the run did not measure it), a target and whether it was
    met (None when not measured). cosattn means the cupy backend.
    """
    ok = [r for r in results if r["status"] == "ok"]

    def attention(impl: str, mode: str, B: int, H: int, S: int) -> dict[str, Any] | None:
        return next((r for r in ok if r["kind"] == "attention" and r["impl"] == impl
                     and (r["mode"], r["B"], r["H"], r["S"], r["D"], r["dtype"])
                     == (mode, B, H, S, 128, "bfloat16")), None)

    def step(impl: str, B: int, H: int) -> dict[str, Any] | None:
        return next((r for r in ok if r["kind"] == "step" and r["impl"] == impl
                     and (r["B"], r["H"], r["D"]) == (B, H, 128)), None)

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, op: str, target: float) -> None:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        checks.append({"name": name, "value": value, "target": f"{op} {target:g}", "met": met})

    for S in (8192, 16384, 32768, 65536):
        r = attention("cosattn:cupy", "fwd", 8, 16, S)
        check(f"forward bf16 B8 H16 D128 S{S}: fraction of copy bandwidth",
              None if r is None else r["fraction_of_copy"], ">=", 0.9)
    r = attention("cosattn:cupy", "fwd", 1, 8, 65536)
    check("forward bf16 B1 H8 D128 S65536: fraction of copy bandwidth",
          None if r is None else r["fraction_of_copy"], ">=", 0.6)
    ours = attention("cosattn:cupy", "fwdbwd", 8, 16, 16384)
    for other, factor in (("fla", 2.0), ("sdpa", 5.0)):
        theirs = attention(other, "fwdbwd", 8, 16, 16384)
        check(f"forward+backward bf16 B8 H16 D128 S16384: speed-up over {other}",
              None if ours is None or theirs is None else theirs["median_s"] / ours["median_s"],
              ">=", factor)
    r = step("cosattn:cupy", 64, 16)
    check("step B64 H16 D128 (B*H = 1024): fraction of copy bandwidth on the state",
          None if r is None else r["fraction_of_copy"], ">=", 0.8)
    r = step("cosattn:cupy", 1, 16)
    check("step B1 H16 D128: device time per step (us)",
          None if r is None else r["device_time_per_step_s"] * 1e6, "<=", 10)
    check("step B1 H16 D128: host time per call (us)",
          None if r is None else r["host_time_per_call_s"] * 1e6, "<=", 40)
    ratios = []
    for r in ok:
        if r["impl"] != "cosattn:numba":
            continue
        twin = next((c for c in ok if c["impl"] == "cosattn:cupy" and all(
            c.get(k) == r.get(k) for k in ("kind", "mode", "B", "H", "S", "D", "dtype"))), None)
        if twin is not None:
            key = "median_s" if r["kind"] == "attention" else "device_time_per_step_s"
            ratios.append(r[key] / twin[key])
    check("numba time over cupy time, worst case on the same shapes",
          max(ratios) if ratios else None, "<=", 3.0)
    measured = [c["met"] for c in checks if c["met"] is not None]
    return {"checks": checks, "measured": len(measured), "all_met": bool(measured)
            and all(measured)}


# ---------------------------------------------------------------- output

def markdown(data: dict[str, Any]) -> str:
    dev, cfg = data["device"], data["config"]
    bw = data["copy_bandwidth"]
    lines = [
        "# cosattn GPU benchmark" + {"cpu": " (dry run on the CPU)", "cuda": ""}[cfg["device"]]
        + (" (quick profile)" if cfg["quick"] else ""),
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['created']}  ",
        f"Device: {dev['device']}" + "".join(
            f", {k} {dev[k]}" for k in ("compute_capability", "driver_api", "runtime_api")
            if k in dev) + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + "  ",
        f"Copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']})  ",
        f"Config: causal, m given; {cfg['warmup']} warm-up run(s), median of "
        f"{cfg['min_repeats']} to {cfg['repeats']} timed runs.",
        "",
        "Cells: median ms (achieved bandwidth over the minimum bytes, as % of the copy "
        "bandwidth); peak extra device memory in the JSON.",
    ]
    attention = [r for r in data["results"] if r["kind"] == "attention"]
    impls = list(dict.fromkeys(r["impl"] for r in attention))
    shapes = [tuple(s) for s in cfg["shapes"]]
    for dtype in cfg["dtypes"]:
        for mode in cfg["modes"]:
            what = "forward" if mode == "fwd" else "forward + backward"
            lines += ["", f"## {dtype}, {what}", ""]
            found = {(r["impl"], (r["B"], r["H"], r["S"], r["D"])): r for r in attention
                     if (r["mode"], r["dtype"]) == (mode, dtype)}
            rows = [[shape_label(*shape),
                     *(hx.cell(found.get((impl, shape)), _attention_cell) for impl in impls)]
                    for shape in sorted(shapes)]
            lines.append(hx.markdown_table(["shape", *impls], rows))
    steps = [r for r in data["results"] if r["kind"] == "step"]
    if steps:
        lines += ["", "## Recurrent step", ""]
        rows = [[r["impl"], r["B"], r["H"], r["D"], r["dtype"], r.get("steps"),
                 hx.cell(r, lambda r: f"{r['device_time_per_step_s'] * 1e6:.1f}"),
                 hx.cell(r, lambda r: f"{r['host_time_per_call_s'] * 1e6:.1f}"),
                 hx.cell(r, lambda r: f"{r['bytes_per_s'] / 1e9:.1f} GB/s"
                         + ("" if r["fraction_of_copy"] is None
                            else f" ({100 * r['fraction_of_copy']:.0f}%)"))]
                for r in steps]
        lines.append(hx.markdown_table(["impl", "B", "H", "D", "dtype", "steps",
                                        "device us/step", "host us/call", "state bandwidth"],
                                       rows))
    targets = data["targets"]
    lines += ["", "## Targets (issue 11)", ""]
    rows = [[c["name"], "-" if c["value"] is None else f"{c['value']:.3g}", c["target"],
             {True: "yes", False: "NO", None: "not measured"}[c["met"]]]
            for c in targets["checks"]]
    lines.append(hx.markdown_table(["target", "value", "wanted", "met"], rows))
    agree = data["agreement"]
    lines += ["", "## Agreement with the float64 reference "
              f"({', '.join(f'{k}={v}' for k, v in agree['shape'].items())}, float32)", ""]
    rows = [[c["impl"], c["status"],
             *(f"{c['errors'][n]:.1e}" if c["status"] == "ok" else "-"
               for n in ("o", "dq", "dk", "dv")),
             "-" if c.get("bound") is None else f"{c['bound']:g}",
             {True: "yes", False: "NO", None: "-"}[c.get("ok")]] for c in agree["cases"]]
    lines.append(hx.markdown_table(["impl", "status", "o", "dq", "dk", "dv", "bound", "ok"],
                                   rows))
    notes = sorted({f"{r['impl']}: {r['reason']}" for r in data["results"]
                    if r["status"] in ("unavailable", "error")})
    if notes:
        lines += ["", "## Not run", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _attention_cell(r: dict[str, Any]) -> str:
    frac = r["fraction_of_copy"]
    return hx.fmt_ms(r["median_s"]) + ("" if frac is None else f" ({100 * frac:.0f}%)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda, or cpu for a dry run of the same code with NumPy at tiny sizes")
    p.add_argument("--quick", action="store_true", help="the small profile (a short rerun)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", metavar="BxHxSxD",
                   help="attention shapes, e.g. 8x16x16384x128 (Dk = Dv = D)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backends", nargs="*", choices=("cupy", "numba", "numpy"),
                   help="cosattn backends to run (default: the device's; none: baselines only)")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    p.add_argument("--repeats", type=int, help="timed runs per case, at most")
    p.add_argument("--min-repeats", type=int, default=3,
                   help="timed runs per case before --max-seconds may stop it")
    p.add_argument("--warmup", type=int)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop repeating a case after this long, once --min-repeats are done")
    p.add_argument("--steps", type=int, help="back-to-back steps per step measurement")
    p.add_argument("--no-step", action="store_true", help="skip the step benchmark")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    profile = PROFILES[(args.device, args.quick)]
    for key in ("shapes", "dtypes", "repeats", "warmup", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.step_shapes = profile["step_shapes"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = hx.command_line(MODULE, argv)
    try:
        runtime = CudaRuntime() if args.device == "cuda" else CpuRuntime()
    except Exception as exc:  # no CuPy, no driver, no device
        print(f"cannot use a CUDA device: {type(exc).__name__}: {exc}\n"
              "(--device cpu runs the same code with NumPy as a dry run)", file=sys.stderr)
        return 2
    if args.backends is None:
        args.backends = list(runtime.backends)
    stem = "gpu_bench" + ("_dry" if args.device == "cpu" else "") + ("_quick" if args.quick else "")
    config = {"device": args.device, "quick": args.quick,
              "shapes": [list(s) for s in args.shapes], "dtypes": list(args.dtypes),
              "modes": list(args.modes), "backends": list(args.backends),
              "baselines": list(args.baselines),
              "repeats": args.repeats, "min_repeats": min(args.repeats, args.min_repeats),
              "warmup": args.warmup, "max_seconds": args.max_seconds,
              "steps": None if args.no_step else args.steps,
              "step_shapes": None if args.no_step else [list(s) for s in args.step_shapes],
              "memory_fraction": MEMORY_FRACTION}
    data: dict[str, Any] = {"benchmark": "gpu", "command": command, "created": hx.now(),
                            "device": runtime.device_info(), "host": hx.machine_info(),
                            "versions": versions(), "config": config}
    print(f"{command}\n{data['device']['device']}", flush=True)
    data["copy_bandwidth"] = runtime.copy_bandwidth()
    copy_bw = data["copy_bandwidth"]["bytes_per_s"]
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    data["agreement"] = agreement(runtime, args.backends, args.baselines)
    print("agreement with the reference:", "ok" if data["agreement"]["ok"] else "FAILED",
          flush=True)
    data["results"] = results = []

    def save() -> None:
        data["targets"] = check_targets(results)
        hx.write_json(args.out / f"{stem}.json", data)
        (args.out / f"{stem}.md").write_text(markdown(data))

    if not args.no_step:  # first: quick, and a run cut short by a time limit still has them
        for B, H, D in args.step_shapes:
            for dtype_name in args.dtypes:
                for backend in args.backends:
                    rec = run_step(runtime, f"cosattn:{backend}", B, H, D, DTYPES[dtype_name],
                                   args.steps, copy_bw)
                    results.append(rec)
                    print(f"step B={B} H={H} D={D} {dtype_name} cosattn:{backend} " + hx.cell(
                        rec, lambda r: f"{r['device_time_per_step_s'] * 1e6:.1f} us/step, "
                                       f"{r['host_time_per_call_s'] * 1e6:.1f} us/call"),
                          flush=True)
        save()
    impls = impl_names(args.backends, args.baselines)
    for dtype_name in args.dtypes:
        for B, H, S, D in args.shapes:
            x = make_inputs(runtime.xp, B, H, S, D, DTYPES[dtype_name])
            for mode in args.modes:
                for impl in impls:
                    rec = run_case(runtime, impl, mode, x, copy_bw, args)
                    results.append(rec)
                    print(f"{dtype_name:8s} {shape_label(B, H, S, D):22s} {mode:6s} "
                          f"{impl:13s} " + hx.cell(rec, _attention_cell), flush=True)
            del x
            save()
    data["finished"] = hx.now()
    save()
    print(f"wrote {args.out / stem}.{{json,md}}")
    return 0 if data["agreement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
