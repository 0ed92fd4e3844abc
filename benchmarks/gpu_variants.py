"""Every kernel variant of the cupy backend: its timings at the target shapes and its errors
against docs/spec.md's bounds, on random and on cancelling inputs.

The backend lists its variants as ``_cupy.VARIANTS`` (names, the default first) and selects one
for the calls made inside the context manager ``_cupy.variant(name)``; a backend that lists
none has one variant, ``default``. Variants are meant for the design choices that decide the
next step (single-pass or three-pass 16-bit products, with or without clusters): this
script times each at bf16 B8 H16 S16384 D128 and B1 H8 S65536 D128, forward and forward +
backward (CUDA events, medians, L2 flushed, as :mod:`benchmarks.gpu_bench`), and measures each
against the float64 reference at B1 H2 S2048 D128:

- ``random`` inputs: q, k, v, do ~ N(0, 1), with an incoming state and ``dstate``;
- ``cancelling`` inputs: nearly parallel queries and keys, values and output gradients whose
  sign alternates along the sequence, so that every output, the state and the gradients are
  sums whose terms cancel to a small fraction of their size (no state, which would hide that).
  Products that round their operands to 16 bits show it; docs/spec.md's bounds still apply.

    python -m benchmarks.gpu_variants               # bfloat16 and float16
    python -m benchmarks.gpu_variants --quick       # bfloat16, B8 H16 S16384 only, S=1024 errors
    python -m benchmarks.gpu_variants --device cpu  # dry run: the numpy backend, tiny sizes

Writes ``gpu_variants.json`` and ``.md`` (``_quick``, ``_dry``) into ``--out``. A variant whose
calls fail is recorded with the reason, and the others still run. Exit status 1 when an error is
over its bound or a variant could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from cosattn import backward, forward, reference
from cosattn.backends import _cupy

from . import _harness as hx
from . import gpu_bench as gb

MODULE = "benchmarks.gpu_variants"
PROFILES: dict[tuple[str, bool], dict[str, Any]] = {
    ("cuda", False): {"timing_shapes": ((8, 16, 16384, 128), (1, 8, 65536, 128)),
                      "error_shape": (1, 2, 2048, 128), "dtypes": ("bfloat16", "float16"),
                      "repeats": 5},
    ("cuda", True): {"timing_shapes": ((8, 16, 16384, 128),), "error_shape": (1, 2, 1024, 128),
                     "dtypes": ("bfloat16",), "repeats": 3},
    ("cpu", False): {"timing_shapes": ((1, 2, 128, 16),), "error_shape": (1, 2, 96, 16),
                     "dtypes": ("bfloat16", "float32"), "repeats": 2},
    ("cpu", True): {"timing_shapes": ((1, 2, 64, 16),), "error_shape": (1, 2, 80, 16),
                    "dtypes": ("bfloat16", "float32"), "repeats": 1},
}
KINDS = ("random", "cancelling")


def variants() -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """The cupy backend's kernel variants by name, each with a factory of the context manager
    that selects it (``_cupy.VARIANTS`` and ``_cupy.variant``); ``default`` when it lists none."""
    names = getattr(_cupy, "VARIANTS", None)
    if names is None:
        return {"default": contextlib.nullcontext}
    return {name: functools.partial(_cupy.variant, name) for name in names}


# ---------------------------------------------------------------- inputs and errors

def make_inputs(kind: str, B: int, H: int, S: int, D: int, dtype: np.dtype, seed: int = 0
                ) -> dict[str, Any]:
    """Host inputs of ``kind`` (``random`` or ``cancelling``) rounded to ``dtype``: q, k, v, do
    (B, H, S, D), m (H,) float32, and for ``random`` a state (kv0, count0) and dkv."""
    rng = np.random.default_rng(seed)

    def noise(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape)

    x: dict[str, Any] = {"m": rng.uniform(-2, 2, size=H).astype(np.float32)}
    if kind == "random":
        x.update({n: noise(B, H, S, D) for n in ("q", "k", "v", "do")})
        x["kv0"] = noise(B, H, D, D).astype(np.float32)
        x["count0"] = rng.integers(0, 50, size=B).astype(np.int64)
        x["dkv"] = noise(B, H, D, D).astype(np.float32)
    elif kind == "cancelling":
        u = noise(1, H, 1, D)
        sign = (-1.0) ** np.arange(S)[None, None, :, None]
        x["q"] = 3 * u + 0.3 * noise(B, H, S, D)
        x["k"] = 3 * u + 0.3 * noise(B, H, S, D)
        x["v"] = sign * 4 * noise(1, H, 1, D) + 0.05 * noise(B, H, S, D)
        x["do"] = sign * 4 * noise(1, H, 1, D) + 0.05 * noise(B, H, S, D)
        x.update(kv0=None, count0=None, dkv=None)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for n in ("q", "k", "v", "do"):
        x[n] = x[n].astype(dtype)
    return x


def references(x: dict[str, Any]) -> dict[str, Any]:
    """The float64 reference's results for the inputs ``x`` (as rounded), and dm's scale."""
    f = {n: None if a is None else np.asarray(a, dtype=np.float64) for n, a in x.items()}
    o, kv, _ = reference.forward(f["q"], f["k"], f["v"], f["m"], kv0=f["kv0"],
                                 count0=x["count0"])
    dq, dk, dv, dm, dkv0 = reference.backward(f["do"], f["q"], f["k"], f["v"], f["m"],
                                              kv0=f["kv0"], count0=x["count0"], dkv=f["dkv"])
    refs = {"o": o, "kv": kv, "dq": dq, "dk": dk, "dv": dv, "dm": dm}
    if dkv0 is not None:
        refs["dkv0"] = dkv0
    B, _, S, _ = f["q"].shape
    refs["dm_scale"] = dm_scale(f["v"], dv, f["m"], np.ones((B, S), bool), x["count0"])
    return refs


def dm_scale(v: np.ndarray, dv_ref: np.ndarray, m: np.ndarray, mask: np.ndarray,
             count0: np.ndarray | None) -> float:
    """The size of the terms dm sums, ``|sigma'(m) t|`` over t[b, h, j] = ln max(1, c_j)
    (dv_j . v_j) (docs/spec.md, "Measuring dm"; dṽ_j . ṽ_j = dv_j . v_j), causal counts."""
    count0 = np.zeros(mask.shape[0], np.int64) if count0 is None else count0
    c = reference.counts(mask, count0, True)
    terms = np.log(np.maximum(c, 1))[:, None, :] * np.einsum("bhsd,bhsd->bhs", dv_ref, v)
    sig = 1 / (1 + np.exp(-np.asarray(m, dtype=np.float64)))
    return float(np.linalg.norm(terms * (sig * (1 - sig))[None, :, None]))


def dm_error(dm: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """docs/spec.md, "Measuring dm": against max(|dm_ref|, |sigma' t|, 1e-6 sqrt(H))."""
    floor = 1e-6 * np.sqrt(ref.size)
    return float(np.linalg.norm(dm - ref) / max(np.linalg.norm(ref), scale, floor))


def _to_device(xp: Any, a: Any) -> Any:
    if a is None or xp is np:
        return a
    if a.dtype == gb.DTYPES["bfloat16"]:
        return xp.asarray(a.view(np.int16)).view(a.dtype)
    return xp.asarray(a)


def errors(xp: Any, backend: str, x: dict[str, Any], refs: dict[str, Any]) -> dict[str, float]:
    """Each result of one forward and one backward call against the reference."""
    from cosattn import RecurrentState

    d = {n: _to_device(xp, a) for n, a in x.items()}
    state = None if d["kv0"] is None else RecurrentState(d["kv0"], d["count0"])
    o, out = forward(d["q"], d["k"], d["v"], d["m"], state=state, return_state=True,
                     backend=backend)
    grads = backward(d["do"], d["q"], d["k"], d["v"], d["m"], state=state, dstate=d["dkv"],
                     backend=backend)
    got = dict(zip(("dq", "dk", "dv", "dm", "dkv0"), grads, strict=False)) | {"o": o,
                                                                            "kv": out.kv}
    result = {}
    for name, ref in refs.items():
        if name == "dm_scale":
            continue
        value = gb._to_host(got[name])
        result[name] = (dm_error(value, ref, refs["dm_scale"]) if name == "dm"
                        else hx.rel_err(value, ref))
    return result


# ---------------------------------------------------------------- the run

def timings(runtime: Any, backend: str, shape: tuple[int, int, int, int], dtype: np.dtype,
            copy_bw: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    B, H, S, D = shape
    x = gb.make_inputs(runtime.xp, B, H, S, D, dtype)
    calls = {"fwd": lambda: forward(x["q"], x["k"], x["v"], x["m"], backend=backend),
             "fwdbwd": lambda: (forward(x["q"], x["k"], x["v"], x["m"], backend=backend),
                                backward(x["do"], x["q"], x["k"], x["v"], x["m"],
                                         backend=backend))}
    records = []
    for mode, fn in calls.items():
        record = {"shape": list(shape), "mode": mode}
        try:
            fn()  # warm-up: loads the kernels
            times = hx.repeat_timed(fn, runtime.time_one, repeats=args.repeats,
                                    min_repeats=min(args.repeats, 2), max_seconds=10.0)
        except Exception as exc:  # recorded (out of memory, a variant that cannot run, ...)
            records.append(record | {"status": "error",
                                     "reason": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        stats = hx.summary(times)
        moved = gb.min_bytes(mode, B, H, S, D, D, dtype.itemsize)
        records.append(record | {"status": "ok"} | stats
                       | gb.bandwidth(moved, stats["median_s"], copy_bw))
    return records


def markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    dry = " (dry run on the CPU)" if cfg["device"] == "cpu" else ""
    lines = [f"# cosattn kernel variants{dry}",
             "", f"Command: `{data['command']}`  ", f"Date: {data['created']}  ",
             f"Device: {data['device']['device']}  ",
             f"Copy bandwidth: {data['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s  ",
             f"Errors at {gb.shape_label(*cfg['error_shape'])} against the float64 reference "
             "(docs/spec.md's measure; dm by its own).", "",
             "## Timings", "",
             "Cells: median ms (achieved bandwidth over the minimum bytes, % of copy).", ""]
    heads = [f"{gb.shape_label(*s)} {m}" for s in cfg["timing_shapes"] for m in gb.MODES]
    rows = []
    for r in data["results"]:
        cells = {(tuple(t["shape"]), t["mode"]): t for t in r["timings"]}
        rows.append([r["variant"], r["dtype"], *(
            hx.cell(cells.get((tuple(s), m)), gb._attention_cell)
            for s in cfg["timing_shapes"] for m in gb.MODES)])
    lines.append(hx.markdown_table(["variant", "dtype", *heads], rows))
    lines += ["", "## Errors", ""]
    rows = []
    for r in data["results"]:
        for kind in KINDS:
            if kind in r["failed"]:
                rows.append([r["variant"], r["dtype"], kind, r["failed"][kind], "-",
                             f"{r['bound']:g}", "NO"])
                continue
            errs = r["errors"][kind]
            worst = max(errs, key=errs.get)
            rows.append([r["variant"], r["dtype"], kind,
                         ", ".join(f"{n} {e:.1e}" for n, e in errs.items()),
                         f"{worst} {errs[worst]:.2e}", f"{r['bound']:g}",
                         "yes" if errs[worst] <= r["bound"] else "NO"])
    lines.append(hx.markdown_table(["variant", "dtype", "inputs", "errors", "worst", "bound",
                                    "within"], rows))
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="the profile of a short rerun")
    p.add_argument("--dtypes", nargs="+", choices=tuple(gb.DTYPES))
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    profile = PROFILES[(args.device, args.quick)]
    for key in ("dtypes", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    args.timing_shapes, args.error_shape = profile["timing_shapes"], profile["error_shape"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = hx.command_line(MODULE, argv)
    try:
        runtime = gb.CudaRuntime() if args.device == "cuda" else gb.CpuRuntime()
    except Exception as exc:  # no CuPy, no driver, no device
        print(f"cannot use a CUDA device: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    backend = "cupy" if args.device == "cuda" else "numpy"
    stem = "gpu_variants" + ("_dry" if args.device == "cpu" else "") + (
        "_quick" if args.quick else "")
    data: dict[str, Any] = {
        "benchmark": "gpu_variants", "command": command, "created": hx.now(),
        "device": runtime.device_info(), "versions": gb.versions(),
        "config": {"device": args.device, "quick": args.quick, "backend": backend,
                   "dtypes": list(args.dtypes), "repeats": args.repeats,
                   "timing_shapes": [list(s) for s in args.timing_shapes],
                   "error_shape": list(args.error_shape)},
        "copy_bandwidth": runtime.copy_bandwidth(), "results": []}
    print(command, flush=True)
    copy_bw = data["copy_bandwidth"]["bytes_per_s"]
    inputs = {(d, kind): make_inputs(kind, *args.error_shape, gb.DTYPES[d])
              for d in args.dtypes for kind in KINDS}
    refs = {key: references(x) for key, x in inputs.items()}
    for name, select in variants().items():
        for dtype_name in args.dtypes:
            dtype = gb.DTYPES[dtype_name]
            errs: dict[str, dict[str, float]] = {}
            failed: dict[str, str] = {}
            with select():
                for kind in KINDS:
                    try:
                        errs[kind] = errors(runtime.xp, backend, inputs[dtype_name, kind],
                                            refs[dtype_name, kind])
                    except Exception as exc:  # a variant that cannot run: the others still do
                        failed[kind] = f"{type(exc).__name__}: {exc}"[:500]
                times = [t for shape in args.timing_shapes
                         for t in timings(runtime, backend, shape, dtype, copy_bw, args)]
            bound = hx.SPEC_TOL[dtype]
            ok = not failed and all(e <= bound for kind in KINDS for e in errs[kind].values())
            data["results"].append({"variant": name, "dtype": dtype_name, "bound": bound,
                                    "errors": errs, "failed": failed, "timings": times,
                                    "ok": ok})
            worst = {kind: f"{max(errs[kind].values()):.2e}" if kind in errs else "failed"
                     for kind in KINDS}
            print(f"{name} {dtype_name}: worst error " + ", ".join(
                f"{k} {w}" for k, w in worst.items()) + f" (bound {bound:g}); "
                + ", ".join(f"{gb.shape_label(*t['shape'])} {t['mode']} "
                            + hx.cell(t, gb._attention_cell) for t in times), flush=True)
    data["finished"] = hx.now()
    hx.write_json(args.out / f"{stem}.json", data)
    (args.out / f"{stem}.md").write_text(markdown(data))
    print(f"wrote {args.out / stem}.{{json,md}}")
    return 0 if all(r["ok"] for r in data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
