"""The ``numba.cuda`` kernels of the numba backend: described by a :class:`Kernel`, built on
first use.

A :class:`Kernel` is a Python function and the one signature it is built for, every array typed
with layout "A" (strided and contiguous arrays share one build, so a call compiles at most one
kernel per operation and dtype). Building compiles it for the current device; the description
alone is what the PTX tests compile for sm_80 and sm_90. Everything the backend runs is one of
these:

- the *sweep*: the chunked algorithm of docs/design.md as one primitive. For one sequence (a
  batch row, or a ``cu_seqlens`` span of a packed row), one head and a tile of ``TZ`` output
  columns, a thread block walks the chunks in order (or in reverse)
  keeping its slice of the state ``St`` (TZ x Dx, accumulation dtype) in shared memory, and
  computes::

      out_i = St_0 · x_i + Σ_{j ≤ i} (x_i · y_j) z_j     (j ≥ i in reverse, every j when ALL)
      St    = St_0 + Σ_j z_j y_jᵀ

  except that ALL with a given St_0 takes it as the whole sum (``out_i = St_0 · x_i``, a part
  of a sequence whose sum is known), and that a ``state_only`` sweep forms St alone, without
  ``out`` (:func:`cosattn.absorb`).

  where each operand is an input array times a per-token scale computed in the kernel (cosine
  normalisation, stabiliser ``w``). The forward is one sweep (x=q̂', y=k̂, z=ṽ); the
  backward is three (dq̂, dk̂ and dṽ, see ``_numba.py``), the last one also reducing ``dm``.
- ``normalise_backward``: ``(g - x̂ (x̂·g)) / |x|`` per row, for dq and dk;
- ``step``: the recurrent step for every (b, h), the state updated in place;
- ``count_total`` / ``count_step`` and ``dm_finish``: the small reductions around them.

Padding holds anything (docs/spec.md, "Bad input"): a padded token's row of an input is never
read, whatever it holds (NaN, Inf, uninitialised memory). The sweep selects zero for it in
every operand (never a multiplication by 0: NaN · 0 is NaN, and 0 times a negative is -0) and
writes +0 at padded positions of its output; ``normalise_backward`` reads the mask too and
writes +0 there without reading ``x``. The step reads nothing of a padded token and skips its
writes to the state, so ``kv`` keeps its bits.

Reductions go through shared memory (no warp shuffles, so the Numba simulator runs the same
code) and always in a fixed order (no atomics): results are deterministic. bfloat16 arrays
arrive as their uint16 bits and are converted in the kernels; float16 and bfloat16 accumulate in
float32, float64 in float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import cuda

from .._dtypes import BFLOAT16, accumulation
from . import ceil_div

# Operand and output scales: what a real token's row is multiplied by (1, 1 / |row|, w).
RAW, NORM, VALUE = range(3)
# A padded token's row is zero in every operand and output, so the mask needs no scale of its
# own (q̂' of docs/spec.md is q̂ here).
# Which positions j a sweep's output i sums over.
FORWARD, REVERSE, ALL = range(3)

STEP_ROWS = 32  # rows of the state one block of the step kernel updates
ROWS = 32  # rows one block of the normalisation epilogue handles
SHARED_BYTES = 48 * 1024  # shared memory a block may use without opting in
# dtype objects (not scalar types) for shared and local arrays: the simulator needs them
_U32, _F32, _I64 = np.dtype(np.uint32), np.dtype(np.float32), np.dtype(np.int64)
_BOOL = np.dtype(np.bool_)


def bits(dtype: np.dtype) -> np.dtype:
    """The dtype kernels see for an input dtype: bfloat16 arrays arrive as their uint16 bits."""
    return np.dtype(np.uint16) if dtype == BFLOAT16 else dtype


@cuda.jit(device=True)
def _sigmoid(x: Any, one: Any) -> Any:
    """``1 / (1 + e^-x)`` in the type of ``one`` (the accumulation dtype's 1)."""
    return one / (one + math.exp(-x))


def _array(dtype: Any, ndim: int) -> Any:
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "A")


def _scalar(dtype: Any) -> Any:
    return numba.from_dtype(np.dtype(dtype))


_FLAG = numba.types.boolean


