"""What the cupy backend's kernels cost an H100/H200, read from their compiled code without a GPU.

Every kernel instance the backend can build (``_cupy.all_specs``) is compiled by NVRTC to a
cubin for sm_90 with the backend's own sources and options; ``cuobjdump -res-usage`` gives each
kernel's registers, stack and static shared memory, ``cuobjdump -elf`` the thread-block cluster
it declares, ``cuobjdump -sass`` its machine code (the ``nvidia-cuda-cuobjdump`` and
``nvidia-cuda-nvdisasm`` wheels run on a CPU machine). With the
dynamic shared memory the backend's launch asks for, this gives the resident blocks and warps
per SM by the sm_90 limits (:data:`SM90`), and for the target shapes of issue 10 the blocks,
waves and SMs busy of each launch.

    python -m benchmarks.cuda_resources [--out DIR] [--as-before]

writes ``cuda_resources.json`` and ``cuda_resources.md`` (default ``benchmarks/results``).
The JSON keeps the ``before`` section it finds (the kernels as they were before the rebuild of
issue 10); ``--as-before`` writes this run there instead. tests/test_nvrtc_compile.py compiles
with :func:`compile_cubin` and checks the machine code with :func:`sass_counts`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from cosattn.backends import _cupy

from ._harness import command_line

ARCH = "sm_90"
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space")  # RawModule's own options

# An sm_90 SM (H100, H200): registers, shared memory, warps and blocks it can hold; the most
# dynamic shared memory a block may opt in to; SMs of an H100 SXM / H200. The static shared
# memory cuobjdump reports for an sm_90 kernel includes the 1 KiB the system reserves per block.
SM90 = {"registers": 65536, "register_unit": 256, "shared": 228 * 1024,
        "dynamic_per_block": 227 * 1024, "warps": 64, "blocks": 32, "sms": 132}

# The shapes of issue 10 (B, H, S, D) in bfloat16.
TARGETS = {"B8-H16-S16k-D128": (8, 16, 16384, 128), "B1-H8-S64k-D128": (1, 8, 65536, 128),
           "B8-H32-S16k-D128": (8, 32, 16384, 128)}


# ------------------------------------------------------------------------------- compiling


def _checked(result: tuple) -> tuple:
    from cuda.bindings import nvrtc

    if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {result[0]}")
    return result[1:]


def source_spec(source: str) -> _cupy.ModuleSpec:
    """One spec with every template instance of ``source`` the backend can ask for (what the
    NVRTC test compiles as one program)."""
    kernels = sorted({kernel for spec in _cupy.all_specs() if spec.source == source
                      for kernel in zip(spec.expressions, spec.shared, spec.clusters,
                                        strict=True)})
    return _cupy.ModuleSpec(source, *map(tuple, zip(*kernels, strict=True)))


def compile_cubin(source: str, arch: str) -> dict:
    """Compile every instance of ``source`` for ``arch`` (:func:`source_spec`) as CuPy's
    RawModule would: ``ok``, the ``log``, the ``cubin``, the lowered ``names`` of the instances
    and the ``shared`` memory of each (its module's table, read from the cubin)."""
    from cuda.bindings import nvrtc

    spec = source_spec(source)
    expressions = spec.expressions
    (program,) = _checked(nvrtc.nvrtcCreateProgram(_cupy.module_text(spec).encode(),
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
                  "log": log.rstrip(b"\0 ").decode(errors="replace"), "cubin": b"", "names": {},
                  "shared": {}}
        if result["ok"]:
            (size,) = _checked(nvrtc.nvrtcGetCUBINSize(program))
            cubin = b" " * size
            _checked(nvrtc.nvrtcGetCUBIN(program, cubin))
            result["cubin"] = cubin
            result["names"] = {e: _checked(nvrtc.nvrtcGetLoweredName(program, e.encode()))[0]
                               .decode() for e in expressions}
            table = np.frombuffer(symbol(cubin, _cupy.LAYOUT_TABLE), dtype=np.uint64)
            result["shared"] = dict(zip(expressions, map(int, table), strict=True))
        return result
    finally:
        nvrtc.nvrtcDestroyProgram(program)


# ---------------------------------------------------------------------- reading the cubin


def symbol(elf: bytes, name: str) -> bytes:
    """The initial bytes of the global variable ``name`` of a cubin (a 64-bit ELF file)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
                for i in range(shnum)]
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, _, _, shndx, value, length = struct.unpack_from("<IBBHQQ", elf, at)
            end = elf.index(b"\0", strings + st_name)
            if elf[strings + st_name:end].decode() == name:
                data = sections[shndx][4] + value
                return elf[data:data + length]
    raise KeyError(f"{name} is not in the cubin")


def tool(name: str) -> str:
    """The path of a CUDA binary utility (``cuobjdump``, ``nvdisasm``): NVIDIA's wheels first."""
    from cuda.pathfinder import find_nvidia_binary_utility

    path = find_nvidia_binary_utility(name)
    if path is None:
        raise RuntimeError(f"{name} not found: pip install nvidia-cuda-{name}")
    return path


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), *flags, f.name], check=True,
                              capture_output=True, text=True).stdout


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``{lowered name: {registers, stack, shared (static), local}}`` of every function."""
    usage, name = {}, None
    for line in _cuobjdump(cubin, "-res-usage").splitlines():
        line = line.strip()
        if line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif name is not None and (m := _RES.search(line)):
            usage[name] = dict(zip(("registers", "stack", "shared", "local"),
                                   map(int, m.groups()), strict=True))
            name = None
    return usage


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def sass(cubin: bytes) -> dict[str, list[str]]:
    """``{lowered name: [opcode with modifiers, ...]}``: the machine code of every kernel, the
    functions it calls included."""
    code: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _cuobjdump(cubin, "-sass").splitlines():
        stripped = line.strip()
        if stripped.startswith("Function : "):
            current = code.setdefault(stripped[len("Function : "):], [])
        elif current is not None and (m := _INSTRUCTION.search(line)):
            current.append(m.group(1))
    return code


# What each counted class of instructions is (by opcode and modifiers).
def _ldg(op: str) -> bool:
    """A global load (LDG), not an asynchronous copy (LDGSTS) or its commit (LDGDEPBAR)."""
    return op == "LDG" or op.startswith("LDG.")


CLASSES = {
    "local loads (LDL)": lambda op: op.startswith("LDL"),
    "local stores (STL)": lambda op: op.startswith("STL"),
    "generic loads (LD)": lambda op: op == "LD" or op.startswith("LD.E"),
    "generic stores (ST)": lambda op: op == "ST" or op.startswith("ST.E"),
    "global loads 128-bit (LDG.128)": lambda op: _ldg(op) and ".128" in op,
    "global loads narrower (LDG)": lambda op: _ldg(op) and ".128" not in op,
    "async copies (LDGSTS)": lambda op: op.startswith("LDGSTS"),
    "global stores (STG)": lambda op: op.startswith("STG"),
    "shared loads (LDS)": lambda op: op.startswith("LDS") and not op.startswith("LDSM"),
    "shared matrix loads (LDSM)": lambda op: op.startswith("LDSM"),
    "shared stores (STS)": lambda op: op.startswith("STS"),
    "barriers (BAR)": lambda op: op.startswith("BAR"),
    "cluster barrier halves (UCGABAR)": lambda op: op.startswith("UCGABAR"),
    "tensor core (HMMA)": lambda op: op.startswith("HMMA"),
    "reciprocals (MUFU.RCP)": lambda op: op.startswith("MUFU.RCP"),
    "calls (CALL)": lambda op: op.startswith("CALL"),
}


def sass_counts(opcodes: list[str]) -> dict[str, int]:
    """Instructions in all and per class of :data:`CLASSES`."""
    counts = Counter()
    for op in opcodes:
        for name, test in CLASSES.items():
            if test(op):
                counts[name] += 1
    return {"instructions": len(opcodes), **{name: counts[name] for name in CLASSES}}


# ---------------------------------------------------------------------------- occupancy


def occupancy(registers: int, static: int, dynamic: int, threads: int) -> dict[str, Any]:
    """Resident blocks and warps per sm_90 SM for a block of ``threads`` threads using
    ``registers`` per thread and ``static`` (as cuobjdump reports it) + ``dynamic`` bytes of
    shared memory, and which resources limit it."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(registers * 32 / SM90["register_unit"]) * SM90["register_unit"]
    limits = {"registers": SM90["registers"] // (per_warp * warps),
              "warps": SM90["warps"] // warps, "blocks": SM90["blocks"]}
    if dynamic > SM90["dynamic_per_block"]:
        limits["shared"] = 0
    else:
        limits["shared"] = SM90["shared"] // max(static + dynamic, 1)
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "limited_by": sorted(k for k, v in limits.items() if v == blocks)}


