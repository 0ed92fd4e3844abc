"""Fused CPU loops of the numpy backend, compiled by Numba's CPU JIT.

NumPy runs one pass over memory per operation; a recurrent step done that way reads and writes
the state several times (an outer product as a temporary, an add, a matrix-vector product). The
step below does it in one pass: each row of the state is read, updated and dotted with q̂ while
it is in cache. Compiled on first use for each dtype and kept in Numba's on-disk cache (beside
this file in ``__pycache__``, or under ``NUMBA_CACHE_DIR`` where that is not writable).

Sums may be reassociated by the compiler (``fastmath={"reassoc", "contract"}``) so that they
vectorise; the order is fixed by the compiled code, so results repeat bit for bit.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_FAST = {"reassoc", "contract"}


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def _unit(x: np.ndarray, eps: float, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out = x / max(|x|, eps)``."""
    sq = 0.0
    for j in range(x.shape[0]):
        sq += x[j] * x[j]
    norm = max(math.sqrt(sq), eps)
    for j in range(x.shape[0]):
        out[j] = x[j] / norm


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def step(kv: np.ndarray, count: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
         sig: np.ndarray, mask: np.ndarray, slots: np.ndarray, initial: np.ndarray,
         o: np.ndarray, eps: float) -> None:  # pragma: no cover (compiled)
    """One recurrent step in place (docs/spec.md, "The RNN form").

    ``kv`` (P, H, Dv, Dk) and ``count`` (P,) are the states; ``q``, ``k`` (B, H, Dk), ``v``
    (B, H, Dv) and ``o`` (B, H, Dv) are in the states' dtype; ``sig`` is sigmoid(m) (H,), or
    empty for no stabiliser; ``mask`` (B,) bool, or empty when every row is real. Row b steps
    state ``slots[b]`` (state b when ``slots`` is empty; none when it is -1 or out of range:
    the row's output is +0), from a zero state where ``initial[b]`` is False (``initial``
    empty: every row from its state). A padded row is not read; its state is not written,
    unless it starts from zero, which it then receives; its output is +0.
    """
    P, H, Dv, Dk = kv.shape
    qh = np.empty(Dk, kv.dtype)
    kh = np.empty(Dk, kv.dtype)
    vs = np.empty(Dv, kv.dtype)  # w v, in the state's dtype like every operand of the loop
    zero = np.zeros(1, kv.dtype)[0]
    for b in range(q.shape[0]):
        s = b if slots.size == 0 else slots[b]
        if s < 0 or s >= P:
            o[b] = 0.0
            continue
        if initial.size and not initial[b]:
            kv[s] = 0.0
            count[s] = 0
        if mask.size and not mask[b]:
            o[b] = 0.0
            continue
        c = count[s] + 1
        for h in range(H):
            _unit(q[b, h], eps, qh)
            _unit(k[b, h], eps, kh)
            w = 1.0 if sig.size == 0 else max(1.0, c) ** -sig[h]
            for i in range(Dv):
                vs[i] = v[b, h, i] * w
            for i in range(Dv):
                row = kv[s, h, i]
                dot = zero
                for j in range(Dk):
                    x = row[j] + vs[i] * kh[j]
                    row[j] = x
                    dot += x * qh[j]
                o[b, h, i] = dot
        count[s] = c


