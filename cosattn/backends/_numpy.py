"""The CPU backend: the chunked algorithm of DESIGN.md on batched BLAS matmuls.

Sequences are cut into chunks of ``CHUNK`` tokens. Within a chunk the causal interaction is a
small masked C x C product; across chunks it goes through per-chunk states (Dv x Dk) whose
prefix sums are taken over the chunk axis. Nothing of size S x S or S x D x D is ever built.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._validate import Problem

DEVICE = "cpu"
CHUNK = 64
# Below this many input elements (B*H*S*(Dk+Dv)) a call runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
# Above it, a call is cut into parts of about this many input elements (whole heads), so that
# a part's temporaries stay small enough for the caches; parts run on a pool of threads.
PART_ELEMENTS = 1 << 20


def unavailable() -> str | None:
    return None


@dataclass
class _Prepared:
    """Normalised, masked, scaled inputs, zero-padded to whole chunks (B, H, N*C, D)."""

    qh: Any  # real_i * q_i / max(|q_i|, eps)
    kh: Any  # real_j * k_j / max(|k_j|, eps)
    vt: Any  # real_j * w_j * v_j
    q_inv: Any  # 1 / max(|q_i|, eps), (B, H, S)
    k_inv: Any
    real: Any  # (B, S) in acc, or None when nothing is masked
    c: Any  # token counts (B, S), int64
    v_scale: Any  # real_j * w_j, (B, H, S) (B, 1, S without m), or None


def _padded(x: Any, n: int, acc: np.dtype) -> Any:
    """``x`` (B, H, S, D) cast into a fresh C-contiguous (B, H, n, D) buffer, zero past S."""
    B, H, S, D = x.shape
    buf = np.empty((B, H, n, D), dtype=acc)
    buf[:, :, :S] = x
    buf[:, :, S:] = 0
    return buf


def _normalise(buf: Any, S: int, real: Any, eps: float) -> Any:
    """Scale rows of ``buf`` in place to unit norm (times ``real``); return ``1/max(|x|, eps)``."""
    rows = buf[:, :, :S]
    norm = np.maximum(np.sqrt(np.einsum("bhsd,bhsd->bhs", rows, rows)), eps)
    rows /= norm[..., None]  # a division, as in SPEC.md: for D = 1 it gives exactly +-1
    if real is not None:
        rows *= real[:, None, :, None]
    return 1.0 / norm


def _counts(p: Problem, mask: Any, count0: Any) -> Any:
    if mask is None:
        if p.causal:
            steps = np.arange(1, p.S + 1, dtype=np.int64)
            base = np.zeros(p.B, dtype=np.int64) if count0 is None else count0
            return base[:, None] + steps[None, :]
        return np.full((p.B, p.S), p.S, dtype=np.int64)
    if p.causal:
        c = np.cumsum(mask, axis=1, dtype=np.int64)
        return c if count0 is None else c + count0[:, None]
    return np.broadcast_to(mask.sum(axis=1, dtype=np.int64)[:, None], (p.B, p.S))


def _weights(m: Any, c: Any) -> Any:
    """``max(1, c) ** -sigmoid(m)`` as (B, H, S), in the dtype of ``m``."""
    sig = 1.0 / (1.0 + np.exp(-m))
    return np.maximum(1, c).astype(m.dtype)[:, None, :] ** (-sig)[None, :, None]


def _prepare(p: Problem, q: Any, k: Any, v: Any, m: Any, mask: Any, count0: Any) -> _Prepared:
    n = -(-p.S // CHUNK) * CHUNK
    real = None if mask is None else mask.astype(p.acc)
    qh, kh, vt = _padded(q, n, p.acc), _padded(k, n, p.acc), _padded(v, n, p.acc)
    q_inv = _normalise(qh, p.S, real, p.eps)
    k_inv = _normalise(kh, p.S, real, p.eps)
    c = _counts(p, mask, count0)
    v_scale = None if m is None else _weights(m, c)
    if real is not None:
        v_scale = real[:, None, :] if v_scale is None else v_scale * real[:, None, :]
    if v_scale is not None:
        vt[:, :, : p.S] *= v_scale[..., None]
    return _Prepared(qh, kh, vt, q_inv, k_inv, real, c, v_scale)


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


def _forward_part(p: Problem, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any, count0: Any,
                  o: Any, want_state: bool) -> tuple[Any, Any]:
    count = np.zeros(p.B, dtype=np.int64) if count0 is None else count0
    count = count + (p.S if mask is None else mask.sum(axis=1, dtype=np.int64))
    if p.S == 0:
        if not want_state:
            return None, None
        kv = np.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
        return kv, count
    x = _prepare(p, q, k, v, m, mask, count0)
    if not p.causal:
        kv = x.vt.swapaxes(-1, -2) @ x.kh  # (B, H, Dv, Dk)
        o[...] = x.qh[:, :, : p.S] @ kv.swapaxes(-1, -2)
        return None, None
    out = _unchunk(_lower_scores(x.qh, x.kh) @ _chunks(x.vt))
    sums = _chunk_sums(x.kh, x.vt, reverse=False)  # sum of k^ v~^T, (B, H, N, Dk, Dv)
    _add_other_chunks(out, x.qh, sums, reverse=False)
    if kv0 is not None:
        out += x.qh @ kv0.astype(p.acc, copy=False).swapaxes(-1, -2)
    o[...] = out[:, :, : p.S]
    if not want_state:
        return None, None
    delta = sums[:, :, -1].swapaxes(-1, -2)
    kv = delta if kv0 is None else kv0 + delta
    return kv.astype(p.state_dtype), count


@dataclass(frozen=True)
class _Part:
    """A block of batch rows ``b`` and heads ``h``: parts of one call are independent."""

    b: slice
    h: slice

    def problem(self, p: Problem) -> Problem:
        return replace(p, B=len(range(p.B)[self.b]), H=len(range(p.H)[self.h]))

    def rows(self, x: Any) -> Any:  # arrays indexed (B, ...)
        return None if x is None else x[self.b]

    def heads(self, x: Any) -> Any:  # arrays indexed (H,)
        return None if x is None else x[self.h]

    def block(self, x: Any) -> Any:  # arrays indexed (B, H, ...)
        return None if x is None else x[self.b, self.h]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _parts(p: Problem) -> list[_Part]:
    """Cut a call into blocks of heads of one batch row (or of whole batch rows, when a row is
    small), about ``PART_ELEMENTS`` input elements each and at least one per core.

    NumPy's matmul releases the GIL, so each part runs its small BLAS products on its own core,
    on temporaries a fraction of the size of the whole call's.
    """
    workers = os.cpu_count() or 1
    per_head = p.S * (p.Dk + p.Dv)
    if workers <= 1 or p.B * p.H * per_head < PARALLEL_MIN_ELEMENTS:
        return [_Part(slice(None), slice(None))]
    heads = min(p.H, max(1, PART_ELEMENTS // max(per_head, 1)))
    rows = 1 if heads < p.H else min(p.B, max(1, PART_ELEMENTS // (p.H * per_head)))
    while -(-p.B // rows) * -(-p.H // heads) < workers and (rows > 1 or heads > 1):
        if rows > 1:
            rows = -(-rows // 2)
        else:
            heads = -(-heads // 2)
    return [_Part(slice(b, min(b + rows, p.B)), slice(h, min(h + heads, p.H)))
            for b in range(0, p.B, rows) for h in range(0, p.H, heads)]


def _run(tasks: list[Any]) -> list[Any]:
    """Run zero-argument callables, in parallel when there are several."""
    global _pool
    if len(tasks) == 1:
        return [tasks[0]()]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="cosattn")
    return [f.result() for f in [_pool.submit(t) for t in tasks]]


def forward(p: Problem, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any, count0: Any,
            o: Any, *, want_state: bool) -> tuple[Any, Any]:
    parts = _parts(p)
    results = _run([
        lambda t=t: _forward_part(t.problem(p), t.block(q), t.block(k), t.block(v), t.heads(m),
                                  t.rows(mask), t.block(kv0), t.rows(count0), t.block(o),
                                  want_state)
        for t in parts
    ])
    if len(results) == 1 or not want_state:
        return results[0]
    kv = np.empty((p.B, p.H, p.Dv, p.Dk), dtype=results[0][0].dtype)
    count = np.empty(p.B, dtype=np.int64)
    for t, (kv_part, count_part) in zip(parts, results, strict=True):
        kv[t.b, t.h] = kv_part
        count[t.b] = count_part
    return kv, count


def backward(p: Problem, do: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any,
             count0: Any, dkv: Any, dq: Any, dk: Any, dv: Any) -> tuple[Any, Any]:
    parts = _parts(p)
    results = _run([
        lambda t=t: _backward_part(t.problem(p), t.block(do), t.block(q), t.block(k),
                                   t.block(v), t.heads(m), t.rows(mask), t.block(kv0),
                                   t.rows(count0), t.block(dkv), t.block(dq), t.block(dk),
                                   t.block(dv))
        for t in parts
    ])
    if len(results) == 1:
        return results[0]
    dm = None if m is None else np.zeros(p.H, dtype=results[0][0].dtype)
    dkv0 = None if kv0 is None else np.empty_like(kv0)
    for t, (dm_part, dkv0_part) in zip(parts, results, strict=True):  # in order: fixed sums
        if dm is not None:
            dm[t.h] += dm_part
        if dkv0 is not None:
            dkv0[t.b, t.h] = dkv0_part
    return dm, dkv0


def _normalise_backward(dxh: Any, xh: Any, inv: Any, eps: float) -> Any:
    """``(dxh - xh (xh . dxh)) / |x|`` where ``|x| > eps``, else ``dxh / eps`` (in place)."""
    inner = np.einsum("bhsd,bhsd->bhs", xh, dxh)
    inner *= inv < 1.0 / eps
    dxh -= xh * inner[..., None]
    dxh *= inv[..., None]
    return dxh


def _backward_part(p: Problem, do: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any,
                   count0: Any, dkv: Any, dq: Any, dk: Any, dv: Any) -> tuple[Any, Any]:
    S = p.S
    if S == 0:
        dm = None if m is None else np.zeros(p.H, dtype=m.dtype)
        if kv0 is None:
            return dm, None
        dkv0 = np.zeros_like(kv0) if dkv is None else dkv.astype(kv0.dtype)
        return dm, dkv0
    x = _prepare(p, q, k, v, m, mask, count0)
    n = x.qh.shape[2]
    dof = _padded(do, n, p.acc)
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
    else:
        kv = x.vt.swapaxes(-1, -2) @ x.kh  # (B, H, Dv, Dk)
        g = dof.swapaxes(-1, -2) @ x.qh  # sum_i do_i q'_i^T, (B, H, Dv, Dk)
        dqh = dof @ kv
        dkh = x.vt @ g
        dvt = x.kh @ g.swapaxes(-1, -2)
        dkv0 = None
    dqh, dkh, dvt = dqh[:, :, :S], dkh[:, :, :S], dvt[:, :, :S]
    if x.real is not None:
        dqh *= x.real[:, None, :, None]
    dq[...] = _normalise_backward(dqh, x.qh[:, :, :S], x.q_inv, p.eps)
    dk[...] = _normalise_backward(dkh, x.kh[:, :, :S], x.k_inv, p.eps)
    dm = None
    if m is not None:
        sig = 1.0 / (1.0 + np.exp(-m))
        per = np.einsum("bhsd,bhsd->bhs", dvt, x.vt[:, :, :S])
        per *= -np.log(np.maximum(1, x.c).astype(p.acc))[:, None, :]
        dm = per.sum(axis=(0, 2)) * sig * (1.0 - sig)
    if x.v_scale is not None:
        dvt *= x.v_scale[..., None]
    dv[...] = dvt
    if kv0 is None:
        return dm, None
    return dm, dkv0.astype(kv0.dtype)


def step(p: Problem, kv: Any, count: Any, q: Any, k: Any, v: Any, m: Any, mask: Any,
         o: Any) -> None:
    acc = kv.dtype
    if mask is None:
        count += 1
        real = None
    else:
        count += mask
        real = mask.astype(acc)
    qh = q.astype(acc)
    kh = k.astype(acc)
    qh /= np.maximum(np.linalg.norm(qh, axis=-1, keepdims=True), p.eps)
    kh /= np.maximum(np.linalg.norm(kh, axis=-1, keepdims=True), p.eps)
    scale = np.ones((p.B, p.H), dtype=acc) if m is None else (
        np.maximum(1, count).astype(acc)[:, None] ** (-1.0 / (1.0 + np.exp(-m.astype(acc)))))
    if real is not None:
        scale = scale * real[:, None]
    vs = v.astype(acc) * scale[..., None]
    kv += vs[..., :, None] * kh[..., None, :]
    out = (kv @ qh[..., None])[..., 0]
    if real is not None:
        out *= real[:, None, None]
    o[...] = out