@dataclass(frozen=True)
class Kernel:
    """A kernel described, not built: its Python function and the argument types it takes."""

    function: Any
    signature: tuple[Any, ...]

    def build(self) -> Any:
        """The compiled kernel (compiled once, for the current device, on first use)."""
        return _build(self)


@functools.cache
def _build(kernel: Kernel) -> Any:
    return cuda.jit(kernel.signature)(kernel.function)


@cuda.jit(device=True)
def _bits_to_f32(bits: Any) -> Any:
    """The float32 value of bfloat16 bits (uint16)."""
    word = cuda.local.array(1, _U32)
    word[0] = np.uint32(bits) << np.uint32(16)
    return word.view(np.float32)[0]


@cuda.jit(device=True)
def _f32_to_bits(value: Any) -> Any:
    """bfloat16 bits of a float32 value, rounded to nearest even (NaN stays NaN)."""
    word = cuda.local.array(1, _F32)
    word[0] = value
    u = np.int64(word.view(np.uint32)[0])
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 0x40)
    return np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)


def _converters(acc: type, bf16: bool) -> tuple[Any, Any]:
    """Device functions ``load(a, idx) -> acc`` and ``store(a, idx, value)`` for input arrays."""
    if bf16:

        @cuda.jit(device=True)
        def load(a: Any, idx: Any) -> Any:
            return _bits_to_f32(a[idx])

        @cuda.jit(device=True)
        def store(a: Any, idx: Any, value: Any) -> None:
            a[idx] = _f32_to_bits(value)

    else:

        @cuda.jit(device=True)
        def load(a: Any, idx: Any) -> Any:
            return acc(a[idx])

        @cuda.jit(device=True)
        def store(a: Any, idx: Any, value: Any) -> None:
            a[idx] = value

    return load, store


def _lane_sums_fn(lanes: int) -> Any:
    """``lane_sums(red, tid)``: in every row of ``red`` (n x threads), each run of ``lanes``
    consecutive entries is summed into its first entry, by a tree in a fixed order."""

    @cuda.jit(device=True)
    def lane_sums(red: Any, tid: Any) -> None:
        lane = tid % lanes
        cuda.syncthreads()
        stride = lanes // 2
        while stride > 0:
            if lane < stride:
                for a in range(red.shape[0]):
                    red[a, tid] += red[a, tid + stride]
            cuda.syncthreads()
            stride //= 2

    return lane_sums


def _block_sum_fn(threads: int) -> Any:
    """``block_sum(red, tid)``: the sum of ``red[0, :threads]``, returned to every thread."""
    lane_sums = _lane_sums_fn(threads)

    @cuda.jit(device=True)
    def block_sum(red: Any, tid: Any) -> Any:
        lane_sums(red, tid)
        total = red[0, 0]
        cuda.syncthreads()
        return total

    return block_sum


def tiles(acc: np.dtype, Dx: int, Dz: int, C: int, NT: int) -> tuple[int, int]:
    """``(TD, TZ)``: the Dx tile of the score products and the output columns of one block.

    ``TZ`` is the widest power of two (at most 32, or 16 in float64) not above what ``Dz`` needs
    whose state slice (TZ x Dx) fits beside the static shared arrays of a block of ``NT``
    threads and chunks of ``C`` tokens.
    """
    size = np.dtype(acc).itemsize
    TD = 32 if size == 4 else 16
    TZ = min(32 if size == 4 else 16, 1 << max(Dz - 1, 0).bit_length())
    while TZ > 1 and size * (_static_elements(C, NT, TD, TZ) + TZ * Dx) > SHARED_BYTES:
        TZ //= 2
    if size * (_static_elements(C, NT, TD, TZ) + TZ * Dx) > SHARED_BYTES:
        most = SHARED_BYTES // size - _static_elements(C, NT, TD, 1)
        raise ValueError(
            f"head size {Dx} is too large for the numba backend's shared-memory state "
            f"(at most {most} in {np.dtype(acc)})"
        )
    return TD, TZ


def _static_elements(C: int, NT: int, TD: int, TZ: int) -> int:
    """Accumulation-dtype elements of a sweep block's static shared arrays (the int64 ones
    counted twice, enough for float32; the bool one as one each)."""
    return 2 * C * TD + C * TZ + C * C + 6 * C + 2 * C + NT + 2 * NT


