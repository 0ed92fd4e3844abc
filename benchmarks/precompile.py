"""Compile every kernel instance of the cupy backend into CuPy's kernel cache, in parallel.

A fresh GPU host has an empty kernel cache, and the backend compiles each instance with NVRTC
on its first call: seconds each, one after the other, inside whatever test or timing makes the
call. This builds every module of ``_cupy.all_specs()`` beforehand, one worker process per core,
through the backend's own build (``_cupy._kernel`` for each kernel of the module, on device 0),
so CuPy's disk cache (``CUPY_CACHE_DIR``, by default ``~/.cupy/kernel_cache``) holds exactly
what every later process looks up.

    python -m benchmarks.precompile              # every instance, one worker per core
    python -m benchmarks.precompile --jobs 4
    python -m benchmarks.precompile --list       # the instances, without compiling (no GPU)

Exit status 0 when every module compiled, 1 when one failed (its NVRTC log is printed), 2 when
the backend cannot run here.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cosattn.backends import _cupy

MODULE = "benchmarks.precompile"
COST = {"backward.cu": 0, "forward.cu": 1, "step.cu": 2}  # submitted longest first


def build(spec: _cupy.ModuleSpec) -> dict[str, Any]:
    """Build ``spec`` as the backend does on a first call (into CuPy's disk cache), each of its
    kernels looked up."""
    start = time.perf_counter()
    try:
        for expression in spec.expressions:
            _cupy._kernel(spec, expression, 0)
    except Exception as exc:  # reported with the NVRTC log, the other modules go on
        return {"spec": spec, "ok": False, "seconds": time.perf_counter() - start,
                "error": f"{type(exc).__name__}: {exc}"[-6000:]}
    return {"spec": spec, "ok": True, "seconds": time.perf_counter() - start}


def cache_dir() -> Path:
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def _entries(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*")) if folder.is_dir() else 0


def describe(spec: _cupy.ModuleSpec) -> str:
    return f"{spec.source}: {', '.join(spec.expressions)}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--list", action="store_true", help="print the instances and stop")
    args = p.parse_args(argv)
    specs = sorted(_cupy.all_specs(), key=lambda s: COST.get(s.source, len(COST)))
    if args.list:
        print("\n".join(describe(s) for s in specs))
        print(f"{len(specs)} modules, {sum(len(s.expressions) for s in specs)} kernels")
        return 0
    reason = _cupy.unavailable()
    if reason is not None:
        print(f"the cupy backend cannot run here: {reason}", file=sys.stderr)
        return 2
    folder = cache_dir()
    before = _entries(folder)
    start = time.perf_counter()
    # spawn: each worker makes its own CUDA context (a forked one would not work)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
        results = list(pool.map(build, specs))
    failed = [r for r in results if not r["ok"]]
    for r in sorted(results, key=lambda r: -r["seconds"]):
        print(f"{'ok    ' if r['ok'] else 'FAILED'} {r['seconds']:6.1f} s  {describe(r['spec'])}")
    for r in failed:
        print(f"\n{describe(r['spec'])}:\n{r['error']}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} modules built in "
          f"{time.perf_counter() - start:.1f} s with {args.jobs} workers; cache {folder}: "
          f"{_entries(folder) - before} new entries, {_entries(folder)} in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
