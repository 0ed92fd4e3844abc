"""The NumPy float64 oracle: literal transcriptions of docs/spec.md, slow on purpose.

Every function takes and returns float64 NumPy arrays in the canonical ``(B, H, S, D)`` layout.
The quadratic form builds the S x S matrix; the recurrent form walks the tokens one at a time.
Nothing here is fast or clever: it is what the fast backends are checked against.

Padding holds anything (docs/spec.md, "Bad input"): every ``real ·`` of docs/spec.md is a
selection (``np.where``), never a product with 0, and padded rows of the inputs are replaced by
zeros before norms and sums are taken, so NaN or Inf there reaches no result and padded outputs
are +0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["backward", "counts", "forward", "forward_rnn", "normalize", "weights"]

EPS = 1e-12


def normalize(x, eps=EPS):
    """Rows divided by ``max(||x||_2, eps)``; returns ``(x_hat, norm)``."""
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, eps), norm


def counts(mask, count0, causal):
    """Token counts ``c_j`` (B, S): causal running count from ``count0``, else each row's length."""
    real = mask.astype(np.float64)
    if causal:
        return count0[:, None].astype(np.float64) + np.cumsum(real, axis=1)
    return np.broadcast_to(real.sum(axis=1, keepdims=True), real.shape).copy()


def weights(m, c, H):
    """Stabiliser ``w`` (B, H, S): ``max(1, c) ** -sigmoid(m_h)``, ones when ``m`` is None."""
    if m is None:
        return np.ones((c.shape[0], H, c.shape[1]))
    sig = 1.0 / (1.0 + np.exp(-np.asarray(m, dtype=np.float64)))
    return np.maximum(1.0, c)[:, None, :] ** (-sig[None, :, None])


def _select(real, x):
    """``real · x`` as docs/spec.md means it: ``x`` where real, +0 where padded."""
    return np.where(real, x, 0.0)


def _prepare(q, k, v, m, mask, count0, causal, eps):
    B, H, S, _ = q.shape
    mask = np.ones((B, S), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    count0 = np.zeros(B, dtype=np.int64) if count0 is None else np.asarray(count0)
    real = mask[:, None, :, None]  # (B, 1, S, 1)
    qh, qn = normalize(_select(real, q), eps)
    kh, kn = normalize(_select(real, k), eps)
    c = counts(mask, count0, causal)
    w = weights(m, c, H)[..., None]  # (B, H, S, 1)
    vt = _select(real, w * v)
    return real, qh, qn, kh, kn, c, w, vt


def forward(q, k, v, m=None, *, causal=True, mask=None, kv0=None, count0=None, eps=EPS):
    """Quadratic forward: ``(o, kv, count)``, where ``kv``, ``count`` are None if bidirectional."""
    B, H, S, Dk = q.shape
    Dv = v.shape[-1]
    real, qh, _, kh, _, _, _, vt = _prepare(q, k, v, m, mask, count0, causal, eps)
    scores = qh @ np.swapaxes(kh, -1, -2)  # (B, H, S, S): q_i . k_j
    if not causal:
        return _select(real, scores @ vt), None, None
    scores = scores * np.tril(np.ones((S, S)))
    kv0 = np.zeros((B, H, Dv, Dk)) if kv0 is None else kv0
    o = _select(real, scores @ vt + qh @ np.swapaxes(kv0, -1, -2))
    kv = kv0 + np.swapaxes(vt, -1, -2) @ _select(real, kh)
    count0 = np.zeros(B, dtype=np.int64) if count0 is None else count0
    mask = np.ones((B, S), dtype=bool) if mask is None else mask
    return o, kv, count0 + mask.sum(axis=1)


def forward_rnn(q, k, v, m=None, *, mask=None, kv0=None, count0=None, eps=EPS):
    """The recurrent form of docs/spec.md, token by token. Returns ``(o, kv, count)``.

    A masked step skips the write: it leaves ``kv`` and ``count`` bit for bit as they were.
    """
    B, H, S, Dk = q.shape
    Dv = v.shape[-1]
    mask = np.ones((B, S), dtype=bool) if mask is None else mask
    q, k, v = (_select(mask[:, None, :, None], x) for x in (q, k, v))
    kv = np.zeros((B, H, Dv, Dk)) if kv0 is None else kv0.copy()
    count = np.zeros(B, dtype=np.int64) if count0 is None else count0.copy()
    o = np.zeros((B, H, S, Dv))
    for t in range(S):
        real = mask[:, t]
        count = count + real
        w = weights(m, count[:, None], H)[:, :, 0]  # (B, H)
        qh, _ = normalize(q[:, :, t], eps)
        kh, _ = normalize(k[:, :, t], eps)
        r = real[:, None, None, None]
        kv = np.where(r, kv + w[..., None, None] * v[:, :, t, :, None] * kh[:, :, None, :], kv)
        o[:, :, t] = _select(real[:, None, None], np.einsum("bhvk,bhk->bhv", kv, qh))
    return o, kv, count


def _normalize_backward(xh, norm, dxh, eps):
    inner = np.sum(xh * dxh, axis=-1, keepdims=True)
    big = norm > eps
    return np.where(big, (dxh - xh * inner) / np.where(big, norm, 1.0), dxh / eps)


def backward(do, q, k, v, m=None, *, causal=True, mask=None, kv0=None, count0=None,
             dkv=None, eps=EPS):
    """Gradients of docs/spec.md, quadratic form. Returns ``(dq, dk, dv, dm, dkv0)``.

    ``dm`` is None when ``m`` is None; ``dkv0`` is None unless causal with ``kv0`` given.
    """
    B, H, S, Dk = q.shape
    Dv = v.shape[-1]
    real, qh, qn, kh, kn, c, w, vt = _prepare(q, k, v, m, mask, count0, causal, eps)
    do = _select(real, do)
    qp = _select(real, qh)  # q-hat' = real_i q-hat_i
    has_state = kv0 is not None
    kv0 = np.zeros((B, H, Dv, Dk)) if kv0 is None else kv0
    dkv_in = np.zeros((B, H, Dv, Dk)) if dkv is None else dkv
    tri = np.tril(np.ones((S, S))) if causal else np.ones((S, S))  # tri[i, j] = [j <= i]
    dov = (do @ np.swapaxes(vt, -1, -2)) * tri  # (B, H, S_i, S_j): do_i . v~_j
    qk = (qp @ np.swapaxes(kh, -1, -2)) * tri  # q-hat'_i . k-hat_j
    dqh = dov @ kh
    dkh = np.swapaxes(dov, -1, -2) @ qp
    dvt = np.swapaxes(qk, -1, -2) @ do
    if causal:
        dqh = dqh + do @ kv0
        dkh = dkh + vt @ dkv_in
        dvt = dvt + kh @ np.swapaxes(dkv_in, -1, -2)
    dqh = _select(real, dqh)
    dkh = _select(real, dkh)
    dv = _select(real, w * dvt)
    dm = None
    if m is not None:
        sig = 1.0 / (1.0 + np.exp(-np.asarray(m, dtype=np.float64)))
        per = np.sum(dvt * vt, axis=-1) * -np.log(np.maximum(1.0, c))[:, None, :]  # (B, H, S)
        dm = per.sum(axis=(0, 2)) * sig * (1.0 - sig)
    dq = _normalize_backward(qh, qn, dqh, eps)
    dk = _normalize_backward(kh, kn, dkh, eps)
    dkv0 = None
    if causal and has_state:
        dkv0 = np.swapaxes(do, -1, -2) @ qp + dkv_in
    return dq, dk, dv, dm, dkv0