@dataclass(frozen=True)
class SweepSpec:
    """One instance of the sweep kernel.

    ``direction`` is FORWARD, REVERSE or ALL; ``x``, ``y``, ``z`` the scales of the operands
    and ``out`` the output's (RAW, NORM or VALUE, at real tokens: padded ones are zero);
    ``out_acc`` whether the output is an accumulation-dtype scratch array (else it has the
    input dtype);
    ``dm`` whether the block also reduces its share of the stabiliser gradient (when the call
    has ``m``); ``dtype`` the
    input dtype; ``C`` the chunk length, ``NT`` the threads of a block (a power of two, at
    least ``C``); ``TD``, ``TZ`` the tiles of :func:`tiles`; ``state_only`` whether the sweep
    forms the state alone (no ``out``; ``x`` is not read).
    """

    direction: int
    x: int
    y: int
    z: int
    out: int
    out_acc: bool
    dm: bool
    dtype: np.dtype
    C: int
    NT: int
    TD: int
    TZ: int
    state_only: bool = False

    @property
    def acc(self) -> np.dtype:
        return accumulation(self.dtype)

    def shared_bytes(self, Dx: int) -> int:
        """Dynamic shared memory of one block: the state slice TZ x Dx."""
        return self.acc.itemsize * self.TZ * Dx


@functools.cache
def sweep(spec: SweepSpec, s0: np.dtype, s_out: np.dtype) -> Kernel:
    """The sweep kernel for ``spec`` (see the module docstring), with states of dtype ``s0``
    (incoming) and ``s_out`` (outgoing).

    Arguments: ``x, y`` (B, H, S, Dx) and ``z`` (B, H, S, Dz) in the input dtype; ``out``
    (B, H, S, Dz) in acc or the input dtype (``spec.out_acc``); ``s0``, ``s_out``
    (N, H, Dz, Dx) or dummies; ``mask`` (B, S) bool, ``m`` (H,) in acc, ``count0`` (N,) int64
    (causal: the incoming count; ALL: every token's count, the whole sequence's),
    ``v`` (B, H, S, Dz) the values for ``dm``, ``dm_part`` (N, H, tiles) in acc, or dummies;
    ``offsets`` (N+1,) int64 (``cu_seqlens``), ``slots`` (N,) int64 and ``initial`` (N,) bool, or
    dummies; the flags ``has_s0, has_s_out, has_mask, has_m, has_count0, packed, pooled,
    has_initial``; ``eps`` in acc. Grid ``(ceil(Dz / TZ), H, N)``, ``NT`` threads,
    :meth:`SweepSpec.shared_bytes` of dynamic shared memory.

    Block (tile, h, n) walks sequence n: batch row n, or, ``packed``, the positions
    ``offsets[n] .. offsets[n+1]-1`` of row 0 (clamped into 0..S, so that unchecked offsets
    never reach outside the arrays). Its states are row n of ``s0``, ``s_out`` and ``count0``,
    or, ``pooled``, row ``slots[n]`` of those pool arrays (the incoming state zero where
    ``initial[n]`` is False); a slot outside the pool (-1: a padding entry) makes a block that
    writes zeros to its outputs and returns. (``total=`` and ``state_only`` sweeps are never
    packed nor pooled: the validation refuses ``total=`` with ``cu_seqlens``.)
    """
    io, acc = bits(spec.dtype), spec.acc
    signature = ((_array(io, 4),) * 3
                 + (_array(acc if spec.out_acc else io, 4), _array(s0, 4), _array(s_out, 4),
                    _array(np.bool_, 2), _array(acc, 1), _array(np.int64, 1), _array(io, 4),
                    _array(acc, 3), _array(np.int64, 1), _array(np.int64, 1),
                    _array(np.bool_, 1))
                 + (_FLAG,) * 8 + (_scalar(acc),))
    return Kernel(_sweep_function(spec), signature)


