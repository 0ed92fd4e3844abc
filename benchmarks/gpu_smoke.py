"""A few small calls of every GPU backend, checked against the reference: what compute-sanitizer
runs in ``gpu_check.sh``.

For each backend, dtype (float32, float16, bfloat16, float64) and head size pair (Dk=Dv=64, a
specialised instance; Dk=48, Dv=20, the general one): a causal forward with a padding mask and
an incoming state, its backward with ``dstate``, a bidirectional forward, a few recurrent
steps, and packed sequences and a pool of states (forward, backward, prefill and step), at
B=2, H=3, S=67 (not a multiple of the chunk); each result is compared with the float64
reference on the same rounded inputs by docs/spec.md's measure and bound (dm against the size of
its terms as well, docs/spec.md, "Measuring dm"). With
``--no-pool`` CuPy allocates every array on its own (no memory pool), so memcheck sees the exact
bounds of each allocation. ``--device cpu`` runs the same checks on the numpy backend.

    compute-sanitizer --tool memcheck python -m benchmarks.gpu_smoke --no-pool

Exit status 1 when a result is off, 0 otherwise; an unavailable backend is reported, not failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

import cosattn
from cosattn import reference

from . import _harness as hx
from . import gpu_variants

DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
          np.dtype(np.float64))
HEADS = ((64, 64), (48, 20))  # (Dk, Dv)
B, H, S = 2, 3, 67


def _device(xp: Any, a: np.ndarray) -> Any:
    """``a`` on ``xp``'s device (bfloat16 crosses as its 16-bit pattern)."""
    if xp is np or a.dtype != DTYPES[2]:
        return xp.asarray(a)
    return xp.asarray(a.view(np.int16)).view(a.dtype)


def _host(a: Any) -> np.ndarray:
    if hasattr(a, "get"):
        a = a.view(np.int16).get().view(a.dtype) if a.dtype == DTYPES[2] else a.get()
    return np.asarray(a, dtype=np.float64)


def check(xp: Any, backend: str, dtype: np.dtype, Dk: int, Dv: int, seed: int = 0
          ) -> dict[str, float]:
    """Errors of one backend in one dtype and head size pair, by name of the checked result."""
    rng = np.random.default_rng(seed)
    acc = np.float64 if dtype == np.float64 else np.float32
    host = {n: rng.standard_normal((B, H, S, D)).astype(dtype)
            for n, D in (("q", Dk), ("k", Dk), ("v", Dv), ("do", Dv))}
    f64 = {n: a.astype(np.float64) for n, a in host.items()}
    m = rng.uniform(-2, 2, size=H).astype(np.float32)
    mask = rng.random((B, S)) < 0.8
    kv0 = rng.standard_normal((B, H, Dv, Dk)).astype(acc)
    count0 = rng.integers(0, 50, size=B).astype(np.int64)
    dkv = rng.standard_normal((B, H, Dv, Dk)).astype(acc)
    dev = {n: _device(xp, a) for n, a in host.items()}
    m_d, mask_d, dkv_d = xp.asarray(m), xp.asarray(mask), xp.asarray(dkv)
    state = cosattn.RecurrentState(xp.asarray(kv0), xp.asarray(count0))
    q, k, v, do = (dev[n] for n in ("q", "k", "v", "do"))
    m64 = m.astype(np.float64)
    kv64 = kv0.astype(np.float64)
    errors = {}

    o, out_state = cosattn.forward(q, k, v, m_d, mask=mask_d, state=state, return_state=True,
                                   backend=backend)
    o_ref, kv_ref, _ = reference.forward(f64["q"], f64["k"], f64["v"], m64, mask=mask,
                                         kv0=kv64, count0=count0)
    errors["forward o"] = hx.rel_err(_host(o), o_ref)
    errors["forward state"] = hx.rel_err(_host(out_state.kv), kv_ref)

    grads = cosattn.backward(do, q, k, v, m_d, mask=mask_d, state=state, dstate=dkv_d,
                             backend=backend)
    refs = reference.backward(f64["do"], f64["q"], f64["k"], f64["v"], m64, mask=mask,
                              kv0=kv64, count0=count0, dkv=dkv.astype(np.float64))
    dm_scale = gpu_variants.dm_scale(f64["v"], refs[2], m64, mask, count0)
    for name, got, ref in zip(("dq", "dk", "dv", "dm", "dkv0"), grads, refs, strict=True):
        errors[f"backward {name}"] = (gpu_variants.dm_error(_host(got), ref, dm_scale)
                                      if name == "dm" else hx.rel_err(_host(got), ref))

    o_bi = cosattn.forward(q, k, v, m_d, causal=False, mask=mask_d, backend=backend)
    o_bi_ref, _, _ = reference.forward(f64["q"], f64["k"], f64["v"], m64, causal=False,
                                       mask=mask)
    errors["bidirectional o"] = hx.rel_err(_host(o_bi), o_bi_ref)

    steps = cosattn.RecurrentState.zeros(B, H, Dk, Dv, like=q)
    outs = [steps.step(q[:, :, t], k[:, :, t], v[:, :, t], m_d, mask=mask_d[:, t],
                       backend=backend) for t in range(5)]
    o_rnn, _, _ = reference.forward_rnn(f64["q"][:, :, :5], f64["k"][:, :, :5],
                                        f64["v"][:, :, :5], m64, mask=mask[:, :5])
    errors["steps o"] = hx.rel_err(np.stack([_host(x) for x in outs], axis=2), o_rnn)
    errors.update(check_packed_and_pool(xp, backend, rng, host, m, mask))
    return errors


