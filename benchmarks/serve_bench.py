"""CPU benchmark of serving: packed variable-length batches and a pool of states.

1. **Packed vs padded training step**: forward + backward of a batch of N sequences of lengths
   drawn log-uniformly (seed fixed), three ways: packed back to back in one row
   (``cu_seqlens``), right-padded to the longest with a mask, and, as the yardstick, one
   unpadded sequence of the same T tokens.
2. **Pool decode**: one step for A active requests through ``StatePool.step`` (slots at random
   places of a pool of P), against a plain batched ``RecurrentState.step`` of B = A rows, a loop
   of A one-row steps, and a copy of the bytes of the A states (read and written once): the
   bandwidth a step that reads and writes each state once could reach.

The implementations are timed in interleaved rounds (the order rotates from round to round), so
a change in the machine's load hits them alike; medians are reported, and ratios are the
medians of the per-round ratios. Before timing, the packed call's results are compared with
those of the padded batch packed back (docs/spec.md: packed is defined as that).

Run from the repository root::

    python -m benchmarks.serve_bench            # the issue's configuration
    python -m benchmarks.serve_bench --quick    # a smoke run: small sizes, few rounds

Writes ``serve_bench.json`` and ``serve_bench.md`` (``serve_bench_quick.*`` with ``--quick``)
into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cosattn

from . import _harness as hx

MODULE = "benchmarks.serve_bench"
# Issue 14's targets (medians of interleaved runs).
PACKED_VS_SINGLE_MAX = 1.15  # packed fwd+bwd <= 1.15 x one unpadded sequence of T tokens
PADDING_DISCOUNT = 1.3  # padded / packed >= (padded tokens / real tokens) / 1.3
POOL_VS_BATCHED_MIN = 0.8  # pool step throughput >= 0.8 x a plain batched step, at A = 64
COPY_FRACTION_MIN = 0.5  # and >= 50% of the copy bandwidth on the slots' bytes
TARGET_ACTIVE = 64


def lengths(n: int, low: int, high: int, seed: int) -> np.ndarray:
    """``n`` lengths log-uniform over ``[low, high]``: ``exp(uniform(ln low, ln high))``,
    rounded down, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(low), np.log(high), n)).astype(np.int64)