def waves(grid: int, blocks_per_sm: int) -> dict[str, Any]:
    """Waves and SMs busy for a launch of ``grid`` blocks on :data:`SM90`'s SMs."""
    slots = blocks_per_sm * SM90["sms"]
    return {"blocks": grid, "waves": round(grid / slots, 3) if slots else None,
            "sms_busy": min(grid, SM90["sms"]) if slots else 0}


_INFO = ".nv.info."
_CLUSTER = re.compile(r"Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)")


def clusters(cubin: bytes) -> dict[str, int]:
    """``{lowered name: blocks per cluster}`` of every kernel that declares a cluster
    (``EIATTR_CTA_PER_CLUSTER`` of its ``.nv.info`` section: ``__cluster_dims__``)."""
    found: dict[str, int] = {}
    name, attribute = None, False
    for line in _cuobjdump(cubin, "-elf").splitlines():
        if line.startswith(_INFO):
            name, attribute = line[len(_INFO):].strip(), False
        elif name is not None and "EIATTR_CTA_PER_CLUSTER" in line:
            attribute = True
        elif attribute and (m := _CLUSTER.search(line)):
            x, y, z = (int(v, 16) for v in m.groups())
            found[name], attribute = x * y * z, False
    return found


# -------------------------------------------------------------------------------- report


