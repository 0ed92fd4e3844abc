"""What every backend's tests share: docs/spec.md's error measure and bounds, and input makers."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st

from cosattn import reference

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)
# docs/spec.md, "Numbers": err(x, ref) <= TOL[dtype]
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3,
       BFLOAT16: 1.5e-2}
MASK_KINDS = ("none", "left", "right", "inner")
# What padding may hold (docs/spec.md, "Bad input": padding holds anything); None keeps zeros.
JUNK = (None, np.nan, np.inf, -np.inf, 1e30)


def rel_err(x, ref, scale=0.0) -> float:
    """``|x - ref| / max(|ref|, 1e-6 sqrt(N))`` in float64 (docs/spec.md, "Numbers");
    ``scale``, when larger, replaces ``|ref|`` (see ``dm_scale``)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    floor = 1e-6 * np.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), scale, floor))


def assert_close(x, ref, dtype, what="", scale=0.0) -> None:
    err = rel_err(x, ref, scale)
    tol = TOL[np.dtype(dtype)]
    assert err <= tol, f"{what}: err {err:.3g} > {tol:.3g} for {np.dtype(dtype)}"


def make_mask(rng, B: int, S: int, kind: str) -> np.ndarray | None:
    """None, or a (B, S) bool mask with left, right or inner padding (rows may be all padding)."""
    if kind == "none":
        return None
    lengths = rng.integers(0, S + 1, size=B)
    pos = np.arange(S)[None, :]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "left":
        return pos >= (S - lengths)[:, None]
    return rng.random((B, S)) < 0.7


