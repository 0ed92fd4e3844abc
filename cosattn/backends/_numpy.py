"""The CPU backend: the chunked algorithm of docs/design.md on batched BLAS matmuls.

Sequences are cut into chunks of C tokens (:func:`chunk_size`). Within a chunk the causal
interaction is a small masked C x C product; across chunks it goes through per-chunk states
(Dk x Dv) whose exclusive running sums over the chunks (one fused pass,
:func:`._cpu_kernels.chunk_scan`, which also adds the incoming state) each chunk meets in one
product. Nothing of size S x S or S x D x D is ever built. Work buffers are cut into chunks,
(B, H, N, C, D); a product that takes one transposed takes a view (:func:`_transposed`).
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype. The products
are NumPy's (BLAS); the elementwise work around them (normalisation, scaling, the output copy)
runs as one fused pass per array in :mod:`._cpu_kernels`, as does the recurrent step. The
backward finishes each gradient (the normalisation backward, ``dm``'s terms) block by block in
the sweep that makes its last product, adding that product as it reads the block.

Padding holds anything (docs/spec.md, "Bad input"): padded rows of q, k, v and do are selected
to zero as they are copied in, so nothing there reaches a sum, and padded outputs are written
as +0.

Packed sequences (``cu_seqlens``) are copied by the same passes into a work layout in which
every sequence starts a chunk (:class:`_Layout`); the running sums over chunks restart at each
sequence. A pool's prefill gathers and scatters its N slots around the packed forward; a pool's
step runs the fused step kernel on the slots in place.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from .._call import BackwardCall, ForwardCall, Problem, StepCall
from . import _cpu_kernels, ceil_div, packed_tokens

DEVICE = "cpu"
VARLEN = True
# Below this many input elements (B*H*S*(Dk+Dv)) a call runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
# Above it, a call is cut into parts of about this many input elements (whole heads), so that
# a part's temporaries stay small enough for the caches; parts run on a pool of threads.
PART_ELEMENTS = 1 << 20
# A sweep forms the states of blocks of chunks holding about this many numbers at a time.
STATE_BLOCK_ELEMENTS = 1 << 18
# The most threads a call uses, its own and the BLAS library's (unset: one per core).
THREADS_ENV_VAR = "COSATTN_NUM_THREADS"


def unavailable() -> str | None:
    return None


def chunk_size(acc: np.dtype, D: int) -> int:
    """The chunk size C for accumulation dtype ``acc`` and head size D = max(Dk, Dv).

    A chunk costs C x C x D products inside it and D x D x C ones between chunks; smaller
    chunks do fewer operations inside but multiply smaller matrices, which BLAS does less
    efficiently, and the best size moves with the dtype and D. Measured (two threads, B1 H8
    S8192 with m, forward and backward each timed in alternation against the neighbouring
    sizes): float32, 16 against 32, forward x0.91-0.99 and backward x0.93-0.98 for D 16-64,
    x1.02 and x1.00 at D96, x1.04 and x1.01 at D128 (64 there: x1.19 and x1.22); float64
    D16-D64 best at 16 (D64: 32 about 5 %, 64 about 25 % slower), D128 at 64 (32 about 10 %
    slower). Larger D than measured keeps 64.
    """
    if D <= 64:
        return 16
    if acc == np.float64:
        return 64
    return 32 if D <= 128 else 64


@dataclass(frozen=True)
class _Layout:
    """Where a call's tokens sit in the work buffers (B, H, n, D), ``n`` a multiple of the chunk
    size C.

    Unpacked, row b's S tokens sit at positions 0 .. S-1, and the chunks of all rows form one
    segment, whose states are the call's B rows. Packed, sequence i (the positions ``src[i]``
    .. ``src[i] + lengths[i] - 1`` of the one row) sits at positions ``C * c0`` onward for
    its segment of chunks ``segments[i] = (c0, c1)``: every sequence starts a chunk, no chunk
    holds two sequences, and the positions between sequences are zero. Its state is row i.
    """

    chunk: int  # C
    n: int
    segments: list[tuple[int, int]]  # chunk ranges
    src: Any = None  # (N,) each sequence's first position in the caller's row; None unpacked
    lengths: Any = None  # (N,) tokens of each sequence

    def rows(self, i: int) -> slice:
        """The state rows of segment i."""
        return slice(None) if self.src is None else slice(i, i + 1)

    def tokens(self, i: int) -> slice:
        """The work positions of segment i."""
        c0, c1 = self.segments[i]
        return slice(c0 * self.chunk, c1 * self.chunk)

    def scan_table(self, n0: int, n1: int) -> Any:
        """The segments within the chunks n0 .. n1 - 1 as :func:`._cpu_kernels.chunk_scan` takes
        them: rows (first chunk, end chunk, state row), chunks counted from n0, int64;
        unpacked, one segment whose state row is the batch row (-1)."""
        if self.src is None:
            return np.array([[0, n1 - n0, -1]], dtype=np.int64)
        return np.array([[max(c0, n0) - n0, min(c1, n1) - n0, i]
                         for i, (c0, c1) in enumerate(self.segments) if c0 < n1 and c1 > n0],
                        dtype=np.int64).reshape(-1, 3)

    def pieces(self, S: int) -> Any:
        """Where the tokens sit, as the CPU kernels take it: rows (caller start, work start,
        length, work length), int64. Unpacked, one piece: the S tokens of every row at the same
        place; packed, one per non-empty sequence."""
        if self.src is None:
            return np.array([[0, 0, S, self.n]], dtype=np.int64)
        table = np.array([[s0, c0 * self.chunk, L, (c1 - c0) * self.chunk] for s0, L, (c0, c1) in
                          zip(self.src, self.lengths, self.segments, strict=True) if L],
                         dtype=np.int64)
        return table.reshape(-1, 4)


def _layout(call: ForwardCall | BackwardCall) -> _Layout:
    p = call.p
    C = chunk_size(p.acc, max(p.Dk, p.Dv))
    if not call.packed:
        n = ceil_div(p.S, C) * C
        return _Layout(C, n, [(0, n // C)])
    lengths = np.diff(call.cu_seqlens)
    chunks = -(-lengths // C)
    ends = np.cumsum(chunks)
    n = int(ends[-1]) * C if len(ends) else 0
    return _Layout(C, n, list(zip((ends - chunks).tolist(), ends.tolist(), strict=True)),
                   call.cu_seqlens[:-1], lengths)


@dataclass
class _Normalised:
    """Normalised, scaled inputs in the work layout cut into chunks, (B, H, N, C, D), zero where
    no real token sits; per-token quantities at the caller's positions."""

    qh: Any  # q_i / max(|q_i|, eps); None when the call has no q
    kh: Any  # k_j / max(|k_j|, eps)
    vt: Any  # w_j * v_j
    q_inv: Any  # 1 / max(|q_i|, eps), (B, H, n) (at the tokens' work positions); None without q
    k_inv: Any
    c: Any  # token counts (B, S), int64
    w: Any  # the stabiliser w_j, (B, H, S), or None without m

    @property
    def kt(self) -> Any:
        """k^ transposed chunk by chunk (B, H, N, Dk, C), a view."""
        return _transposed(self.kh)

    @property
    def vt_t(self) -> Any:
        """v~ transposed chunk by chunk (B, H, N, Dv, C), a view."""
        return _transposed(self.vt)