def _sweep_function(spec: SweepSpec) -> Any:
    dt = spec.acc
    acc = dt.type
    C, NT, TD, TZ = spec.C, spec.NT, spec.TD, spec.TZ
    NA, NO = ceil_div(C * C, NT), ceil_div(C * TZ, NT)
    C_TD, C_TZ, C_C = C * TD, C * TZ, C * C  # array sizes must be constants, not expressions
    X_SCALE, Y_SCALE, Z_SCALE, OUT_SCALE = spec.x, spec.y, spec.z, spec.out
    FWD, REV, BOTH = (spec.direction == d for d in (FORWARD, REVERSE, ALL))
    OUT_ACC, DM, STATE_ONLY = spec.out_acc, spec.dm, spec.state_only
    PASSES = 1 if STATE_ONLY or not BOTH else 2
    load, store = _converters(acc, spec.dtype == BFLOAT16)
    block_sum = _block_sum_fn(NT)

    @cuda.jit(device=True)
    def scale(kind: Any, a: Any, b: Any, h: Any, s: Any, w: Any, eps: Any) -> Any:
        if kind == RAW:
            return acc(1)
        if kind == VALUE:
            return w
        total = acc(0)
        for d in range(a.shape[3]):
            e = load(a, (b, h, s, d))
            total += e * e
        return acc(1) / max(math.sqrt(total), eps)

    def sweep(x: Any, y: Any, z: Any, out: Any, s0: Any, s_out: Any, mask: Any, m: Any,
              count0: Any, v: Any, dm_part: Any, offsets: Any, slots: Any, initial: Any,
              has_s0: Any, has_s_out: Any, has_mask: Any, has_m: Any, has_count0: Any,
              packed: Any, pooled: Any, has_initial: Any, eps: Any) -> None:
        tid = cuda.threadIdx.x
        zt, h, n = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        Dx, Dz = x.shape[3], z.shape[3]
        z0 = zt * TZ
        tz = min(TZ, Dz - z0)
        b, start, S = np.int64(n), np.int64(0), np.int64(x.shape[2])  # x's row and positions
        if packed:
            start = min(max(offsets[n], np.int64(0)), S)
            S = min(max(offsets[n + 1], start), S) - start
            b = np.int64(0)
        slot = np.int64(n)  # the row of the states
        from_state = True
        if pooled:
            slot = slots[n]
            if slot < 0 or slot >= count0.shape[0]:  # a padding entry: zeros, no slot
                for e in range(tid, S * tz, NT):
                    s = e // tz
                    if OUT_ACC:
                        out[b, h, start + s, z0 + e - s * tz] = acc(0)
                    else:
                        store(out, (b, h, start + s, z0 + e - s * tz), acc(0))
                if DM and has_m and tid == 0:
                    dm_part[n, h, zt] = acc(0)
                return
            from_state = not has_initial or initial[n]
        st = cuda.shared.array(0, dt)  # the state slice, TZ x Dx
        xt = cuda.shared.array(C_TD, dt)
        yt = cuda.shared.array(C_TD, dt)
        zs = cuda.shared.array(C_TZ, dt)
        at = cuda.shared.array(C_C, dt)
        sx = cuda.shared.array(C, dt)
        sy = cuda.shared.array(C, dt)
        sz = cuda.shared.array(C, dt)
        so = cuda.shared.array(C, dt)
        lc = cuda.shared.array(C, dt)  # -ln max(1, c)
        real = cuda.shared.array(C, _BOOL)  # the scales above are set where this is True
        cnt = cuda.shared.array(C, _I64)
        red = cuda.shared.array((1, NT), _I64)
        redf = cuda.shared.array((1, NT), dt)
        acc_a = cuda.local.array(NA, dt)
        acc_o = cuda.local.array(NO, dt)

        for e in range(tid, TZ * Dx, NT):
            t = e // Dx
            st[e] = (acc(s0[slot, h, z0 + t, e - t * Dx]) if has_s0 and from_state and t < tz
                     else acc(0))
        total = np.int64(S)
        if has_mask and not FWD:
            part = np.int64(0)
            for s in range(tid, S, NT):
                if mask[b, start + s]:
                    part += 1
            red[0, tid] = part
            total = block_sum(red, tid)
        n0 = count0[slot] if has_count0 and from_state else np.int64(0)
        sig = _sigmoid(m[h], acc(1)) if has_m else acc(0)
        if BOTH and has_count0:
            total = n0
        nchunks = (S + C - 1) // C
        dm_acc = acc(0)
        # ALL given St_0: the whole sum is known, skip the pass that would form it
        for npass in range(1 if BOTH and has_s0 and not STATE_ONLY else 0, PASSES):
            update = STATE_ONLY or not BOTH or npass == 0
            emit = not STATE_ONLY and (not BOTH or npass == 1)
            running = n0 + total if REV else n0
            for chunk in range(nchunks):
                base = (nchunks - 1 - chunk) * C if REV else chunk * C
                if tid == 0:
                    if REV:
                        for r in range(min(C, S - base)):
                            if not has_mask or mask[b, start + base + r]:
                                running -= 1
                    c = total if BOTH else running
                    for r in range(C):
                        if not BOTH and base + r < S and (not has_mask
                                                          or mask[b, start + base + r]):
                            c += 1
                        cnt[r] = c
                    if FWD:
                        running = c
                cuda.syncthreads()
                if tid < C:
                    s = base + tid
                    p = start + s
                    real[tid] = s < S and (not has_mask or mask[b, p])
                    if real[tid]:
                        count = acc(max(np.int64(1), cnt[tid]))
                        w = math.pow(count, -sig) if has_m else acc(1)
                        if not STATE_ONLY:
                            sx[tid] = scale(X_SCALE, x, b, h, p, w, eps)
                        sy[tid] = scale(Y_SCALE, y, b, h, p, w, eps)
                        sz[tid] = scale(Z_SCALE, z, b, h, p, w, eps)
                        so[tid] = scale(OUT_SCALE, z, b, h, p, w, eps)
                        lc[tid] = -math.log(count)
                cuda.syncthreads()
                if update:
                    for e in range(tid, C * TZ, NT):
                        r = e // TZ
                        t = e - r * TZ
                        inside = real[r] and t < tz
                        zs[e] = (load(z, (b, h, start + base + r, z0 + t)) * sz[r] if inside
                                 else acc(0))
                for k in range(NA):
                    acc_a[k] = acc(0)
                for k in range(NO):
                    acc_o[k] = acc(0)
                for d0 in range(0, Dx, TD):
                    td = min(TD, Dx - d0)
                    for e in range(tid, C * TD, NT):
                        r = e // TD
                        dd = e - r * TD
                        inside = real[r] and dd < td
                        p = start + base + r
                        if emit:
                            xt[e] = load(x, (b, h, p, d0 + dd)) * sx[r] if inside else acc(0)
                        if not BOTH or update:
                            yt[e] = load(y, (b, h, p, d0 + dd)) * sy[r] if inside else acc(0)
                    cuda.syncthreads()
                    if emit:
                        for k in range(NO):
                            e = tid + k * NT
                            if e < C * TZ:
                                i = e // TZ
                                row = (e - i * TZ) * Dx + d0
                                part_o = acc(0)
                                for dd in range(td):
                                    part_o += st[row + dd] * xt[i * TD + dd]
                                acc_o[k] += part_o
                    if emit and not BOTH:
                        for k in range(NA):
                            e = tid + k * NT
                            if e < C * C:
                                i = e // C
                                j = e - i * C
                                if (FWD and j <= i) or (REV and j >= i):
                                    part_a = acc(0)
                                    for dd in range(td):
                                        part_a += xt[i * TD + dd] * yt[j * TD + dd]
                                    acc_a[k] += part_a
                    cuda.syncthreads()
                    if update:
                        for e in range(tid, TZ * TD, NT):
                            t = e // TD
                            dd = e - t * TD
                            if dd < td:
                                part_s = acc(0)
                                for j in range(C):
                                    part_s += zs[j * TZ + t] * yt[j * TD + dd]
                                st[t * Dx + d0 + dd] += part_s
                    cuda.syncthreads()
                if emit:
                    if not BOTH:
                        for k in range(NA):
                            e = tid + k * NT
                            if e < C * C:
                                at[e] = acc_a[k]
                        cuda.syncthreads()
                    for k in range(NO):
                        e = tid + k * NT
                        if e < C * TZ:
                            i = e // TZ
                            t = e - i * TZ
                            value = acc_o[k]
                            if not BOTH:
                                for j in range(C):
                                    value += at[i * C + j] * zs[j * TZ + t]
                            p = start + base + i
                            if base + i < S and t < tz:
                                if real[i]:
                                    value = value * so[i]
                                    if DM and has_m:
                                        dm_acc += value * load(v, (b, h, p, z0 + t)) * lc[i]
                                else:
                                    value = acc(0)
                                if OUT_ACC:
                                    out[b, h, p, z0 + t] = value
                                else:
                                    store(out, (b, h, p, z0 + t), value)
                cuda.syncthreads()
        written = has_s_out
        if written and pooled and from_state:
            # A sequence with no real token leaves its slot bit for bit (docs/spec.md, "State
            # pools"): its zero products would turn -0.0 into +0.0, and a float64 slot would
            # pass through the state's dtype.
            part = np.int64(0)
            for s in range(tid, S, NT):
                if not has_mask or mask[b, start + s]:
                    part += 1
            red[0, tid] = part
            written = block_sum(red, tid) > 0
        if written:
            for e in range(tid, tz * Dx, NT):
                t = e // Dx
                s_out[slot, h, z0 + t, e - t * Dx] = st[e]
        if DM and has_m:
            redf[0, tid] = dm_acc
            dm_total = block_sum(redf, tid)
            if tid == 0:
                dm_part[n, h, zt] = dm_total

    return sweep


