"""The CPU backend: the chunked algorithm of docs/design.md on batched BLAS matmuls.

Sequences are cut into chunks of ``CHUNK`` tokens. Within a chunk the causal interaction is a
small masked C x C product; across chunks it goes through per-chunk states (Dv x Dk) whose
prefix sums are taken over the chunk axis. Nothing of size S x S or S x D x D is ever built.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.

Padding holds anything (docs/spec.md, "Bad input"): padded rows of q, k, v and do are selected
to zero as they are copied in, so nothing there reaches a sum, and padded outputs are set to +0
at the end.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._call import BackwardCall, ForwardCall, Problem, StepCall
from . import _cpu_kernels, ceil_div

DEVICE = "cpu"
VARLEN = True
CHUNK = 64
# Below this many input elements (B*H*S*(Dk+Dv)) a call runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
# Above it, a call is cut into parts of about this many input elements (whole heads), so that
# a part's temporaries stay small enough for the caches; parts run on a pool of threads.
PART_ELEMENTS = 1 << 20


def unavailable() -> str | None:
    return None


@dataclass(frozen=True)
class _Layout:
    """Where a call's tokens sit in the work buffers (B, H, n, D), ``n`` a multiple of CHUNK.

    Unpacked, row b's S tokens sit at positions 0 .. S-1, and the chunks of all rows form one
    segment, whose states are the call's B rows. Packed, sequence i (the positions ``src[i]``
    .. ``src[i] + lengths[i] - 1`` of the one row) is copied to positions ``CHUNK * c0`` onward
    for its segment of chunks ``segments[i] = (c0, c1)``: every sequence starts a chunk, no chunk
    holds two sequences, and the positions between sequences are zero. Its state is row i.
    """

    S: int  # positions in use: the caller's S, or n when packed
    n: int
    mask: Any  # (B, S) bool: real tokens at the positions in use, or None when all are real
    segments: list[tuple[int, int]]  # chunk ranges
    src: Any = None  # (N,) each sequence's first position in the caller's row; None unpacked
    lengths: Any = None  # (N,) tokens of each sequence

    def rows(self, i: int) -> slice:
        """The state rows of segment i."""
        return slice(None) if self.src is None else slice(i, i + 1)

    def tokens(self, i: int) -> slice:
        """The work positions of segment i."""
        c0, c1 = self.segments[i]
        return slice(c0 * CHUNK, c1 * CHUNK)

    def spans(self) -> list[tuple[int, int, int]]:
        """Packed: ``(caller position, work position, length)`` of every sequence."""
        return [(int(s0), c0 * CHUNK, int(L)) for s0, (c0, _), L in
                zip(self.src, self.segments, self.lengths, strict=True)]


def _layout(call: ForwardCall | BackwardCall) -> _Layout:
    p = call.p
    if not call.packed:
        n = ceil_div(p.S, CHUNK) * CHUNK
        return _Layout(p.S, n, call.mask, [(0, n // CHUNK)])
    cu = call.cu_seqlens
    lengths = np.diff(cu)
    chunks = -(-lengths // CHUNK)
    ends = np.cumsum(chunks)
    n = int(ends[-1]) * CHUNK if len(ends) else 0
    layout = _Layout(n, n, None, list(zip((ends - chunks).tolist(), ends.tolist(), strict=True)),
                     cu[:-1], lengths)
    if call.mask is None:
        return layout
    mask = np.zeros((1, n), dtype=np.bool_)
    for s0, d0, L in layout.spans():
        mask[0, d0:d0 + L] = call.mask[0, s0:s0 + L]
    return replace(layout, mask=mask)


def _into(x: Any, layout: _Layout, acc: np.dtype) -> Any:
    """``x`` (B, H, S, D) cast into a fresh C-contiguous work buffer (B, H, n, D), zero where no
    real token sits (selected, whatever the padding holds)."""
    B, H, S, D = x.shape
    if layout.src is None:
        buf = np.empty((B, H, layout.n, D), dtype=acc)
        buf[:, :, :S] = x
        buf[:, :, S:] = 0
    else:
        buf = np.zeros((B, H, layout.n, D), dtype=acc)
        for s0, d0, L in layout.spans():
            buf[:, :, d0:d0 + L] = x[:, :, s0:s0 + L]
    if layout.mask is not None:
        np.copyto(buf[:, :, :layout.S], 0, where=~layout.mask[:, None, :, None])
    return buf


def _out_of(work: Any, out: Any, mask: Any, layout: _Layout) -> None:
    """Write the caller's output (B, H, S, D) from a work buffer (B, H, >= layout.S, D); padded
    positions (``mask``, the caller's (B, S)) become +0."""
    if layout.src is None:
        out[...] = work[:, :, :out.shape[2]]
    else:
        for s0, d0, L in layout.spans():
            out[:, :, s0:s0 + L] = work[:, :, d0:d0 + L]
    if mask is not None:
        np.copyto(out, 0, where=~mask[:, None, :, None])


def _normalise(buf: Any, S: int, eps: float) -> Any:
    """Scale rows of ``buf`` in place to unit norm; return ``1/max(|x|, eps)``."""
    rows = buf[:, :, :S]
    norm = np.maximum(np.sqrt(np.einsum("bhsd,bhsd->bhs", rows, rows)), eps)
    rows /= norm[..., None]  # a division, as in docs/spec.md: for D = 1 it gives exactly +-1
    return 1.0 / norm


def _counts(p: Problem, layout: _Layout, count0: Any) -> Any:
    """The token counts ``c`` (B, layout.S) of docs/spec.md, "Forward", step 2."""
    mask = layout.mask
    if layout.src is not None:
        return _packed_counts(p, layout, count0)
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


def _packed_counts(p: Problem, layout: _Layout, count0: Any) -> Any:
    """Counts restarting at every sequence (from its incoming count), (1, n)."""
    if layout.mask is None:
        real = np.zeros(layout.n, dtype=np.bool_)
        for _, d0, L in layout.spans():
            real[d0:d0 + L] = True
    else:
        real = layout.mask[0]
    total = np.concatenate(([0], np.cumsum(real, dtype=np.int64)))  # real tokens before each
    chunks = np.array(layout.segments, dtype=np.int64).reshape(-1, 2)
    before, after = total[chunks[:, 0] * CHUNK], total[chunks[:, 1] * CHUNK]
    segment = np.repeat(np.arange(len(chunks)), (chunks[:, 1] - chunks[:, 0]) * CHUNK)
    if p.causal:
        base = before if count0 is None else before - count0
        return (total[1:] - base[segment])[None]
    return (after - before)[segment][None]


def _sigmoid(m: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-m))