# --- the chunked algorithm's prologue and epilogues: one pass over each array ----------------
# Arrays ``x`` are (B, H, S, D) in float32 or float64 (16-bit inputs are cast by the caller), at
# the caller's positions; work buffers are (B, H, n, D) with a whole number of chunks, at work
# positions. ``pieces`` (P, 4) int64 says where each run of tokens sits: rows (caller start,
# work start, length, work length), the work length a whole number of chunks, in increasing
# order, with work start >= caller start (so an output at the caller's positions may be the
# first S rows of the work buffer it is computed from: no row is written before it is read).
# Unpacked, one piece (0, 0, S, n); packed, one per sequence. ``mask`` is (B, S) bool, or (0, 0)
# when every token is real; a padded row is never read and its output is +0.


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def unit_rows(x: np.ndarray, mask: np.ndarray, eps: float, out: np.ndarray, inv: np.ndarray,
              pieces: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[.., q, :] = x_p / max(|x_p|, eps)`` and ``inv[.., q] = 1 / max(|x_p|, eps)`` for
    each token at caller position p and work position q (1/eps and zeros where padded, as for
    a zero row); the work positions past a piece's tokens are zeroed."""
    B, H = x.shape[:2]
    D = x.shape[3]
    norm = np.empty(1, out.dtype)  # the norm in the output's dtype, so the division is too
    for b in range(B):
        for h in range(H):
            for src, dst, length, span in pieces:
                for s in range(length):
                    p, q = src + s, dst + s
                    if mask.size and not mask[b, p]:
                        out[b, h, q] = 0.0
                        inv[b, h, q] = 1.0 / eps
                        continue
                    sq = 0.0
                    for d in range(D):
                        sq += x[b, h, p, d] * x[b, h, p, d]
                    norm[0] = max(math.sqrt(sq), eps)
                    n = norm[0]
                    for d in range(D):
                        out[b, h, q, d] = x[b, h, p, d] / n
                    inv[b, h, q] = 1.0 / n
                out[b, h, dst + length:dst + span] = 0.0


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def scaled_rows(x: np.ndarray, mask: np.ndarray, w: np.ndarray, out: np.ndarray,
                pieces: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[.., q, :] = w[.., p] x_p`` (``w`` (B, H, S) at the caller's positions, or
    (0, 0, 0) for 1), zero where padded and past a piece's tokens."""
    B, H = x.shape[:2]
    D = x.shape[3]
    for b in range(B):
        for h in range(H):
            for src, dst, length, span in pieces:
                for s in range(length):
                    p, q = src + s, dst + s
                    if mask.size and not mask[b, p]:
                        out[b, h, q] = 0.0
                    elif w.size:
                        scale = w[b, h, p]
                        for d in range(D):
                            out[b, h, q, d] = x[b, h, p, d] * scale
                    else:
                        out[b, h, q] = x[b, h, p]
                out[b, h, dst + length:dst + span] = 0.0


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def rows_out(work: np.ndarray, mask: np.ndarray, out: np.ndarray,
             pieces: np.ndarray) -> None:  # pragma: no cover
    """``out[.., p, :] = work[.., q, :]``, +0 where padded (``out`` (B, H, S, D), any
    strides)."""
    B, H = out.shape[:2]
    for b in range(B):
        for h in range(H):
            for src, dst, length, _ in pieces:
                for s in range(length):
                    p = src + s
                    if mask.size and not mask[b, p]:
                        out[b, h, p] = 0.0
                    else:
                        out[b, h, p] = work[b, h, dst + s]


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def unit_rows_backward(g: np.ndarray, xh: np.ndarray, inv: np.ndarray, mask: np.ndarray,
                       eps: float, out: np.ndarray,
                       pieces: np.ndarray) -> None:  # pragma: no cover (compiled)
    """The normalisation's backward, docs/spec.md "Backward": ``out_p = (g_q - x̂_q (x̂_q ·
    g_q)) / |x|`` where ``|x| > eps``, else ``g_q / eps``; +0 where padded. ``g``, ``xh`` and
    ``inv`` are at work positions, ``out`` (B, H, S, D) at the caller's (it may be the first S
    rows of ``g``)."""
    B, H = out.shape[:2]
    D = out.shape[3]
    big = 1.0 / eps
    inner = np.empty(1, g.dtype)  # x̂ · g in the buffers' dtype
    for b in range(B):
        for h in range(H):
            for src, dst, length, _ in pieces:
                for s in range(length):
                    p, q = src + s, dst + s
                    if mask.size and not mask[b, p]:
                        out[b, h, p] = 0.0
                        continue
                    r = inv[b, h, q]
                    inner[0] = 0.0
                    if r < big:
                        for d in range(D):
                            inner[0] += xh[b, h, q, d] * g[b, h, q, d]
                    c = inner[0]
                    for d in range(D):
                        out[b, h, p, d] = (g[b, h, q, d] - xh[b, h, q, d] * c) * r


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def values_backward(dvt: np.ndarray, vt: np.ndarray, w: np.ndarray, log_c: np.ndarray,
                    mask: np.ndarray, dm_terms: np.ndarray, out: np.ndarray,
                    pieces: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out_p = w_p dṽ_q`` (+0 where padded) and, when ``w`` is given, ``dm_terms[b, h] =
    Σ (dṽ_q · ṽ_q) ln max(1, c_p)`` (``w`` (B, H, S) and ``log_c`` (B, S) at the caller's
    positions, ``dvt`` and ``vt`` at work positions); ``out`` may be the first S rows of
    ``dvt``."""
    B, H = out.shape[:2]
    D = out.shape[3]
    for b in range(B):
        for h in range(H):
            total = 0.0
            for src, dst, length, _ in pieces:
                for s in range(length):
                    p, q = src + s, dst + s
                    if mask.size and not mask[b, p]:
                        out[b, h, p] = 0.0
                        continue
                    if w.size == 0:
                        out[b, h, p] = dvt[b, h, q]
                        continue
                    dot = 0.0
                    for d in range(D):
                        dot += dvt[b, h, q, d] * vt[b, h, q, d]
                    total += dot * log_c[b, p]
                    scale = w[b, h, p]
                    for d in range(D):
                        out[b, h, p, d] = dvt[b, h, q, d] * scale
            if w.size:
                dm_terms[b, h] = total
