"""The CPU backend: the chunked algorithm of docs/design.md on batched BLAS matmuls.

Sequences are cut into chunks of ``CHUNK`` tokens. Within a chunk the causal interaction is a
small masked C x C product; across chunks it goes through per-chunk states (Dv x Dk) whose
prefix sums are taken over the chunk axis. Nothing of size S x S or S x D x D is ever built.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype. The products
are NumPy's (BLAS); the elementwise work around them (normalisation, scaling, the output copy,
the normalisation backward, ``dm``'s terms) runs as one fused pass per array in
:mod:`._cpu_kernels`, as does the recurrent step.

Padding holds anything (docs/spec.md, "Bad input"): padded rows of q, k, v and do are selected
to zero as they are copied in, so nothing there reaches a sum, and padded outputs are written
as +0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from .._call import BackwardCall, Call, ForwardCall, Problem, StepCall
from . import _cpu_kernels, ceil_div

DEVICE = "cpu"
CHUNK = 64
# Below this many input elements (B*H*S*(Dk+Dv)) a call runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
# Above it, a call is cut into parts of about this many input elements (whole heads), so that
# a part's temporaries stay small enough for the caches; parts run on a pool of threads.
PART_ELEMENTS = 1 << 20
# The most threads a call uses, its own and the BLAS library's (unset: one per core).
THREADS_ENV_VAR = "COSATTN_NUM_THREADS"


def unavailable() -> str | None:
    return None


@dataclass
class _Normalised:
    """Normalised, scaled inputs, zero at padded positions and past S (B, H, N*C, D)."""

    qh: Any  # q_i / max(|q_i|, eps); None when the call has no q
    kh: Any  # k_j / max(|k_j|, eps)
    vt: Any  # w_j * v_j
    q_inv: Any  # 1 / max(|q_i|, eps), (B, H, S); None without q
    k_inv: Any
    c: Any  # token counts (B, S), int64
    w: Any  # the stabiliser w_j, (B, H, S), or None without m


def _readable(x: Any, acc: np.dtype) -> Any:
    """``x`` as the CPU kernels read it: float32/float64 as it is (any strides), 16-bit cast."""
    return x if x.dtype == acc else x.astype(acc)


def _no_mask(mask: Any) -> Any:
    """``mask`` (B, S) as the CPU kernels take it: (0, 0) when every token is real."""
    return _ALL_REAL if mask is None else mask


def _into(out: Any, buf: Any, kernel: Any, *args: Any) -> None:
    """Run an epilogue ``kernel(*args, target)`` writing ``out`` (B, H, S, D): straight into it
    when it has the accumulation dtype, else into the first S rows of the padded buffer
    ``buf`` (in place), then cast into ``out``."""
    if out.dtype == buf.dtype:
        kernel(*args, out)
    else:
        rows = buf[:, :, : out.shape[2]]
        kernel(*args, rows)
        out[...] = rows


def _real_tokens(p: Problem, mask: Any) -> Any:
    """The real tokens of each batch row, (B,) int64."""
    if mask is None:
        return np.full(p.B, p.S, dtype=np.int64)
    return mask.sum(axis=1, dtype=np.int64)


def _counts(p: Problem, mask: Any, count0: Any) -> Any:
    """c_j (B, S): causal, running from ``count0``; bidirectional, ``count0`` (the whole
    sequence's count, ``total=``) or the row's own real tokens."""
    if not p.causal:
        total = _real_tokens(p, mask) if count0 is None else count0
        return np.broadcast_to(total[:, None], (p.B, p.S))
    if mask is None:
        steps = np.arange(1, p.S + 1, dtype=np.int64)
        base = np.zeros(p.B, dtype=np.int64) if count0 is None else count0
        return base[:, None] + steps[None, :]
    c = np.cumsum(mask, axis=1, dtype=np.int64)
    return c if count0 is None else c + count0[:, None]


def _sigmoid(m: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-m))


def _weights(m: Any, c: Any) -> Any:
    """``max(1, c) ** -sigmoid(m)`` as (B, H, S) for counts ``c`` (B, S), in the dtype of ``m``."""
    return np.maximum(1, c).astype(m.dtype)[:, None, :] ** (-_sigmoid(m))[None, :, None]


def _normalised_inputs(call: ForwardCall | BackwardCall) -> _Normalised:
    p, mask = call.p, _no_mask(call.mask)
    n = ceil_div(p.S, CHUNK) * CHUNK
    kh = np.empty((p.B, p.H, n, p.Dk), p.acc)
    k_inv = np.empty((p.B, p.H, p.S), p.acc)
    _cpu_kernels.unit_rows(_readable(call.k, p.acc), mask, p.eps, kh, k_inv)
    qh = q_inv = None
    if call.q is not None:
        qh = np.empty((p.B, p.H, n, p.Dk), p.acc)
        q_inv = np.empty((p.B, p.H, p.S), p.acc)
        _cpu_kernels.unit_rows(_readable(call.q, p.acc), mask, p.eps, qh, q_inv)
    c = _counts(p, call.mask, call.count0)
    w = None if call.m is None else _weights(call.m, c)
    vt = _scaled(call.v, n, p.acc, mask, w)
    return _Normalised(qh, kh, vt, q_inv, k_inv, c, w)


def _scaled(x: Any, n: int, acc: np.dtype, mask: Any, w: Any = None) -> Any:
    """``w x`` (B, H, S, D) in a padded buffer (B, H, n, D), zero past S and where padded."""
    B, H, _, D = x.shape
    out = np.empty((B, H, n, D), acc)
    _cpu_kernels.scaled_rows(_readable(x, acc), mask, np.empty((0, 0, 0), acc) if w is None
                             else w, out)
    return out


def _chunks(x: Any) -> Any:
    """(B, H, N*C, D) -> (B, H, N, C, D), a view."""
    B, H, n, D = x.shape
    return x.reshape(B, H, n // CHUNK, CHUNK, D)


def _lower_scores(a: Any, b: Any) -> Any:
    """Per chunk, ``tril(a b^T)``: entry (i, j) is ``a_i . b_j`` for ``j <= i``, else 0."""
    scores = _chunks(a) @ _chunks(b).swapaxes(-1, -2)  # (B, H, N, C, C)
    scores *= np.tri(CHUNK, dtype=scores.dtype)
    return scores


def _chunk_sums(a: Any, b: Any, *, reverse: bool) -> Any:
    """Running sums over chunks of ``a^T b``, (B, H, N, Da, Db): entry n holds chunks <= n
    (chunks >= n with ``reverse``). A loop over chunks, since ``np.cumsum`` along a middle axis
    is several times slower."""
    sums = _chunks(a).swapaxes(-1, -2) @ _chunks(b)
    N = sums.shape[2]
    if reverse:
        for n in range(N - 2, -1, -1):
            sums[:, :, n] += sums[:, :, n + 1]
    else:
        for n in range(1, N):
            sums[:, :, n] += sums[:, :, n - 1]
    return sums


def _add_other_chunks(out: Any, x: Any, sums: Any, *, reverse: bool) -> None:
    """``out[n] += x[n] @ sums[n - 1]`` (``sums[n + 1]`` with ``reverse``): each chunk meets the
    chunks strictly before (after) it through their running sum."""
    out, x = _chunks(out), _chunks(x)
    if reverse:
        out[:, :, :-1] += x[:, :, :-1] @ sums[:, :, 1:]
    else:
        out[:, :, 1:] += x[:, :, 1:] @ sums[:, :, :-1]


def _unchunk(x: Any) -> Any:
    """(B, H, N, C, D) -> (B, H, N*C, D), a view."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)


def _state_part(call: ForwardCall) -> tuple[Any, Any]:
    """The ``(kv, count)`` of :class:`ForwardCall` alone (``o`` None): one product over S."""
    p, kv0 = call.p, call.kv0
    count = _real_tokens(p, call.mask)
    if p.causal and call.count0 is not None:
        count = count + call.count0
    kv = np.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
    if p.S:
        x = _normalised_inputs(call)
        kv += x.vt.swapaxes(-1, -2) @ x.kh
    return kv, count


def _forward_part(call: ForwardCall) -> tuple[Any, Any] | None:
    if call.o is None:
        return _state_part(call)
    p, mask, kv0 = call.p, call.mask, call.kv0
    state = None
    if call.want_state:
        count = np.zeros(p.B, dtype=np.int64) if call.count0 is None else call.count0
        count = count + _real_tokens(p, mask)
        kv = np.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
        state = kv, count
    if p.S == 0:
        return state
    x = _normalised_inputs(call)
    if not p.causal:
        # the call's own sum, or the whole sequence's (total=)
        kv = x.vt.swapaxes(-1, -2) @ x.kh if kv0 is None else kv0.astype(p.acc, copy=False)
        out = x.qh @ kv.swapaxes(-1, -2)
        _into(call.o, out, _cpu_kernels.rows_out, out, _no_mask(mask))
        return None
    out = _unchunk(_lower_scores(x.qh, x.kh) @ _chunks(x.vt))
    sums = _chunk_sums(x.kh, x.vt, reverse=False)  # sum of k^ v~^T, (B, H, N, Dk, Dv)
    _add_other_chunks(out, x.qh, sums, reverse=False)
    if kv0 is not None:
        out += x.qh @ kv0.astype(p.acc, copy=False).swapaxes(-1, -2)
    _into(call.o, out, _cpu_kernels.rows_out, out, _no_mask(mask))
    if state is None:
        return None
    kv, count = state
    kv += sums[:, :, -1].swapaxes(-1, -2)
    return kv, count


def num_threads() -> int | None:
    """``$COSATTN_NUM_THREADS`` as a positive int; None when it is unset or empty."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(
            f"the environment variable {THREADS_ENV_VAR} must be a positive integer, got {value!r}"
        )
    return threads


@functools.cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (found once; threadpoolctl)."""
    return ThreadpoolController()


def _blas_threads(threads: int | None) -> contextlib.AbstractContextManager[Any]:
    """Limit the BLAS libraries to ``threads`` for the duration of a call (None: leave them)."""
    if threads is None:
        return contextlib.nullcontext()
    return _blas().limit(limits=threads, user_api="blas")


_pool: tuple[int, ThreadPoolExecutor] | None = None  # its size and itself
_pool_lock = threading.Lock()


def _parts(p: Problem, workers: int) -> list[tuple[slice, slice]]:
    """Cut a call into blocks ``(rows, heads)``: heads of one batch row (or whole batch rows,
    when a row is small), about ``PART_ELEMENTS`` input elements each and at least one per
    worker thread.

    NumPy's matmul releases the GIL, so each part runs its small BLAS products on its own core,
    on temporaries a fraction of the size of the whole call's. Parts are independent.
    """
    per_head = p.S * (p.Dk + p.Dv)
    if workers <= 1 or p.B * p.H * per_head < PARALLEL_MIN_ELEMENTS:
        return [(slice(None), slice(None))]
    heads = min(p.H, max(1, PART_ELEMENTS // max(per_head, 1)))
    rows = 1 if heads < p.H else min(p.B, max(1, PART_ELEMENTS // (p.H * per_head)))
    while ceil_div(p.B, rows) * ceil_div(p.H, heads) < workers and (rows > 1 or heads > 1):
        if rows > 1:
            rows = ceil_div(rows, 2)
        else:
            heads = ceil_div(heads, 2)
    return [(slice(b, min(b + rows, p.B)), slice(h, min(h + heads, p.H)))
            for b in range(0, p.B, rows) for h in range(0, p.H, heads)]


def _workers_pool(workers: int) -> ThreadPoolExecutor:
    """The pool of ``workers`` threads (replaced when the thread setting changes)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = workers, ThreadPoolExecutor(workers, thread_name_prefix="cosattn")
        return _pool[1]


def _run(call: Call, part: Any) -> list[tuple[tuple[slice, slice], Any]]:
    """``part(block)`` for every block of :func:`_parts`, in parallel when there are several;
    returns each block's ``(rows, heads)`` with its result, in a fixed order.

    With ``COSATTN_NUM_THREADS=n`` a call uses at most n threads: n parts at a time, each with
    one BLAS thread, or, when it is not cut, the calling thread with at most n BLAS threads.
    Unset, there is one worker per core and the BLAS library keeps its own setting.
    """
    threads = num_threads()
    blocks = _parts(call.p, threads or os.cpu_count() or 1)
    if len(blocks) == 1:
        with _blas_threads(threads):
            return [(blocks[0], part(call))]
    pool = _workers_pool(threads or os.cpu_count() or 1)
    with _blas_threads(None if threads is None else 1):
        futures = [pool.submit(part, call.block(*b)) for b in blocks]
        return [(b, f.result()) for b, f in zip(blocks, futures, strict=True)]


def forward(call: ForwardCall) -> tuple[Any, Any] | None:
    results = _run(call, _forward_part)
    if len(results) == 1 or not call.want_state:
        return results[0][1]
    p = call.p
    kv = np.empty((p.B, p.H, p.Dv, p.Dk), dtype=p.state_dtype)
    count = np.empty(p.B, dtype=np.int64)
    for (rows, heads), (kv_part, count_part) in results:
        kv[rows, heads] = kv_part
        count[rows] = count_part
    return kv, count


def backward(call: BackwardCall) -> tuple[Any, Any]:
    results = _run(call, _backward_part)
    if len(results) == 1:
        return results[0][1]
    p = call.p
    dm = None if call.m is None else np.zeros(p.H, dtype=p.acc)
    dkv0 = None if call.kv0 is None or not p.causal else np.empty_like(call.kv0)
    for (rows, heads), (dm_part, dkv0_part) in results:  # in order: fixed sums
        if dm is not None:
            dm[heads] += dm_part
        if dkv0 is not None:
            dkv0[rows, heads] = dkv0_part
    return dm, dkv0


def _backward_part(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, dkv = call.p, call.kv0, call.dkv
    S = p.S
    if S == 0:
        dm = None if call.m is None else np.zeros(p.H, dtype=p.acc)
        if kv0 is None or not p.causal:
            return dm, None
        return dm, np.zeros_like(kv0) if dkv is None else dkv.astype(kv0.dtype)
    x = _normalised_inputs(call)
    mask = _no_mask(call.mask)
    dof = _scaled(call.do, x.qh.shape[2], p.acc, mask)
    if p.causal:
        # Three causal products of the forward's shape share two score matrices and one sum:
        # dq^ meets earlier tokens through (do . v~), dk^ later ones through the same scores
        # transposed, and dv~ later ones through (q^' . k^), the forward's scores transposed.
        dov = _lower_scores(dof, x.vt)  # (i, j): do_i . v~_j
        dqh = _unchunk(dov @ _chunks(x.kh))
        _add_other_chunks(dqh, dof, _chunk_sums(x.vt, x.kh, reverse=False), reverse=False)
        dkh = _unchunk(dov.swapaxes(-1, -2) @ _chunks(x.qh))
        del dov
        later = _chunk_sums(dof, x.qh, reverse=True)  # sum over later tokens of do q^'^T
        _add_other_chunks(dkh, x.vt, later, reverse=True)
        dvt = _unchunk(_lower_scores(x.qh, x.kh).swapaxes(-1, -2) @ _chunks(dof))
        _add_other_chunks(dvt, x.kh, later.swapaxes(-1, -2), reverse=True)
        dkv0 = later[:, :, 0]
        if kv0 is not None:
            dqh += dof @ kv0.astype(p.acc, copy=False)
        if dkv is not None:
            dkv_acc = dkv.astype(p.acc, copy=False)
            dkh += x.vt @ dkv_acc
            dvt += x.kh @ dkv_acc.swapaxes(-1, -2)
            dkv0 = dkv0 + dkv_acc
    else:  # the call's own sums, or the whole sequence's and their gradient (total=)
        if kv0 is None:
            kv = x.vt.swapaxes(-1, -2) @ x.kh  # (B, H, Dv, Dk)
            g = dof.swapaxes(-1, -2) @ x.qh  # sum_i do_i q'_i^T, (B, H, Dv, Dk)
        else:
            kv, g = kv0.astype(p.acc, copy=False), dkv.astype(p.acc, copy=False)
        dqh = dof @ kv
        dkh = x.vt @ g
        dvt = x.kh @ g.swapaxes(-1, -2)
    # Padded rows of q^, k^, v~ and do are zero, so dq^, dk^ and dv~ are zero there too.
    _into(call.dq, dqh, _cpu_kernels.unit_rows_backward, dqh, x.qh, x.q_inv, mask, p.eps)
    _into(call.dk, dkh, _cpu_kernels.unit_rows_backward, dkh, x.kh, x.k_inv, mask, p.eps)
    dm = None
    if call.m is None:
        w, log_c = np.empty((0, 0, 0), p.acc), np.empty((0, 0), p.acc)
    else:
        w, log_c = x.w, np.log(np.maximum(1, x.c)).astype(p.acc)
    terms = np.empty((p.B, p.H), p.acc)
    _into(call.dv, dvt, _cpu_kernels.values_backward, dvt, x.vt, w, log_c, mask, terms)
    if call.m is not None:
        sig = _sigmoid(call.m)
        dm = -terms.sum(axis=0) * sig * (1.0 - sig)
    if kv0 is None or not p.causal:
        return dm, None
    return dm, dkv0.astype(kv0.dtype)


def step(call: StepCall) -> None:
    """One fused pass over the state (:func:`._cpu_kernels.step`); a padded row's state is not
    written at all, so it keeps its bits (docs/spec.md, "Bad input")."""
    kv, acc = call.kv, call.kv.dtype
    q, k, v = (np.ascontiguousarray(x, dtype=acc) for x in (call.q, call.k, call.v))
    sig = _NONE if call.m is None else _sigmoid(call.m.astype(acc))
    mask = _ALL_REAL_ROWS if call.mask is None else np.ascontiguousarray(call.mask)
    direct = call.o.dtype == acc and call.o.flags.c_contiguous
    o = call.o if direct else np.empty(call.o.shape, acc)
    _cpu_kernels.step(kv, call.count, q, k, v, sig, mask, o, call.p.eps)
    if not direct:
        call.o[...] = o


_NONE = np.empty(0, np.float32)  # no stabiliser
_ALL_REAL = np.empty((0, 0), np.bool_)  # no mask, as the CPU kernels take it
_ALL_REAL_ROWS = np.empty(0, np.bool_)  # no step mask
