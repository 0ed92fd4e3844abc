"""The NumPy float64 oracle: literal transcriptions of docs/spec.md, slow on purpose.

Every function takes and returns float64 NumPy arrays in the canonical ``(B, H, S, D)`` layout.
The quadratic form builds the S x S matrix; the recurrent form walks the tokens one at a time.
Nothing here is fast or clever: it is what the fast backends are checked against.

Packed sequences and pools of states (docs/spec.md, "Packed variable-length sequences" and "A
pool of states") are defined here as the spec defines them: unpack into a right-padded batch
with a mask, call the operation, pack back; gather the named slots, call it, scatter back.

Padding holds anything (docs/spec.md, "Bad input"): every ``real ·`` of docs/spec.md is a
selection (``np.where``), never a product with 0, and padded rows of the inputs are replaced by
zeros before norms and sums are taken, so NaN or Inf there reaches no result and padded outputs
are +0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "backward",
    "backward_packed",
    "counts",
    "forward",
    "forward_packed",
    "forward_rnn",
    "normalize",
    "pack",
    "pool_prefill",
    "pool_step",
    "unpack",
    "weights",
]

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


def unpack(x, cu_seqlens, mask=None):
    """Packed ``x`` (1, H, T, D) as a right-padded batch (N, H, L, D), L the longest sequence,
    and its mask (N, L): True at the tokens of each sequence (and of ``mask`` (1, T), if
    given). Padding holds zeros."""
    cu = np.asarray(cu_seqlens)
    lengths = np.diff(cu)
    N, L = len(lengths), int(lengths.max(initial=0))
    out = np.zeros((N, x.shape[1], L, x.shape[3]), dtype=x.dtype)
    real = np.zeros((N, L), dtype=bool)
    for n in range(N):
        out[n, :, : lengths[n]] = x[0, :, cu[n]:cu[n + 1]]
        real[n, : lengths[n]] = True if mask is None else mask[0, cu[n]:cu[n + 1]]
    return out, real


def pack(x, cu_seqlens):
    """The inverse of :func:`unpack`: (N, H, L, D) back to (1, H, T, D)."""
    cu = np.asarray(cu_seqlens)
    parts = [x[n, :, : cu[n + 1] - cu[n]] for n in range(len(cu) - 1)]
    return np.concatenate(parts, axis=1)[None] if parts else x[:1, :, :0]


def forward_packed(q, k, v, m=None, *, cu_seqlens, causal=True, mask=None, kv0=None,
                   count0=None, eps=EPS):
    """:func:`forward` on N packed sequences: unpack, call, pack. Returns ``(o, kv, count)``
    (kv (N, H, Dv, Dk) and count (N,), or None when bidirectional)."""
    (qu, real), (ku, _), (vu, _) = (unpack(x, cu_seqlens, mask) for x in (q, k, v))
    o, kv, count = forward(qu, ku, vu, m, causal=causal, mask=real, kv0=kv0, count0=count0,
                           eps=eps)
    return pack(o, cu_seqlens), kv, count


def backward_packed(do, q, k, v, m=None, *, cu_seqlens, causal=True, mask=None, kv0=None,
                    count0=None, dkv=None, eps=EPS):
    """:func:`backward` on N packed sequences: unpack, call, pack. Returns
    ``(dq, dk, dv, dm, dkv0)``."""
    (dou, real), (qu, _), (ku, _), (vu, _) = (unpack(x, cu_seqlens, mask)
                                              for x in (do, q, k, v))
    dq, dk, dv, dm, dkv0 = backward(dou, qu, ku, vu, m, causal=causal, mask=real, kv0=kv0,
                                    count0=count0, dkv=dkv, eps=eps)
    return pack(dq, cu_seqlens), pack(dk, cu_seqlens), pack(dv, cu_seqlens), dm, dkv0


def _gather(kv, count, state_indices, has_initial_state):
    """The states the entries start from: their slots, zero for -1 entries and where
    ``has_initial_state`` is False."""
    idx = np.asarray(state_indices)
    start = idx >= 0
    if has_initial_state is not None:
        start = start & np.asarray(has_initial_state)
    slot = np.where(idx >= 0, idx, 0)
    kv0 = np.where(start[:, None, None, None], kv[slot], 0.0)
    return kv0, np.where(start, count[slot], 0)


def _scatter(kv, count, state_indices, new_kv, new_count):
    """New pool arrays: the entries' outgoing states in their slots (none for -1 entries)."""
    kv, count = kv.copy(), count.copy()
    idx = np.asarray(state_indices)
    live = idx >= 0
    kv[idx[live]] = new_kv[live]
    count[idx[live]] = new_count[live]
    return kv, count


def pool_prefill(kv, count, q, k, v, m=None, *, cu_seqlens, state_indices,
                 has_initial_state=None, mask=None, eps=EPS):
    """A pool's prefill: gather the named slots, :func:`forward_packed`, scatter back.

    ``kv`` (P, H, Dv, Dk), ``count`` (P,) are the pool; returns ``(o, kv, count)`` with new
    pool arrays (the reference changes nothing in place). A -1 entry's tokens are padding."""
    kv0, count0 = _gather(kv, count, state_indices, has_initial_state)
    live = np.repeat(np.asarray(state_indices) >= 0, np.diff(cu_seqlens))[None]
    real = live if mask is None else live & mask
    o, new_kv, new_count = forward_packed(q, k, v, m, cu_seqlens=cu_seqlens, mask=real,
                                          kv0=kv0, count0=count0, eps=eps)
    return (o, *_scatter(kv, count, state_indices, new_kv, new_count))


def pool_step(kv, count, q, k, v, m=None, *, state_indices, has_initial_state=None, mask=None,
              eps=EPS):
    """A pool's step: gather the named slots, one step of :func:`forward_rnn`, scatter back.

    ``q``, ``k`` (N, H, Dk), ``v`` (N, H, Dv), ``mask`` (N,); returns ``(o, kv, count)``, ``o``
    (N, H, Dv), with new pool arrays. A -1 entry is padding."""
    kv0, count0 = _gather(kv, count, state_indices, has_initial_state)
    real = np.asarray(state_indices) >= 0
    if mask is not None:
        real = real & mask
    o, new_kv, new_count = forward_rnn(q[:, :, None], k[:, :, None], v[:, :, None], m,
                                       mask=real[:, None], kv0=kv0, count0=count0, eps=eps)
    return (o[:, :, 0], *_scatter(kv, count, state_indices, new_kv, new_count))
