"""What the CPU and GPU harnesses share: the error measure, machine facts, timing loops, output.

Results are plain dicts: one record per (implementation, mode, size) with ``status`` "ok",
"skipped" (would not fit: ``needed_bytes`` says how much it would take), "unavailable" or
"error" (``reason`` says why).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# docs/spec.md, "Numbers": err(x, ref) <= SPEC_TOL[dtype] against the float64 reference.
SPEC_TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5,
            np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.5e-2}


def rel_err(x: Any, ref: Any) -> float:
    """docs/spec.md's error measure: ``|x - ref| / max(|ref|, 1e-6 sqrt(N))`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs reference {ref.shape}")
    floor = 1e-6 * np.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _blas() -> dict[str, Any]:
    try:
        config = np.show_config(mode="dicts")
    except TypeError:  # NumPy < 1.26 prints only
        return {}
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return {k: blas[k] for k in ("name", "version", "openblas configuration") if k in blas}


def _thread_pools() -> list[dict[str, Any]] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "num_threads", "version", "architecture")
    return [{k: pool.get(k) for k in keys} for pool in threadpool_info()]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine skews timings."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """Facts about this machine and the Python stack that numbers depend on."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "MKL_NUM_THREADS") if v in os.environ}
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": None if affinity is None else len(affinity),
        "memory_bytes": _memory_total(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas(),
        "blas_threads_env": threads,
        "thread_pools": _thread_pools(),
    }


def cpu_header(title: str, data: dict[str, Any]) -> list[str]:
    """The first lines of a CPU benchmark's Markdown: the title, the command, the date and the
    machine (load averages at the start and the end, the BLAS library) the numbers came from."""
    mach = data["machine"]
    blas = mach["blas"]
    return [
        title,
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['created']}  ",
        f"Machine: {mach['cpu']}, {mach['usable_cpus']} usable of {mach['cpu_count']} CPUs, "
        f"{fmt_bytes(mach['memory_bytes'])} memory; load average at start "
        f"{', '.join(f'{x:.2f}' for x in mach['load_average'] or [])}, at end "
        f"{', '.join(f'{x:.2f}' for x in data['load_average_end'] or [])}  ",
        f"Python {mach['python']}, NumPy {mach['numpy']} ({blas.get('name', '?')} "
        f"{blas.get('version', '')}), {mach['platform']}  ",
        "Thread pools (threadpoolctl): " + ("; ".join(
            f"{pool['internal_api']} {pool['version']}, {pool['architecture']} kernels, "
            f"{pool['num_threads']} threads" for pool in mach.get("thread_pools") or ())
            or "none found") + "  ",
    ]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def repeat_timed(fn: Callable[[], Any], time_one: Callable[[Callable[[], Any]], float], *,
                 repeats: int, min_repeats: int, max_seconds: float) -> list[float]:
    """Seconds of up to ``repeats`` runs of ``fn`` timed by ``time_one``.

    Stops early once ``min_repeats`` runs are done and ``max_seconds`` of wall time have passed,
    so the slow baselines at large S do not take hours.
    """
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        times.append(time_one(fn))
        if len(times) >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    return times


def wall_time(fn: Callable[[], Any]) -> float:
    """Seconds of one synchronous call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and max (seconds) and every sample."""
    return {"median_s": float(np.median(times)), "min_s": float(min(times)),
            "max_s": float(max(times)), "repeats": len(times), "times_s": list(times)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds to three significant digits, whole numbers from 100 ms on."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def skipped(needed: int, budget: int) -> dict[str, Any]:
    """The record of a case that would not fit ``budget`` bytes."""
    return {"status": "skipped", "needed_bytes": int(needed), "budget_bytes": int(budget),
            "reason": f"needs about {fmt_bytes(needed)}, over the budget of {fmt_bytes(budget)}"}


def cell(record: dict[str, Any] | None, value: Callable[[dict[str, Any]], str]) -> str:
    """A Markdown table cell: ``value(record)`` when it ran, else why not."""
    if record is None:
        return "-"
    status = record["status"]
    if status == "ok":
        return value(record)
    if status == "skipped":
        return f"skipped (needs {fmt_bytes(record['needed_bytes'])})"
    return status