@functools.cache
def normalise_backward(dtype: np.dtype, threads: int, lanes: int) -> Kernel:
    """``out_i = (g_i - x̂_i (x̂_i · g_i)) / |x_i|`` where ``|x_i| > eps``, else ``g_i / eps``;
    +0 where token i is padding (``has_mask`` and not ``mask[b, i]``), and then ``x_i`` is not
    read.

    ``g`` (B, H, S, D) in acc, as the sweep wrote it; ``x`` and ``out`` (B, H, S, D) in the
    input dtype ``dtype``, ``mask`` (B, S) bool, ``eps`` in acc. Grid ``(ceil(S / ROWS), H,
    B)``, ``threads`` threads: ``lanes`` of them share a row.
    """
    dt = accumulation(dtype)
    acc = dt.type
    load, store = _converters(acc, dtype == BFLOAT16)
    lane_sums = _lane_sums_fn(lanes)
    rows = threads // lanes

    def normalise_backward(g: Any, x: Any, out: Any, mask: Any, has_mask: Any,
                           eps: Any) -> None:
        tid = cuda.threadIdx.x
        lane = tid % lanes
        first = tid - lane
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        S, D = x.shape[2], x.shape[3]
        red = cuda.shared.array((1, threads), dt)
        s0 = cuda.blockIdx.x * ROWS
        for r0 in range(0, min(ROWS, S - s0), rows):  # the same count for the whole block
            s = s0 + r0 + tid // lanes
            real = s < S and (not has_mask or mask[b, s])
            part = acc(0)
            if real:
                for d in range(lane, D, lanes):
                    e = load(x, (b, h, s, d))
                    part += e * e
            red[0, tid] = part
            lane_sums(red, tid)
            norm = math.sqrt(red[0, first])
            den = max(norm, eps)
            # x̂ by division, so that D = 1 gives x̂ = ±1 and the (zero) gradient exactly
            part = acc(0)
            if real:
                for d in range(lane, D, lanes):
                    part += load(x, (b, h, s, d)) / den * g[b, h, s, d]
            cuda.syncthreads()
            red[0, tid] = part
            lane_sums(red, tid)
            inner = red[0, first] if norm > eps else acc(0)  # x̂·g
            if real:
                for d in range(lane, D, lanes):
                    value = g[b, h, s, d] - load(x, (b, h, s, d)) / den * inner
                    store(out, (b, h, s, d), value / den)
            elif s < S:
                for d in range(lane, D, lanes):
                    store(out, (b, h, s, d), acc(0))
            cuda.syncthreads()

    io = bits(dtype)
    return Kernel(normalise_backward, (_array(dt, 4), _array(io, 4), _array(io, 4),
                                       _array(_BOOL, 2), _FLAG, _scalar(dt)))