def check_packed_and_pool(xp: Any, backend: str, rng: np.random.Generator,
                          host: dict[str, np.ndarray], m: np.ndarray, mask: np.ndarray
                          ) -> dict[str, float]:
    """Row 0's tokens as three packed sequences (one empty) with states, forward and backward;
    a prefill of them into slots of a pool (a -1 entry, a reused slot) and a step of the pool:
    the offsets and slots the kernels read on the device."""
    _, _, _, Dk = host["q"].shape
    Dv = host["v"].shape[3]
    acc = np.float64 if host["q"].dtype == np.float64 else np.float32
    cu = np.array([0, 30, 30, S])
    row = {n: a[:1] for n, a in host.items()}
    f64 = {n: a.astype(np.float64) for n, a in row.items()}
    q, k, v, do = (_device(xp, row[n]) for n in ("q", "k", "v", "do"))
    kv0, dkv = (rng.standard_normal((3, H, Dv, Dk)).astype(acc) for _ in range(2))
    count0 = rng.integers(0, 50, size=3).astype(np.int64)
    m_d, mask_d, cu_d = xp.asarray(m), xp.asarray(mask[:1]), xp.asarray(cu)
    m64 = m.astype(np.float64)
    state = cosattn.RecurrentState(xp.asarray(kv0), xp.asarray(count0))
    refs = dict(cu_seqlens=cu, mask=mask[:1], kv0=kv0.astype(np.float64), count0=count0)
    errors = {}
    o, out = cosattn.forward(q, k, v, m_d, mask=mask_d, state=state, return_state=True,
                             cu_seqlens=cu_d, backend=backend)
    o_ref, kv_ref, _ = reference.forward_packed(f64["q"], f64["k"], f64["v"], m64, **refs)
    errors["packed o"] = hx.rel_err(_host(o), o_ref)
    errors["packed state"] = hx.rel_err(_host(out.kv), kv_ref)
    grads = cosattn.backward(do, q, k, v, m_d, mask=mask_d, state=state,
                             dstate=xp.asarray(dkv), cu_seqlens=cu_d, backend=backend)
    grads_ref = reference.backward_packed(f64["do"], f64["q"], f64["k"], f64["v"], m64,
                                          dkv=dkv.astype(np.float64), **refs)
    for name, got, ref in zip(("dq", "dk", "dv", "dm", "dkv0"), grads, grads_ref, strict=True):
        if name != "dm":  # dm has its own measure (gpu_variants.dm_error): check() covers it
            errors[f"packed {name}"] = hx.rel_err(_host(got), ref)

    kv_pool = rng.standard_normal((5, H, Dv, Dk)).astype(acc)
    count_pool = rng.integers(0, 50, size=5).astype(np.int64)
    pool = cosattn.StatePool(xp.array(kv_pool), xp.array(count_pool))  # copies: written
    slots, initial = np.array([3, -1, 0]), np.array([True, True, False])
    o_pre = pool.prefill(q, k, v, m_d, mask=mask_d, cu_seqlens=cu_d,
                         state_indices=xp.asarray(slots), has_initial_state=xp.asarray(initial),
                         backend=backend)
    o_ref, kv_ref, count_ref = reference.pool_prefill(
        kv_pool.astype(np.float64), count_pool, f64["q"], f64["k"], f64["v"], m64, cu_seqlens=cu,
        state_indices=slots, has_initial_state=initial, mask=mask[:1])
    errors["prefill o"] = hx.rel_err(_host(o_pre), o_ref)
    errors["prefill pool"] = hx.rel_err(_host(pool.kv), kv_ref)
    # one token for each of the three entries (positions 0, 1, 2 of row 0), slots reversed
    token = {n: np.ascontiguousarray(row[n][0, :, :3].transpose(1, 0, 2))
             for n in ("q", "k", "v")}
    o_t = pool.step(*(_device(xp, token[n]) for n in ("q", "k", "v")), m_d,
                    state_indices=xp.asarray(slots[::-1].copy()), backend=backend)
    o_ref, kv_ref, _ = reference.pool_step(kv_ref, count_ref,
                                           *(token[n].astype(np.float64) for n in "qkv"), m64,
                                           state_indices=slots[::-1])
    errors["pool step o"] = hx.rel_err(_host(o_t), o_ref)
    errors["pool step pool"] = hx.rel_err(_host(pool.kv), kv_ref)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--no-pool", action="store_true",
                   help="allocate every CuPy array on its own (for memcheck)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        xp, backends = np, ("numpy",)
    else:
        import cupy

        xp, backends = cupy, ("cupy", "numba")
        if args.no_pool:
            cupy.cuda.set_allocator(None)
    failed = False
    for backend in backends:
        reason = cosattn.available_backends()[backend]
        if reason is not None:
            print(f"{backend}: unavailable ({reason})")
            continue
        for dtype in DTYPES:
            for Dk, Dv in HEADS:
                errors = check(xp, backend, dtype, Dk, Dv)
                tol = hx.SPEC_TOL[dtype]
                bad = {n: e for n, e in errors.items() if not e <= tol}
                failed |= bool(bad)
                worst = max(errors, key=errors.get)
                print(f"{backend} {dtype.name} Dk={Dk} Dv={Dv}: worst {worst} "
                      f"{errors[worst]:.2e} (bound {tol:g})" + (f"; OFF: {bad}" if bad else ""),
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
