"""The parallel operation: :func:`forward`, :func:`backward`, and :func:`absorb`, the forward's
state without its output (docs/spec.md)."""

from __future__ import annotations

from typing import Any

from . import _validate as val
from ._device import on_device
from ._interop import export_array
from .recurrent import RecurrentState


def _state_arrays(state: Any, name: str = "state") -> tuple[Any, Any] | None:
    if state is None:
        return None
    if not isinstance(state, RecurrentState):
        raise TypeError(f"{name} must be a cosattn.RecurrentState, got {type(state).__name__}")
    return state.kv, state.count


def forward(q: Any, k: Any, v: Any, m: Any = None, *, causal: bool = True, mask: Any = None,
            state: RecurrentState | None = None, return_state: bool = False,
            cu_seqlens: Any = None, total: RecurrentState | None = None, eps: float = 1e-12,
            layout: str = "bhsd", backend: str | None = None, validate: bool = False,
            out: Any = None) -> Any:
    """Cottention forward: cosine attention with the learned length stabiliser.

    Parameters
    ----------
    q, k : array (B, H, S, Dk), or (B, S, H, Dk) with ``layout="bshd"``
        Queries and keys; float16, bfloat16, float32 or float64, any DLPack array.
    v : array (B, H, S, Dv), or (B, S, H, Dv)
        Values, same dtype as q and k.
    m : array (H,), optional
        Per-head stabiliser logit: value j is divided by ``max(1, c_j) ** sigmoid(m_h)``.
    causal : bool
        Causal (default) or bidirectional.
    mask : bool array (B, S), optional
        True where the token is real; padded tokens give zero output and add nothing.
    state : RecurrentState, optional
        Incoming state (causal only), one row per sequence; it is not modified.
    return_state : bool
        Also return the outgoing :class:`RecurrentState` (causal only).
    cu_seqlens : int32 or int64 array (N+1,), optional
        Packed sequences (docs/spec.md, "Packed variable-length sequences"): q, k, v hold N
        sequences back to back in one row (B = 1, S = T tokens), sequence n at positions
        ``cu_seqlens[n] .. cu_seqlens[n+1]-1`` (``cu_seqlens[0] = 0``, non-decreasing, ending
        at T; empty sequences allowed). Each sequence is attended on its own, as a padded
        batch would be; ``mask`` (1, T) pads inside sequences, and a state has N rows.
    total : RecurrentState, optional
        Bidirectional only: this call's tokens are a part of a longer sequence, whose
        ``Σ ṽ k̂ᵀ`` (``total.kv``, (B, H, Dv, Dk)) and number of real tokens per row
        (``total.count``, (B,)) are given: ``o_i = real_i · total.kv · q̂_i``, and every value's
        stabiliser counts ``total.count``. Each part's share is :func:`absorb` with
        ``causal=False, total_count=total.count``; their sum is ``total.kv``
        (docs/spec.md, "Context parallel"). It is not modified. Not with ``cu_seqlens``
        (packed sequences are whole sequences): ``ValueError``.
    eps : float
        Norm floor of the cosine normalisation.
    layout : {"bhsd", "bshd"}
        Order of the axes of q, k, v and o.
    backend : {"numpy", "cupy", "numba"}, optional
        Override the choice made from where the data lives.
    validate : bool
        Also check values that need a device→host copy on CUDA (a state's counts); host
        arrays are always checked. ``COSATTN_VALIDATE=1`` turns it on everywhere.
    out : array like v, optional
        Where to write ``o``, so that a training loop reuses one buffer instead of fresh memory
        each step: v's shape (in ``layout``) and dtype, C-contiguous, writable, sharing no
        memory with any other argument. Not for JAX arrays, which are immutable.

    Returns
    -------
    o : array like v, in the dtype and framework of the inputs (``out`` when given)
        ``(o, state)`` with ``return_state=True``.

    Examples
    --------
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 2, 5, 4), dtype=np.float32)
    >>> o, state = cosattn.forward(q, k, v, np.zeros(2), return_state=True)
    >>> o.shape, state.kv.shape
    ((1, 2, 5, 4), (1, 2, 4, 4))
    >>> o, state = cosattn.forward(q, k, v, return_state=True,
    ...                            cu_seqlens=np.array([0, 2, 2, 5]))  # lengths 2, 0, 3
    >>> state.kv.shape
    (3, 2, 4, 4)
    """
    prepared = val.forward_call(q, k, v, m, causal=causal, mask=mask, state=_state_arrays(state),
                                total=_state_arrays(total, "total"), return_state=return_state,
                                eps=eps, layout=layout, backend=backend, validate=validate,
                                cu_seqlens=cu_seqlens, out=out)
    with on_device(prepared.call.p.device):
        new_state = prepared.backend.forward(prepared.call)
    o = prepared.result("o", out)
    if new_state is None:
        return o
    kv, count = (export_array(x, prepared.framework) for x in new_state)
    return o, RecurrentState(kv, count)