@functools.cache
def step(state: np.dtype, dtype: np.dtype, threads: int, lanes: int) -> Kernel:
    """One recurrent step for every (b, h): ``kv += w v k̂ᵀ``, ``o = kv q̂`` where the token is
    real; where it is padding, ``o`` is +0 and ``kv`` is not written (it keeps its bits).

    ``kv`` (P, H, Dv, Dk) in ``state`` (float32 or float64, the dtype it accumulates in),
    ``count`` (P,) int64 the counts *before* the step, ``q, k`` (B, H, Dk), ``v`` and ``o``
    (B, H, Dv) in the input dtype ``dtype``, ``m`` (H,) in its accumulation dtype, ``mask``
    (B,), ``slots`` (B,) int64, ``initial`` (B,) bool, or dummies; the flags ``has_m,
    has_mask, pooled, has_initial``; ``eps`` in ``state``. Row b steps state b, or, ``pooled``,
    state ``slots[b]`` (none when that is outside the pool: a -1 entry, whose output is +0), from
    a zero state where ``initial[b]`` is False (the state then receives the step's outgoing
    state, zeros for a padded row). Grid ``(ceil(Dv / STEP_ROWS), H, B)``, ``threads`` threads
    (``lanes`` of them share a row of the state), dynamic shared memory ``2 Dk`` elements of
    ``state``. The counts are advanced afterwards by :data:`COUNT_STEP`.
    """
    dt = state
    acc = dt.type
    load, store = _converters(acc, dtype == BFLOAT16)
    block_sums = _lane_sums_fn(threads)
    lane_sums = _lane_sums_fn(lanes)
    rows = threads // lanes

    def step(kv: Any, count: Any, q: Any, k: Any, v: Any, o: Any, m: Any, mask: Any,
             slots: Any, initial: Any, has_m: Any, has_mask: Any, pooled: Any,
             has_initial: Any, eps: Any) -> None:
        tid = cuda.threadIdx.x
        lane = tid % lanes
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        Dk, Dv = q.shape[2], v.shape[2]
        row0 = cuda.blockIdx.x * STEP_ROWS
        slot = slots[b] if pooled else np.int64(b)
        if slot < 0 or slot >= kv.shape[0]:  # a padding entry: zeros, no state
            for t in range(row0 + tid, min(row0 + STEP_ROWS, Dv), threads):
                store(o, (b, h, t), acc(0))
            return
        from_state = not has_initial or initial[b]
        vectors = cuda.shared.array(0, dt)  # q̂ then k̂, 2 x Dk
        norms = cuda.shared.array((2, threads), dt)  # q·q and k·k
        red = cuda.shared.array((1, threads), dt)
        real = not has_mask or mask[b]  # the same for the whole block
        qq = acc(0)
        kk = acc(0)
        if real:  # a padded token's q, k and v are not read, and kv is not written
            for d in range(tid, Dk, threads):
                qd = load(q, (b, h, d))
                kd = load(k, (b, h, d))
                vectors[d] = qd
                vectors[Dk + d] = kd
                qq += qd * qd
                kk += kd * kd
        norms[0, tid] = qq
        norms[1, tid] = kk
        block_sums(norms, tid)
        q_den = max(math.sqrt(norms[0, 0]), eps)
        k_den = max(math.sqrt(norms[1, 0]), eps)
        if real:
            for d in range(tid, Dk, threads):
                vectors[d] = vectors[d] / q_den
                vectors[Dk + d] = vectors[Dk + d] / k_den
        w = acc(1)
        if has_m:
            before = count[slot] if from_state else np.int64(0)
            w = math.pow(acc(max(np.int64(1), before + 1)), -_sigmoid(m[h], acc(1)))
        cuda.syncthreads()
        for r0 in range(0, min(STEP_ROWS, Dv - row0), rows):  # the same for the whole block
            t = row0 + r0 + tid // lanes
            part = acc(0)
            if real and t < Dv:
                vt = w * load(v, (b, h, t))
                for d in range(lane, Dk, lanes):
                    old = acc(kv[slot, h, t, d]) if from_state else acc(0)
                    kv_td = old + vt * vectors[Dk + d]
                    kv[slot, h, t, d] = kv_td
                    part += kv_td * vectors[d]
            elif not from_state and t < Dv:
                for d in range(lane, Dk, lanes):
                    kv[slot, h, t, d] = acc(0)
            red[0, tid] = part
            lane_sums(red, tid)
            if lane == 0 and t < Dv:
                store(o, (b, h, t), red[0, tid])
            cuda.syncthreads()

    io = bits(dtype)
    return Kernel(step, (_array(dt, 4), _array(np.int64, 1), *(_array(io, 3),) * 4,
                         _array(accumulation(dtype), 1), _array(np.bool_, 1),
                         _array(np.int64, 1), _array(np.bool_, 1), *(_FLAG,) * 4,
                         _scalar(dt)))


