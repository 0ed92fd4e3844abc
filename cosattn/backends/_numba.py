"""The numba backend: ``numba.cuda`` kernels for CUDA arrays where the CuPy path cannot run.

Every operation is a few launches of the kernels in :mod:`._numba_kernels` on the caller's
stream. The forward is one chunked sweep; the backward is three (for dq̂, dk̂ and dṽ, the last
one also producing the incoming state's gradient and the partial sums of ``dm``), then the
normalisation epilogues and the ``dm`` reduction. In the notation of the sweep
(``out_i = St_0 · x_i + Σ_j (x_i · y_j) z_j``, ``St = St_0 + Σ_j z_j y_jᵀ``):

==========  =====  =====  =====  ==============  =========  ======================
output      x      y      z      St_0            sums over  out scale
==========  =====  =====  =====  ==============  =========  ======================
o           q̂'     k̂      ṽ      kv0             j ≤ i      1
dq̂          do     ṽ      k̂      kv0ᵀ            j ≤ i      real_i
dk̂          ṽ      do     q̂'     dstateᵀ         i ≥ j      1
dṽ -> dv    k̂      q̂'     do     dstate -> dkv0  i ≥ j      real_j w_j (dv), dm
==========  =====  =====  =====  ==============  =========  ======================

(Scales are those of real tokens: every operand and output is zero at padded positions, so q̂'
is q̂ there. Bidirectional sweeps sum over every position and carry no state, except with
``total=``: then St_0 is the whole sequence's sum, or its gradient, taken as it is.)
:func:`cosattn.absorb` is the ``o`` sweep forming its state alone (``state_only``).
Every launch has one block per sequence (a batch row, or one of the ``cu_seqlens`` of a packed
row, read by the kernels on the device: nothing waits for the host to learn the lengths), and
a pool's prefill and step read and write the named slots of the pool directly.
Native arrays are CuPy arrays (seen by Numba through ``__cuda_array_interface__``, no copy)
or Numba device arrays (:mod:`cosattn._numba_arrays`); results are allocated in the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._call import BackwardCall, Call, ForwardCall, StepCall
from .._device import namespace
from .._dtypes import BFLOAT16, accumulation
from . import ceil_div

try:
    import numba
    from numba import cuda

    from .. import _numba_arrays
    from . import _numba_kernels as kernels
except ImportError as exc:  # unavailable() reports it
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

DEVICE = "cuda"
VARLEN = True


@dataclass(frozen=True)
class Config:
    """Launch sizes: ``chunk`` tokens per chunk, ``threads`` per block (a power of two, at
    least ``chunk``), ``lanes`` threads per row in the row-wise kernels (a power of two)."""

    chunk: int
    threads: int
    lanes: int


GPU = Config(chunk=32, threads=128, lanes=32)
# The simulator runs each thread as a Python thread and every barrier is expensive there:
# the same kernels on smaller blocks with shorter reductions.
SIMULATOR = Config(chunk=16, threads=16, lanes=4)
CONFIG = SIMULATOR if _IMPORT_ERROR is None and numba.config.ENABLE_CUDASIM else GPU


def unavailable() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"numba-cuda cannot be imported ({_IMPORT_ERROR}): pip install cosattn[cuda13]"
    if not cuda.is_available():
        return "numba.cuda finds no usable CUDA driver and GPU"
    return None


def sweep_spec(output: str, *, causal: bool, dtype: Any, Dx: int, Dz: int,
               config: Config | None = None) -> Any:
    """The :class:`~._numba_kernels.SweepSpec` that computes ``output`` (a row of the table
    above: ``"o"``, ``"dq"``, ``"dk"`` or ``"dv"``, which also reduces ``dm``; or ``"state"``,
    the ``o`` sweep's state alone) for inputs of ``dtype``; ``Dx``, ``Dz`` are the sizes of its
    x and z operands."""
    K = kernels
    scales, reverse, out_acc = {
        "o": ((K.NORM, K.NORM, K.VALUE, K.RAW), False, False),
        "state": ((K.NORM, K.NORM, K.VALUE, K.RAW), False, False),
        "dq": ((K.RAW, K.VALUE, K.NORM, K.RAW), False, True),
        "dk": ((K.VALUE, K.RAW, K.NORM, K.RAW), True, True),
        "dv": ((K.NORM, K.NORM, K.RAW, K.VALUE), True, False),
    }[output]
    direction = K.ALL if not causal else K.REVERSE if reverse else K.FORWARD
    dtype = np.dtype(dtype)
    cfg = config or CONFIG
    TD, TZ = K.tiles(accumulation(dtype), Dx, Dz, cfg.chunk, cfg.threads)
    return K.SweepSpec(direction, *scales, out_acc, output == "dv", dtype, cfg.chunk,
                       cfg.threads, TD, TZ, output == "state")


def _view(x: Any) -> Any:
    """The Numba array kernels take for native ``x`` (bfloat16 as its uint16 bits); no copy."""
    if x.dtype == BFLOAT16:
        x = x.view(np.uint16)
    return x if _numba_arrays.is_numba_array(x) else _numba_arrays.from_cuda_array(x)


_DUMMIES: dict[tuple[int, str, int], Any] = {}


def _dummy(device: int, dtype: Any, ndim: int) -> Any:
    """A one-element device array standing in for an absent argument (flagged as absent)."""
    key = (device, np.dtype(dtype).str, ndim)
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda.device_array((1,) * ndim, dtype=np.dtype(dtype))
    return _DUMMIES[key]


def _launch(kernel: Any, grid: tuple[int, ...], threads: int, stream: Any, shared: int,
            *args: Any) -> None:
    """Build ``kernel`` (a :class:`~._numba_kernels.Kernel`) if needed and launch it."""
    if all(g > 0 for g in grid):
        kernel.build()[grid, threads, stream, shared](*args)


class _Launches:
    """The launches of one call: its stream, call-wide arrays and stand-ins for absent ones."""

    def __init__(self, call: Call, count0: Any = None) -> None:
        p = self.p = call.p
        self.N = call.N
        self.xp = namespace(p.device)
        self.cfg = CONFIG
        self.stream = cuda.external_stream(p.stream) if p.stream else cuda.legacy_default_stream()
        self.acc = np.dtype(p.acc)
        self.eps = self.acc.type(p.eps)
        index = p.device.index
        offsets = getattr(call, "cu_seqlens", None)
        slots, initial = (getattr(call, n, None) for n in ("state_indices", "has_initial"))
        self.has_m, self.has_mask, self.has_count0 = (
            a is not None for a in (call.m, call.mask, count0))
        self.packed, self.pooled, self.has_initial = (
            a is not None for a in (offsets, slots, initial))
        self.m = _view(call.m) if self.has_m else _dummy(index, self.acc, 1)
        mask_ndim = 1 if isinstance(call, StepCall) else 2
        self.mask = _view(call.mask) if self.has_mask else _dummy(index, np.bool_, mask_ndim)
        self.count0 = _view(count0) if self.has_count0 else _dummy(index, np.int64, 1)
        self.offsets = _view(offsets) if self.packed else _dummy(index, np.int64, 1)
        self.slots = _view(slots) if self.pooled else _dummy(index, np.int64, 1)
        self.initial = _view(initial) if self.has_initial else _dummy(index, np.bool_, 1)
        self.state_dummy = _dummy(index, self.acc, 4)
        self.parts_dummy = _dummy(index, self.acc, 3)

    def sequences(self) -> tuple[Any, ...]:
        """The arguments that name each block's sequence and slot (see ``kernels.sweep``)."""
        return self.offsets, self.slots, self.initial

    def spec(self, output: str) -> Any:
        p = self.p
        Dx, Dz = (p.Dk, p.Dv) if output in ("o", "state", "dv") else (p.Dv, p.Dk)
        return sweep_spec(output, causal=p.causal, dtype=p.dtype, Dx=Dx, Dz=Dz, config=self.cfg)

    def sweep(self, spec: Any, x: Any, y: Any, z: Any, out: Any, *, s0: Any = None,
              s_out: Any = None, v: Any = None, dm_part: Any = None) -> None:
        p = self.p
        Dx, Dz = x.shape[3], z.shape[3]
        views = [_view(a) for a in (x, y, z, out)]
        state = [self.state_dummy if a is None else _view(a) for a in (s0, s_out)]
        v_view = views[0] if v is None else _view(v)
        parts = self.parts_dummy if dm_part is None else _view(dm_part)
        s0_dtype, s_out_dtype = (self.acc if a is None else np.dtype(a.dtype) for a in (s0, s_out))
        _launch(kernels.sweep(spec, s0_dtype, s_out_dtype), (ceil_div(Dz, spec.TZ), p.H, self.N),
                spec.NT, self.stream, spec.shared_bytes(Dx), *views, *state, self.mask, self.m,
                self.count0, v_view, parts, *self.sequences(), s0 is not None,
                s_out is not None, self.has_mask, self.has_m, self.has_count0, self.packed,
                self.pooled, self.has_initial, self.eps)

    def normalise_backward(self, g: Any, x: Any, out: Any) -> None:
        p, threads = self.p, self.cfg.threads
        kernel = kernels.normalise_backward(np.dtype(p.dtype), threads, self.cfg.lanes)
        _launch(kernel, (ceil_div(p.S, kernels.ROWS), p.H, p.B), threads, self.stream, 0,
                _view(g), _view(x), _view(out), self.mask, self.has_mask, self.eps)


def forward(call: ForwardCall) -> tuple[Any, Any] | None:
    """The forward sweep; a pool's prefill reads and writes the pool (``kv0``, ``count0``) in
    place, one block per (slot, head, tile), which no other block touches. With ``call.o``
    None, the state alone: the ``o`` sweep without its output (k stands in for the q it does
    not read, and a one-element dummy for ``o``)."""
    p = call.p
    run = _Launches(call, call.count0)
    kv, count = call.kv0, call.count0  # a pool's prefill: the outgoing states go to the slots
    if not call.pooled:
        kv = count = None
        if call.want_state:
            kv = run.xp.empty((call.N, p.H, p.Dv, p.Dk), dtype=p.state_dtype)
            count = run.xp.empty((call.N,), dtype=np.int64)
    if call.o is None:
        out = _dummy(p.device.index, kernels.bits(np.dtype(p.dtype)), 4)
        run.sweep(run.spec("state"), call.k, call.k, call.v, out, s0=call.kv0, s_out=kv)
    else:
        run.sweep(run.spec("o"), call.q, call.k, call.v, call.o, s0=call.kv0, s_out=kv)
    if count is None:
        return None
    threads = run.cfg.threads
    _launch(kernels.count_total(threads), (call.N,), threads, run.stream, 0, run.count0,
            run.mask, _view(count), p.S, *run.sequences(), run.has_count0 and p.causal,
            run.has_mask, run.packed, run.pooled, run.has_initial)
    return None if call.pooled else (kv, count)


def backward(call: BackwardCall) -> tuple[Any, Any]:
    p, kv0, dkv = call.p, call.kv0, call.dkv
    run = _Launches(call, call.count0)
    xp = run.xp

    def transposed(state: Any) -> Any:
        return None if state is None else xp.permute_dims(state, (0, 1, 3, 2))

    dq_hat = xp.empty((p.B, p.H, p.S, p.Dk), dtype=p.acc)
    run.sweep(run.spec("dq"), call.do, call.v, call.k, dq_hat, s0=transposed(kv0))
    run.normalise_backward(dq_hat, call.q, call.dq)
    dk_hat = dq_hat  # the same scratch: the launches are ordered on one stream
    run.sweep(run.spec("dk"), call.v, call.do, call.q, dk_hat, s0=transposed(dkv))
    run.normalise_backward(dk_hat, call.k, call.dk)
    dkv0 = None if kv0 is None or not p.causal else xp.empty(kv0.shape, dtype=kv0.dtype)
    spec = run.spec("dv")
    dm_part = None
    if call.m is not None:
        dm_part = xp.empty((call.N, p.H, ceil_div(p.Dv, spec.TZ)), dtype=p.acc)
    run.sweep(spec, call.k, call.q, call.do, call.dv, s0=dkv, s_out=dkv0, v=call.v,
              dm_part=dm_part)
    dm = None
    if call.m is not None:
        dm = xp.empty((p.H,), dtype=p.acc)
        threads = run.cfg.threads
        _launch(kernels.dm_finish(run.acc), (ceil_div(p.H, threads),), threads, run.stream, 0,
                _view(dm_part), run.m, _view(dm))
    return dm, dkv0


def step(call: StepCall) -> None:
    p = call.p
    run = _Launches(call)
    threads = run.cfg.threads
    acc = np.dtype(call.kv.dtype)
    kernel = kernels.step(acc, np.dtype(p.dtype), threads, run.cfg.lanes)
    count_view = _view(call.count)
    _launch(kernel, (ceil_div(p.Dv, kernels.STEP_ROWS), p.H, p.B), threads, run.stream,
            2 * p.Dk * acc.itemsize, _view(call.kv), count_view, _view(call.q), _view(call.k),
            _view(call.v), _view(call.o), run.m, run.mask, run.slots, run.initial, run.has_m,
            run.has_mask, run.pooled, run.has_initial, acc.type(p.eps))
    _launch(kernels.COUNT_STEP, (ceil_div(p.B, threads),), threads, run.stream, 0, count_view,
            run.mask, run.slots, run.initial, run.has_mask, run.pooled, run.has_initial)