@dataclass
class Case:
    """One problem's inputs (already rounded to ``dtype``) and their float64 copies."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    do: np.ndarray
    m: np.ndarray | None
    mask: np.ndarray | None
    kv0: np.ndarray | None
    count0: np.ndarray | None
    dkv: np.ndarray | None
    f64: dict = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype:
        return self.q.dtype


def make_case(rng, B, H, S, Dk, Dv, dtype, *, mask="none", m=True, state=False, dstate=False,
              scale=1.0, junk=None) -> Case:
    """Random inputs in (B, H, S, D) layout; a state of float32 (float64 for float64 inputs).

    ``junk`` (NaN, Inf, 1e30, ...) fills the padded positions of q, k, v and do, where their
    float64 copies (what the reference sees) hold zeros: a backend must give the same results.
    """
    dtype = np.dtype(dtype)
    acc = np.float64 if dtype == np.float64 else np.float32

    def draw(*shape):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    q, k, v, do = draw(B, H, S, Dk), draw(B, H, S, Dk), draw(B, H, S, Dv), draw(B, H, S, Dv)
    mvec = rng.uniform(-2, 2, size=H).astype(np.float32) if m else None
    kv0 = rng.standard_normal((B, H, Dv, Dk)).astype(acc) if state else None
    count0 = rng.integers(0, 50, size=B).astype(np.int64) if state else None
    dkv = rng.standard_normal((B, H, Dv, Dk)).astype(acc) if dstate else None
    case = Case(q, k, v, do, mvec, make_mask(rng, B, S, mask), kv0, count0, dkv)
    case.f64 = {n: None if a is None else np.array(a, dtype=np.float64)
                for n, a in dict(q=q, k=k, v=v, do=do, m=mvec, kv0=kv0, dkv=dkv).items()}
    if junk is not None and case.mask is not None:
        with np.errstate(over="ignore"):  # 1e30 is Inf in float16
            for name, x in dict(q=q, k=k, v=v, do=do).items():
                x.transpose(0, 2, 1, 3)[~case.mask] = junk
                case.f64[name].transpose(0, 2, 1, 3)[~case.mask] = 0
    return case


def assert_same_bits(x, y, name: str) -> None:
    """``x`` and ``y`` are the same array, bit for bit (NaN payloads and signed zeros too)."""
    np.testing.assert_array_equal(x, y, err_msg=name)
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{name}: signed zeros differ"


def assert_padding_zero(x, mask, name: str) -> None:
    """Every padded position of ``x`` (B, H, S, D) is +0 (docs/spec.md, "Bad input")."""
    if mask is None:
        return
    padded = np.asarray(x).transpose(0, 2, 1, 3)[~mask].astype(np.float64)
    assert np.all(padded == 0) and not np.any(np.signbit(padded)), (
        f"{name}: padded positions must be +0, got {padded[(padded != 0) | np.signbit(padded)][:5]}"
    )


def reference_forward(case: Case, causal=True):
    f = case.f64
    return reference.forward(f["q"], f["k"], f["v"], f["m"], causal=causal, mask=case.mask,
                             kv0=f["kv0"], count0=case.count0)


def reference_backward(case: Case, causal=True):
    f = case.f64
    return reference.backward(f["do"], f["q"], f["k"], f["v"], f["m"], causal=causal,
                              mask=case.mask, kv0=f["kv0"], count0=case.count0, dkv=f["dkv"])


def dm_scale(case: Case, causal: bool, dv_ref) -> float:
    """The size of the terms that ``dm`` sums: ``|t|`` over t[b, h, j] = ln(c_j) (dv_j . v_j).

    ``dm`` is one number per head, a sum over B x S of terms of either sign (docs/spec.md,
    "Backward": ``dṽ_j . ṽ_j = dv_j . v_j``). Each term carries the rounding of the values'
    gradient, about 1e-7 of it in float32, so the error of any float32 computation of ``dm``
    scales with |t|, not with |dm|: on a draw where the terms cancel to |dm| << |t|, the plain
    ``|dm - ref| / |ref|`` exceeds 1e-5 for every backend, the NumPy one included. ``dm`` is
    therefore measured against max(|ref|, |t|) (docs/spec.md, "Measuring dm"), which is |ref|
    unless the terms cancel unusually. ``dv_ref`` is the reference's dv for the case.
    """
    B, S = case.q.shape[::2]
    mask = np.ones((B, S), bool) if case.mask is None else case.mask
    count0 = np.zeros(B, np.int64) if case.count0 is None else case.count0
    c = reference.counts(mask, count0, causal)
    terms = np.log(np.maximum(c, 1))[:, None, :] * np.einsum("bhsd,bhsd->bhs", dv_ref,
                                                              case.f64["v"])
    sig = 1.0 / (1.0 + np.exp(-case.f64["m"]))
    return float(np.linalg.norm(terms * (sig * (1.0 - sig))[None, :, None]))


def case_id(B, H, S, Dk, Dv) -> str:
    return f"B{B}-H{H}-S{S}-Dk{Dk}-Dv{Dv}"


def to_layout(x, layout):
    """A (B, H, S, D) array in ``layout`` (a contiguous copy for "bshd")."""
    return x if layout == "bhsd" else np.ascontiguousarray(x.transpose(0, 2, 1, 3))


def from_layout(x, layout):
    return x if layout == "bhsd" else x.transpose(0, 2, 1, 3)


def _buffer_like(x: np.ndarray, to_native) -> Any:
    """An out= buffer shaped and typed like ``x``, holding NaN (so unwritten entries show)."""
    return to_native(np.full(x.shape, np.nan, x.dtype))


def check_forward(case: Case, *, causal: bool, layout: str = "bhsd", backend=None,
                  to_native=np.asarray, to_host=np.asarray, out: bool = False) -> None:
    """cosattn.forward (with states when given and causal) against the reference; with
    ``out``, into a given buffer, which the call returns."""
    import cosattn

    ref_o, ref_kv, ref_count = reference_forward(case, causal)
    args = [to_native(to_layout(a, layout)) for a in (case.q, case.k, case.v)]
    m = None if case.m is None else to_native(case.m)
    mask = None if case.mask is None else to_native(case.mask)
    state = None
    if causal and case.kv0 is not None:
        state = cosattn.RecurrentState(to_native(case.kv0), to_native(case.count0))
    given = _buffer_like(to_layout(case.v, layout), to_native) if out else None
    result = cosattn.forward(*args, m, causal=causal, mask=mask, state=state,
                             return_state=causal, layout=layout, backend=backend, out=given)
    o, out_state = result if causal else (result, None)
    assert not out or o is given
    o = to_host(o)
    assert o.dtype == case.dtype
    assert_close(from_layout(o, layout), ref_o, case.dtype, "o")
    assert_padding_zero(from_layout(o, layout), case.mask, "o")
    if causal:
        kv = to_host(out_state.kv)
        assert kv.dtype == (np.float64 if case.dtype == np.float64 else np.float32)
        assert_close(kv, ref_kv, case.dtype, "state.kv")
        np.testing.assert_array_equal(to_host(out_state.count), ref_count)


def check_backward(case: Case, *, causal: bool, layout: str = "bhsd", backend=None,
                   to_native=np.asarray, to_host=np.asarray, out: bool = False) -> None:
    """cosattn.backward (dstate and dkv0 when given and causal) against the reference; with
    ``out``, into given buffers, which the call returns."""
    import cosattn

    ref = reference_backward(case, causal)
    args = [to_native(to_layout(a, layout)) for a in (case.do, case.q, case.k, case.v)]
    m = None if case.m is None else to_native(case.m)
    mask = None if case.mask is None else to_native(case.mask)
    state = dstate = None
    if causal and case.kv0 is not None:
        state = cosattn.RecurrentState(to_native(case.kv0), to_native(case.count0))
    if causal and case.dkv is not None:
        dstate = to_native(case.dkv)
    given = None
    if out:
        given = tuple(_buffer_like(to_layout(a, layout), to_native)
                      for a in (case.q, case.k, case.v))
    grads = cosattn.backward(*args, m, causal=causal, mask=mask, state=state, dstate=dstate,
                             layout=layout, backend=backend, out=given)
    assert len(grads) == (5 if state is not None else 4)
    assert not out or all(g is b for g, b in zip(grads, given, strict=False))
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref[:3], strict=True):
        g = to_host(g)
        assert g.dtype == case.dtype, name
        assert_close(from_layout(g, layout), r, case.dtype, name)
        assert_padding_zero(from_layout(g, layout), case.mask, name)
    if case.m is None:
        assert grads[3] is None
    else:
        assert_close(to_host(grads[3]), ref[3], case.dtype, "dm",
                     dm_scale(case, causal, ref[2]))
    if state is not None:
        assert_close(to_host(grads[4]), ref[4], case.dtype, "dkv0")



def reference_sum(case: Case, counts, *, lo: int = 0, hi: int | None = None):
    """``Σ_j real_j w(c_j) v_j k̂_jᵀ`` (B, H, Dv, Dk) in float64 over positions [lo, hi), with
    the counts ``counts`` (B, S) of the whole sequence (docs/spec.md, "Forward")."""
    f = case.f64
    B, H, S, _ = case.q.shape
    hi = S if hi is None else hi
    mask = np.ones((B, S), bool) if case.mask is None else case.mask
    real = mask[:, None, lo:hi, None]
    kh, _ = reference.normalize(np.where(real, f["k"][:, :, lo:hi], 0.0))
    w = reference.weights(f["m"], np.asarray(counts, np.float64)[:, lo:hi], H)[..., None]
    vt = np.where(real, w * f["v"][:, :, lo:hi], 0.0)
    return np.swapaxes(vt, -1, -2) @ kh


def check_absorb(case: Case, *, causal: bool, layout: str = "bhsd", backend=None,
                 to_native=np.asarray, to_host=np.asarray, rng=None) -> None:
    """cosattn.absorb against the reference: causal, the state forward would return (from the
    case's incoming state when it has one); bidirectional, the sum weighted with a whole
    sequence's count of at least the call's own real tokens (drawn with ``rng``)."""
    import cosattn

    B, _, S, _ = case.q.shape
    mask = np.ones((B, S), bool) if case.mask is None else case.mask
    own = mask.sum(axis=1).astype(np.int64)
    native_mask = None if case.mask is None else to_native(case.mask)
    m = None if case.m is None else to_native(case.m)
    k, v = (to_native(to_layout(a, layout)) for a in (case.k, case.v))
    acc = np.float64 if case.dtype == np.float64 else np.float32
    if causal:
        state = None
        if case.kv0 is not None:
            state = cosattn.RecurrentState(to_native(case.kv0), to_native(case.count0))
        got = cosattn.absorb(k, v, m, mask=native_mask, state=state, layout=layout,
                             backend=backend)
        _, ref_kv, ref_count = reference_forward(case)
    else:
        extra = np.zeros(B, np.int64) if rng is None else rng.integers(0, 40, size=B)
        total = own + extra
        got = cosattn.absorb(k, v, m, causal=False, mask=native_mask,
                             total_count=to_native(total), layout=layout, backend=backend)
        ref_kv = reference_sum(case, np.broadcast_to(total[:, None], (B, S)))
        ref_count = own
    kv = to_host(got.kv)
    assert kv.dtype == acc
    assert_close(kv, ref_kv, case.dtype, "absorb kv")
    np.testing.assert_array_equal(to_host(got.count), ref_count)


def check_total(case: Case, cut: int, *, layout: str = "bhsd", backend=None,
                to_native=np.asarray, to_host=np.asarray) -> None:
    """The bidirectional form of a sequence cut at ``cut`` into two parts, each run with
    ``total=`` (the sum of both parts' absorb) and, in the backward, ``dstate`` = the whole
    sequence's ``Σ do q̂'ᵀ``: each part's o, dq, dk, dv are the reference's on its positions,
    and the two parts' dm add up to the reference's (docs/spec.md, "Context parallel")."""
    import cosattn

    B, _, S, _ = case.q.shape
    mask = np.ones((B, S), bool) if case.mask is None else case.mask
    parts = [slice(0, cut), slice(cut, S)]
    m = None if case.m is None else to_native(case.m)

    def part(x, where):
        return to_native(to_layout(np.ascontiguousarray(x[:, :, where]), layout))

    def part_mask(where):
        return None if case.mask is None else to_native(np.ascontiguousarray(mask[:, where]))

    L = mask.sum(axis=1).astype(np.int64)
    sums = [to_host(cosattn.absorb(part(case.k, w), part(case.v, w), m, causal=False,
                                   mask=part_mask(w), total_count=to_native(L), layout=layout,
                                   backend=backend).kv) for w in parts]
    total = cosattn.RecurrentState(to_native(sums[0] + sums[1]), to_native(L))
    grads = [to_host(cosattn.absorb(part(case.q, w), part(case.do, w), causal=False,
                                    mask=part_mask(w), layout=layout, backend=backend).kv)
             for w in parts]
    g = to_native(grads[0] + grads[1])
    ref_o, _, _ = reference_forward(case, causal=False)
    ref = reference_backward(case, causal=False)
    dm = []
    for w in parts:
        args = [part(x, w) for x in (case.q, case.k, case.v)]
        o = to_host(cosattn.forward(*args, m, causal=False, mask=part_mask(w), total=total,
                                    layout=layout, backend=backend))
        assert_close(from_layout(o, layout), ref_o[:, :, w], case.dtype, f"o[{w}]")
        result = cosattn.backward(part(case.do, w), *args, m, causal=False, mask=part_mask(w),
                                  total=total, dstate=g, layout=layout, backend=backend)
        assert len(result) == 4
        for name, x, r in zip(("dq", "dk", "dv"), result[:3], ref[:3], strict=True):
            assert_close(from_layout(to_host(x), layout), r[:, :, w], case.dtype, f"{name}[{w}]")
        dm.append(None if result[3] is None else to_host(result[3]))
    if case.m is None:
        assert dm == [None, None]
    else:
        assert_close(dm[0] + dm[1], ref[3], case.dtype, "dm of the parts",
                     dm_scale(case, False, ref[2]))


def _read_only(x):
    x.flags.writeable = False
    return x


def failing_steps(B=2, H=3, Dk=4, Dv=5):
    """``(name, call, error, pattern)`` for steps that must raise and change nothing (docs/
    spec.md, "Bad input"): each ``call(state, q, k, v, **kwargs)`` gets a NumPy state and
    float32 q, k (B, H, Dk), v (B, H, Dv), and makes one thing wrong."""
    f32 = np.float32

    def read_only(name):
        def call(state, q, k, v, **kw):
            _read_only(getattr(state, name))
            state.step(q, k, v, **kw)
        return call

    def with_out(out):
        return lambda s, q, k, v, **kw: s.step(q, k, v, out=out, **kw)

    return [
        ("read-only kv", read_only("kv"), ValueError, "state.kv is read-only"),
        ("read-only count", read_only("count"), ValueError, "state.count is read-only"),
        ("out of the wrong shape", with_out(np.empty((B, H, Dk), f32)), ValueError,
         r"out must have shape \(B, H, Dv\)"),
        ("out of the wrong dtype", with_out(np.empty((B, H, Dv))), TypeError,
         "out must have the dtype of v_t"),
        ("read-only out", with_out(_read_only(np.empty((B, H, Dv), f32))), ValueError,
         "out is read-only"),
        ("mixed dtypes", lambda s, q, k, v, **kw: s.step(q, k.astype(np.float64), v, **kw),
         TypeError, "must share one dtype"),
        ("integer inputs", lambda s, q, k, v, **kw: s.step(q.astype(np.int32), k, v, **kw),
         TypeError, "unsupported dtype"),
        ("bad mask", lambda s, q, k, v, **kw: s.step(q, k, v, mask=np.ones(B + 1, bool), **kw),
         ValueError, r"mask must have shape"),
        ("bad m", lambda s, q, k, v, **kw: s.step(q, k, v, np.zeros(H + 1, f32), **kw),
         ValueError, r"m must have shape"),
        ("bad eps", lambda s, q, k, v, **kw: s.step(q, k, v, eps="a", **kw), TypeError,
         "eps must be a real number"),
    ]


# --- packed sequences and pools (docs/spec.md, "Packed variable-length sequences", "A pool of
# states") ---------------------------------------------------------------------------------------

@dataclass
class PackedCase:
    """N sequences packed in one row: q, k (1, H, T, Dk), v, do (1, H, T, Dv), ``cu_seqlens``
    (N+1,); states (N, ...). ``f64`` holds float64 copies with zeros where ``junk`` went."""

    case: Case
    cu_seqlens: np.ndarray

    def __getattr__(self, name):
        return getattr(self.case, name)

    @property
    def N(self) -> int:
        return len(self.cu_seqlens) - 1


def make_packed_case(rng, lengths, H, Dk, Dv, dtype, *, mask=False, m=True, state=False,
                     dstate=False, index_dtype=np.int64, junk=None) -> PackedCase:
    """Random packed inputs for sequences of ``lengths``; ``mask`` puts padding inside them
    (about 30% of the tokens, some sequences all padding); ``junk`` fills the padding."""
    lengths = list(lengths)
    N, T = len(lengths), int(sum(lengths))
    case = make_case(rng, N, H, T, Dk, Dv, dtype, m=m, state=state, dstate=dstate)
    q, k, v, do = (x[:1] for x in (case.q, case.k, case.v, case.do))
    real = (rng.random((1, T)) < 0.7) if mask else None
    packed = Case(q, k, v, do, case.m, real, case.kv0, case.count0, case.dkv)
    packed.f64 = {n: None if a is None else np.array(a, dtype=np.float64)
                  for n, a in dict(q=q, k=k, v=v, do=do, m=case.m, kv0=case.kv0,
                                   dkv=case.dkv).items()}
    if junk is not None and real is not None:
        with np.errstate(over="ignore"):
            for name in ("q", "k", "v", "do"):
                getattr(packed, name).transpose(0, 2, 1, 3)[~real] = junk
                packed.f64[name].transpose(0, 2, 1, 3)[~real] = 0
    cu = np.concatenate(([0], np.cumsum(lengths))).astype(index_dtype)
    return PackedCase(packed, cu)


def reference_packed_forward(pc: PackedCase, causal=True):
    f = pc.f64
    return reference.forward_packed(f["q"], f["k"], f["v"], f["m"], cu_seqlens=pc.cu_seqlens,
                                    causal=causal, mask=pc.mask, kv0=f["kv0"],
                                    count0=pc.count0)


def reference_packed_backward(pc: PackedCase, causal=True):
    f = pc.f64
    return reference.backward_packed(f["do"], f["q"], f["k"], f["v"], f["m"],
                                     cu_seqlens=pc.cu_seqlens, causal=causal, mask=pc.mask,
                                     kv0=f["kv0"], count0=pc.count0, dkv=f["dkv"])


def packed_dm_scale(pc: PackedCase, causal: bool, dv_ref) -> float:
    """:func:`dm_scale` of the unpacked batch that defines the packed call."""
    (v, real), (dv, _) = (reference.unpack(x, pc.cu_seqlens, pc.mask)
                          for x in (pc.f64["v"], dv_ref))
    count0 = np.zeros(pc.N, np.int64) if pc.count0 is None else pc.count0
    c = reference.counts(real, count0, causal)
    terms = np.log(np.maximum(c, 1))[:, None, :] * np.einsum("bhsd,bhsd->bhs", dv, v)
    sig = 1.0 / (1.0 + np.exp(-pc.f64["m"]))
    return float(np.linalg.norm(terms * (sig * (1.0 - sig))[None, :, None]))


def check_packed_forward(pc: PackedCase, *, causal: bool, layout: str = "bhsd", backend=None,
                         to_native=np.asarray, to_host=np.asarray) -> None:
    """cosattn.forward with cu_seqlens (states when given and causal) against the reference."""
    import cosattn

    ref_o, ref_kv, ref_count = reference_packed_forward(pc, causal)
    args = [to_native(to_layout(a, layout)) for a in (pc.q, pc.k, pc.v)]
    m = None if pc.m is None else to_native(pc.m)
    mask = None if pc.mask is None else to_native(pc.mask)
    state = None
    if causal and pc.kv0 is not None:
        state = cosattn.RecurrentState(to_native(pc.kv0), to_native(pc.count0))
    result = cosattn.forward(*args, m, causal=causal, mask=mask, state=state,
                             return_state=causal, cu_seqlens=to_native(pc.cu_seqlens),
                             layout=layout, backend=backend)
    o, out_state = result if causal else (result, None)
    o = from_layout(to_host(o), layout)
    assert o.dtype == pc.dtype
    assert_close(o, ref_o, pc.dtype, "o")
    assert_padding_zero(o, pc.mask, "o")
    if causal:
        kv = to_host(out_state.kv)
        assert kv.shape == (pc.N, pc.q.shape[1], pc.v.shape[3], pc.q.shape[3])
        assert_close(kv, ref_kv, pc.dtype, "state.kv")
        np.testing.assert_array_equal(to_host(out_state.count), ref_count)


def check_packed_backward(pc: PackedCase, *, causal: bool, layout: str = "bhsd", backend=None,
                          to_native=np.asarray, to_host=np.asarray) -> None:
    """cosattn.backward with cu_seqlens (dstate and dkv0 when given and causal) against the
    reference."""
    import cosattn

    ref = reference_packed_backward(pc, causal)
    args = [to_native(to_layout(a, layout)) for a in (pc.do, pc.q, pc.k, pc.v)]
    m = None if pc.m is None else to_native(pc.m)
    mask = None if pc.mask is None else to_native(pc.mask)
    state = dstate = None
    if causal and pc.kv0 is not None:
        state = cosattn.RecurrentState(to_native(pc.kv0), to_native(pc.count0))
    if causal and pc.dkv is not None:
        dstate = to_native(pc.dkv)
    grads = cosattn.backward(*args, m, causal=causal, mask=mask, state=state, dstate=dstate,
                             cu_seqlens=to_native(pc.cu_seqlens), layout=layout,
                             backend=backend)
    assert len(grads) == (5 if state is not None else 4)
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref[:3], strict=True):
        g = from_layout(to_host(g), layout)
        assert g.dtype == pc.dtype, name
        assert_close(g, r, pc.dtype, name)
        assert_padding_zero(g, pc.mask, name)
    if pc.m is None:
        assert grads[3] is None
    else:
        assert_close(to_host(grads[3]), ref[3], pc.dtype, "dm",
                     packed_dm_scale(pc, causal, ref[2]))
    if state is not None:
        assert_close(to_host(grads[4]), ref[4], pc.dtype, "dkv0")


@dataclass
class Slots:
    """A pool's contents and the slots a call names: ``kv`` (P, H, Dv, Dk), ``count`` (P,),
    ``indices`` (N,) with -1 entries, ``initial`` (N,) bool or None. Slots named with
    ``initial`` False hold NaN: a backend must not read them."""

    kv: np.ndarray
    count: np.ndarray
    indices: np.ndarray
    initial: np.ndarray | None


def make_slots(rng, N, P, H, Dk, Dv, acc, *, padding=True, initial=True,
               index_dtype=np.int64) -> Slots:
    kv = rng.standard_normal((P, H, Dv, Dk)).astype(acc)
    kv[..., 0, 0] = -0.0  # bit-for-bit comparisons bite on -0.0
    count = rng.integers(0, 40, size=P).astype(np.int64)
    chosen = rng.permutation(P)[:N]
    indices = np.where(rng.random(N) < 0.25, -1, chosen) if padding else chosen
    start = rng.random(N) < 0.7 if initial else None
    if start is not None:
        kv[indices[(indices >= 0) & ~start]] = np.nan
    return Slots(kv, count, indices.astype(index_dtype), start)


def _named(indices) -> np.ndarray:
    return np.asarray(indices)[np.asarray(indices) >= 0]


def check_pool(pool, before: Slots, ref_kv, ref_count, dtype, to_host) -> None:
    """The named slots against the reference; every other slot bit for bit as it was."""
    kv, count = to_host(pool.kv), to_host(pool.count)
    named = _named(before.indices)
    untouched = np.setdiff1d(np.arange(len(before.count)), named)
    assert kv[untouched].tobytes() == before.kv[untouched].tobytes(), "unnamed slots changed"
    np.testing.assert_array_equal(count[untouched], before.count[untouched])
    assert_close(kv[named], ref_kv[named], dtype, "pool.kv")
    np.testing.assert_array_equal(count[named], ref_count[named])


def check_prefill(pc: PackedCase, slots: Slots, *, layout: str = "bhsd", backend=None,
                  to_native=np.asarray, to_host=np.asarray, out: bool = False) -> None:
    """StatePool.prefill against the reference: the outputs (+0 for -1 entries and padding),
    the named slots, and the other slots unchanged; with ``out``, the outputs into a given
    buffer, which the call returns."""
    import cosattn

    f = pc.f64
    ref_o, ref_kv, ref_count = reference.pool_prefill(
        slots.kv.astype(np.float64), slots.count, f["q"], f["k"], f["v"], f["m"],
        cu_seqlens=pc.cu_seqlens, state_indices=slots.indices,
        has_initial_state=slots.initial, mask=pc.mask)
    pool = cosattn.StatePool(to_native(slots.kv.copy()), to_native(slots.count.copy()))
    args = [to_native(to_layout(a, layout)) for a in (pc.q, pc.k, pc.v)]
    given = _buffer_like(to_layout(pc.v, layout), to_native) if out else None
    o = pool.prefill(*args, None if pc.m is None else to_native(pc.m),
                     cu_seqlens=to_native(pc.cu_seqlens),
                     state_indices=to_native(slots.indices),
                     has_initial_state=None if slots.initial is None else to_native(slots.initial),
                     mask=None if pc.mask is None else to_native(pc.mask), layout=layout,
                     out=given, backend=backend)
    assert not out or o is given
    o = from_layout(to_host(o), layout)
    assert o.dtype == pc.dtype
    assert_close(o, ref_o, pc.dtype, "o")
    live = np.repeat(slots.indices >= 0, np.diff(pc.cu_seqlens))[None]
    real = live if pc.mask is None else live & pc.mask
    assert_padding_zero(o, real, "o")
    check_pool(pool, slots, ref_kv, ref_count, pc.dtype, to_host)
    # A sequence with no real token that starts from its slot leaves it bit for bit.
    tokens = np.array([real[0, a:b].sum() for a, b in itertools.pairwise(pc.cu_seqlens)])
    start = slots.indices >= 0
    if slots.initial is not None:
        start &= slots.initial
    kept = slots.indices[start & (tokens == 0)]
    assert to_host(pool.kv)[kept].tobytes() == slots.kv[kept].tobytes(), "a slot with no token"


def check_pool_step(rng, slots: Slots, H, Dk, Dv, dtype, *, mask=False, junk=None,
                    backend=None, to_native=np.asarray, to_host=np.asarray) -> None:
    """StatePool.step against the reference: the outputs (+0 for -1 entries and masked rows),
    the named slots, and the other slots unchanged. ``junk`` fills the -1 and masked rows."""
    import cosattn

    N = len(slots.indices)
    q, k, v = (rng.standard_normal((N, H, D)).astype(dtype) for D in (Dk, Dk, Dv))
    m = rng.uniform(-2, 2, size=H).astype(np.float32)
    real = rng.random(N) < 0.7 if mask else None
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    padded = slots.indices < 0 if real is None else (slots.indices < 0) | ~real
    if junk is not None:
        with np.errstate(over="ignore"):
            for x, x64 in zip((q, k, v), f64, strict=True):
                x[padded] = junk
                x64[padded] = 0
    ref_o, ref_kv, ref_count = reference.pool_step(
        slots.kv.astype(np.float64), slots.count, *f64, m.astype(np.float64),
        state_indices=slots.indices, has_initial_state=slots.initial, mask=real)
    pool = cosattn.StatePool(to_native(slots.kv.copy()), to_native(slots.count.copy()))
    o = pool.step(*(to_native(x) for x in (q, k, v)), to_native(m),
                  state_indices=to_native(slots.indices),
                  has_initial_state=None if slots.initial is None else to_native(slots.initial),
                  mask=None if real is None else to_native(real), backend=backend)
    o = to_host(o)
    assert o.dtype == np.dtype(dtype) and o.shape == (N, H, Dv)
    assert_close(o, ref_o, dtype, "o_t")
    assert np.all(o[padded] == 0) and not np.any(np.signbit(o[padded]))
    check_pool(pool, slots, ref_kv, ref_count, dtype, to_host)
    if real is not None:  # a masked row that starts from its slot leaves it bit for bit
        kept = slots.indices[(slots.indices >= 0) & ~real
                             & (True if slots.initial is None else slots.initial)]
        assert to_host(pool.kv)[kept].tobytes() == slots.kv[kept].tobytes()


# --- Hypothesis strategies for packed calls and pools, shared by every backend's tests ---------

INDEX_DTYPES = st.sampled_from([np.int32, np.int64])


def accumulation(dtype) -> np.dtype:
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def pool_dtypes(dtype):
    """The dtypes a pool for inputs of ``dtype`` may have: float32 or float64, float64 only for
    float64 inputs (docs/spec.md, "Numbers")."""
    return st.sampled_from(sorted({accumulation(dtype), np.dtype(np.float64)}, key=str))


def packed_lengths(chunks, longest: int = 150):
    """Sequence lengths around each of the backend's ``chunks`` (a chunk less one, one, one
    more, two and a bit), empty and single tokens, or anything up to ``longest``: sequence
    boundaries inside chunks and on their edges."""
    around = {n for C in chunks for n in (C - 1, C, C + 1, 2 * C + 3)}
    return st.one_of(st.sampled_from(sorted({0, 1, 2} | around)), st.integers(0, longest))


@st.composite
def packed_cases(draw, lengths, head_sizes, dtypes=DTYPES, max_sequences: int = 6):
    """``(PackedCase, causal, layout)``: up to ``max_sequences`` sequences of ``lengths``,
    ``(Dk, Dv)`` from ``head_sizes``, a dtype of ``dtypes``, padding inside the sequences that
    holds junk, m, states and dstate."""
    Dk, Dv = draw(head_sizes)
    causal = draw(st.booleans())
    mask = draw(st.booleans())
    pc = make_packed_case(np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
                          draw(st.lists(lengths, min_size=1, max_size=max_sequences)),
                          draw(st.integers(1, 3)), Dk, Dv, draw(st.sampled_from(dtypes)),
                          mask=mask, m=draw(st.booleans()), state=causal and draw(st.booleans()),
                          dstate=causal and draw(st.booleans()),
                          index_dtype=draw(INDEX_DTYPES),
                          junk=draw(st.sampled_from(JUNK)) if mask else None)
    return pc, causal, draw(st.sampled_from(["bhsd", "bshd"]))


@st.composite
def prefills(draw, lengths, head_sizes, dtypes=DTYPES, max_sequences: int = 5):
    """``(PackedCase, Slots, layout)`` for a pool's prefill: random slots of a pool of up to 4
    spare slots, padding entries (-1) whose tokens hold junk, sequences that do not start from
    their (reused) slot, padding inside the sequences."""
    lengths = draw(st.lists(lengths, min_size=1, max_size=max_sequences))
    N = len(lengths)
    H, (Dk, Dv) = draw(st.integers(1, 3)), draw(head_sizes)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = draw(st.booleans())
    index_dtype = draw(INDEX_DTYPES)
    pc = make_packed_case(rng, lengths, H, Dk, Dv, dtype, mask=mask, m=draw(st.booleans()),
                          index_dtype=index_dtype,
                          junk=draw(st.sampled_from(JUNK)) if mask else None)
    slots = make_slots(rng, N, N + draw(st.integers(0, 4)), H, Dk, Dv,
                       draw(pool_dtypes(dtype)), padding=draw(st.booleans()),
                       initial=draw(st.booleans()), index_dtype=index_dtype)
    junk = draw(st.sampled_from(JUNK))
    if junk is not None:  # the tokens of -1 entries hold anything
        dead = np.repeat(slots.indices < 0, lengths)
        with np.errstate(over="ignore"):
            for name in ("q", "k", "v"):
                getattr(pc, name)[:, :, dead] = junk
                pc.f64[name][:, :, dead] = 0
    return pc, slots, draw(st.sampled_from(["bhsd", "bshd"]))


@st.composite
def pool_steps(draw, head_sizes, dtypes=DTYPES, max_entries: int = 8):
    """The arguments of :func:`check_pool_step` but the backend's: up to ``max_entries``
    entries on random slots of a pool with up to 6 spare slots, padding entries, reused slots,
    masked rows, junk in the rows that are not read."""
    N, P = draw(st.integers(1, max_entries)), draw(st.integers(0, 6))
    H, (Dk, Dv) = draw(st.integers(1, 3)), draw(head_sizes)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slots = make_slots(rng, N, N + P, H, Dk, Dv, draw(pool_dtypes(dtype)),
                       padding=draw(st.booleans()), initial=draw(st.booleans()),
                       index_dtype=draw(INDEX_DTYPES))
    return dict(rng=rng, slots=slots, H=H, Dk=Dk, Dv=Dv, dtype=dtype,
                mask=draw(st.booleans()), junk=draw(st.sampled_from(JUNK)))


@contextlib.contextmanager
def split_sequences(split: bool) -> Iterator[None]:
    """The cupy backend with, when ``split``, a GPU of many SMs and segments of one chunk: every
    forward and backward with more than one chunk in its row cuts each sequence into segments
    (forward_kernel, scan_kernel, then the sweeps per segment: docs/design.md, "The sequence
    split")."""
    from cosattn.backends import _cupy

    with pytest.MonkeyPatch.context() as patch:
        if split:
            patch.setattr(_cupy, "_sm_count", lambda device: 10**6)
            patch.setattr(_cupy, "MIN_SEGMENT_CHUNKS", 1)
        yield


@dataclass(frozen=True)
class Problem:
    """One drawn case of the CUDA kernels' properties (emulated and on the device), small enough
    for Hypothesis to print."""

    dtype: np.dtype
    B: int
    H: int
    S: int
    Dk: int
    Dv: int
    mask: str
    m: bool
    state: bool
    dstate: bool
    causal: bool
    layout: str
    junk: float | None
    seed: int

    def case(self):
        return make_case(np.random.default_rng(self.seed), self.B, self.H, self.S, self.Dk,
                         self.Dv, self.dtype, mask=self.mask, m=self.m, state=self.state,
                         dstate=self.dstate, junk=self.junk)
