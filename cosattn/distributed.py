"""Context parallel: one long sequence sharded along S over the ranks of a communicator.

Rank r of R holds the r-th contiguous shard of the same B rows (its own length, possibly 0, and
its own part of the mask). :func:`forward` and :func:`backward` give every rank its shard of
what one process computes on the whole sequence (docs/spec.md, "Context parallel"). Cottention's
state is a sum, so only small things cross between ranks, never keys or values: each rank's
count of real tokens, its ``Σ ṽ k̂ᵀ`` (B·H·Dv·Dk numbers) and in the backward its ``Σ do q̂'ᵀ`` and
``dm``. Each exchange is one all-gather followed by a prefix (or suffix) sum computed on every
rank in rank order, so every rank holds the same bits for what they share (the outgoing state,
``dm``). The backward takes each rank's incoming state from the forward's :class:`Context`
instead of recomputing it (docs/design.md, "Context parallel").

Only a :class:`Communicator` is needed: ``rank``, ``size`` and ``allgather`` of a byte buffer.
:class:`MPICommunicator` is one over mpi4py; another process group plugs in the same way
(docs/design.md shows one over ``torch.distributed``).

Ranks that share a machine should share its cores: set ``COSATTN_NUM_THREADS`` (for the numpy
backend) to the cores per rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import _validate as val
from ._call import Problem
from ._device import Device, cuda_native, namespace, on_device
from ._dtypes import INPUT_DTYPES, STATE_DTYPES, accumulation
from ._interop import export_array, import_array
from .attention import _state_arrays, absorb
from .attention import backward as _backward
from .attention import forward as _forward
from .recurrent import RecurrentState

__all__ = ["Communicator", "Context", "MPICommunicator", "backward", "forward"]


@runtime_checkable
class Communicator(Protocol):
    """What context parallel needs from a process group: its ``rank`` and ``size`` and one
    collective.

    ``allgather(buffer)`` takes a 1-D ``uint8`` array, of the same length on every rank (NumPy,
    or CuPy when the inputs are CuPy-native CUDA arrays), and returns every rank's buffer as a
    ``(size, n)`` ``uint8`` array of the same kind, row r being rank r's. Every rank of the group
    calls it the same number of times, in the same order.
    """

    rank: int
    size: int

    def allgather(self, buffer: Any) -> Any:
        """Every rank's ``buffer``, stacked in rank order."""


def _mpi_cuda_aware(comm: Any) -> bool:
    """Whether the MPI library takes CUDA device buffers: the memory allocation kinds of MPI
    4.1 (``mpi_memory_alloc_kinds`` lists ``cuda`` or ``cuda:device``)."""
    try:
        kinds = comm.Get_info().Get("mpi_memory_alloc_kinds") or ""
    except Exception:  # an MPI before 4.1, or a communicator without info
        return False
    return any(kind.strip() in ("cuda", "cuda:device") for kind in kinds.split(","))


class MPICommunicator:
    """A :class:`Communicator` over an mpi4py communicator (``MPI.COMM_WORLD`` by default).

    NumPy buffers go to ``MPI_Allgather`` directly. CuPy buffers go there too when the MPI
    library is CUDA-aware; otherwise they are staged through the host (a device-to-host copy,
    the all-gather, a host-to-device copy: the buffers are small). ``cuda_aware=None`` asks the
    library (MPI 4.1's ``mpi_memory_alloc_kinds``; an MPI that cannot say is taken as not
    CUDA-aware); True or False overrides it. ``bytes_sent`` and ``messages`` count what this
    rank handed to the collective.
    """

    def __init__(self, comm: Any = None, *, cuda_aware: bool | None = None) -> None:
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.cuda_aware = _mpi_cuda_aware(self.comm) if cuda_aware is None else bool(cuda_aware)
        self.bytes_sent = 0
        self.messages = 0

    def allgather(self, buffer: Any) -> Any:
        self.bytes_sent += int(buffer.nbytes)
        self.messages += 1
        if isinstance(buffer, np.ndarray):
            out = np.empty((self.size, buffer.size), dtype=np.uint8)
            self.comm.Allgather(buffer, out)
            return out
        import cupy

        if self.cuda_aware:
            out = cupy.empty((self.size, buffer.size), dtype=cupy.uint8)
            cupy.cuda.get_current_stream().synchronize()  # MPI reads the buffer now
            self.comm.Allgather(buffer, out)
            return out
        host = np.empty((self.size, buffer.size), dtype=np.uint8)
        self.comm.Allgather(cupy.asnumpy(buffer), host)
        return cupy.asarray(host)