def rounds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` runs of every function, in interleaved rounds whose order rotates;
    one warm-up run of each first."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(hx.wall_time(fns[name]))
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``time(a) / time(b)``."""
    return float(np.median(np.array(times[a]) / np.array(times[b])))


# ----------------------------------------------------------------------------- packed batch


def packed_inputs(L: np.ndarray, H: int, D: int, dtype: Any, seed: int = 1) -> dict[str, Any]:
    """q, k, v, do packed (1, H, T, D), the same sequences padded (N, H, max L, D) with their
    mask, ``cu_seqlens`` and ``m`` = 0.5."""
    rng = np.random.default_rng(seed)
    T, N, longest = int(L.sum()), len(L), int(L.max())
    cu = np.concatenate(([0], np.cumsum(L))).astype(np.int64)
    packed = {n: rng.standard_normal((1, H, T, D), dtype=np.float32).astype(dtype)
              for n in ("q", "k", "v", "do")}
    padded = {n: np.zeros((N, H, longest, D), dtype=dtype) for n in packed}
    mask = np.arange(longest)[None, :] < L[:, None]
    for i in range(N):
        for n in packed:
            padded[n][i, :, : L[i]] = packed[n][0, :, cu[i]:cu[i + 1]]
    return {"packed": packed, "padded": padded, "mask": mask, "cu_seqlens": cu,
            "m": np.full(H, 0.5, dtype=np.float32)}


def training_steps(x: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Forward then backward, packed, padded, and on one sequence of T tokens."""
    p, b, m, cu, mask = x["packed"], x["padded"], x["m"], x["cu_seqlens"], x["mask"]

    def packed() -> Any:
        return (cosattn.forward(p["q"], p["k"], p["v"], m, cu_seqlens=cu),
                cosattn.backward(p["do"], p["q"], p["k"], p["v"], m, cu_seqlens=cu))

    def padded() -> Any:
        return (cosattn.forward(b["q"], b["k"], b["v"], m, mask=mask),
                cosattn.backward(b["do"], b["q"], b["k"], b["v"], m, mask=mask))

    def single() -> Any:
        return (cosattn.forward(p["q"], p["k"], p["v"], m),
                cosattn.backward(p["do"], p["q"], p["k"], p["v"], m))

    return {"packed": packed, "padded": padded, "single": single}


def agreement(x: dict[str, Any], fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The packed results against the padded ones packed back (docs/spec.md's definition),
    by the error measure of docs/spec.md; both are float32 computations."""
    (o, (dq, dk, dv, dm)), (po, (pdq, pdk, pdv, pdm)) = fns["packed"](), fns["padded"]()
    cu = x["cu_seqlens"]

    def pack(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[i:i + 1, :, : cu[i + 1] - cu[i]] for i in range(len(cu) - 1)],
                              axis=2)

    errors = {"o": hx.rel_err(o, pack(po)), "dq": hx.rel_err(dq, pack(pdq)),
              "dk": hx.rel_err(dk, pack(pdk)), "dv": hx.rel_err(dv, pack(pdv)),
              "dm": hx.rel_err(dm, pdm)}
    bound = 2 * hx.SPEC_TOL[np.dtype(np.float32)]  # two float32 results, each within 1e-5
    return {"errors": errors, "bound": bound, "ok": max(errors.values()) <= bound}


def packed_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    L = lengths(args.sequences, args.min_len, args.max_len, args.seed)
    x = packed_inputs(L, args.H, args.D, np.float32)
    fns = training_steps(x)
    agree = agreement(x, fns)
    times = rounds(fns, args.repeats)
    T, padded_tokens = int(L.sum()), int(len(L) * L.max())
    waste = padded_tokens / T
    packed_vs_single = paired_ratio(times, "packed", "single")
    padded_vs_packed = paired_ratio(times, "padded", "packed")
    return {
        "lengths": L.tolist(), "T": T, "padded_tokens": padded_tokens,
        "padded_over_real": waste, "agreement": agree,
        "results": {n: hx.summary(t) for n, t in times.items()},
        "packed_over_single": packed_vs_single, "padded_over_packed": padded_vs_packed,
        "targets": [
            check("packed fwd+bwd / one sequence of T tokens", packed_vs_single,
                  PACKED_VS_SINGLE_MAX, at_most=True),
            check("padded fwd+bwd / packed", padded_vs_packed, waste / PADDING_DISCOUNT,
                  at_most=False),
        ],
    }


def check(name: str, value: float, limit: float, *, at_most: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit,
            "kind": "at most" if at_most else "at least",
            "met": bool(value <= limit if at_most else value >= limit)}


# ----------------------------------------------------------------------------- pool decode


def decode_steps(A: int, P: int, H: int, D: int, calls: int, seed: int = 2
                 ) -> dict[str, Callable[[], Any]]:
    """``calls`` back-to-back steps of A requests each way: through a pool of P slots (at
    random places), a batched state, a loop of one-row states; and a copy of A states."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((A, H, D), dtype=np.float32) for _ in range(3))
    m = np.full(H, 0.5, dtype=np.float32)
    pool = cosattn.StatePool.zeros(P, H, D, D)
    slots = rng.permutation(P)[:A].astype(np.int64)
    batched = cosattn.RecurrentState.zeros(A, H, D, D)
    singles = [cosattn.RecurrentState.zeros(1, H, D, D) for _ in range(A)]
    rows = [(q[a:a + 1], k[a:a + 1], v[a:a + 1]) for a in range(A)]
    out = np.empty((A, H, D), dtype=np.float32)
    source = np.ones((A, H, D, D), dtype=np.float32)
    target = np.empty_like(source)

    def repeat(step: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                step()
        return run

    def loop() -> None:
        for state, (qa, ka, va) in zip(singles, rows, strict=True):
            state.step(qa, ka, va, m)

    return {
        "pool": repeat(lambda: pool.step(q, k, v, m, state_indices=slots, out=out)),
        "batched": repeat(lambda: batched.step(q, k, v, m, out=out)),
        "loop": repeat(loop),
        "copy": repeat(lambda: np.copyto(target, source)),
    }


def pool_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    records = []
    for A in args.active:
        fns = decode_steps(A, max(args.pool_slots, A), args.H, args.D, args.calls)
        times = rounds(fns, args.repeats)
        state_bytes = 2 * A * args.H * args.D * args.D * 4  # read and written once
        per_step = {n: float(np.median(t)) / args.calls for n, t in times.items()}
        record = {
            "active": A, "state_bytes_per_step": state_bytes,
            "results": {n: hx.summary([s / args.calls for s in t]) for n, t in times.items()},
            "tokens_per_s": {n: A / per_step[n] for n in ("pool", "batched", "loop")},
            "bytes_per_s": {n: state_bytes / per_step[n] for n in per_step},
            "pool_over_batched_throughput": 1.0 / paired_ratio(times, "pool", "batched"),
            "pool_over_copy_bandwidth": 1.0 / paired_ratio(times, "pool", "copy"),
        }
        records.append(record)
        print(f"A={A:4d}  pool {per_step['pool'] * 1e6:9.1f} us  batched "
              f"{per_step['batched'] * 1e6:9.1f} us  loop {per_step['loop'] * 1e6:9.1f} us  "
              f"copy {per_step['copy'] * 1e6:9.1f} us", flush=True)
    at = next((r for r in records if r["active"] == TARGET_ACTIVE), None)
    targets = []
    if at is not None:
        targets = [
            check(f"pool step / batched step throughput, {TARGET_ACTIVE} active",
                  at["pool_over_batched_throughput"], POOL_VS_BATCHED_MIN, at_most=False),
            check(f"pool step bandwidth / copy bandwidth, {TARGET_ACTIVE} active",
                  at["pool_over_copy_bandwidth"], COPY_FRACTION_MIN, at_most=False),
        ]
    return {"pool_slots": args.pool_slots, "calls_per_sample": args.calls, "records": records,
            "targets": targets}


# ----------------------------------------------------------------------------- output


def markdown(data: dict[str, Any]) -> str:
    cfg, packed, pool = data["config"], data["packed"], data["pool"]
    lines = [
        *hx.cpu_header("# cosattn serving benchmark (CPU)"
                       + (" (quick profile)" if cfg["quick"] else ""), data),
        f"Config: H={cfg['H']}, D={cfg['D']}, float32, causal, m = 0.5; {cfg['repeats']} "
        "interleaved rounds (medians; ratios are medians of per-round ratios).",
        "",
        f"## Packed vs padded forward + backward ({len(packed['lengths'])} sequences, "
        f"lengths log-uniform over {cfg['min_len']}-{cfg['max_len']}, seed {cfg['seed']})",
        "",
        f"T = {packed['T']:,} real tokens; the padded batch holds {packed['padded_tokens']:,} "
        f"({packed['padded_over_real']:.2f}x). Lengths: "
        f"{', '.join(map(str, sorted(packed['lengths'])))}.",
        "",
        hx.markdown_table(["layout", "median ms", "min ms", "max ms"], [
            [name, hx.fmt_ms(r["median_s"]), hx.fmt_ms(r["min_s"]), hx.fmt_ms(r["max_s"])]
            for name, r in packed["results"].items()]),
        "",
        "Packed against the padded batch packed back: "
        + ", ".join(f"{n} {e:.1e}" for n, e in packed["agreement"]["errors"].items())
        + f" (bound {packed['agreement']['bound']:g}).",
        "",
        f"## Pool decode step (H={cfg['H']}, D={cfg['D']}, pool of {pool['pool_slots']} slots)",
        "",
        "Time per step of A active requests; tokens/s; bandwidth = 2 x A x H x D x D x 4 bytes "
        "(each state read and written once) per step.",
        "",
    ]
    rows = []
    for r in pool["records"]:
        res, bw = r["results"], r["bytes_per_s"]
        rows.append([r["active"]] + [f"{res[n]['median_s'] * 1e6:.1f}" for n in
                                      ("pool", "batched", "loop", "copy")]
                    + [f"{r['tokens_per_s']['pool']:,.0f}",
                       f"{r['pool_over_batched_throughput']:.2f}",
                       f"{hx.fmt_bytes(bw['pool'])}/s", f"{hx.fmt_bytes(bw['copy'])}/s",
                       f"{r['pool_over_copy_bandwidth']:.2f}"])
    lines.append(hx.markdown_table(
        ["A", "pool us", "batched us", "loop us", "copy us", "pool tokens/s",
         "pool / batched", "pool bandwidth", "copy bandwidth", "pool / copy"], rows))
    lines += ["", "## Targets (issue 14)", ""]
    targets = packed["targets"] + pool["targets"]
    lines.append(hx.markdown_table(["target", "measured", "limit", "met"], [
        [t["name"], f"{t['value']:.3g}", f"{t['kind']} {t['limit']:.3g}",
         "yes" if t["met"] else "NO"] for t in targets]))
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke profile: 6 sequences of 16-512 tokens, 3 rounds, A up to 16")
    p.add_argument("--sequences", type=int, help="sequences in the packed batch (24)")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, help="longest length drawn (4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lengths")
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64, help="Dk = Dv")
    p.add_argument("--active", type=int, nargs="+", help="active requests (1 4 16 64 256)")
    p.add_argument("--pool-slots", type=int, default=256, help="slots of the pool (P)")
    p.add_argument("--calls", type=int, default=20, help="steps timed back to back per sample")
    p.add_argument("--repeats", type=int, help="interleaved rounds (15, quick 3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    args.sequences = args.sequences or (6 if args.quick else 24)
    args.max_len = args.max_len or (512 if args.quick else 4096)
    args.active = args.active or ([1, 16] if args.quick else [1, 4, 16, 64, 256])
    args.repeats = args.repeats or (3 if args.quick else 15)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = hx.command_line(MODULE, argv)
    machine = hx.machine_info()
    print(f"{command}\n{machine['cpu']}, NumPy {machine['numpy']}", flush=True)
    packed = packed_benchmark(args)
    print(f"T={packed['T']}: packed {packed['results']['packed']['median_s'] * 1e3:.1f} ms, "
          f"padded {packed['results']['padded']['median_s'] * 1e3:.1f} ms, one sequence "
          f"{packed['results']['single']['median_s'] * 1e3:.1f} ms; agreement "
          f"{'ok' if packed['agreement']['ok'] else 'FAILED'}", flush=True)
    pool = pool_benchmark(args)
    config = {"H": args.H, "D": args.D, "dtype": "float32", "sequences": args.sequences,
              "min_len": args.min_len, "max_len": args.max_len, "seed": args.seed,
              "active": args.active, "repeats": args.repeats, "quick": args.quick}
    data = {"benchmark": "serve", "command": command, "created": hx.now(), "machine": machine,
            "config": config, "packed": packed, "pool": pool,
            "load_average_end": hx.load_average()}
    stem = "serve_bench_quick" if args.quick else "serve_bench"
    hx.write_json(args.out / f"{stem}.json", data)
    (args.out / f"{stem}.md").write_text(markdown(data))
    for t in packed["targets"] + pool["targets"]:
        print(f"{t['name']}: {t['value']:.3g} ({t['kind']} {t['limit']:.3g}): "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"wrote {args.out / stem}.{{json,md}}")
    return 0 if packed["agreement"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
