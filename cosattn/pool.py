"""A pool of recurrent states for continuous batching (docs/spec.md, "A pool of states").

A serving engine keeps one state per request in a slot of a preallocated pool, prefills packed
prompts into named slots and steps every active request together, one token each. Only the
pool's own :meth:`StatePool.prefill` and :meth:`StatePool.step` change it, in place;
:func:`cosattn.forward` and :func:`cosattn.backward` stay pure.
"""

from __future__ import annotations

from typing import Any

from . import _validate as val
from ._device import on_device
from ._dtypes import FLOAT32
from .recurrent import zero_arrays


class StatePool:
    """P slots of causal Cottention state: ``kv`` (P, H, Dv, Dk) and ``count`` (P,) int64.

    Slot p holds one sequence's state as a :class:`cosattn.RecurrentState` row would (float32,
    or float64 for float64 inputs). A call names its sequences' slots with ``state_indices``
    (N,) int32 or int64: ``-1`` marks a padding entry (its outputs are +0, its inputs reach no
    result, and it reads and writes no slot), and no slot may be named twice. Slots not named
    are left bit for bit as they were, and a call that raises changes nothing.

    ``has_initial_state`` (N,) bool, optional: where False, the sequence starts from a zero
    state whatever its slot holds (a new request in a reused slot), and the slot receives its
    outgoing state.

    Slot values (in -1..P-1, none twice) and ``cu_seqlens`` are checked on host arrays always,
    on device arrays only with ``validate=True`` or ``COSATTN_VALIDATE=1`` (reading them stalls
    the stream); unchecked bad values give unspecified results but no access outside the
    arrays. JAX arrays cannot be written in place, so a pool cannot hold them (``TypeError``).

    Examples
    --------
    >>> pool = cosattn.StatePool.zeros(8, H=2, Dk=4, Dv=4)
    >>> o = pool.prefill(q, k, v, m, cu_seqlens=np.array([0, 3, 5]),
    ...                  state_indices=np.array([6, 1]))  # q, k, v (1, 2, 5, 4): two prompts
    >>> o_t = pool.step(q_t, k_t, v_t, m, state_indices=np.array([6, -1, 1]))  # (3, 2, 4)
    >>> pool.count[[6, 1]]
    array([4, 3])
    """

    def __init__(self, kv: Any, count: Any, *, validate: bool = False) -> None:
        imported = val.import_all({"pool.kv": kv, "pool.count": count})
        ikv, icount = imported["pool.kv"], imported["pool.count"]
        if ikv.framework == "jax":
            raise TypeError("a StatePool cannot hold JAX arrays: they cannot be written in place "
                            "(use cosattn.RecurrentState, whose step returns new arrays)")
        if ikv.array.ndim != 4:
            raise ValueError(
                f"pool.kv must have rank 4 (P, H, Dv, Dk), got {tuple(ikv.array.shape)}"
            )
        P, H, Dv, Dk = ikv.array.shape
        val.check_state(ikv.array, icount.array, P, H, Dk, Dv, FLOAT32, name="pool", rows="P")
        val.check_writable_state(ikv.array, icount.array, "pool")
        if val.values_checked(validate, ikv.device):
            with on_device(ikv.device):
                val.check_count_values(icount.array, "pool.count")
        self.kv = kv
        self.count = count

    @classmethod
    def zeros(cls, P: int, H: int, Dk: int, Dv: int, *, like: Any = None,
              dtype: Any = None) -> StatePool:
        """An empty pool of P slots for H heads of sizes Dk, Dv (``kv`` is (P, H, Dv, Dk)).

        ``like``: an array whose framework and device the pool takes (NumPy when None).
        ``dtype``: float32 or float64; by default float64 when ``like`` is float64, else float32.
        """
        return cls(*zero_arrays({"P": P, "H": H, "Dk": Dk, "Dv": Dv}, like, dtype))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(P, H, Dk, Dv)``, the arguments of :meth:`zeros`."""
        P, H, Dv, Dk = self.kv.shape
        return P, H, Dk, Dv

    @property
    def nbytes(self) -> int:
        """Bytes of ``kv`` and ``count``."""
        return int(self.kv.nbytes + self.count.nbytes)

    def __repr__(self) -> str:
        P, H, Dk, Dv = self.shape
        return f"StatePool(P={P}, H={H}, Dk={Dk}, Dv={Dv}, dtype={self.kv.dtype})"

    def prefill(self, q: Any, k: Any, v: Any, m: Any = None, *, cu_seqlens: Any,
                state_indices: Any, has_initial_state: Any = None, mask: Any = None,
                eps: float = 1e-12, layout: str = "bhsd", out: Any = None,
                backend: str | None = None, validate: bool = False) -> Any:
        """Run N packed prompts through the causal forward from their slots, and leave each
        one's outgoing state in its slot.

        Parameters
        ----------
        q, k : array (1, H, T, Dk), or (1, T, H, Dk) with ``layout="bshd"``
        v : array (1, H, T, Dv), or (1, T, H, Dv)
            N sequences back to back, as :func:`cosattn.forward` takes them with
            ``cu_seqlens``.
        m : array (H,), optional
            Stabiliser logits.
        cu_seqlens : int32 or int64 array (N+1,)
            Sequence n is positions ``cu_seqlens[n] .. cu_seqlens[n+1]-1``.
        state_indices : int32 or int64 array (N,)
            Sequence n's slot, or -1 for a padding entry.
        has_initial_state : bool array (N,), optional
            False: sequence n starts from a zero state, not from its slot (default: all True).
        mask : bool array (1, T), optional
            Padding inside sequences.
        eps, layout, out, backend, validate
            As given to :func:`cosattn.forward`: ``out``, an array like v (C-contiguous,
            sharing no memory with the inputs or the pool) that receives the outputs, so that
            a serving loop reuses one buffer per prompt size.

        Returns
        -------
        o : array like v, in the dtype and framework of the inputs (+0 at padding entries;
            ``out`` when given).
        """
        prepared = val.prefill_call(self.kv, self.count, q, k, v, m, cu_seqlens=cu_seqlens,
                                    state_indices=state_indices,
                                    has_initial_state=has_initial_state, mask=mask, eps=eps,
                                    layout=layout, backend=backend, validate=validate, out=out)
        with on_device(prepared.call.p.device):
            prepared.backend.forward(prepared.call)
        return prepared.result("o", out)

    def step(self, q_t: Any, k_t: Any, v_t: Any, m: Any = None, *, state_indices: Any,
             has_initial_state: Any = None, mask: Any = None, eps: float = 1e-12,
             out: Any = None, backend: str | None = None, validate: bool = False) -> Any:
        """Absorb one token for each of N entries into its slot, in place, and return the
        outputs (:meth:`cosattn.RecurrentState.step` on the named slots).

        Parameters
        ----------
        q_t, k_t : array (N, H, Dk)
        v_t : array (N, H, Dv)
        m : array (H,), optional
        state_indices : int32 or int64 array (N,)
            Entry n's slot, or -1 for a padding entry (a fixed batch with free places).
        has_initial_state : bool array (N,), optional
            False: entry n starts from a zero state, not from its slot.
        mask : bool array (N,), optional
            False for entries whose token is padding: they output zeros and leave their slot
            as it was (or zero it, where they start from a zero state).
        eps, out, backend, validate
            As given to :meth:`cosattn.RecurrentState.step`.

        Returns
        -------
        o_t : array (N, H, Dv) in the dtype and framework of the inputs (``out`` when given).
        """
        prepared = val.step_call(self.kv, self.count, q_t, k_t, v_t, m, mask=mask, eps=eps,
                                 out=out, backend=backend, validate=validate,
                                 state_indices=state_indices,
                                 has_initial_state=has_initial_state)
        with on_device(prepared.call.p.device):
            prepared.backend.step(prepared.call)
        return prepared.result("o", out)