def _readable(x: Any, acc: np.dtype) -> Any:
    """``x`` (B, H, S, D) as the CPU kernels read it: float32/float64 as it is (any strides),
    16-bit cast (float16 by :func:`._cpu_kernels.half_to_float`)."""
    if x.dtype == acc:
        return x
    if x.dtype == np.float16:
        out = np.empty(x.shape, np.float32)
        _cpu_kernels.half_to_float(x.view(np.uint16), out.view(np.uint32))
        return out
    return x.astype(acc)


def _cast_into(out: Any, x: Any) -> None:
    """``out[...] = x`` for (B, H, S, D) arrays, float32 into float16 by
    :func:`._cpu_kernels.float_to_half`."""
    if out.dtype == np.float16 and x.dtype == np.float32:
        _cpu_kernels.float_to_half(x.view(np.uint32), out.view(np.uint16))
    else:
        out[...] = x


def _no_mask(mask: Any) -> Any:
    """``mask`` (B, S) as the CPU kernels take it: (0, 0) when every token is real (and stays
    so when sliced)."""
    return _ALL_REAL if mask is None else mask


def _rows_out(out: Any, work: Any, mask: Any, pieces: Any) -> None:
    """``out`` (B, H, S, D) receives the rows of the chunked work buffer ``work`` at the
    caller's positions, +0 where padded (:func:`._cpu_kernels.rows_out`): straight into it when
    it has the accumulation dtype, else into the first S rows of ``work`` (in place: each row
    moves to an earlier or the same position), then cast into ``out``."""
    if out.dtype == work.dtype:
        _cpu_kernels.rows_out(work, mask, out, pieces)
    else:
        rows = _unchunk(work)[:, :, : out.shape[2]]
        _cpu_kernels.rows_out(work, mask, rows, pieces)
        _cast_into(out, rows)


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


