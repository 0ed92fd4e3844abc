"""The CPU backend: the chunked algorithm of DESIGN.md on batched BLAS matmuls.

Sequences are cut into chunks of ``CHUNK`` tokens. Within a chunk the causal interaction is a
small masked C x C product; across chunks it goes through per-chunk states (Dv x Dk) whose
prefix sums are taken over the chunk axis. Nothing of size S x S or S x D x D is ever built.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import Problem

DEVICE = "cpu"
CHUNK = 64


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
    w: Any  # stabiliser (B, H, S) or None


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
    w = None if m is None else _weights(m, c)
    scale = w if real is None else (real[:, None, :] if w is None else w * real[:, None, :])
    if scale is not None:
        vt[:, :, : p.S] *= scale[..., None]
    return _Prepared(qh, kh, vt, q_inv, k_inv, real, c, w)


def _chunks(x: Any) -> Any:
    B, H, n, D = x.shape
    return x.reshape(B, H, n // CHUNK, CHUNK, D)


def _causal(qx: Any, kx: Any, vx: Any, state0: Any, *, reverse: bool) -> tuple[Any, Any]:
    """``out_i = state0 @ qx_i + sum_{j <= i} (qx_i . kx_j) vx_j`` over padded (B, H, n, D) arrays.

    With ``reverse`` the sum runs over ``j >= i``. ``state0`` is (B, H, Dv, Dq) or None.
    Returns ``out`` (B, H, n, Dv) and the state increment ``sum_j vx_j kx_j^T`` (B, H, Dv, Dq).
    """
    q, k, v = _chunks(qx), _chunks(kx), _chunks(vx)
    scores = q @ k.swapaxes(-1, -2)  # (B, H, N, C, C)
    keep = np.tri(CHUNK, dtype=scores.dtype)
    scores *= keep.T if reverse else keep
    out = scores @ v
    del scores
    local = v.swapaxes(-1, -2) @ k  # (B, H, N, Dv, Dq): each chunk's own sum
    if reverse:
        prefix = np.cumsum(local[:, :, ::-1], axis=2)[:, :, ::-1]
        out[:, :, :-1] += q[:, :, :-1] @ prefix[:, :, 1:].swapaxes(-1, -2)
        total = prefix[:, :, 0]
    else:
        prefix = np.cumsum(local, axis=2, out=local)
        out[:, :, 1:] += q[:, :, 1:] @ prefix[:, :, :-1].swapaxes(-1, -2)
        total = prefix[:, :, -1]
    out = out.reshape(*qx.shape[:3], vx.shape[-1])
    if state0 is not None:
        out += qx @ state0.astype(qx.dtype, copy=False).swapaxes(-1, -2)
    return out, total


def _flat(x: Any) -> Any:
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def forward(p: Problem, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any, count0: Any,
            o: Any, *, want_state: bool) -> tuple[Any, Any]:
    count = np.zeros(p.B, dtype=np.int64) if count0 is None else count0
    count = count + (p.S if mask is None else mask.sum(axis=1, dtype=np.int64))
    if p.S == 0:
        if not want_state:
            return None, None
        kv = np.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
        return kv, count
    x = _prepare(p, q, k, v, m, mask, count0)
    if p.causal:
        out, delta = _causal(x.qh, x.kh, x.vt, kv0, reverse=False)
        o[...] = out[:, :, : p.S]
        if not want_state:
            return None, None
        kv = delta if kv0 is None else kv0 + delta
        return kv.astype(p.state_dtype), count
    kv = x.vt.swapaxes(-1, -2) @ x.kh  # (B, H, Dv, Dk)
    o[...] = (x.qh[:, :, : p.S] @ kv.swapaxes(-1, -2))
    return None, None


def _normalise_backward(dxh: Any, xh: Any, inv: Any, eps: float) -> Any:
    """``(dxh - xh (xh . dxh)) / |x|`` where ``|x| > eps``, else ``dxh / eps`` (in place)."""
    inner = np.einsum("bhsd,bhsd->bhs", xh, dxh)
    inner *= inv < 1.0 / eps
    dxh -= xh * inner[..., None]
    dxh *= inv[..., None]
    return dxh


def backward(p: Problem, do: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, kv0: Any,
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
    dkv_acc = None if dkv is None else dkv.astype(p.acc)
    if p.causal:
        kv0_t = None if kv0 is None else kv0.swapaxes(-1, -2)
        dqh, _ = _causal(dof, x.vt, x.kh, kv0_t, reverse=False)
        dkh, _ = _causal(x.vt, dof, x.qh, None if dkv is None else dkv_acc.swapaxes(-1, -2),
                         reverse=True)
        dvt, dkv0 = _causal(x.kh, x.qh, dof, dkv_acc, reverse=True)
        if dkv_acc is not None:
            dkv0 += dkv_acc
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
    scale = x.w if x.real is None else (
        x.real[:, None, :] if x.w is None else x.w * x.real[:, None, :])
    if scale is not None:
        dvt *= scale[..., None]
    dv[...] = dvt
    if kv0 is None:
        return dm, None
    if dkv0 is None:
        dkv0 = np.zeros((p.B, p.H, p.Dv, p.Dk), dtype=p.acc)
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