@dataclass(frozen=True)
class Context:
    """What :func:`forward` hands to :func:`backward` on this rank.

    ``state`` is the outgoing :class:`~cosattn.RecurrentState` of the whole sequence (causal;
    the same on every rank), None for the bidirectional form. The rest is this rank's: its
    incoming state (causal; None on rank 0 without a state), the whole sequence's sum and count
    (bidirectional), and the settings and sizes the backward must agree with.
    """

    state: RecurrentState | None
    causal: bool
    eps: float
    layout: str
    shape: tuple[int, int, int, int, int]  # this shard's (B, H, S, Dk, Dv)
    dtype: np.dtype
    has_m: bool
    had_state: bool  # rank 0 was given a state: backward returns dkv0
    sum_dtype: np.dtype  # the dtype of the exchanged sums: the state's
    incoming: RecurrentState | None
    total: RecurrentState | None


# ------------------------------------------------------------------------------ exchange

HEADER = ("B", "H", "Dk", "Dv", "dtype", "causal", "has_m", "has_state", "state_dtype", "eps")
MESSAGE_BYTES = 1024  # an error's type and text, on the error path only
_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, RuntimeError)
_STATUS = (np.dtype(np.int64), (1,))

Layout = Sequence[tuple[np.dtype, tuple[int, ...]]]


def _nbytes(layout: Layout) -> int:
    return sum(dtype.itemsize * int(np.prod(shape, dtype=np.int64)) for dtype, shape in layout)


class _Exchange:
    """The rounds of one call. Each rank's buffer starts with a status word; a rank whose local
    work failed sends status 1 (and zeros) instead of its data, and then every rank learns why
    and raises: the failing rank its own exception, the others the same type naming the rank.
    """

    def __init__(self, comm: Communicator, xp: Any) -> None:
        self.comm, self.xp = comm, xp

    def after(self, layout: Layout, compute: Callable[[], list[Any]], xp: Any = None) -> list:
        """Run ``compute`` (this rank's arrays, laid out as ``layout``), then all-gather them;
        returns every rank's arrays, in rank order."""
        try:
            parts, error = compute(), None
        except Exception as exc:
            parts, error = None, exc
        return self.round(layout, parts, error, self.xp if xp is None else xp)

    def round(self, layout: Layout, parts: list[Any] | None, error: Exception | None,
              xp: Any) -> list:
        full = [_STATUS, *layout]
        if error is None:
            status = xp.zeros(1, dtype=np.int64)
            buffer = xp.concatenate([xp.ascontiguousarray(a).reshape(-1).view(np.uint8)
                                     for a in (status, *parts)])
        else:
            buffer = xp.zeros(_nbytes(full), dtype=np.uint8)
            buffer[:8] = xp.asarray(np.frombuffer(np.int64(1).tobytes(), np.uint8))
        gathered = self.comm.allgather(buffer)
        ranks = [_split(gathered[r], full) for r in range(self.comm.size)]
        failed = [r for r, fields in enumerate(ranks) if int(fields[0][0]) != 0]
        if failed:
            self._raise(error, failed)
        return [fields[1:] for fields in ranks]

    def _raise(self, error: Exception | None, failed: list[int]) -> None:
        """Tell every rank why the failed ones failed (one more all-gather), then raise."""
        message = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
        if error is not None:
            code = next((i for i, t in enumerate(_ERRORS) if isinstance(error, t)),
                        len(_ERRORS) - 1)
            text = f"{type(error).__name__}: {error}".encode()[: MESSAGE_BYTES - 8]
            message[:8] = np.frombuffer(np.int64(code).tobytes(), np.uint8)
            message[8: 8 + len(text)] = np.frombuffer(text, np.uint8)
        gathered = _host(self.comm.allgather(message))
        if error is not None:
            raise error
        why = []
        for r in failed:
            text = gathered[r, 8:].tobytes().rstrip(b"\0").decode(errors="replace")
            why.append(f"rank {r}: {text}")
        kind = _ERRORS[int(gathered[failed[0], :8].view(np.int64)[0])]
        raise kind(f"context parallel failed on another rank ({'; '.join(why)})")


