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