@functools.cache
def count_total(threads: int) -> Kernel:
    """``out[n] = count0[n] + Σ_s mask[b, s]`` (or ``+`` the length) over sequence n; grid N,
    ``threads`` threads.

    Arguments ``count0, mask, out, S, offsets, slots, initial, has_count0, has_mask, packed,
    pooled, has_initial``; sequences, slots and ``initial`` as for :func:`sweep` (with
    ``pooled``, ``count0`` and ``out`` are the pool's counts, and a -1 entry writes nothing).
    """
    block_sum = _block_sum_fn(threads)

    def count_total(count0: Any, mask: Any, out: Any, S: Any, offsets: Any, slots: Any,
                    initial: Any, has_count0: Any, has_mask: Any, packed: Any, pooled: Any,
                    has_initial: Any) -> None:
        tid = cuda.threadIdx.x
        n = cuda.blockIdx.x
        b, start, length = np.int64(n), np.int64(0), S
        if packed:
            start = min(max(offsets[n], np.int64(0)), S)
            length = min(max(offsets[n + 1], start), S) - start
            b = np.int64(0)
        slot = np.int64(n)
        from_state = True
        if pooled:
            slot = slots[n]
            if slot < 0 or slot >= out.shape[0]:
                return
            from_state = not has_initial or initial[n]
        red = cuda.shared.array((1, threads), _I64)
        part = np.int64(0)
        if has_mask:
            for s in range(tid, length, threads):
                if mask[b, start + s]:
                    part += 1
        elif tid == 0:
            part = length
        red[0, tid] = part
        total = block_sum(red, tid)
        if tid == 0:
            out[slot] = total + (count0[slot] if has_count0 and from_state else np.int64(0))

    return Kernel(count_total, (_array(np.int64, 1), _array(np.bool_, 2), _array(np.int64, 1),
                                numba.types.int64, _array(np.int64, 1), _array(np.int64, 1),
                                _array(np.bool_, 1), *(_FLAG,) * 5))