def _weights(m: Any, c: Any) -> Any:
    """``max(1, c) ** -sigmoid(m)`` as (B, H, S) for counts ``c`` (B, S), in the dtype of ``m``."""
    return np.maximum(1, c).astype(m.dtype)[:, None, :] ** (-_sigmoid(m))[None, :, None]


@dataclass
class _Normalised:
    """Normalised, scaled inputs in the work layout, zero where no real token sits
    (B, H, n, D)."""

    qh: Any  # q_i / max(|q_i|, eps)
    kh: Any  # k_j / max(|k_j|, eps)
    vt: Any  # w_j * v_j
    q_inv: Any  # 1 / max(|q_i|, eps), (B, H, layout.S)
    k_inv: Any
    c: Any  # token counts (B, layout.S), int64
    w: Any  # the stabiliser w_j, (B, H, layout.S), or None without m


def _normalised_inputs(call: ForwardCall | BackwardCall, layout: _Layout) -> _Normalised:
    p = call.p
    qh, kh, vt = (_into(x, layout, p.acc) for x in (call.q, call.k, call.v))
    q_inv = _normalise(qh, layout.S, p.eps)
    k_inv = _normalise(kh, layout.S, p.eps)
    c = _counts(p, layout, call.count0)
    w = None if call.m is None else _weights(call.m, c)
    if w is not None:
        vt[:, :, : layout.S] *= w[..., None]
    return _Normalised(qh, kh, vt, q_inv, k_inv, c, w)


