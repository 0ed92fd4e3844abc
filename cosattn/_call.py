"""The call descriptions: what a backend is given, once every argument has been checked.

:mod:`cosattn._validate` builds one :class:`ForwardCall`, :class:`BackwardCall` or
:class:`StepCall` per public call; a backend reads it and writes its outputs. Arrays are native
(NumPy, CuPy or Numba), in the canonical ``(B, H, S, D)`` order (``(B, H, D)`` for a step), as
possibly strided views of the caller's memory. Each array field's type says which leading axes
it has (:data:`RowsHeads`, :data:`Rows`, :data:`Heads`, :data:`SeqsHeads`, :data:`Seqs`,
:data:`SlotsHeads`, :data:`Slots`), so a call can be cut into independent blocks of batch rows
and heads (:meth:`Call.block`) without listing its fields.

Sequences and slots (docs/spec.md, "Packed variable-length sequences" and "A pool of states"):
a call has N sequences. Unpacked, sequence n is batch row n (N = B). Packed (``cu_seqlens``
given, B = 1), sequence n is the positions ``cu_seqlens[n] .. cu_seqlens[n+1]-1`` of the one
row. A state's row is its sequence's, or, when ``state_indices`` is given, the slot it names in
a pool (``-1``: a padding entry that reads and writes no slot).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, TypeVar, get_type_hints

import numpy as np

from ._device import Device
from ._dtypes import accumulation


@dataclass(frozen=True)
class Problem:
    """Sizes and settings of one call.

    ``dtype`` is that of q, k, v (and do, o); ``state_dtype`` that of the recurrent state's
    ``kv`` (the accumulation dtype when no state is given). ``S`` is 1 for a step. ``stream``
    is the caller's raw CUDA stream handle, None on the CPU.
    """

    B: int
    H: int
    S: int
    Dk: int
    Dv: int
    dtype: np.dtype
    state_dtype: np.dtype
    causal: bool
    eps: float
    device: Device
    stream: int | None

    @property
    def acc(self) -> np.dtype:
        """The accumulation dtype: float64 for float64 inputs, else float32."""
        return accumulation(self.dtype)


RowsHeads = Annotated[Any, "BH"]  # an array indexed (B, H, ...), or None
Rows = Annotated[Any, "B"]  # (B, ...), or None
Heads = Annotated[Any, "H"]  # (H,), or None
SeqsHeads = Annotated[Any, "NH"]  # (N, H, ...), one per sequence, or None
Seqs = Annotated[Any, "N"]  # (N, ...), or None
SlotsHeads = Annotated[Any, "PH"]  # (N, H, ...), or a pool (P, H, ...) named by state_indices
Slots = Annotated[Any, "P"]  # (N,), or a pool's (P,)

C = TypeVar("C", bound="Call")


@functools.cache
def _leading_axes(cls: type) -> dict[str, str]:
    """``{field: "BH" | "B" | "H" | "NH" | "N" | "PH" | "P"}`` for the array fields of a call
    class."""
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name].__metadata__[0] for f in fields(cls)
            if hasattr(hints[f.name], "__metadata__")}


@dataclass(frozen=True, kw_only=True)
class Call:
    """What every operation reads: ``q``, ``k`` (…, Dk), ``v`` (…, Dv), ``m`` (H,) in
    ``p.acc`` or None (no stabiliser), ``mask`` bool (B, S) or (B,) or None (all real)."""

    p: Problem
    q: RowsHeads
    k: RowsHeads
    v: RowsHeads
    m: Heads
    mask: Rows

    @property
    def packed(self) -> bool:
        """Whether the sequences lie back to back in one row (``cu_seqlens`` given)."""
        return getattr(self, "cu_seqlens", None) is not None

    @property
    def pooled(self) -> bool:
        """Whether states live in a pool's slots named by ``state_indices``."""
        return getattr(self, "state_indices", None) is not None

    @property
    def N(self) -> int:
        """The number of sequences: B, or ``len(cu_seqlens) - 1`` when packed."""
        return self.cu_seqlens.shape[0] - 1 if self.packed else self.p.B

    def block(self: C, rows: slice, heads: slice) -> C:
        """The same call restricted to batch rows ``rows`` and heads ``heads`` (views).

        For a packed call ``rows`` selects sequences: the block holds their positions of the
        one row, with ``cu_seqlens`` rebased to start at 0 (a new array: packed calls are cut on
        the host). A pool's slots are never cut by rows (``state_indices`` names them).
        """
        p = self.p
        sizes = {"H": len(range(p.H)[heads])}
        positions: tuple[slice, ...] = ()
        changes: dict[str, Any] = {}
        sequences = rows
        if self.packed:
            first, last, _ = rows.indices(self.N)
            last = max(first, last)
            cu = self.cu_seqlens
            positions = (slice(int(cu[first]), int(cu[last])),)
            sizes["S"] = int(cu[last] - cu[first])
            changes["cu_seqlens"] = cu[first:last + 1] - cu[first]
            rows = slice(None)
        else:
            sizes["B"] = len(range(p.B)[rows])
        slots = slice(None) if self.pooled else sequences
        cut = {"BH": (rows, heads, *positions), "B": (rows, *positions), "H": (heads,),
               "NH": (sequences, heads), "N": (sequences,), "PH": (slots, heads),
               "P": (slots,)}
        changes.update({name: getattr(self, name)[cut[axes]]
                        for name, axes in _leading_axes(type(self)).items()
                        if getattr(self, name) is not None})
        return replace(self, p=replace(p, **sizes), **changes)