def _split(row: Any, layout: Layout) -> list[Any]:
    """One rank's buffer back into its arrays (copies, so each is aligned)."""
    fields, at = [], 0
    for dtype, shape in layout:
        n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        fields.append(row[at: at + n].copy().view(dtype).reshape(shape))
        at += n
    return fields


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def _check_agreement(headers: list[list[Any]]) -> None:
    """The same B, H, Dk, Dv, dtype, causal, eps and use of m on every rank, and an incoming
    state on rank 0 only; raises the same error on every rank otherwise."""
    table = {name: [int(h[0][i]) for h in headers] for i, name in enumerate(HEADER)}

    def per_rank(values: list[Any]) -> str:
        return ", ".join(f"rank {r} {v}" for r, v in enumerate(values))

    for name in ("B", "H", "Dk", "Dv"):
        if len(set(table[name])) > 1:
            raise ValueError(
                f"context parallel: every rank's shard must have the same {name}; got "
                f"{per_rank(table[name])}"
            )
    if len(set(table["dtype"])) > 1:
        raise TypeError(
            "context parallel: every rank's shard must have the same dtype; got "
            f"{per_rank([INPUT_DTYPES[c] for c in table['dtype']])}"
        )
    if len(set(table["causal"])) > 1:
        raise ValueError(f"context parallel: causal differs between ranks: "
                         f"{per_rank([bool(c) for c in table['causal']])}")
    if len(set(table["has_m"])) > 1:
        with_m = [r for r, h in enumerate(table["has_m"]) if h]
        raise ValueError(f"context parallel: m must be given on every rank or on none; it is "
                         f"given on ranks {with_m} only")
    if len(set(table["eps"])) > 1:
        raise ValueError(f"context parallel: eps differs between ranks: "
                         f"{per_rank([float(np.int64(e).view(np.float64)) for e in table['eps']])}")
    late = [r for r, h in enumerate(table["has_state"]) if h and r > 0]
    if late:
        raise ValueError(f"context parallel: an incoming state is given on rank 0 only; ranks "
                         f"{late} were given one")


# --------------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class _Space:
    """Where the small exchanged arrays are computed: NumPy on the CPU, CuPy on a GPU where
    CuPy runs, and the host for Numba device arrays (staged: they have no arithmetic)."""

    device: Device
    framework: str

    @functools.cached_property
    def staged(self) -> bool:
        return self.device.kind == "cuda" and cuda_native().name == "numba"

    @property
    def xp(self) -> Any:
        return np if self.staged else namespace(self.device)

    def work(self, x: Any, name: str) -> Any:
        """Caller's array ``x`` as an array of :attr:`xp` (a copy only when staged)."""
        native = import_array(x, name).array
        return native.copy_to_host() if self.staged else native

    def caller(self, x: Any) -> Any:
        """An array of :attr:`xp` in the caller's framework and on its device."""
        if self.staged:
            from numba import cuda

            x = cuda.to_device(x)
        return export_array(x, self.framework)

    def state(self, kv: Any, count: Any) -> RecurrentState:
        return RecurrentState(self.caller(kv), self.caller(count))


def _running(parts: list[Any], start: Any = None) -> list[Any]:
    """``[start, start + parts[0], start + parts[0] + parts[1], ...]`` (len(parts) + 1 entries),
    each a new array, summed in that order; ``start`` None is zero."""
    total = np.zeros_like(parts[0]) if start is None else start.copy()
    sums = [total]
    for x in parts:
        total = total + x
        sums.append(total)
    return sums


def _comm(comm: Any) -> Communicator:
    if not isinstance(comm, Communicator):
        raise TypeError(
            "comm must be a cosattn.distributed.Communicator (rank, size, allgather), e.g. "
            f"MPICommunicator(); got {type(comm).__name__}"
        )
    return comm