def _packed_counts(p: Problem, cu: Any, mask: Any, count0: Any) -> Any:
    """The counts (1, S) of packed sequences: they restart at every sequence (from its
    incoming count); bidirectional, each sequence's real tokens."""
    lengths = np.diff(cu)
    real = np.ones(p.S, dtype=np.int64) if mask is None else mask[0]
    total = np.concatenate(([0], np.cumsum(real, dtype=np.int64)))  # real tokens before each
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    if p.causal:
        base = total[cu[:-1]] if count0 is None else total[cu[:-1]] - count0
        return (total[1:] - base[sequence])[None]
    return (total[cu[1:]] - total[cu[:-1]])[sequence][None]


def _sigmoid(m: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-m))


def _weights(m: Any, c: Any) -> Any:
    """``max(1, c) ** -sigmoid(m)`` as (B, H, S) for counts ``c`` (B, S), in the dtype of ``m``."""
    return np.maximum(1, c).astype(m.dtype)[:, None, :] ** (-_sigmoid(m))[None, :, None]


def _chunked(p: Problem, layout: _Layout, *shape: int) -> Any:
    """A work buffer cut into chunks, (B, H, N, *shape)."""
    return np.empty((p.B, p.H, layout.n // layout.chunk, *shape), p.acc)


def _transposed(x: Any) -> Any:
    """A chunked buffer (B, H, N, C, D) transposed chunk by chunk, as a view. Products take
    such views as they are: measured with two threads at B1 H8 S8192, copying k^ and v~
    transposed first (a plain right operand multiplies faster in OpenBLAS) gained nothing in
    float32 at D32-D64 (forward and backward within 3 %) and lost about 2 % at D128, while the
    copies cost the backward 0.06 x bytes(q, k, v, o) of peak memory; float64 lost 2-3 % with
    them."""
    return x.swapaxes(-1, -2)


def _normalised_inputs(call: ForwardCall | BackwardCall, layout: _Layout) -> _Normalised:
    """The inputs of the chunked products."""
    p, mask, C = call.p, _no_mask(call.mask), layout.chunk
    kh = _chunked(p, layout, C, p.Dk)
    vt = _chunked(p, layout, C, p.Dv)
    k_inv = np.empty((p.B, p.H, layout.n), p.acc)
    _rows_in(call.k, p, layout, mask, kh, inv=k_inv)
    qh = q_inv = None
    if call.q is not None:
        qh = _chunked(p, layout, C, p.Dk)
        q_inv = np.empty((p.B, p.H, layout.n), p.acc)
        _rows_in(call.q, p, layout, mask, qh, inv=q_inv)
    if call.packed:
        c = _packed_counts(p, call.cu_seqlens, call.mask, call.count0)
    else:
        c = _counts(p, call.mask, call.count0)
    w = None if call.m is None else _weights(call.m, c)
    _rows_in(call.v, p, layout, mask, vt, w=w)
    return _Normalised(qh, kh, vt, q_inv, k_inv, c, w)


def _as_work(call: BackwardCall, x: Any, layout: _Layout) -> Any:
    """``x`` (B, H, S, D) as a chunked work buffer (B, H, N, C, D): a view of it when nothing
    is to be moved, selected or cast (no packing, no mask, whole chunks, the accumulation
    dtype: splitting the S axis needs no copy, whatever the strides), else a copy."""
    p = call.p
    if not call.packed and call.mask is None and layout.n == p.S and x.dtype == p.acc:
        return _chunks(x, layout.chunk)
    out = _chunked(p, layout, layout.chunk, x.shape[3])
    _rows_in(x, p, layout, _no_mask(call.mask), out)
    return out


def _output_work(call: ForwardCall | BackwardCall, out: Any,
                 layout: _Layout) -> tuple[Any, bool]:
    """The chunked work buffer (B, H, N, C, D) of the output ``out`` (B, H, S, D), and whether
    it is ``out`` itself: a view of it where the work layout is the caller's (no packing, whole
    chunks) in the accumulation dtype with each head's rows one contiguous matrix, else a new
    buffer. The products then write the output directly, and the backward's epilogues finish
    its gradients in place. Measured at B1 H8 S8192 D64 (in-process alternation): for ``o``,
    the forward about 5 % faster in float32 and float64, its peak extra memory 0.57 instead of
    0.63 x bytes(q, k, v, o) in float32; for ``dq``, ``dk`` and ``dv``, the peak extra memory
    of a forward + backward 1.35 instead of 1.51 in float32 and 1.29 instead of 1.47 in
    float64."""
    p = call.p
    item = out.itemsize
    rows = out.strides[3] == item and out.strides[2] == out.shape[3] * item
    if not call.packed and layout.n == p.S and out.dtype == p.acc and rows:
        return _chunks(out, layout.chunk), True
    return _chunked(p, layout, layout.chunk, out.shape[3]), False


def _rows_in(x: Any, p: Problem, layout: _Layout, mask: Any, out: Any, *, inv: Any = None,
             w: Any = None) -> None:
    """The prologue pass (:func:`._cpu_kernels.rows_in`) of one input (B, H, S, D) into the
    chunked work buffer ``out``: normalised when ``inv`` is given, else scaled by ``w`` (None:
    1)."""
    none = np.empty((0, 0, 0), p.acc)
    _cpu_kernels.rows_in(_readable(x, p.acc), mask, p.eps, none if w is None else w, out,
                         none if inv is None else inv, layout.pieces(x.shape[2]))


def _chunks(x: Any, C: int) -> Any:
    """(B, H, N*C, D) -> (B, H, N, C, D), a view."""
    B, H, n, D = x.shape
    return x.reshape(B, H, n // C, C, D)


def _lower(out: Any, a: Any, b_t: Any) -> None:
    """Per chunk, ``out = tril(a b^T)``: entry (i, j) is ``a_i . b_j`` for ``j <= i``, else 0
    (``a`` (B, H, N, C, D), ``b_t`` b transposed chunk by chunk (B, H, N, D, C))."""
    np.matmul(a, b_t, out=out)
    out *= np.tri(out.shape[-1], dtype=out.dtype)


def _block_chunks(layout: _Layout, per_chunk: int) -> int:
    """The chunks of a sweep's block: as many as hold about ``STATE_BLOCK_ELEMENTS`` numbers of
    per-chunk states (``per_chunk`` numbers a chunk), at most all of them."""
    return max(1, min(layout.n // layout.chunk, STATE_BLOCK_ELEMENTS // max(per_chunk, 1)))


def _blocks(layout: _Layout, step: int, *, reverse: bool) -> Iterator[tuple[slice, Any]]:
    """The chunks cut into blocks of ``step`` (:func:`_block_chunks`), in the order of a sweep
    (last to first with ``reverse``), each with its segments for
    :func:`._cpu_kernels.chunk_scan`. A sweep forms the states of one block, scans them and
    multiplies them in, so they stay cache-sized instead of S / C states a head."""
    N = layout.n // layout.chunk
    starts = range(0, N, step)
    for n0 in reversed(starts) if reverse else starts:
        n1 = min(n0 + step, N)
        yield slice(n0, n1), layout.scan_table(n0, n1)


def _block_buffer(p: Problem, step: int, *shape: int) -> Any:
    """A buffer (B, H, step, *shape) for a product of a sweep's blocks: every block writes the
    same one (:func:`_of_block`), made once a call. A fresh array a block would be one
    allocation of up to a few MB per block, which glibc maps and unmaps each time while its
    mmap threshold is low (a fresh process), the pages faulted in and zeroed again."""
    return np.empty((p.B, p.H, step, *shape), p.acc)


def _of_block(buffer: Any, n: slice) -> Any:
    """The part of a :func:`_block_buffer` that block ``n`` uses."""
    return buffer[:, :, : n.stop - n.start]


def _carry(rows: int, p: Problem, X: int, Y: int, init: Any) -> Any:
    """The carried sums of a sweep, (rows, H, X, Y): a copy of ``init`` (the incoming state or
    ``dstate``, in the layout of the sums), or zeros."""
    if init is None:
        return np.zeros((rows, p.H, X, Y), p.acc)
    return np.array(init, dtype=p.acc)


def _scan(terms: Any, table: Any, carry: Any, *, reverse: bool) -> None:
    """Exclusive running sums of the per-chunk ``terms`` (B, H, n, X, Y) of one block, in
    place (:func:`._cpu_kernels.chunk_scan`): entry n becomes its segment's carried value plus
    the terms before n (after n with ``reverse``), so each chunk meets the chunks before (after)
    it, and the incoming state, in one product; ``carry`` goes on to the next block."""
    _cpu_kernels.chunk_scan(terms, table, reverse, carry)


def _unchunk(x: Any) -> Any:
    """(B, H, N, C, D) -> (B, H, N*C, D), a view."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)


def _sequence_tokens(call: ForwardCall) -> Any:
    """Real tokens of each sequence, (N,) int64 (each batch row's when unpacked)."""
    p, mask = call.p, call.mask
    if not call.packed:
        return _real_tokens(p, mask)
    return packed_tokens(np, call.cu_seqlens, mask, p.S)


def _state_part(call: ForwardCall) -> tuple[Any, Any]:
    """The ``(kv, count)`` of :class:`ForwardCall` alone (``o`` None): one product over S.
    Never packed nor pooled (:func:`cosattn.absorb` takes no ``cu_seqlens``)."""
    p, kv0 = call.p, call.kv0
    count = _real_tokens(p, call.mask)
    if p.causal and call.count0 is not None:
        count = count + call.count0
    kv = np.zeros((p.B, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
    if p.S:
        x = _normalised_inputs(call, _layout(call))
        kv += _unchunk(x.vt).swapaxes(-1, -2) @ _unchunk(x.kh)
    return kv, count


def _forward_part(call: ForwardCall) -> tuple[Any, Any] | None:
    if call.o is None:
        return _state_part(call)
    p, kv0 = call.p, call.kv0
    count = None
    if call.want_state:
        count = np.zeros(call.N, dtype=np.int64) if call.count0 is None else call.count0
        count = count + _sequence_tokens(call)
        if p.S == 0:
            kv = np.zeros((call.N, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
            return kv, count
    if p.S == 0:
        return None
    layout = _layout(call)
    mask, pieces = _no_mask(call.mask), layout.pieces(p.S)
    if not p.causal:
        x = _normalised_inputs(call, layout)
        qh, kh, vt = (_unchunk(a) for a in (x.qh, x.kh, x.vt))
        out, direct = _output_work(call, call.o, layout)
        for i in range(len(layout.segments)):
            tokens = layout.tokens(i)
            if kv0 is None:  # the sequence's own sum
                kv = vt[:, :, tokens].swapaxes(-1, -2) @ kh[:, :, tokens]  # (B, H, Dv, Dk)
            else:  # the whole sequence's (total=; never packed, so one segment)
                kv = kv0[layout.rows(i)].astype(p.acc, copy=False)
            np.matmul(qh[:, :, tokens], kv.swapaxes(-1, -2), out=_unchunk(out)[:, :, tokens])
        if not direct or call.mask is not None:  # padded rows of a direct output may hold -0
            _rows_out(call.o, out, mask, pieces)
        return None
    x = _normalised_inputs(call, layout)
    scores = _chunked(p, layout, layout.chunk, layout.chunk)
    _lower(scores, x.qh, x.kt)
    out, direct = _output_work(call, call.o, layout)
    np.matmul(scores, x.vt, out=out)
    del scores
    carry = _carry(call.N, p, p.Dk, p.Dv, None if kv0 is None else kv0.swapaxes(-1, -2))
    step = _block_chunks(layout, p.B * p.H * p.Dk * p.Dv)
    states_buffer = _block_buffer(p, step, p.Dk, p.Dv)
    inter_buffer = _block_buffer(p, step, layout.chunk, p.Dv)
    for n, table in _blocks(layout, step, reverse=False):
        # k^^T v~ of each chunk, then the state before it
        states = np.matmul(x.kt[:, :, n], x.vt[:, :, n], out=_of_block(states_buffer, n))
        _scan(states, table, carry, reverse=False)
        out[:, :, n] += np.matmul(x.qh[:, :, n], states, out=_of_block(inter_buffer, n))
    if not direct or call.mask is not None:  # padded rows of a direct output may hold -0
        _rows_out(call.o, out, mask, pieces)
    if not call.want_state:
        return None
    return carry.swapaxes(-1, -2).astype(p.state_dtype), count


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


def _packed_parts(call: ForwardCall | BackwardCall, workers: int) -> list[tuple[slice, slice]]:
    """Cut a packed call into blocks ``(sequences, heads)``: runs of whole sequences of about
    ``PART_ELEMENTS`` input elements (or of a core's share, when that is smaller), a run larger
    than that cut into blocks of heads, at least one block per worker thread where the heads allow.
    Each block walks few sequences, so the per-sequence work of the whole call is done once,
    not once per block of heads."""
    p = call.p
    per_token = p.H * (p.Dk + p.Dv)
    if workers <= 1 or p.S * per_token < PARALLEL_MIN_ELEMENTS:
        return [(slice(None), slice(None))]
    ends = np.cumsum(np.diff(call.cu_seqlens)) * per_token  # elements up to each sequence's end
    target = min(PART_ELEMENTS, ceil_div(int(ends[-1]), workers))
    groups, first = [], 0
    while first < call.N:
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + target, side="right")))
        groups.append((first, last, int(ends[last - 1] - base)))
        first = last
    split = [min(p.H, max(1, ceil_div(size, PART_ELEMENTS))) for _, _, size in groups]
    while sum(split) < workers and any(c < p.H for c in split):
        biggest = max((g for g in range(len(groups)) if split[g] < p.H),
                      key=lambda g: groups[g][2] / split[g])
        split[biggest] = min(p.H, 2 * split[biggest])
    blocks = []
    for (first, last, _), parts in zip(groups, split, strict=True):
        cuts = [i * p.H // parts for i in range(parts + 1)]
        blocks += [(slice(first, last), slice(h0, h1)) for h0, h1 in itertools.pairwise(cuts)]
    return blocks


def _workers_pool(workers: int) -> ThreadPoolExecutor:
    """The pool of ``workers`` threads (replaced when the thread setting changes)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = workers, ThreadPoolExecutor(workers, thread_name_prefix="cosattn")
        return _pool[1]


def _run(call: ForwardCall | BackwardCall,
         part: Any) -> list[tuple[tuple[slice, slice], Any]]:
    """``part(block)`` for every block of :func:`_parts` (:func:`_packed_parts`), in parallel
    when there are several; returns each block's ``(rows, heads)`` (``(sequences, heads)``)
    with its result, in a fixed order.

    Parts run with one BLAS thread each: a BLAS thread pool per worker would put more threads
    than cores on the products, and OpenBLAS's threads spin while they wait (a float64 D128
    call measured 2-3 times slower, and 50 times slower while other work held a core). With
    ``COSATTN_NUM_THREADS=n`` a call uses at most n threads: n parts at a time, or, when it is
    not cut, the calling thread with at most n BLAS threads. Unset, there is one worker per
    core, and a call that is not cut leaves the BLAS library's setting as it is.
    """
    threads = num_threads()
    workers = threads or os.cpu_count() or 1
    blocks = _packed_parts(call, workers) if call.packed else _parts(call.p, workers)
    if len(blocks) == 1:
        with _blas_threads(threads):
            return [(blocks[0], part(call))]
    pool = _workers_pool(workers)
    with _blas_threads(1):
        futures = [pool.submit(part, call.block(*b)) for b in blocks]
        return [(b, f.result()) for b, f in zip(blocks, futures, strict=True)]


def forward(call: ForwardCall) -> tuple[Any, Any] | None:
    if call.pooled:
        _prefill(call)
        return None
    results = _run(call, _forward_part)
    if len(results) == 1 or not call.want_state:
        return results[0][1]
    p = call.p
    kv = np.empty((call.N, p.H, p.Dv, p.Dk), dtype=p.state_dtype)
    count = np.empty(call.N, dtype=np.int64)
    for (rows, heads), (kv_part, count_part) in results:
        kv[rows, heads] = kv_part
        count[rows] = count_part
    return kv, count


def _prefill(call: ForwardCall) -> None:
    """A pool's prefill: the packed forward from the named slots (zero where a sequence has no
    initial state), its outgoing states written back into them. The slots are gathered and
    scattered whole, once per call (a prefill's cost is in its tokens); a ``-1`` entry's tokens
    are masked, so they reach no result, and its slot index is never used."""
    indices = call.state_indices
    live = indices >= 0
    slot = np.where(live, indices, 0)
    start = live if call.has_initial is None else live & call.has_initial
    kv0 = np.where(start[:, None, None, None], call.kv0[slot], 0).astype(call.kv0.dtype)
    count0 = np.where(start, call.count0[slot], 0)
    mask = call.mask
    if not live.all():
        real = np.repeat(live, np.diff(call.cu_seqlens))[None]
        mask = real if mask is None else mask & real
    pure = replace(call, kv0=kv0, count0=count0, mask=mask, want_state=True, state_indices=None,
                   has_initial=None)
    kv, count = forward(pure)
    # A sequence with no real token that starts from its slot leaves it bit for bit
    # (docs/spec.md, "State pools"): its zero products would turn -0.0 into +0.0, and a float64
    # slot would pass through float32 sums.
    written = live & ~(start & (count == count0))
    call.kv0[indices[written]] = kv[written]
    call.count0[indices[written]] = count[written]


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


@dataclass
class _Gradient:
    """One gradient of the backward: the caller's array, its chunked work buffer (a view of it
    when :func:`_output_work` allows) and where the epilogue writes it."""

    out: Any  # (B, H, S, D)
    work: Any  # (B, H, N, C, D)
    direct: bool  # work is a view of out

    @classmethod
    def of(cls, call: BackwardCall, out: Any, layout: _Layout) -> _Gradient:
        return cls(out, *_output_work(call, out, layout))

    @property
    def cast(self) -> bool:
        return self.out.dtype != self.work.dtype

    def target(self) -> tuple[Any, bool]:
        """The epilogue's ``out, at_work``: the work buffer itself, at work positions, when it
        is the output or the output takes a cast; else the output, at the caller's positions."""
        if self.direct or self.cast:
            return _unchunk(self.work), True
        return self.out, False

    def settle(self, call: BackwardCall, mask: Any, pieces: Any) -> None:
        """After the epilogues, a cast output receives its rows: moved to the caller's positions
        first when packed (:func:`_rows_out`); unpacked, they are there already."""
        if not self.cast:
            return
        if call.packed:
            _rows_out(self.out, self.work, mask, pieces)
        else:
            _cast_into(self.out, _unchunk(self.work)[:, :, : call.p.S])


def _backward_part(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, dkv = call.p, call.kv0, call.dkv
    if p.S == 0:
        dm = None if call.m is None else np.zeros(p.H, dtype=p.acc)
        if kv0 is None or not p.causal:
            return dm, None
        return dm, np.zeros_like(kv0) if dkv is None else dkv.astype(kv0.dtype)
    layout = _layout(call)
    mask, C, pieces = _no_mask(call.mask), layout.chunk, layout.pieces(p.S)
    terms = np.zeros((p.B, p.H), p.acc)
    if p.causal:
        # Three causal products of the forward's shape share two score matrices and two running
        # sums: dq^ meets earlier tokens through (do . v~) and the sum of v~ k^^T before its
        # chunk, dk^ later ones through the same scores transposed and the sum of do q^'^T
        # after its chunk, and dv~ later ones through (q^' . k^), the forward's scores
        # transposed, and that sum transposed.
        # Each gradient is finished block by block in the sweep that makes its last product,
        # which the epilogue adds as it reads the block. The order keeps the live buffers few:
        # each operand goes as soon as its last product is done. Padded rows of q^, k^, v~
        # and do are zero, so dq^, dk^ and dv~ are zero there too.
        x = _normalised_inputs(call, layout)
        dof = _as_work(call, call.do, layout)
        scores = _chunked(p, layout, C, C)
        _lower(scores, x.qh, x.kt)
        dv = _Gradient.of(call, call.dv, layout)
        np.matmul(scores.swapaxes(-1, -2), dof, out=dv.work)
        dov, scores = scores, None  # its buffer again, for (i, j): do_i . v~_j
        _lower(dov, dof, x.vt_t)
        dq, dk = (_Gradient.of(call, out, layout) for out in (call.dq, call.dk))
        np.matmul(dov, x.kh, out=dq.work)
        np.matmul(dov.swapaxes(-1, -2), x.qh, out=dk.work)
        dov = None
        step = _block_chunks(layout, p.B * p.H * p.Dv * p.Dk)
        sums = _block_buffer(p, step, p.Dv, p.Dk)  # a block's running sums, either sweep
        extra = _block_buffer(p, step, C, max(p.Dk, p.Dv))  # a block's last products
        carry = _carry(call.N, p, p.Dv, p.Dk, kv0)
        for n, table in _blocks(layout, step, reverse=False):
            # v~^T k^ of each chunk, then the sum before it
            before = np.matmul(x.vt_t[:, :, n], x.kh[:, :, n], out=_of_block(sums, n))
            _scan(before, table, carry, reverse=False)
            product = np.matmul(dof[:, :, n], before, out=_of_block(extra[..., : p.Dk], n))
            _cpu_kernels.unit_rows_backward(dq.work, product, x.qh, x.q_inv, mask, p.eps,
                                            *dq.target(), pieces, n.start, n.stop)
        dq.settle(call, mask, pieces)  # its work buffer and q's norms can go
        dq = x.q_inv = None
        w, log_c = _value_weights(call, x)
        carry = _carry(call.N, p, p.Dv, p.Dk, dkv)
        for n, table in _blocks(layout, step, reverse=True):
            # do^T q^' of each chunk, then the sum after it
            later = np.matmul(_transposed(dof[:, :, n]), x.qh[:, :, n], out=_of_block(sums, n))
            _scan(later, table, carry, reverse=True)
            product = np.matmul(x.vt[:, :, n], later, out=_of_block(extra[..., : p.Dk], n))
            _cpu_kernels.unit_rows_backward(dk.work, product, x.kh, x.k_inv, mask, p.eps,
                                            *dk.target(), pieces, n.start, n.stop)
            product = np.matmul(x.kh[:, :, n], _transposed(later),
                                out=_of_block(extra[..., : p.Dv], n))
            _cpu_kernels.values_backward(dv.work, product, x.vt, w, log_c, mask, terms,
                                         *dv.target(), pieces, n.start, n.stop)
        dk.settle(call, mask, pieces)
        dv.settle(call, mask, pieces)
        dkv0 = carry
    else:  # each sequence's own sums, or the whole sequence's and their gradient (total=)
        x = _normalised_inputs(call, layout)
        w, log_c = _value_weights(call, x)
        dof = _as_work(call, call.do, layout)
        qh, kh, vt, do = (_unchunk(a) for a in (x.qh, x.kh, x.vt, dof))
        dq, dk, dv = (_Gradient.of(call, out, layout) for out in (call.dq, call.dk, call.dv))
        for i in range(len(layout.segments)):
            t = layout.tokens(i)
            if kv0 is None:
                kv = vt[:, :, t].swapaxes(-1, -2) @ kh[:, :, t]  # (B, H, Dv, Dk)
                g = do[:, :, t].swapaxes(-1, -2) @ qh[:, :, t]  # sum_i do_i q'_i^T
            else:  # total= (never packed, so one segment)
                rows = layout.rows(i)
                kv, g = (a[rows].astype(p.acc, copy=False) for a in (kv0, dkv))
            np.matmul(do[:, :, t], kv, out=_unchunk(dq.work)[:, :, t])
            np.matmul(vt[:, :, t], g, out=_unchunk(dk.work)[:, :, t])
            np.matmul(kh[:, :, t], g.swapaxes(-1, -2), out=_unchunk(dv.work)[:, :, t])
        N = layout.n // C
        _cpu_kernels.unit_rows_backward(dq.work, _NO_EXTRA, x.qh, x.q_inv, mask, p.eps,
                                        *dq.target(), pieces, 0, N)
        _cpu_kernels.unit_rows_backward(dk.work, _NO_EXTRA, x.kh, x.k_inv, mask, p.eps,
                                        *dk.target(), pieces, 0, N)
        _cpu_kernels.values_backward(dv.work, _NO_EXTRA, x.vt, w, log_c, mask, terms,
                                     *dv.target(), pieces, 0, N)
        for grad in (dq, dk, dv):
            grad.settle(call, mask, pieces)
        dkv0 = None
    dm = None
    if call.m is not None:
        sig = _sigmoid(call.m)
        dm = -terms.sum(axis=0) * sig * (1.0 - sig)
    if kv0 is None or not p.causal:
        return dm, None
    return dm, dkv0.astype(kv0.dtype)


def _value_weights(call: BackwardCall, x: _Normalised) -> tuple[Any, Any]:
    """``w`` (B, H, S) and ``ln max(1, c)`` (B, S) for :func:`._cpu_kernels.values_backward`,
    both empty without ``m``."""
    if call.m is None:
        return np.empty((0, 0, 0), call.p.acc), np.empty((0, 0), call.p.acc)
    return x.w, np.log(np.maximum(1, x.c)).astype(call.p.acc)


def step(call: StepCall) -> None:
    """One fused pass over the state (:func:`._cpu_kernels.step`), in place on the slots a
    pool's step names (no copies of them); a padded row's state is not written at all, so it
    keeps its bits (docs/spec.md, "Bad input")."""
    kv, acc = call.kv, call.kv.dtype
    q, k, v = (np.ascontiguousarray(x, dtype=acc) for x in (call.q, call.k, call.v))
    sig = _NONE if call.m is None else _sigmoid(call.m.astype(acc))
    mask = _ALL_REAL_ROWS if call.mask is None else np.ascontiguousarray(call.mask)
    slots = _NO_SLOTS if call.state_indices is None else call.state_indices
    initial = (_ALL_REAL_ROWS if call.has_initial is None
               else np.ascontiguousarray(call.has_initial))
    direct = call.o.dtype == acc and call.o.flags.c_contiguous
    o = call.o if direct else np.empty(call.o.shape, acc)
    _cpu_kernels.step(kv, call.count, q, k, v, sig, mask, slots, initial, o, call.p.eps)
    if not direct:
        call.o[...] = o


_NONE = np.empty(0, np.float32)  # no stabiliser
_NO_EXTRA = np.empty((0,) * 5, np.float32)  # nothing for an epilogue to add
_ALL_REAL = np.empty((0, 0), np.bool_)  # no mask, as the CPU kernels take it
_ALL_REAL_ROWS = np.empty(0, np.bool_)  # no step mask; every row from its state
_NO_SLOTS = np.empty(0, np.int64)  # row b is state b