@dataclass(frozen=True, kw_only=True)
class SequenceCall(Call):
    """What forward and backward share: ``cu_seqlens`` (N+1,) int64 for packed sequences (then
    B = 1 and ``mask`` is (1, S)), or None; the incoming states ``kv0`` (N, H, Dv, Dk) and
    ``count0`` (N,) int64 (None: zero).

    Causal: ``kv0`` and ``count0`` are the incoming state. Bidirectional (never packed nor
    pooled: ``total=`` is refused with ``cu_seqlens``): ``count0``, when given, is every token's
    count c_j (the real tokens of the whole sequence this call is a part of) and ``kv0``, when
    given, the whole sequence's ``Σ ṽ k̂ᵀ``, used in place of the call's own (``total=``)."""

    cu_seqlens: Any = None
    kv0: SlotsHeads
    count0: Slots


@dataclass(frozen=True, kw_only=True)
class ForwardCall(SequenceCall):
    """:func:`cosattn.forward`, :func:`cosattn.absorb` and a pool's prefill: write ``o``
    (B, H, S, Dv).

    With ``want_state`` the backend returns ``(kv, count)`` (N rows) as new arrays, else None:
    causal, the outgoing state; bidirectional (only with ``o`` None), the call's own
    ``Σ ṽ k̂ᵀ`` and its number of real tokens. With ``state_indices`` (N,) int64, ``kv0`` and
    ``count0`` are a pool's (P rows): sequence n starts from slot ``state_indices[n]`` (from zero
    where ``has_initial`` (N,) bool is False) and its outgoing state is written into that slot,
    in place; a ``-1`` entry's outputs are +0 and it reads and writes no slot.

    ``o`` None asks for that ``(kv, count)`` alone, without the output (:func:`cosattn.absorb`;
    ``q`` is then None too, ``want_state`` True, and the call is neither packed nor pooled).
    """

    o: RowsHeads
    want_state: bool = False
    state_indices: Seqs = None
    has_initial: Seqs = None


@dataclass(frozen=True, kw_only=True)
class BackwardCall(SequenceCall):
    """:func:`cosattn.backward`: given ``do`` (like o) and ``dkv`` (N, H, Dv, Dk), the gradient
    at the outgoing state's kv, or None, write ``dq``, ``dk``, ``dv`` and return
    ``(dm, dkv0)``: ``dm`` (H,) in ``p.acc`` (None without ``m``), ``dkv0`` (N, H, Dv, Dk) in the
    state's dtype (None without ``kv0``, and always None for the bidirectional form).

    ``kv0`` and ``count0`` mean what they mean in :class:`SequenceCall`. Bidirectional with
    ``kv0`` (``total=``): ``dkv`` (never None then) is the gradient at that ``kv0``, used in
    place of the call's own ``Σ do q̂'ᵀ``.
    """

    do: RowsHeads
    dkv: SeqsHeads
    dq: RowsHeads
    dk: RowsHeads
    dv: RowsHeads


@dataclass(frozen=True, kw_only=True)
class StepCall(Call):
    """:meth:`cosattn.RecurrentState.step` and a pool's step: q, k (B, H, Dk), v (B, H, Dv),
    mask (B,). Update the state ``kv`` (B, H, Dv, Dk) and ``count`` (B,) int64 in place and
    write ``o`` (B, H, Dv). Rows whose mask is False leave ``kv`` and ``count`` untouched, bit
    for bit.

    With ``state_indices`` (B,) int64, ``kv`` and ``count`` are a pool's (P rows) and row b
    steps slot ``state_indices[b]``, from a zero state where ``has_initial`` (B,) bool is False
    (the slot then receives the outgoing state even when the row is masked); a ``-1`` row's
    output is +0 and it reads and writes no slot.
    """

    kv: SlotsHeads
    count: Slots
    o: RowsHeads
    state_indices: Seqs = None
    has_initial: Seqs = None