def _real_tokens(space: _Space, mask: Any, B: int, S: int) -> Any:
    xp = space.xp
    if mask is None:
        return xp.full(B, S, dtype=np.int64)
    return space.work(mask, "mask").sum(axis=1, dtype=np.int64)


# ------------------------------------------------------------------------------- forward


def forward(q: Any, k: Any, v: Any, m: Any = None, *, comm: Any, causal: bool = True,
            mask: Any = None, state: RecurrentState | None = None, eps: float = 1e-12,
            layout: str = "bhsd", backend: str | None = None, validate: bool = False,
            out: Any = None) -> tuple[Any, Context]:
    """Cottention forward of a sequence sharded along S over the ranks of ``comm``.

    Call it on every rank, each with its own shard (rank order is sequence order).

    Parameters
    ----------
    q, k : array (B, H, S_r, Dk), or (B, S_r, H, Dk) with ``layout="bshd"``
        This rank's shard: S_r may differ between ranks and may be 0; B, H, Dk, Dv and the
        dtype may not.
    v : array (B, H, S_r, Dv)
    m : array (H,), optional
        The same stabiliser logits on every rank (given on all or none).
    comm : Communicator
        The ranks that share the sequence (e.g. :class:`MPICommunicator`).
    causal : bool
        The same on every rank.
    mask : bool array (B, S_r), optional
        This shard's part of the mask.
    state : RecurrentState, optional
        The incoming state, on rank 0 only (causal).
    eps, layout, backend, validate, out
        As for :func:`cosattn.forward` (eps the same on every rank; ``out`` like this rank's
        v, checked with the other arguments, before any rank exchanges data).

    Returns
    -------
    o : array like v
        This rank's shard of the whole sequence's output (``out`` when given).
    context : Context
        For :func:`backward`; ``context.state`` is the outgoing state of the whole sequence on
        every rank (causal).

    Raises
    ------
    ValueError, TypeError, RuntimeError
        On every rank, when any rank's arguments are bad or the ranks disagree (B, H, Dk, Dv,
        dtype, causal, eps, m given or not, a state on a rank other than 0).

    Examples
    --------
    >>> comm = cosattn.distributed.MPICommunicator()
    >>> o, ctx = cosattn.distributed.forward(q, k, v, m, comm=comm)
    """
    comm = _comm(comm)
    header_layout = [(np.dtype(np.int64), (len(HEADER),))]
    exchange = _Exchange(comm, np)
    found: dict[str, Any] = {}

    def check() -> list[Any]:
        x, imported = val.inputs({"q": q, "k": k, "v": v}, m, mask, _state_arrays(state),
                                 causal, eps, layout, backend, validate, extra={"out": out})
        val.check_outputs(imported, x, {"out": "v"})
        found["x"] = x
        p = x.p
        state_dtype = STATE_DTYPES.index(p.state_dtype) if state is not None else -1
        return [np.array([p.B, p.H, p.Dk, p.Dv, INPUT_DTYPES.index(p.dtype), p.causal,
                          m is not None, state is not None, state_dtype,
                          np.float64(p.eps).view(np.int64)], dtype=np.int64)]

    headers = exchange.after(header_layout, check)
    _check_agreement(headers)
    x = found["x"]
    p = x.p
    rank0 = headers[0][0]
    had_state = bool(rank0[HEADER.index("has_state")])
    sum_dtype = (STATE_DTYPES[int(rank0[HEADER.index("state_dtype")])] if had_state
                 else accumulation(p.dtype))
    space = _Space(p.device, x.framework)
    xp = space.xp
    exchange.xp = xp
    with on_device(p.device):
        return _forward_shards(exchange, space, p, q, k, v, m, mask, state, had_state,
                               sum_dtype, layout, backend, validate, out)