def _count_step(count: Any, mask: Any, slots: Any, initial: Any, has_mask: Any, pooled: Any,
                has_initial: Any) -> None:
    b = cuda.grid(1)
    if b < (slots.shape[0] if pooled else count.shape[0]):
        slot = slots[b] if pooled else np.int64(b)
        if 0 <= slot < count.shape[0]:
            real = not has_mask or mask[b]
            if has_initial and not initial[b]:
                count[slot] = np.int64(1) if real else np.int64(0)
            elif real:
                count[slot] += 1


COUNT_STEP = Kernel(_count_step, (_array(np.int64, 1), _array(np.bool_, 1),
                                  _array(np.int64, 1), _array(np.bool_, 1), *(_FLAG,) * 3))
"""``count[slot] += mask[b]`` (or 1; from 0 where ``initial[b]`` is False), after
:func:`step`, with the rows, slots and flags of :func:`step`; one thread per row b."""


@functools.cache
def dm_finish(dt: np.dtype) -> Kernel:
    """``dm[h] = σ(m_h)(1 - σ(m_h)) Σ_b Σ_tile parts[b, h, tile]``, summed in a fixed order.

    ``parts`` (B, H, tiles) and ``m``, ``dm`` (H,) in the accumulation dtype ``dt``; one
    thread per h.
    """
    acc = dt.type

    def dm_finish(parts: Any, m: Any, dm: Any) -> None:
        h = cuda.grid(1)
        if h < dm.shape[0]:
            total = acc(0)
            for b in range(parts.shape[0]):
                for t in range(parts.shape[2]):
                    total += parts[b, h, t]
            sig = _sigmoid(m[h], acc(1))
            dm[h] = total * (sig * (acc(1) - sig))

    return Kernel(dm_finish, (_array(dt, 3), _array(dt, 1), _array(dt, 1)))
