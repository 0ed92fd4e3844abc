"""The call descriptions: what a backend is given, once every argument has been checked.

:mod:`cosattn._validate` builds one :class:`ForwardCall`, :class:`BackwardCall` or
:class:`StepCall` per public call; a backend reads it and writes its outputs. Arrays are native
(NumPy, CuPy or Numba), in the canonical ``(B, H, S, D)`` order (``(B, H, D)`` for a step), as
possibly strided views of the caller's memory. Each array field's type says which leading axes
it has (:data:`RowsHeads`, :data:`Rows`, :data:`Heads`), so a call can be cut into independent
blocks of batch rows and heads (:meth:`Call.block`) without listing its fields.
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

C = TypeVar("C", bound="Call")


@functools.cache
def _leading_axes(cls: type) -> dict[str, str]:
    """``{field: "BH" | "B" | "H"}`` for the array fields of a call class."""
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

    def block(self: C, rows: slice, heads: slice) -> C:
        """The same call restricted to batch rows ``rows`` and heads ``heads`` (views)."""
        cut = {"BH": (rows, heads), "B": (rows,), "H": (heads,)}
        changes = {name: getattr(self, name)[cut[axes]]
                   for name, axes in _leading_axes(type(self)).items()
                   if getattr(self, name) is not None}
        p = self.p
        sizes = {"B": len(range(p.B)[rows]), "H": len(range(p.H)[heads])}
        return replace(self, p=replace(p, **sizes), **changes)


@dataclass(frozen=True, kw_only=True)
class ForwardCall(Call):
    """:func:`cosattn.forward`: write ``o`` (B, H, S, Dv).

    Causal: ``kv0`` (B, H, Dv, Dk) and ``count0`` (B,) int64 are the incoming state (None:
    zero). Bidirectional: ``count0``, when given, is every token's count c_j (the real tokens of
    the whole sequence this call is a part of) and ``kv0``, when given, the whole sequence's
    ``Σ ṽ k̂ᵀ``, used in place of the call's own (``total=``). With ``want_state`` the backend
    returns ``(kv, count)`` as new arrays, else None: causal, the outgoing state; bidirectional
    (only with ``o`` None), the call's own ``Σ ṽ k̂ᵀ`` and its number of real tokens.

    ``o`` None asks for that ``(kv, count)`` alone, without the output (:func:`cosattn.absorb`;
    ``q`` is then None too and ``want_state`` True).
    """

    kv0: RowsHeads
    count0: Rows
    o: RowsHeads
    want_state: bool = False


@dataclass(frozen=True, kw_only=True)
class BackwardCall(Call):
    """:func:`cosattn.backward`: given ``do`` (like o) and ``dkv`` (the gradient at the
    outgoing state's kv, or None), write ``dq``, ``dk``, ``dv`` and return ``(dm, dkv0)``: ``dm``
    (H,) in ``p.acc`` (None without ``m``), ``dkv0`` in the state's dtype (None without
    ``kv0``, and always None for the bidirectional form).

    ``kv0`` and ``count0`` mean what they mean in :class:`ForwardCall`. Bidirectional with
    ``kv0`` (``total=``): ``dkv`` (never None then) is the gradient at that ``kv0``, used in
    place of the call's own ``Σ do q̂'ᵀ``.
    """

    do: RowsHeads
    kv0: RowsHeads
    count0: Rows
    dkv: RowsHeads
    dq: RowsHeads
    dk: RowsHeads
    dv: RowsHeads


@dataclass(frozen=True, kw_only=True)
class StepCall(Call):
    """:meth:`cosattn.RecurrentState.step`: q, k (B, H, Dk), v (B, H, Dv), mask (B,). Update
    the state ``kv`` (B, H, Dv, Dk) and ``count`` (B,) int64 in place and write ``o``
    (B, H, Dv). Rows whose mask is False leave ``kv`` and ``count`` untouched, bit for bit."""

    kv: RowsHeads
    count: Rows
    o: RowsHeads