def _forward_shards(exchange: _Exchange, space: _Space, p: Problem, q: Any, k: Any, v: Any,
                    m: Any, mask: Any, state: RecurrentState | None, had_state: bool,
                    sum_dtype: np.dtype, layout: str, backend: str | None, validate: bool,
                    out: Any) -> tuple[Any, Context]:
    xp, comm = space.xp, exchange.comm
    B, H, Dk, Dv = p.B, p.H, p.Dk, p.Dv
    counts_layout = [(np.dtype(np.int64), (B,))]
    sums_layout = [(sum_dtype, (B, H, Dv, Dk))]
    kw = dict(eps=p.eps, layout=layout, backend=backend, validate=validate)

    def own_count() -> Any:
        n = _real_tokens(space, mask, B, p.S)
        if state is not None:  # rank 0 counts the incoming state's tokens as its own
            n = n + space.work(state.count, "state.count")
        return n

    def own_sum(offset: Any) -> Any:
        """This shard's Σ ṽ k̂ᵀ (rank 0: plus the incoming state's kv): causal, with the counts
        of the ranks before; bidirectional, with the whole sequence's."""
        if p.causal:
            start = state
            if state is None:
                zeros = xp.zeros((B, H, Dv, Dk), dtype=sum_dtype)
                start = space.state(zeros, xp.zeros(B, dtype=np.int64) if offset is None
                                    else offset)
            part = absorb(k, v, m, mask=mask, state=start, **kw)
        else:
            total_count = None if offset is None else space.caller(offset)
            part = absorb(k, v, m, causal=False, mask=mask, total_count=total_count, **kw)
        return space.work(part.kv, "kv").astype(sum_dtype, copy=False)

    if m is None:  # the sums do not depend on the counts: one round
        gathered = exchange.after(counts_layout + sums_layout,
                                  lambda: [own_count(), own_sum(None)])
        counts = [g[0] for g in gathered]
        sums = [g[1] for g in gathered]
    else:
        counts = [g[0] for g in exchange.after(counts_layout, lambda: [own_count()])]
        before = _running(counts)
        offset = before[comm.rank] if p.causal else before[-1]
        sums = [g[0] for g in exchange.after(sums_layout, lambda: [own_sum(offset)])]
    before_counts = _running(counts)
    before_sums = _running(sums)
    out_state = incoming = total = None
    if p.causal:
        out_state = space.state(before_sums[-1], before_counts[-1])
        if comm.rank > 0:
            incoming = space.state(before_sums[comm.rank], before_counts[comm.rank])
        else:
            incoming = state
        o = _forward(q, k, v, m, mask=mask, state=incoming, out=out, **kw)
    else:
        total = space.state(before_sums[-1], before_counts[-1])
        o = _forward(q, k, v, m, causal=False, mask=mask, total=total, out=out, **kw)
    context = Context(out_state, p.causal, p.eps, layout, (B, H, p.S, Dk, Dv), p.dtype,
                      m is not None, had_state, sum_dtype, incoming, total)
    return o, context


# ------------------------------------------------------------------------------ backward


