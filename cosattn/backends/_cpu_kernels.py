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


# --- float16 <-> float32 ---------------------------------------------------------------------
# NumPy's float16 casts take 2-3 times as long as a pass over the bits here (about 7 and 10 ms
# per 4M elements in and out on the 2-core test machine, against 4). Both are exact: IEEE
# round-to-nearest-even, with NumPy's rules for infinities, NaN payloads and subnormals; checked
# against NumPy for all 2^16 halves and all 2^32 floats (tests/test_numpy.py checks a sample).


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _half_bits_to_float(h: int) -> int:  # pragma: no cover (compiled)
    """The float32 bits of the float16 with bits ``h``."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:  # infinity, NaN (payload kept)
        return sign | 0x7F800000 | (m << 13)
    if e:
        return sign | ((e + 112) << 23) | (m << 13)
    if m == 0:
        return sign
    k = 9  # a subnormal: m 2^-24, its leading bit k
    while not (m >> k) & 1:
        k -= 1
    return sign | ((k + 103) << 23) | ((m << (23 - k)) & 0x7FFFFF)


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _float_bits_to_half(x: int) -> int:  # pragma: no cover (compiled)
    """The float16 bits nearest (ties to even) the float32 with bits ``x``."""
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a >= 0x7F800000:  # infinity, NaN: the payload's top bits, never zero
        if a == 0x7F800000:
            return sign | 0x7C00
        r = 0x7C00 | ((a & 0x7FFFFF) >> 13)
        return sign | (r + 1 if r == 0x7C00 else r)
    if a >= 0x477FF000:  # rounds past the largest half
        return sign | 0x7C00
    if a >= 0x38800000:  # a normal half: rebias, round on the 13 bits dropped
        return sign | (((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10))
    if a >= 0x33000000:  # a subnormal half (or the smallest normal, by rounding)
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - (a >> 23)
        hm = m >> shift
        rest = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and hm & 1):
            hm += 1
        return sign | hm
    return sign  # rounds to zero


@numba.njit(cache=True, nogil=True, boundscheck=False)
def half_to_float(h: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out = float32(h)`` for (B, H, S, D) arrays of bits: ``h`` uint16 (a float16 array's
    view, any strides), ``out`` uint32 (a float32 array's view)."""
    B, H, S, D = h.shape
    for b in range(B):
        for i in range(H):
            for s in range(S):
                for d in range(D):
                    out[b, i, s, d] = _half_bits_to_float(np.uint32(h[b, i, s, d]))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def float_to_half(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out = float16(x)`` for (B, H, S, D) arrays of bits: ``x`` uint32 (a float32 array's
    view), ``out`` uint16 (a float16 array's view, any strides)."""
    B, H, S, D = x.shape
    for b in range(B):
        for i in range(H):
            for s in range(S):
                for d in range(D):
                    out[b, i, s, d] = _float_bits_to_half(x[b, i, s, d])


# --- the chunked algorithm's prologue and epilogues: one pass over each array ----------------
# Arrays ``x`` are (B, H, S, D) in float32 or float64 (16-bit inputs are cast by the caller), at
# the caller's positions; work buffers hold a whole number of chunks at work positions, cut into
# chunks, (B, H, N, C, D) (any strides). ``pieces`` (P, 4) int64 says where each run of tokens
# sits: rows (caller start, work start, length, work length), the work start and length whole
# numbers of chunks, in increasing order, with work start >= caller start (so an output at the
# caller's positions may be the first S rows of the work buffer it is computed from: no row is
# written before it is read). Unpacked, one piece (0, 0, S, n); packed, one per sequence.
# ``mask`` is (B, S) bool, or (0, 0) when every token is real; a padded row is never read and its
# output is +0.


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def rows_in(x: np.ndarray, mask: np.ndarray, eps: float, w: np.ndarray, out: np.ndarray,
            inv: np.ndarray, pieces: np.ndarray) -> None:  # pragma: no cover (compiled)
    """The prologue: each token's row of ``x`` from caller position p into the chunked work
    buffer ``out`` (B, H, N, C, D) at its work position q, zero where padded and past a piece's
    tokens.

    With ``inv`` (B, H, n) not empty, the row is normalised: ``x_p / max(|x_p|, eps)``, and
    ``inv[.., q] = 1 / max(|x_p|, eps)`` (1/eps where padded, as for a zero row). Otherwise it
    is scaled by ``w[.., p]`` (``w`` (B, H, S) at the caller's positions; empty for 1)."""
    B, H = x.shape[:2]
    C, D = out.shape[3], x.shape[3]
    norm = np.empty(1, x.dtype)  # the norm in the outputs' dtype, so the division is too
    for b in range(B):
        for h in range(H):
            for src, dst, length, span in pieces:
                for s0 in range(0, span, C):
                    rows = out[b, h, (dst + s0) // C]
                    for r in range(C):
                        s = s0 + r
                        p, q = src + s, dst + s
                        if s >= length or (mask.size and not mask[b, p]):
                            rows[r] = 0.0
                            if s < length and inv.size:
                                inv[b, h, q] = 1.0 / eps
                        elif inv.size:
                            sq = 0.0
                            for d in range(D):
                                sq += x[b, h, p, d] * x[b, h, p, d]
                            norm[0] = max(math.sqrt(sq), eps)
                            n = norm[0]
                            for d in range(D):
                                rows[r, d] = x[b, h, p, d] / n
                            inv[b, h, q] = 1.0 / n
                        elif w.size:
                            scale = w[b, h, p]
                            for d in range(D):
                                rows[r, d] = x[b, h, p, d] * scale
                        else:
                            for d in range(D):
                                rows[r, d] = x[b, h, p, d]


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def chunk_scan(sums: np.ndarray, segments: np.ndarray, reverse: bool,
               carry: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Exclusive running sums over the chunks of each segment, in place: ``sums`` (B, H, N, X,
    Y) holds one term per chunk; entry n becomes the segment's carried value plus the terms of
    its chunks before n (after n with ``reverse``). ``segments`` (K, 3) int64 holds rows (first
    chunk, end chunk, state row), the state row -1 for "the batch row b". ``carry`` (R, H, X,
    Y) holds by state row the value a segment starts from, and receives the value it ends with
    (its start plus every term), so that a sweep cut into blocks of chunks carries its sums
    from block to block."""
    B, H, _, X, Y = sums.shape
    acc = np.empty((X, Y), sums.dtype)
    for b in range(B):
        for h in range(H):
            for c0, c1, row in segments:
                r = b if row < 0 else row
                acc[:] = carry[r, h]
                for i in range(c1 - c0):
                    n = c1 - 1 - i if reverse else c0 + i
                    term = sums[b, h, n]
                    for x in range(X):
                        for y in range(Y):
                            t = term[x, y]
                            term[x, y] = acc[x, y]
                            acc[x, y] += t
                carry[r, h] = acc


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def rows_out(work: np.ndarray, mask: np.ndarray, out: np.ndarray,
             pieces: np.ndarray) -> None:  # pragma: no cover
    """``out[.., p, :] = work[.., q, :]``, +0 where padded (``out`` (B, H, S, D), any
    strides)."""
    B, H = out.shape[:2]
    C = work.shape[3]
    for b in range(B):
        for h in range(H):
            for src, dst, length, _ in pieces:
                for s in range(length):
                    p = src + s
                    if mask.size and not mask[b, p]:
                        out[b, h, p] = 0.0
                    else:
                        n, r = divmod(dst + s, C)
                        out[b, h, p] = work[b, h, n, r]


@numba.njit(inline="always", fastmath=_FAST, nogil=True, boundscheck=False)
def _gradient_row(g: np.ndarray, extra: np.ndarray, b: int, h: int, n: int, i: int, first: int,
                  row: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``row = g[b, h, n, i] + extra[b, h, n - first, i]`` (``extra`` empty: nothing added)."""
    if extra.size:
        for d in range(row.shape[0]):
            row[d] = g[b, h, n, i, d] + extra[b, h, n - first, i, d]
    else:
        for d in range(row.shape[0]):
            row[d] = g[b, h, n, i, d]


# The gradients' epilogues finish the tokens of the chunks ``first`` .. ``end`` - 1 (a sweep's
# block, or all of them): the gradient at work position q is ``g`` (B, H, N, C, D) plus
# ``extra`` (B, H, end - first, C, D), the block's last product, added here instead of in a pass
# of its own (empty: nothing to add). They write ``out`` at the caller's positions (B, H, S, D),
# or, with ``at_work``, at the work positions (B, H, n, D): then ``out`` may be ``g`` itself,
# unchunked, since each row is read whole before it is written.


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def unit_rows_backward(g: np.ndarray, extra: np.ndarray, xh: np.ndarray, inv: np.ndarray,
                       mask: np.ndarray, eps: float, out: np.ndarray, at_work: bool,
                       pieces: np.ndarray, first: int, end: int) -> None:  # pragma: no cover
    """The normalisation's backward, docs/spec.md "Backward": ``out = (g - x̂ (x̂ · g)) / |x|``
    where ``|x| > eps``, else ``g / eps``; +0 where padded. ``xh`` (cut into chunks) and
    ``inv`` are at work positions."""
    B, H, _, C, D = g.shape
    big = 1.0 / eps
    zero = np.zeros(1, g.dtype)[0]  # x̂ · g is summed in the buffers' dtype
    row = np.empty(D, g.dtype)
    for b in range(B):
        for h in range(H):
            for src, dst, length, _ in pieces:
                for s in range(max(0, first * C - dst), min(length, end * C - dst)):
                    p, q = src + s, dst + s
                    t = q if at_work else p
                    if mask.size and not mask[b, p]:
                        out[b, h, t] = 0.0
                        continue
                    n, i = divmod(q, C)
                    _gradient_row(g, extra, b, h, n, i, first, row)
                    xq = xh[b, h, n, i]
                    r = inv[b, h, q]
                    inner = zero
                    if r < big:
                        for d in range(D):
                            inner += xq[d] * row[d]
                    for d in range(D):
                        out[b, h, t, d] = (row[d] - xq[d] * inner) * r


@numba.njit(cache=True, fastmath=_FAST, nogil=True, boundscheck=False)
def values_backward(g: np.ndarray, extra: np.ndarray, vt: np.ndarray, w: np.ndarray,
                    log_c: np.ndarray, mask: np.ndarray, dm_terms: np.ndarray, out: np.ndarray,
                    at_work: bool, pieces: np.ndarray, first: int,
                    end: int) -> None:  # pragma: no cover (compiled)
    """``out = w_p dṽ_q`` (+0 where padded) and, when ``w`` is given, ``dm_terms[b, h] +=
    Σ (dṽ_q · ṽ_q) ln max(1, c_p)`` (``w`` (B, H, S) and ``log_c`` (B, S) at the caller's
    positions, ``vt`` at work positions, cut into chunks)."""
    B, H, _, C, D = g.shape
    row = np.empty(D, g.dtype)
    for b in range(B):
        for h in range(H):
            total = 0.0
            for src, dst, length, _ in pieces:
                for s in range(max(0, first * C - dst), min(length, end * C - dst)):
                    p, q = src + s, dst + s
                    t = q if at_work else p
                    if mask.size and not mask[b, p]:
                        out[b, h, t] = 0.0
                        continue
                    n, i = divmod(q, C)
                    _gradient_row(g, extra, b, h, n, i, first, row)
                    if w.size == 0:
                        for d in range(D):
                            out[b, h, t, d] = row[d]
                        continue
                    dot = 0.0
                    xq = vt[b, h, n, i]
                    for d in range(D):
                        dot += row[d] * xq[d]
                    total += dot * log_c[b, p]
                    scale = w[b, h, p]
                    for d in range(D):
                        out[b, h, t, d] = row[d] * scale
            if w.size:
                dm_terms[b, h] += total
