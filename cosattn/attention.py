"""The parallel operation: :func:`forward` and :func:`backward` (SPEC.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validate as val
from ._interop import Imported, export_array, namespace, on_device
from .backends import select
from .recurrent import RecurrentState


@dataclass
class _Call:
    """One validated call: the problem, native bhsd views and where results go."""

    p: val.Problem
    arrays: dict[str, Any]
    m: Any
    mask: Any
    kv0: Any
    count0: Any
    framework: str
    xp: Any
    backend: Any
    shapes: dict[str, tuple[int, ...]]

    def empty(self, like: str, layout: str) -> tuple[Any, Any]:
        """An output shaped like argument ``like`` in the caller's layout, and its bhsd view."""
        out = self.xp.empty(self.shapes[like], dtype=self.p.dtype)
        return out, val.to_bhsd(out, layout, self.xp)


def _prepare(named: dict[str, Any], m: Any, mask: Any, state: RecurrentState | None,
             causal: bool, eps: float, layout: str, backend: str | None,
             extra: dict[str, Any] | None = None) -> tuple[_Call, dict[str, Imported]]:
    val.check_layout(layout)
    eps = val.check_eps(eps)
    if state is not None and not causal:
        raise ValueError("a recurrent state exists for the causal form only (causal=False given)")
    if state is not None and not isinstance(state, RecurrentState):
        raise TypeError(f"state must be a cosattn.RecurrentState, got {type(state).__name__}")
    everything = dict(named, m=m, mask=mask, **(extra or {}))
    if state is not None:
        everything.update({"state.kv": state.kv, "state.count": state.count})
    imported = val.import_all(everything)
    raw = {n: imported[n].array for n in named}
    dtype = val.check_float_dtypes(raw)
    B, H, S, Dk, Dv = val.check_qkv(raw, layout)
    acc = val.accumulation_dtype(dtype)
    first = imported["q"]
    xp = namespace(first.device)
    native_mask = None
    if mask is not None:
        native_mask = imported["mask"].array
        val.check_mask(native_mask, (B, S), "(B, S)")
    kv0 = count0 = None
    state_dtype = acc
    if state is not None:
        kv0, count0 = imported["state.kv"].array, imported["state.count"].array
        val.check_state(kv0, count0, B, H, Dk, Dv, acc)
        count0 = xp.astype(count0, np.int64, copy=False)
        state_dtype = np.dtype(kv0.dtype)
    with on_device(first.device):
        native_m = None if m is None else val.check_m(imported["m"].array, H, acc, xp)
    p = val.Problem(B, H, S, Dk, Dv, dtype, acc, state_dtype, causal, eps, first.device,
                    first.stream)
    call = _Call(p, {n: val.to_bhsd(a, layout, xp) for n, a in raw.items()}, native_m, native_mask,
                 kv0, count0, first.framework, xp, select(backend, first.device),
                 {n: tuple(a.shape) for n, a in raw.items()})
    return call, imported


def forward(q: Any, k: Any, v: Any, m: Any = None, *, causal: bool = True, mask: Any = None,
            state: RecurrentState | None = None, return_state: bool = False, eps: float = 1e-12,
            layout: str = "bhsd", backend: str | None = None) -> Any:
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
        Incoming state (causal only); it is not modified.
    return_state : bool
        Also return the outgoing :class:`RecurrentState` (causal only).
    eps : float
        Norm floor of the cosine normalisation.
    layout : {"bhsd", "bshd"}
        Order of the axes of q, k, v and o.
    backend : {"numpy", "cupy", "numba"}, optional
        Override the choice made from where the data lives.

    Returns
    -------
    o : array like v, in the dtype and framework of the inputs
        ``(o, state)`` with ``return_state=True``.

    Examples
    --------
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 2, 5, 4), dtype=np.float32)
    >>> o, state = cosattn.forward(q, k, v, np.zeros(2), return_state=True)
    >>> o.shape, state.kv.shape
    ((1, 2, 5, 4), (1, 2, 4, 4))
    """
    if return_state and not causal:
        raise ValueError("return_state=True needs the causal form (causal=False given)")
    call, _ = _prepare({"q": q, "k": k, "v": v}, m, mask, state, causal, eps, layout, backend)
    p, a = call.p, call.arrays
    o, o_view = call.empty("v", layout)
    with on_device(p.device):
        kv, count = call.backend.forward(p, a["q"], a["k"], a["v"], call.m, call.mask, call.kv0,
                                         call.count0, o_view, want_state=return_state)
    o = export_array(o, call.framework)
    if not return_state:
        return o
    return o, RecurrentState(export_array(kv, call.framework), export_array(count, call.framework))


def backward(do: Any, q: Any, k: Any, v: Any, m: Any = None, *, causal: bool = True,
             mask: Any = None, state: RecurrentState | None = None, dstate: Any = None,
             eps: float = 1e-12, layout: str = "bhsd", backend: str | None = None) -> tuple:
    """Gradients of :func:`forward` with respect to q, k, v, m (and the incoming state).

    Parameters
    ----------
    do : array like v
        Gradient arriving at ``o``, same dtype as q, k, v.
    q, k, v, m, causal, mask, state, eps, layout, backend
        As given to :func:`forward`.
    dstate : array (B, H, Dv, Dk), optional
        Gradient arriving at the outgoing state's ``kv`` (causal only).

    Returns
    -------
    (dq, dk, dv, dm) : dq, dk, dv like q, k, v; ``dm`` (H,) in float32 (float64 for float64
        inputs), None when ``m`` is None. With ``state`` given, a fifth item ``dkv0``, the gradient
        of the incoming state's ``kv``, in the state's dtype.

    Examples
    --------
    >>> dq, dk, dv, dm = cosattn.backward(np.ones_like(v), q, k, v, np.zeros(2))
    """
    if dstate is not None and not causal:
        raise ValueError("dstate needs the causal form (causal=False given)")
    call, imported = _prepare({"q": q, "k": k, "v": v, "do": do}, m, mask, state, causal, eps,
                              layout, backend, extra={"dstate": dstate})
    p, a = call.p, call.arrays
    dkv = None
    if dstate is not None:
        dkv = imported["dstate"].array
        if tuple(dkv.shape) != (p.B, p.H, p.Dv, p.Dk):
            raise ValueError(
                f"dstate must have the shape of state.kv (B, H, Dv, Dk) = "
                f"{(p.B, p.H, p.Dv, p.Dk)}, got {tuple(dkv.shape)}"
            )
        if np.dtype(dkv.dtype) not in (np.float32, np.float64):
            raise TypeError(f"dstate must be float32 or float64, got {dkv.dtype}")
    dq, dq_view = call.empty("q", layout)
    dk, dk_view = call.empty("k", layout)
    dv, dv_view = call.empty("v", layout)
    with on_device(p.device):
        dm, dkv0 = call.backend.backward(p, a["do"], a["q"], a["k"], a["v"], call.m, call.mask,
                                         call.kv0, call.count0, dkv, dq_view, dk_view, dv_view)
    grads = [export_array(g, call.framework) for g in (dq, dk, dv)]
    grads.append(None if dm is None else export_array(dm, call.framework))
    if state is not None:
        grads.append(export_array(dkv0, call.framework))
    return tuple(grads)
