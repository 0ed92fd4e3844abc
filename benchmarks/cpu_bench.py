"""CPU benchmark: cosattn's NumPy backend against the appendix-A cumulative-sum form and the
quadratic masked form, forward and forward+backward, over the sequence length S.

Each case is run once to warm up, once under ``tracemalloc`` (NumPy reports its array
allocations to it, so the peak is the real peak of the call's arrays, outputs included, inputs
excluded), then timed ``--repeats`` times with ``time.perf_counter``; the median is reported.
A baseline whose estimated memory (:func:`benchmarks.baselines.needed_bytes`) is over
``--memory-budget-gb`` is recorded as skipped with that estimate, not run. Before timing
anything, every implementation is checked once against the float64 reference
(``cosattn.reference``) at a small size.

Run from the repository root::

    python -m benchmarks.cpu_bench            # the full grid, S = 1024 ... 65536
    python -m benchmarks.cpu_bench --quick    # S up to 4096, one repeat: a smoke run

Then the margin rows (``--margin-only`` runs just these): at S = 8192 each input dtype against
float32, and the recurrent step against a bare NumPy update of the same state (B1 H16 D128) and
against a plain copy of a large state (B64 H16 D128), every pair timed in alternation so that
the machine's drift falls on both.

Writes ``cpu_bench.json``, ``cpu_bench.md`` and ``cpu_bench.png`` (``cpu_bench_quick.*`` with
``--quick``, ``cpu_margin.*`` with ``--margin-only``) into ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
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

MODULE = "benchmarks.cpu_bench"
IMPLS = ("cosattn", "appendix", "appendix_sliced", "quadratic")
MODES = baselines.MODES
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward + backward"}
FULL_S = tuple(1024 * 2**i for i in range(7))  # 1024 ... 65536
QUICK_S = (1024, 2048, 4096)
TARGET_S = 8192
# Issue 2's targets for the default configuration at S = 8192.
TARGETS = {"fwdbwd_median_s": 0.220, "fwd_median_s": 0.080, "speedup_vs_appendix": 50.0,
           "peak_extra_ratio": 4.0}
# The CPU margin's targets (medians of alternated runs).
MARGIN_TARGETS = {"fwdbwd_s": 0.070, "fwd_s": 0.022, "bwd_over_fwd": 2.5,
                  "bfloat16_over_float32": 1.3, "float16_over_float32": 1.6,
                  "float64_over_float32": 2.5, "step_over_bare_update": 0.65,
                  "step_share_of_copy_bandwidth": 0.5}
MARGIN_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
                 "float64": np.float64}
# The margin's float32 training step whose outputs go into the same buffers each time (out=).
REUSED = "float32, out= buffers"


def _forward(impl: str) -> Callable[..., Any]:
    if impl == "cosattn":
        return lambda q, k, v, m: cosattn.forward(q, k, v, m, backend="numpy")
    fn = getattr(baselines, f"{impl}_forward")
    return lambda q, k, v, m: fn(np, q, k, v, m)


def _backward(impl: str) -> Callable[..., Any]:
    if impl == "cosattn":
        return lambda do, q, k, v, m: cosattn.backward(do, q, k, v, m, backend="numpy")
    fn = getattr(baselines, f"{impl}_backward")
    return lambda do, q, k, v, m: fn(np, do, q, k, v, m)


def case(impl: str, mode: str, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One call of ``impl``: its forward, or its forward then its backward (a training step)."""
    fwd, bwd = _forward(impl), _backward(impl)
    q, k, v, m, do = (inputs[n] for n in ("q", "k", "v", "m", "do"))
    if mode == "fwd":
        return lambda: fwd(q, k, v, m)
    return lambda: (fwd(q, k, v, m), bwd(do, q, k, v, m))


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated during ``fn()`` over what was allocated before it (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def make_inputs(B: int, H: int, S: int, Dk: int, Dv: int, dtype: Any, seed: int = 0
                ) -> dict[str, Any]:
    """q, k, do ~ N(0, 1), v ~ N(0, 1) in ``dtype`` (B, H, S, D), and ``m`` = 0.5 (H,)."""
    rng = np.random.default_rng(seed)

    def draw(D: int) -> np.ndarray:
        return rng.standard_normal((B, H, S, D), dtype=np.float32).astype(dtype)

    return {"q": draw(Dk), "k": draw(Dk), "v": draw(Dv), "do": draw(Dv),
            "m": np.full(H, 0.5, dtype=np.float32)}


def agreement(seed: int = 0) -> dict[str, Any]:
    """Every implementation against the float64 reference at B=2, H=3, S=67, Dk=16, Dv=12.

    With ``m`` and a random padding mask (the masked call goes through the public API and the
    baselines alike), in float64 and float32; errors and bounds as docs/spec.md, "Numbers" gives
    them.
    """
    rng = np.random.default_rng(seed)
    B, H, S, Dk, Dv = 2, 3, 67, 16, 12
    out: dict[str, Any] = {"shape": {"B": B, "H": H, "S": S, "Dk": Dk, "Dv": Dv}, "cases": []}
    mask = rng.random((B, S)) < 0.8
    shapes = {"q": (B, H, S, Dk), "k": (B, H, S, Dk), "v": (B, H, S, Dv), "do": (B, H, S, Dv)}
    f64 = {n: rng.standard_normal(s) for n, s in shapes.items()}
    m = rng.uniform(-2, 2, size=H)
    for dtype in (np.dtype(np.float64), np.dtype(np.float32)):
        x = {n: a.astype(dtype) for n, a in f64.items()}
        r = {n: a.astype(np.float64) for n, a in x.items()}
        o_ref, _, _ = reference.forward(r["q"], r["k"], r["v"], m, mask=mask)
        dq, dk, dv, dm, _ = reference.backward(r["do"], r["q"], r["k"], r["v"], m, mask=mask)
        refs = {"o": o_ref, "dq": dq, "dk": dk, "dv": dv, "dm": dm}
        mm = m.astype(baselines.accumulation_dtype(dtype))
        for impl in IMPLS:
            if impl == "cosattn":
                o = cosattn.forward(x["q"], x["k"], x["v"], mm, mask=mask, backend="numpy")
                grads = cosattn.backward(x["do"], x["q"], x["k"], x["v"], mm, mask=mask,
                                         backend="numpy")
            else:
                o = getattr(baselines, f"{impl}_forward")(np, x["q"], x["k"], x["v"], mm, mask=mask)
                grads = getattr(baselines, f"{impl}_backward")(np, x["do"], x["q"], x["k"],
                                                               x["v"], mm, mask=mask)
            got = dict(zip(("o", "dq", "dk", "dv", "dm"), (o, *grads), strict=True))
            errors = {n: hx.rel_err(got[n], refs[n]) for n in refs}
            tol = hx.SPEC_TOL[dtype]
            out["cases"].append({"impl": impl, "dtype": str(dtype), "errors": errors,
                                 "tolerance": tol, "ok": max(errors.values()) <= tol})
    out["ok"] = all(c["ok"] for c in out["cases"])
    return out


def needed_bytes(impl: str, mode: str, B: int, H: int, S: int, Dk: int, Dv: int,
                 dtype: Any) -> int | None:
    """Estimated peak of a baseline; None for cosattn, whose memory is linear in S."""
    if impl == "cosattn":
        return None
    return baselines.needed_bytes(impl, mode, B, H, S, Dk, Dv, dtype)


def run_case(impl: str, mode: str, inputs: dict[str, Any], args: argparse.Namespace
             ) -> dict[str, Any]:
    B, H, S, Dk = inputs["q"].shape
    Dv = inputs["v"].shape[-1]
    record: dict[str, Any] = {"impl": impl, "mode": mode, "S": S}
    needed = needed_bytes(impl, mode, B, H, S, Dk, Dv, inputs["q"].dtype)
    budget = int(args.memory_budget_gb * 1e9)
    if needed is not None and needed > budget:
        return record | hx.skipped(needed, budget)
    fn = case(impl, mode, inputs)
    qkvo = sum(inputs[n].nbytes for n in ("q", "k", "v")) + inputs["v"].nbytes
    fn()  # warm-up: one-time costs (thread pools, caches) stay out of both numbers
    peak = peak_extra_bytes(fn)
    times = hx.repeat_timed(fn, hx.wall_time, repeats=args.repeats,
                            min_repeats=min(args.repeats, 3), max_seconds=args.max_seconds)
    return record | {"status": "ok", "needed_bytes": needed, "peak_extra_bytes": peak,
                     "qkvo_bytes": qkvo, "peak_extra_ratio": peak / qkvo} | hx.summary(times)


def _find(results: Sequence[dict[str, Any]], impl: str, mode: str, S: int
          ) -> dict[str, Any] | None:
    for r in results:
        if (r["impl"], r["mode"], r["S"]) == (impl, mode, S):
            return r
    return None


def _ok(record: dict[str, Any] | None) -> bool:
    return record is not None and record["status"] == "ok"


def check_targets(results: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Issue 2's targets at S = 8192, when the run has that size in the default configuration."""
    default = (config["B"], config["H"], config["Dk"], config["Dv"], config["dtype"]) == (
        1, 8, 64, 64, "float32")
    if TARGET_S not in config["S"] or not default:
        return {"S": TARGET_S, "evaluated": False,
                "reason": "the targets are stated for B=1, H=8, Dk=Dv=64, float32 at S=8192"}
    checks = []

    def add(name: str, value: float | None, limit: float, at_most: bool) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        checks.append({"name": name, "value": value, "limit": limit,
                       "kind": "at most" if at_most else "at least", "met": met})

    for mode in MODES:
        ours = _find(results, "cosattn", mode, TARGET_S)
        appendix = _find(results, "appendix", mode, TARGET_S)
        median = ours["median_s"] if _ok(ours) else None
        add(f"{mode} median (s)", median, TARGETS[f"{mode}_median_s"], True)
        speedup = (appendix["median_s"] / median if median and _ok(appendix) else None)
        add(f"{mode} speedup over the appendix form", speedup, TARGETS["speedup_vs_appendix"],
            False)
        ratio = ours["peak_extra_ratio"] if _ok(ours) else None
        add(f"{mode} peak extra memory / bytes(q, k, v, o)", ratio, TARGETS["peak_extra_ratio"],
            True)
    return {"S": TARGET_S, "evaluated": True, "checks": checks,
            "all_met": all(c["met"] for c in checks)}


def _alternated(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn round after round (after a warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(hx.wall_time(fn))
    return {name: float(np.median(t)) for name, t in times.items()}


class _TrainingStep:
    """cosattn's forward then backward on ``inputs``, as a training step runs them; keeps the
    seconds and the page faults (minor faults, ``getrusage``) of each half of every call. With
    ``reuse``, every step writes o, dq, dk and dv into the same buffers (``out=``)."""

    def __init__(self, inputs: dict[str, Any], *, reuse: bool = False) -> None:
        if reuse:
            o, dq, dk, dv = (np.empty_like(inputs[n]) for n in ("v", "q", "k", "v"))
            self.fwd = lambda q, k, v, m: cosattn.forward(q, k, v, m, backend="numpy", out=o)
            self.bwd = lambda do, q, k, v, m: cosattn.backward(do, q, k, v, m, backend="numpy",
                                                               out=(dq, dk, dv))
        else:
            self.fwd, self.bwd = _forward("cosattn"), _backward("cosattn")
        self.inputs = inputs
        self.halves: dict[str, list[tuple[float, int]]] = {"fwd": [], "bwd": []}

    def _timed(self, half: str, fn: Callable[[], Any]) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = hx.wall_time(fn)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.halves[half].append((seconds, faults))

    def __call__(self) -> None:
        q, k, v, m, do = (self.inputs[n] for n in ("q", "k", "v", "m", "do"))
        self._timed("fwd", lambda: self.fwd(q, k, v, m))
        self._timed("bwd", lambda: self.bwd(do, q, k, v, m))

    def medians(self) -> dict[str, float]:
        """Each half's median seconds and page faults; the first call, a warm-up, left out."""
        out = {}
        for half, samples in self.halves.items():
            seconds, faults = np.array(samples[1:]).T
            out[f"{half}_s"], out[f"{half}_faults"] = float(np.median(seconds)), float(
                np.median(faults))
        return out


def _per_call(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    def many() -> None:
        for _ in range(calls):
            fn()
    return many


def margin(rounds: int) -> dict[str, Any]:
    """The margin rows: dtypes at S = 8192, the step against a bare update and a copy.

    The backward is compared with the forward of the same training steps, each half timed on
    its own: a lone forward's time depends on what the calls before it freed (whether glibc
    hands its output pages it keeps mapped or fresh ones). Each half's page faults are kept
    too: in a step the forward's output reuses mapped pages, while the backward's three
    gradients, freed together with the output when the step is over, go past glibc's trim
    threshold and are returned to the kernel, which faults them in and zeroes them again in
    the next step. A float32 step that writes into the same buffers each time (``out=``) is
    timed beside them: the same work without fresh pages."""
    dtype_fns: dict[str, Callable[[], Any]] = {}
    steps = {}
    for name, dtype in MARGIN_DTYPES.items():
        x = make_inputs(1, 8, TARGET_S, 64, 64, np.dtype(dtype))
        steps[name] = _TrainingStep(x)
        dtype_fns[f"{name} fwd"] = case("cosattn", "fwd", x)
        dtype_fns[f"{name} fwdbwd"] = steps[name]
        if name == "float32":
            steps[REUSED] = _TrainingStep(x, reuse=True)
            dtype_fns[f"{REUSED} fwdbwd"] = steps[REUSED]
    times = _alternated(dtype_fns, rounds)
    halves = {name: step.medians() for name, step in steps.items()}
    rng = np.random.default_rng(0)
    step = {}
    for B, calls in ((1, 200), (64, 3)):
        H, D = 16, 128
        q, k, v = (rng.standard_normal((B, H, D), dtype=np.float32) for _ in range(3))
        m = np.full(H, 0.5, np.float32)
        state = cosattn.RecurrentState.zeros(B, H, D, D)
        out = np.empty((B, H, D), np.float32)
        kv, copy = np.zeros((B, H, D, D), np.float32), np.zeros((B, H, D, D), np.float32)

        def bare(kv: Any = kv, q: Any = q, k: Any = k, v: Any = v) -> Any:
            kv += v[..., :, None] * k[..., None, :]
            return (kv @ q[..., None])[..., 0]

        fns = {"step": _per_call(lambda s=state, q=q, k=k, v=v, m=m, o=out: s.step(
                   q, k, v, m, out=o), calls),
               "bare update": _per_call(bare, calls),
               "copy": _per_call(lambda a=copy, b=kv: np.copyto(a, b), calls)}
        seconds = {n: t / calls for n, t in _alternated(fns, rounds).items()}
        state_bytes = kv.nbytes
        step[f"B{B} H{H} D{D}"] = {
            "state_bytes": state_bytes, "seconds": seconds,
            "step_over_bare_update": seconds["step"] / seconds["bare update"],
            "step_GBps": 2 * state_bytes / seconds["step"] / 1e9,
            "copy_GBps": 2 * state_bytes / seconds["copy"] / 1e9,
            "step_share_of_copy_bandwidth": seconds["copy"] / seconds["step"]}
    f32 = times["float32 fwd"], times["float32 fwdbwd"]
    measured = {
        "fwd_s": f32[0], "fwdbwd_s": f32[1],
        "bwd_over_fwd": halves["float32"]["bwd_s"] / halves["float32"]["fwd_s"],
        **{f"{n}_over_float32": times[f"{n} fwdbwd"] / f32[1] for n in MARGIN_DTYPES
           if n != "float32"},
        "step_over_bare_update": step["B1 H16 D128"]["step_over_bare_update"],
        "step_share_of_copy_bandwidth": step["B64 H16 D128"]["step_share_of_copy_bandwidth"],
    }
    at_most = {k for k in MARGIN_TARGETS if k != "step_share_of_copy_bandwidth"}
    checks = [{"name": k, "value": measured[k], "limit": limit,
               "kind": "at most" if k in at_most else "at least",
               "met": measured[k] <= limit if k in at_most else measured[k] >= limit}
              for k, limit in MARGIN_TARGETS.items()]
    return {"rounds": rounds, "dtype_seconds": times, "training_step_halves": halves,
            "step": step, "checks": checks}


def margin_markdown(data: dict[str, Any]) -> list[str]:
    mg = data["margin"]
    lines = ["", f"## Margin rows (medians of {mg['rounds']} alternated rounds)", "",
             "B=1, H=8, S=8192, D=64, m given:", ""]
    seconds, halves = mg["dtype_seconds"], mg["training_step_halves"]
    rows = [[name, hx.fmt_ms(seconds[f"{name} fwd"]) if f"{name} fwd" in seconds else "-",
             hx.fmt_ms(seconds[f"{name} fwdbwd"]),
             f"{seconds[f'{name} fwdbwd'] / seconds['float32 fwdbwd']:.2f}",
             hx.fmt_ms(halves[name]["fwd_s"]), hx.fmt_ms(halves[name]["bwd_s"]),
             f"{halves[name]['bwd_s'] / halves[name]['fwd_s']:.2f}",
             f"{halves[name]['fwd_faults']:.0f} / {halves[name]['bwd_faults']:.0f}"]
            for name in (*MARGIN_DTYPES, REUSED) if name in halves]
    lines.append(hx.markdown_table(["dtype", "fwd ms", "fwd+bwd ms", "x float32",
                                    "step's fwd ms", "step's bwd ms", "bwd / fwd",
                                    "page faults fwd / bwd"], rows))
    lines += ["", "fwd is a lone forward; fwd+bwd a training step (forward, then backward), "
              "whose halves are also timed on their own: bwd / fwd compares those. Page faults "
              "are the median minor faults of each half (fresh pages the kernel maps and "
              f"zeroes). {REUSED!r} is the float32 step writing o, dq, dk and dv into the same "
              "buffers every time (`out=`): the same work without fresh pages."]
    lines += ["", "Recurrent step, float32, `m` given, validation included:", ""]
    rows = [[shape, f"{r['seconds']['step'] * 1e6:.1f}", f"{r['seconds']['bare update'] * 1e6:.1f}",
             f"{r['step_over_bare_update']:.2f}", f"{r['step_GBps']:.1f}", f"{r['copy_GBps']:.1f}"]
            for shape, r in mg["step"].items()]
    lines.append(hx.markdown_table(["shape", "step us", "bare update us", "ratio",
                                    "step GB/s", "copy GB/s"], rows))
    lines += ["", "Targets:", ""]
    rows = [[c["name"], f"{c['value']:.4g}", f"{c['kind']} {c['limit']:g}",
             "yes" if c["met"] else "NO"] for c in mg["checks"]]
    lines.append(hx.markdown_table(["target", "measured", "limit", "met"], rows))
    return lines


def markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        *hx.cpu_header("# cosattn CPU benchmark" + (" (quick profile)" if cfg["quick"] else ""),
                       data),
        f"Config: B={cfg['B']}, H={cfg['H']}, Dk={cfg['Dk']}, Dv={cfg['Dv']}, {cfg['dtype']}, "
        f"causal, m given; median of up to {cfg['repeats']} timed runs after one warm-up "
        f"run and one tracemalloc run; memory budget "
        f"{hx.fmt_bytes(cfg['memory_budget_bytes'])}.",
        "",
        "Time in ms (median); `x` is peak extra memory / bytes(q, k, v, o); speed-up is the "
        "baseline's time over cosattn's.",
    ]
    results = data["results"]
    for mode in MODES if results else ():
        lines += ["", f"## {MODE_NAMES[mode]}", ""]
        headers = ["S", "cosattn ms", "x"]
        for impl in IMPLS[1:]:
            headers += [f"{impl} ms", "x", "speed-up"]
        rows = []
        for S in cfg["S"]:
            ours = _find(results, "cosattn", mode, S)
            row = [S, hx.cell(ours, lambda r: hx.fmt_ms(r["median_s"])),
                   hx.cell(ours, lambda r: f"{r['peak_extra_ratio']:.2f}")]
            for impl in IMPLS[1:]:
                base = _find(results, impl, mode, S)
                row += [hx.cell(base, lambda r: hx.fmt_ms(r["median_s"])),
                        hx.cell(base, lambda r: f"{r['peak_extra_ratio']:.2f}"),
                        f"{base['median_s'] / ours['median_s']:.1f}"
                        if _ok(base) and _ok(ours) else "-"]
            rows.append(row)
        lines.append(hx.markdown_table(headers, rows))
    targets = data["targets"]
    lines += ["", f"## Targets at S={targets['S']}", ""]
    if not results:
        lines.append("Not evaluated: the grid was not run (--margin-only).")
    elif targets["evaluated"]:
        rows = [[c["name"], "-" if c["value"] is None else f"{c['value']:.4g}",
                 f"{c['kind']} {c['limit']:g}", {True: "yes", False: "NO", None: "-"}[c["met"]]]
                for c in targets["checks"]]
        lines.append(hx.markdown_table(["target", "measured", "limit", "met"], rows))
    else:
        lines.append(f"Not evaluated: {targets['reason']}.")
    agree = data["agreement"]
    shape = ", ".join(f"{k}={v}" for k, v in agree["shape"].items())
    lines += ["", f"## Agreement with the float64 reference ({shape}, m and a padding mask)", ""]
    rows = [[c["impl"], c["dtype"], *(f"{e:.1e}" for e in c["errors"].values()),
             f"{c['tolerance']:g}", "yes" if c["ok"] else "NO"] for c in agree["cases"]]
    lines.append(hx.markdown_table(["impl", "dtype", "o", "dq", "dk", "dv", "dm", "bound", "ok"],
                                   rows))
    lines += margin_markdown(data)
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, mode in enumerate(MODES):
        for impl in IMPLS:
            ok = [r for r in data["results"]
                  if (r["impl"], r["mode"]) == (impl, mode) and r["status"] == "ok"]
            S = [r["S"] for r in ok]
            axes[0, col].plot(S, [r["median_s"] * 1e3 for r in ok], "o-", label=impl)
            axes[1, col].plot(S, [r["peak_extra_ratio"] for r in ok], "o-", label=impl)
        axes[0, col].set_title(f"{MODE_NAMES[mode]}: median time")
        axes[0, col].set_ylabel("ms")
        axes[1, col].set_title(f"{MODE_NAMES[mode]}: peak extra memory")
        axes[1, col].set_ylabel("x bytes(q, k, v, o)")
        axes[1, col].set_xlabel("S")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    cfg = data["config"]
    fig.suptitle(f"cosattn CPU (numpy backend), B={cfg['B']} H={cfg['H']} D={cfg['Dk']} "
                 f"{cfg['dtype']}; skipped sizes are missing\n{data['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke profile: S in {QUICK_S}, one timed run")
    p.add_argument("--S", type=int, nargs="+", help="sequence lengths (default 1024 ... 65536)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64, help="Dk = Dv")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, help="timed runs per case (default 7, quick 1)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating a case after this long, once 3 runs are done")
    p.add_argument("--memory-budget-gb", type=float, default=12.0,
                   help="skip a baseline whose estimated peak is over this (GB)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--margin-only", action="store_true",
                   help="only the margin rows (dtypes, the recurrent step)")
    p.add_argument("--rounds", type=int, help="alternated rounds of the margin rows "
                   "(default 15, quick 3)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.S = args.S or list(QUICK_S if args.quick else FULL_S)
    args.repeats = args.repeats or (1 if args.quick else 7)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = hx.command_line(MODULE, argv)
    machine = hx.machine_info()
    config = {"B": args.B, "H": args.H, "Dk": args.D, "Dv": args.D, "dtype": args.dtype,
              "S": args.S, "impls": args.impls, "causal": True, "m": 0.5,
              "repeats": args.repeats, "max_seconds": args.max_seconds, "warmup": 1,
              "memory_budget_bytes": int(args.memory_budget_gb * 1e9), "quick": args.quick}
    print(f"{command}\n{machine['cpu']}, NumPy {machine['numpy']}", flush=True)
    agree = agreement()
    print("agreement with the reference:", "ok" if agree["ok"] else "FAILED", flush=True)
    results = []
    for S in () if args.margin_only else args.S:
        inputs = make_inputs(args.B, args.H, S, args.D, args.D, np.dtype(args.dtype))
        for mode in MODES:
            for impl in args.impls:
                record = run_case(impl, mode, inputs, args)
                results.append(record)
                print(f"S={S:6d} {mode:6s} {impl:9s} " + hx.cell(
                    record, lambda r: f"{r['median_s'] * 1e3:10.2f} ms  peak x "
                                      f"{r['peak_extra_ratio']:.2f}"), flush=True)
        del inputs
    margin_rows = margin(args.rounds)
    for c in margin_rows["checks"]:
        print(f"margin {c['name']:32s} {c['value']:.4g} ({c['kind']} {c['limit']:g})", flush=True)
    data = {"benchmark": "cpu", "command": command, "created": hx.now(), "machine": machine,
            "config": config, "agreement": agree, "results": results,
            "targets": check_targets(results, config), "margin": margin_rows,
            "load_average_end": hx.load_average()}
    stem = "cpu_margin" if args.margin_only else "cpu_bench_quick" if args.quick else "cpu_bench"
    hx.write_json(args.out / f"{stem}.json", data)
    (args.out / f"{stem}.md").write_text(markdown(data))
    plotted = not (args.no_plot or args.margin_only)
    if plotted:
        plot(data, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.{{json,md{',png' if plotted else ''}}}")
    return 0 if agree["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
