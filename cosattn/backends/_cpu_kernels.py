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
# Arrays ``x`` are (B, H, S, D) in float32 or float64 (16-bit inputs are cast by the caller);
# padded buffers are (B, H, n, D) with n >= S a whole number of chunks; ``mask`` is (B, S)
# bool, or (0, 0) when every token is real; a padded row is never read and its output is +0.


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def unit_rows(x: np.ndarray, mask: np.ndarray, eps: float, out: np.ndarray,
              inv: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[.., s, :] = x_s / max(|x_s|, eps)`` (zero past S and where padded) and
    ``inv[.., s] = 1 / max(|x_s|, eps)`` (1/eps where padded, as for a zero row)."""
    B, H, S, D = x.shape
    norm = np.empty(1, out.dtype)  # the norm in the output's dtype, so the division is too
    for b in range(B):
        for h in range(H):
            for s in range(S):
                if mask.size and not mask[b, s]:
                    out[b, h, s] = 0.0
                    inv[b, h, s] = 1.0 / eps
                    continue
                sq = 0.0
                for d in range(D):
                    sq += x[b, h, s, d] * x[b, h, s, d]
                norm[0] = max(math.sqrt(sq), eps)
                n = norm[0]
                for d in range(D):
                    out[b, h, s, d] = x[b, h, s, d] / n
                inv[b, h, s] = 1.0 / n
            out[b, h, S:] = 0.0


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def scaled_rows(x: np.ndarray, mask: np.ndarray, w: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[.., s, :] = w[.., s] x_s`` (``w`` (B, H, S), or (0, 0, 0) for 1), zero past S and
    where padded."""
    B, H, S, D = x.shape
    for b in range(B):
        for h in range(H):
            for s in range(S):
                if mask.size and not mask[b, s]:
                    out[b, h, s] = 0.0
                elif w.size:
                    scale = w[b, h, s]
                    for d in range(D):
                        out[b, h, s, d] = x[b, h, s, d] * scale
                else:
                    out[b, h, s] = x[b, h, s]
            out[b, h, S:] = 0.0


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def rows_out(src: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out = src[:, :, :S]``, +0 where padded (``out`` (B, H, S, D), any strides)."""
    B, H, S = out.shape[:3]
    for b in range(B):
        for h in range(H):
            for s in range(S):
                if mask.size and not mask[b, s]:
                    out[b, h, s] = 0.0
                else:
                    out[b, h, s] = src[b, h, s]


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def unit_rows_backward(g: np.ndarray, xh: np.ndarray, inv: np.ndarray, mask: np.ndarray,
                       eps: float, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """The normalisation's backward, docs/spec.md "Backward": ``out_s = (g_s - x̂_s (x̂_s ·
    g_s)) / |x_s|`` where ``|x_s| > eps``, else ``g_s / eps``; +0 where padded. ``g`` and
    ``xh`` are padded buffers, ``out`` (B, H, S, D) may be ``g`` itself."""
    B, H, S, D = out.shape
    big = 1.0 / eps
    inner = np.empty(1, g.dtype)  # x̂ · g in the buffers' dtype
    for b in range(B):
        for h in range(H):
            for s in range(S):
                if mask.size and not mask[b, s]:
                    out[b, h, s] = 0.0
                    continue
                r = inv[b, h, s]
                inner[0] = 0.0
                if r < big:
                    for d in range(D):
                        inner[0] += xh[b, h, s, d] * g[b, h, s, d]
                c = inner[0]
                for d in range(D):
                    out[b, h, s, d] = (g[b, h, s, d] - xh[b, h, s, d] * c) * r


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def values_backward(dvt: np.ndarray, vt: np.ndarray, w: np.ndarray, log_c: np.ndarray,
                    mask: np.ndarray, dm_terms: np.ndarray,
                    out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out_s = w_s dṽ_s`` (+0 where padded) and, when ``w`` is given, ``dm_terms[b, h] =
    Σ_s (dṽ_s · ṽ_s) ln max(1, c_s)`` (``log_c`` (B, S)); ``out`` may be ``dvt`` itself."""
    B, H, S, D = out.shape
    for b in range(B):
        for h in range(H):
            total = 0.0
            for s in range(S):
                if mask.size and not mask[b, s]:
                    out[b, h, s] = 0.0
                    continue
                if w.size == 0:
                    out[b, h, s] = dvt[b, h, s]
                    continue
                dot = 0.0
                for d in range(D):
                    dot += dvt[b, h, s, d] * vt[b, h, s, d]
                total += dot * log_c[b, s]
                scale = w[b, h, s]
                for d in range(D):
                    out[b, h, s, d] = dvt[b, h, s, d] * scale
            if w.size:
                dm_terms[b, h] = total