def _chunks(x: Any) -> Any:
    """(B, H, N*C, D) -> (B, H, N, C, D), a view."""
    B, H, n, D = x.shape
    return x.reshape(B, H, n // CHUNK, CHUNK, D)


def _lower_scores(a: Any, b: Any) -> Any:
    """Per chunk, ``tril(a b^T)``: entry (i, j) is ``a_i . b_j`` for ``j <= i``, else 0."""
    scores = _chunks(a) @ _chunks(b).swapaxes(-1, -2)  # (B, H, N, C, C)
    scores *= np.tri(CHUNK, dtype=scores.dtype)
    return scores


def _chunk_sums(a: Any, b: Any, layout: _Layout, *, reverse: bool) -> Any:
    """Running sums over the chunks of each segment of ``a^T b``, (B, H, N, Da, Db): entry n
    holds its segment's chunks <= n (chunks >= n with ``reverse``). A loop over chunks, since
    ``np.cumsum`` along a middle axis is several times slower."""
    sums = _chunks(a).swapaxes(-1, -2) @ _chunks(b)
    for c0, c1 in layout.segments:
        if reverse:
            for n in range(c1 - 2, c0 - 1, -1):
                sums[:, :, n] += sums[:, :, n + 1]
        else:
            for n in range(c0 + 1, c1):
                sums[:, :, n] += sums[:, :, n - 1]
    return sums


def _add_other_chunks(out: Any, x: Any, sums: Any, layout: _Layout, *, reverse: bool) -> None:
    """``out[n] += x[n] @ sums[n - 1]`` (``sums[n + 1]`` with ``reverse``) within each segment:
    each chunk meets the chunks strictly before (after) it through their running sum."""
    out, x = _chunks(out), _chunks(x)
    for c0, c1 in layout.segments:
        if c1 - c0 < 2:
            continue
        if reverse:
            out[:, :, c0:c1 - 1] += x[:, :, c0:c1 - 1] @ sums[:, :, c0 + 1:c1]
        else:
            out[:, :, c0 + 1:c1] += x[:, :, c0 + 1:c1] @ sums[:, :, c0:c1 - 1]


def _add_states(out: Any, x: Any, states: Any, layout: _Layout) -> None:
    """``out += x @ states`` with each segment's positions meeting its own state (B or N rows,
    (..., Dx, Dz))."""
    for i in range(len(layout.segments)):
        tokens = layout.tokens(i)
        out[:, :, tokens] += x[:, :, tokens] @ states[layout.rows(i)]


def _unchunk(x: Any) -> Any:
    """(B, H, N, C, D) -> (B, H, N*C, D), a view."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)


def _real_tokens(call: ForwardCall) -> Any:
    """Real tokens of each sequence, (N,) int64."""
    p, mask = call.p, call.mask
    if not call.packed:
        return np.full(p.B, p.S, dtype=np.int64) if mask is None else mask.sum(
            axis=1, dtype=np.int64)
    if mask is None:
        return np.diff(call.cu_seqlens)
    total = np.concatenate(([0], np.cumsum(mask[0], dtype=np.int64)))
    return np.diff(total[call.cu_seqlens])


def _forward_part(call: ForwardCall) -> tuple[Any, Any] | None:
    p, kv0 = call.p, call.kv0
    state = None
    if call.want_state:
        count = np.zeros(call.N, dtype=np.int64) if call.count0 is None else call.count0
        count = count + _real_tokens(call)
        kv = np.zeros((call.N, p.H, p.Dv, p.Dk), p.state_dtype) if kv0 is None else kv0.copy()
        state = kv, count
    if p.S == 0:
        return state
    layout = _layout(call)
    x = _normalised_inputs(call, layout)
    if not p.causal:
        out = np.empty((*x.qh.shape[:3], p.Dv), dtype=p.acc)
        for i in range(len(layout.segments)):
            tokens = layout.tokens(i)
            kv = x.vt[:, :, tokens].swapaxes(-1, -2) @ x.kh[:, :, tokens]  # (B, H, Dv, Dk)
            out[:, :, tokens] = x.qh[:, :, tokens] @ kv.swapaxes(-1, -2)
        _out_of(out, call.o, call.mask, layout)
        return None
    out = _unchunk(_lower_scores(x.qh, x.kh) @ _chunks(x.vt))
    sums = _chunk_sums(x.kh, x.vt, layout, reverse=False)  # sum of k^ v~^T, (B, H, N, Dk, Dv)
    _add_other_chunks(out, x.qh, sums, layout, reverse=False)
    if kv0 is not None:
        _add_states(out, x.qh, kv0.astype(p.acc, copy=False).swapaxes(-1, -2), layout)
    _out_of(out, call.o, call.mask, layout)
    if state is None:
        return None
    kv, count = state
    for i, (c0, c1) in enumerate(layout.segments):
        if c1 > c0:
            kv[layout.rows(i)] += sums[:, :, c1 - 1].swapaxes(-1, -2)
    return kv, count


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _parts(p: Problem) -> list[tuple[slice, slice]]:
    """Cut a call into blocks ``(rows, heads)``: heads of one batch row (or whole batch rows,
    when a row is small), about ``PART_ELEMENTS`` input elements each and at least one per core.

    NumPy's matmul releases the GIL, so each part runs its small BLAS products on its own core,
    on temporaries a fraction of the size of the whole call's. Parts are independent.
    """
    workers = os.cpu_count() or 1
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


def _packed_parts(call: ForwardCall | BackwardCall) -> list[tuple[slice, slice]]:
    """Cut a packed call into blocks ``(sequences, heads)``: runs of whole sequences of about
    ``PART_ELEMENTS`` input elements (or of a core's share, when that is smaller), a run larger
    than that cut into blocks of heads, at least one block per core where the heads allow.
    Each block walks few sequences, so the per-sequence work of the whole call is done once,
    not once per block of heads."""
    p = call.p
    workers = os.cpu_count() or 1
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


def _run(call: ForwardCall | BackwardCall, part: Any) -> list[tuple[tuple[slice, slice], Any]]:
    """``part(block)`` for every block of :func:`_parts` (:func:`_packed_parts`), in parallel
    when there are several; returns each block's ``(rows, heads)`` (``(sequences, heads)``)
    with its result, in a fixed order."""
    global _pool
    blocks = _packed_parts(call) if call.packed else _parts(call.p)
    if len(blocks) == 1:
        return [(blocks[0], part(call))]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="cosattn")
    futures = [_pool.submit(part, call.block(*b)) for b in blocks]
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
    call.kv0[indices[live]] = kv[live]
    call.count0[indices[live]] = count[live]


def backward(call: BackwardCall) -> tuple[Any, Any]:
    results = _run(call, _backward_part)
    if len(results) == 1:
        return results[0][1]
    p = call.p
    dm = None if call.m is None else np.zeros(p.H, dtype=p.acc)
    dkv0 = None if call.kv0 is None else np.empty_like(call.kv0)
    for (rows, heads), (dm_part, dkv0_part) in results:  # in order: fixed sums
        if dm is not None:
            dm[heads] += dm_part
        if dkv0 is not None:
            dkv0[rows, heads] = dkv0_part
    return dm, dkv0


def _normalise_backward(dxh: Any, xh: Any, inv: Any, eps: float) -> Any:
    """``(dxh - xh (xh . dxh)) / |x|`` where ``|x| > eps``, else ``dxh / eps`` (in place)."""
    inner = np.einsum("bhsd,bhsd->bhs", xh, dxh)
    inner *= inv < 1.0 / eps
    dxh -= xh * inner[..., None]
    dxh *= inv[..., None]
    return dxh


def _backward_part(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, dkv = call.p, call.kv0, call.dkv
    if p.S == 0:
        dm = None if call.m is None else np.zeros(p.H, dtype=p.acc)
        if kv0 is None:
            return dm, None
        return dm, np.zeros_like(kv0) if dkv is None else dkv.astype(kv0.dtype)
    layout = _layout(call)
    S = layout.S
    x = _normalised_inputs(call, layout)
    dof = _into(call.do, layout, p.acc)
    if p.causal:
        # Three causal products of the forward's shape share two score matrices and one sum:
        # dq^ meets earlier tokens through (do . v~), dk^ later ones through the same scores
        # transposed, and dv~ later ones through (q^' . k^), the forward's scores transposed.
        dov = _lower_scores(dof, x.vt)  # (i, j): do_i . v~_j
        dqh = _unchunk(dov @ _chunks(x.kh))
        _add_other_chunks(dqh, dof, _chunk_sums(x.vt, x.kh, layout, reverse=False), layout,
                          reverse=False)
        dkh = _unchunk(dov.swapaxes(-1, -2) @ _chunks(x.qh))
        del dov
        later = _chunk_sums(dof, x.qh, layout, reverse=True)  # sum over later tokens of do q^'^T
        _add_other_chunks(dkh, x.vt, later, layout, reverse=True)
        dvt = _unchunk(_lower_scores(x.qh, x.kh).swapaxes(-1, -2) @ _chunks(dof))
        _add_other_chunks(dvt, x.kh, later.swapaxes(-1, -2), layout, reverse=True)
        dkv0 = np.zeros((call.N, p.H, p.Dv, p.Dk), dtype=p.acc)
        for i, (c0, c1) in enumerate(layout.segments):
            if c1 > c0:
                dkv0[layout.rows(i)] = later[:, :, c0]
        if kv0 is not None:
            _add_states(dqh, dof, kv0.astype(p.acc, copy=False), layout)
        if dkv is not None:
            dkv_acc = dkv.astype(p.acc, copy=False)
            _add_states(dkh, x.vt, dkv_acc, layout)
            _add_states(dvt, x.kh, dkv_acc.swapaxes(-1, -2), layout)
            dkv0 += dkv_acc
    else:
        dqh, dkh, dvt = (np.empty((*x.qh.shape[:3], D), dtype=p.acc)
                         for D in (p.Dk, p.Dk, p.Dv))
        for i in range(len(layout.segments)):
            t = layout.tokens(i)
            kv = x.vt[:, :, t].swapaxes(-1, -2) @ x.kh[:, :, t]  # (B, H, Dv, Dk)
            g = dof[:, :, t].swapaxes(-1, -2) @ x.qh[:, :, t]  # sum_i do_i q'_i^T
            dqh[:, :, t] = dof[:, :, t] @ kv
            dkh[:, :, t] = x.vt[:, :, t] @ g
            dvt[:, :, t] = x.kh[:, :, t] @ g.swapaxes(-1, -2)
        dkv0 = None
    # Padded rows of q^, k^, v~ and do are zero, so dq^, dk^ and dv~ are zero there too.
    dqh, dkh, dvt = dqh[:, :, :S], dkh[:, :, :S], dvt[:, :, :S]
    _out_of(_normalise_backward(dqh, x.qh[:, :, :S], x.q_inv, p.eps), call.dq, call.mask, layout)
    _out_of(_normalise_backward(dkh, x.kh[:, :, :S], x.k_inv, p.eps), call.dk, call.mask, layout)
    dm = None
    if call.m is not None:
        sig = _sigmoid(call.m)
        per = np.einsum("bhsd,bhsd->bhs", dvt, x.vt[:, :, :S])
        per *= -np.log(np.maximum(1, x.c).astype(p.acc))[:, None, :]
        dm = per.sum(axis=(0, 2)) * sig * (1.0 - sig)
        dvt *= x.w[..., None]
    _out_of(dvt, call.dv, call.mask, layout)
    if kv0 is None:
        return dm, None
    return dm, dkv0.astype(kv0.dtype)


def step(call: StepCall) -> None:
    """One fused pass over the state (:func:`._cpu_kernels.step`), in place on the slots a
    pool's step names (no copies of them); a padded row's state is not written at all, so it
    keeps its bits (docs/spec.md, "Bad input")."""
    kv, acc = call.kv, call.kv.dtype
    q, k, v = (np.ascontiguousarray(x, dtype=acc) for x in (call.q, call.k, call.v))
    sig = _NONE if call.m is None else _sigmoid(call.m.astype(acc))
    mask = _NO_MASK if call.mask is None else np.ascontiguousarray(call.mask)
    slots = _NO_SLOTS if call.state_indices is None else call.state_indices
    initial = _NO_MASK if call.has_initial is None else np.ascontiguousarray(call.has_initial)
    direct = call.o.dtype == acc and call.o.flags.c_contiguous
    o = call.o if direct else np.empty(call.o.shape, acc)
    _cpu_kernels.step(kv, call.count, q, k, v, sig, mask, slots, initial, o, call.p.eps)
    if not direct:
        call.o[...] = o


_NONE = np.empty(0, np.float32)  # no stabiliser
_NO_MASK = np.empty(0, np.bool_)  # every row real; every row from its state
_NO_SLOTS = np.empty(0, np.int64)  # row b is state b