def backward(do: Any, q: Any, k: Any, v: Any, m: Any = None, *, causal: bool = True,
             mask: Any = None, state: RecurrentState | None = None, dstate: Any = None,
             cu_seqlens: Any = None, total: RecurrentState | None = None, eps: float = 1e-12,
             layout: str = "bhsd", backend: str | None = None,
             validate: bool = False, out: Any = None) -> tuple:
    """Gradients of :func:`forward` with respect to q, k, v, m (and the incoming state).

    Parameters
    ----------
    do : array like v
        Gradient arriving at ``o``, same dtype as q, k, v.
    q, k, v, m, causal, mask, state, cu_seqlens, total, eps, layout, backend, validate
        As given to :func:`forward`.
    dstate : array (B, H, Dv, Dk), optional
        Gradient arriving at the outgoing state's ``kv`` (causal); (N, H, Dv, Dk) for packed
        sequences. With ``total``, the gradient arriving at ``total.kv`` from the whole
        sequence's outputs; k and v receive their gradient through it alone (zero when it is
        not given).
    out : tuple (dq, dk, dv), optional
        Where to write the three gradients, each as :func:`forward`'s ``out`` is to v (shaped
        like q, k, v; C-contiguous, writable, no shared memory); a None entry gets a new
        array.

    Returns
    -------
    (dq, dk, dv, dm) : dq, dk, dv like q, k, v (the ``out`` arrays when given); ``dm`` (H,) in
        float32 (float64 for float64 inputs), None when ``m`` is None. With ``state`` given, a
        fifth item ``dkv0``, the gradient of the incoming state's ``kv``, in the state's dtype.
        Packed, dq, dk, dv are packed like q, k, v, ``dkv0`` has N rows and ``dm`` sums over
        every sequence.

    Examples
    --------
    >>> dq, dk, dv, dm = cosattn.backward(np.ones_like(v), q, k, v, np.zeros(2))
    """
    prepared = val.backward_call(do, q, k, v, m, causal=causal, mask=mask,
                                 state=_state_arrays(state), total=_state_arrays(total, "total"),
                                 dstate=dstate, eps=eps, layout=layout, backend=backend,
                                 validate=validate, cu_seqlens=cu_seqlens, out=out)
    with on_device(prepared.call.p.device):
        dm, dkv0 = prepared.backend.backward(prepared.call)
    given = (None,) * 3 if out is None else out
    grads = [prepared.result(n, g) for n, g in zip(("dq", "dk", "dv"), given, strict=True)]
    grads.append(None if dm is None else export_array(dm, prepared.framework))
    if state is not None:
        grads.append(export_array(dkv0, prepared.framework))
    return tuple(grads)


def absorb(k: Any, v: Any, m: Any = None, *, causal: bool = True, mask: Any = None,
           state: RecurrentState | None = None, total_count: Any = None, eps: float = 1e-12,
           layout: str = "bhsd", backend: str | None = None,
           validate: bool = False) -> RecurrentState:
    """The state a sequence leaves, without its output: ``Σ ṽ k̂ᵀ`` and the real tokens.

    Causal: the state :func:`forward` with ``return_state=True`` would return for these
    k, v, m, mask and incoming ``state``, without computing ``o`` (q is not needed). A state
    whose ``kv`` is zero and whose ``count`` is n gives a segment's own sum as if n real tokens
    came before it. Bidirectional (``causal=False``): the call's ``Σ ṽ k̂ᵀ`` with every token's
    count ``total_count`` (the whole sequence's real tokens; the call's own when None), and its
    number of real tokens. These are the pieces from which sequences split along S are put
    together (docs/spec.md, "Context parallel").

    Parameters
    ----------
    k : array (B, H, S, Dk), or (B, S, H, Dk) with ``layout="bshd"``
    v : array (B, H, S, Dv), or (B, S, H, Dv)
    m, causal, mask, state, eps, layout, backend, validate
        As given to :func:`forward`.
    total_count : int array (B,), optional
        Bidirectional only: every token's count c_j.

    Returns
    -------
    RecurrentState
        ``kv`` (B, H, Dv, Dk) in the state's dtype (float32; float64 for float64 inputs),
        ``count`` (B,) int64: the incoming count plus the real tokens of the call.

    Examples
    --------
    >>> first = cosattn.absorb(k[:, :, :3], v[:, :, :3], m)
    >>> whole = cosattn.absorb(k[:, :, 3:], v[:, :, 3:], m, state=first)
    >>> int(whole.count[0])
    5
    """
    prepared = val.absorb_call(k, v, m, causal=causal, mask=mask, state=_state_arrays(state),
                               total_count=total_count, eps=eps, layout=layout,
                               backend=backend, validate=validate)
    with on_device(prepared.call.p.device):
        kv, count = prepared.backend.forward(prepared.call)
    return RecurrentState(*(export_array(x, prepared.framework) for x in (kv, count)))