def backward(do: Any, q: Any, k: Any, v: Any, m: Any = None, *, context: Context, comm: Any,
             mask: Any = None, dstate: Any = None, backend: str | None = None,
             validate: bool = False, out: Any = None) -> tuple:
    """Gradients of :func:`forward`, on every rank for its shard.

    Parameters
    ----------
    do : array like v
        The gradient at this rank's shard of ``o``.
    q, k, v, m, mask, backend, validate
        As given to :func:`forward` on this rank.
    context : Context
        What :func:`forward` returned on this rank (causal, eps and layout come from it).
    comm : Communicator
        The communicator given to :func:`forward`.
    dstate : array (B, H, Dv, Dk), optional
        The gradient at the outgoing state's ``kv`` (causal): the same on every rank, given on
        every rank or on none.
    out : tuple (dq, dk, dv), optional
        As for :func:`cosattn.backward`, for this rank's shards (checked with the other
        arguments, before any rank exchanges data).

    Returns
    -------
    (dq, dk, dv, dm) : this rank's shard of dq, dk, dv (``out``'s arrays where given); ``dm``
        (H,) the whole sequence's, the same on every rank (None without ``m``). When rank 0 was
        given a state, a fifth item: ``dkv0`` on rank 0, None on the others.

    Examples
    --------
    >>> dq, dk, dv, dm = cosattn.distributed.backward(do, q, k, v, m, context=ctx, comm=comm)
    """
    comm = _comm(comm)
    if not isinstance(context, Context):
        raise TypeError(f"context must be the Context forward returned, got "
                        f"{type(context).__name__}")
    ctx = context
    B, H, _, Dk, Dv = ctx.shape
    exchange = _Exchange(comm, np)
    found: dict[str, Any] = {}

    def check() -> list[Any]:
        x, imported = val.inputs({"q": q, "k": k, "v": v, "do": do}, m, mask, None,
                                 ctx.causal, ctx.eps, ctx.layout, backend, validate,
                                 extra={"dstate": dstate, **val.backward_outputs(out)})
        val.check_outputs(imported, x, val.BACKWARD_OUTPUTS)
        p = x.p
        if (p.B, p.H, p.S, p.Dk, p.Dv) != ctx.shape or p.dtype != ctx.dtype:
            raise ValueError(
                f"backward's shard must be the forward's: (B, H, S, Dk, Dv) = {ctx.shape} in "
                f"{ctx.dtype}, got {(p.B, p.H, p.S, p.Dk, p.Dv)} in {p.dtype}"
            )
        if (m is not None) != ctx.has_m:
            raise ValueError("m must be given to backward as it was to forward")
        if dstate is not None:
            if not ctx.causal:
                raise ValueError("dstate needs the causal form (causal=False given)")
            val.check_dstate(imported["dstate"].array, p)
        found["x"] = x
        space = _Space(p.device, x.framework)
        found["space"] = space
        with on_device(p.device):
            g = absorb(q, do, mask=mask, eps=ctx.eps, layout=ctx.layout, backend=backend,
                       validate=validate).kv
            return [space.xp.asarray([dstate is not None], dtype=np.int64),
                    space.work(g, "kv").astype(ctx.sum_dtype, copy=False)]

    layout = [(np.dtype(np.int64), (1,)), (ctx.sum_dtype, (B, H, Dv, Dk))]
    try:
        exchange.xp = _Space(import_array(q, "q").device, "numpy").xp
    except Exception:  # check() reports it
        exchange.xp = np
    gathered = exchange.after(layout, check)
    given = {int(g[0][0]) for g in gathered}
    if len(given) > 1:
        with_dstate = [r for r, g in enumerate(gathered) if int(g[0][0])]
        raise ValueError(f"context parallel: dstate must be given on every rank or on none; it "
                         f"is given on ranks {with_dstate} only")
    x, space = found["x"], found["space"]
    with on_device(x.p.device):
        return _backward_shards(exchange, space, ctx, [g[1] for g in gathered], do, q, k, v, m,
                                mask, dstate, backend, validate, out)


def _backward_shards(exchange: _Exchange, space: _Space, ctx: Context, grads: list[Any],
                     do: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, dstate: Any,
                     backend: str | None, validate: bool, out: Any) -> tuple:
    comm = exchange.comm
    kw = dict(eps=ctx.eps, layout=ctx.layout, backend=backend, validate=validate, out=out)
    if ctx.causal:
        # The gradient at this rank's outgoing state: dstate plus the Σ do q̂'ᵀ of the ranks
        # after it, summed from the last rank down.
        start = None if dstate is None else space.work(dstate, "dstate").astype(ctx.sum_dtype)
        after = _running(grads[::-1], start)[comm.size - 1 - comm.rank]
        later = None if dstate is None and comm.rank == comm.size - 1 else space.caller(after)
        result = _backward(do, q, k, v, m, mask=mask, state=ctx.incoming, dstate=later, **kw)
    else:
        g = space.caller(_running(grads)[-1])
        result = _backward(do, q, k, v, m, causal=False, mask=mask, total=ctx.total, dstate=g,
                           **kw)
    dq, dk, dv, dm = result[:4]
    if m is not None:
        H = ctx.shape[1]
        acc = accumulation(ctx.dtype)
        parts = exchange.after([(acc, (H,))], lambda: [space.work(dm, "dm")])
        dm = space.caller(_running([p[0] for p in parts])[-1])
    if not ctx.had_state:
        return dq, dk, dv, dm
    return dq, dk, dv, dm, result[4] if comm.rank == 0 else None