def _compile_all(workers: int) -> dict[str, dict]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = {source: pool.submit(compile_cubin, source, ARCH) for source in _cupy.SOURCES}
        return {source: job.result() for source, job in jobs.items()}


def measure(workers: int = 2) -> dict[str, Any]:
    """Per kernel instance: resources, occupancy at its launch and SASS counts; per target
    shape: the launches of the forward and the backward."""
    instances = []
    builds = _compile_all(workers)
    for source, build in builds.items():
        if not build["ok"]:
            raise RuntimeError(f"NVRTC failed on cuda/{source}:\n{build['log']}")
        usage = resource_usage(build["cubin"])
        code = sass(build["cubin"])
        cluster = clusters(build["cubin"])
        for expression, lowered in sorted(build["names"].items()):
            res = usage[lowered]
            dynamic = build["shared"][expression]
            instances.append({"source": source, "kernel": expression, **res,
                              "threads": _cupy.THREADS, "dynamic_shared": dynamic,
                              "cluster": cluster.get(lowered, 1),
                              "sass": sass_counts(code[lowered])})
    bf16 = np.dtype(ml_dtypes.bfloat16)
    targets = {name: [{"kernel": launch.expression, "blocks": launch.grid}
                      for launch in (_cupy.forward_plan(bf16, B, H, S, D, D).launches
                                     + _cupy.backward_plan(bf16, B, H, S, D, D,
                                                           with_m=True).launches)]
               for name, (B, H, S, D) in TARGETS.items()}
    return derive({"instances": instances, "targets": targets})


def derive(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` with the occupancy of each instance and the waves of each target launch
    (re)computed from its resources and grids by :data:`SM90`."""
    instances = [{**r, **occupancy(r["registers"], r["shared"], r["dynamic_shared"],
                                   r["threads"])} for r in section["instances"]]
    per_sm = {r["kernel"]: r["blocks_per_sm"] for r in instances}
    targets = {name: [{**t, **waves(t["blocks"], per_sm[t["kernel"]])} for t in launches]
               for name, launches in section["targets"].items()}
    return {**section, "instances": instances, "targets": targets}


def _markdown(result: dict) -> str:
    lines = [f"# CUDA kernel resources (sm_90, H100/H200: {SM90['sms']} SMs)", "",
             f"Compiled by NVRTC {result['now']['nvrtc']} for {ARCH}; read by cuobjdump. "
             "Limits per SM: "
             f"{SM90['registers']} registers, {SM90['shared'] // 1024} KiB shared memory "
             f"(at most {SM90['dynamic_per_block'] // 1024} KiB dynamic per block; the static "
             "figure includes the 1 KiB the system reserves per block), "
             f"{SM90['warps']} warps, {SM90['blocks']} blocks.", ""]
    for label, section in (("Now", result["now"]), ("Before the rebuild (issue 10)",
                                                     result["before"])):
        if not section:
            continue
        lines += [f"## {label}", "", f"Measured {section['date']} with `{section['command']}`.",
                  "", "### Per instance", "",
                  "| kernel | threads | registers | stack | shared (static + dynamic) "
                  "| cluster | blocks/SM | warps/SM | limited by |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in section["instances"]:
            lines.append(f"| `{r['kernel']}` | {r['threads']} | {r['registers']} | {r['stack']} "
                         f"| {r['shared']} + {r['dynamic_shared']} | {r.get('cluster', 1)} "
                         f"| {r['blocks_per_sm']} | {r['warps_per_sm']} "
                         f"| {', '.join(r['limited_by'])} |")
        lines += ["", "### Target shapes (bfloat16)", "",
                  "| shape | kernel | blocks | waves | SMs busy |", "|---|---|---|---|---|"]
        for shape, launches in section["targets"].items():
            for t in launches:
                lines.append(f"| {shape} | `{t['kernel']}` | {t['blocks']} | {t['waves']} "
                             f"| {t['sms_busy']} |")
        classes = list(section["instances"][0]["sass"])
        lines += ["", "### SASS instruction counts (kernel and the functions it calls)", "",
                  "| kernel | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        for r in section["instances"]:
            lines.append(f"| `{r['kernel']}` | "
                         + " | ".join(str(r["sass"][c]) for c in classes) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--as-before", action="store_true",
                        help="record this run as the state before the rebuild")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from cuda.bindings import nvrtc

    major, minor = _checked(nvrtc.nvrtcVersion())
    run = {"command": command_line("benchmarks.cuda_resources", argv),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "nvrtc": f"{major}.{minor}", "numpy": np.__version__, **measure(args.workers)}
    path = args.out / "cuda_resources.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    before = run if args.as_before else previous.get("before")
    result = {"now": run, "before": before and derive(before)}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "cuda_resources.md").write_text(_markdown(result))
    print(f"wrote {path} and cuda_resources.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
