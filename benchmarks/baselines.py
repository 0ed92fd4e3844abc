"""The two baselines cosattn is measured against, written once for any array namespace ``xp``.

Both compute docs/spec.md's causal operation without an incoming state: cosine-normalised q and k,
each value scaled by ``max(1, c_j) ** -sigmoid(m_h)`` with the count ``c_j`` at its own position,
padded tokens (``mask`` False) contributing nothing and receiving zero output. They take and
return arrays of ``xp`` (NumPy or CuPy), compute in float32 (float64 for float64 inputs) and
return o, dq, dk, dv in the input dtype, like :func:`cosattn.forward` / :func:`cosattn.backward`.

``appendix_*``: the cumulative-sum form of Mongaras, Dohm & Larson (2024), "Cottention: Linear
Transformers With Cosine Attention", appendix A. The state after every position,
``KV_i = sum_{j <= i} ṽ_j k̂_jᵀ``, is materialised as a cumulative sum over the sequence of the
Dv x Dk outer products, a (B, H, S, Dv, Dk) tensor (S·D² memory), and ``o_i = KV_i q̂_i``. Its
backward is the hand-derived one of the same form: ``dq̂_i = KV_iᵀ do_i`` from the same cumulative
sum, and from the reverse cumulative sum ``G_j = sum_{i >= j} do_i q̂_iᵀ``: ``dk̂_j = G_jᵀ ṽ_j``,
``dṽ_j = G_j k̂_j``; then the stabiliser and normalisation chain rules of docs/spec.md. As printed,
the sum is the framework's ``cumsum`` (``xp.cumsum``, which writes a second tensor of that size).

``appendix_sliced_*``: the same form and the same sums in the same order, but the cumulative sum
runs in place, adding whole (B, H, Dv, Dk) slices in sequence. NumPy's ``cumsum`` along that axis
walks one strided line at a time and is some 40 times slower than this; the sliced variant shows
what the form costs without that NumPy artefact (on a GPU, where ``cupy.cumsum`` is a parallel
scan, only the printed form is measured).

``quadratic_*``: the masked S x S form, ``o = tril(Q̂ K̂ᵀ) Ṽ`` (S² memory per head).

``needed_bytes`` estimates the peak working memory of each, so a harness can skip sizes that do
not fit instead of running them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FORMS = ("appendix", "appendix_sliced", "quadratic")
MODES = ("fwd", "fwdbwd")
EPS = 1e-12


@dataclass
class _Prepared:
    """Normalised, masked, scaled inputs in the accumulation dtype, all (B, H, S, D)."""

    qh: Any  # real_i q_i / max(|q_i|, eps)
    kh: Any  # real_j k_j / max(|k_j|, eps)
    vt: Any  # real_j w_j v_j
    q_inv: Any  # 1 / max(|q_i|, eps), (B, H, S, 1)
    k_inv: Any
    real: Any  # mask as 0/1, (B, 1, S, 1)
    scale: Any  # real_j w_j, (B, H, S, 1)
    log_c: Any  # ln max(1, c_j), (B, 1, S, 1)
    sig: Any  # sigmoid(m), (H,), or None


def accumulation_dtype(dtype: Any) -> np.dtype:
    """float64 for float64 inputs, float32 for every other float dtype (docs/spec.md, "Numbers")."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _normalise(xp: Any, x: Any, real: Any, eps: float) -> tuple[Any, Any]:
    inv = 1.0 / xp.maximum(xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True)), eps)
    return x * (inv * real), inv


def _prepare(xp: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, eps: float) -> _Prepared:
    B, S = q.shape[0], q.shape[2]
    acc = accumulation_dtype(q.dtype)
    if mask is None:
        real = xp.ones((B, 1, S, 1), dtype=acc)
        c = xp.broadcast_to(xp.arange(1, S + 1, dtype=acc), (B, S))
    else:
        real = mask.astype(acc)[:, None, :, None]
        c = xp.cumsum(mask, axis=1, dtype=acc)
    log_c = xp.log(xp.maximum(c, 1.0))[:, None, :, None]
    qh, q_inv = _normalise(xp, q.astype(acc), real, eps)
    kh, k_inv = _normalise(xp, k.astype(acc), real, eps)
    sig = None
    scale = real
    if m is not None:
        sig = 1.0 / (1.0 + xp.exp(-m.astype(acc)))
        scale = real * xp.exp(-sig[None, :, None, None] * log_c)
    return _Prepared(qh, kh, v.astype(acc) * scale, q_inv, k_inv, real, scale, log_c, sig)


def _normalise_backward(xp: Any, dxh: Any, xh: Any, inv: Any, eps: float) -> Any:
    """docs/spec.md: ``(dx̂ − x̂ (x̂·dx̂)) / |x|`` where ``|x| > eps``, else ``dx̂ / eps``."""
    inner = xp.sum(xh * dxh, axis=-1, keepdims=True) * (inv < 1.0 / eps)
    return (dxh - xh * inner) * inv


def _epilogue(xp: Any, x: _Prepared, dqh: Any, dkh: Any, dvt: Any, dtype: Any,
              eps: float) -> tuple[Any, Any, Any, Any]:
    """dq, dk, dv in ``dtype`` and dm from the gradients of q̂', k̂' and ṽ."""
    dm = None
    if x.sig is not None:
        per = xp.sum(dvt * x.vt, axis=-1, keepdims=True) * -x.log_c  # (B, H, S, 1)
        dm = per.sum(axis=(0, 2, 3)) * x.sig * (1.0 - x.sig)
    dq = _normalise_backward(xp, dqh, x.qh, x.q_inv, eps)
    dk = _normalise_backward(xp, dkh, x.kh, x.k_inv, eps)
    return dq.astype(dtype), dk.astype(dtype), (dvt * x.scale).astype(dtype), dm


def _outer_cumsum(xp: Any, a: Any, b: Any, *, reverse: bool, sliced: bool) -> Any:
    """``sum_{j <= i} a_j b_jᵀ`` (``j >= i`` with ``reverse``) for every i: (B, H, S, Da, Db).

    ``xp.cumsum`` as printed (a second tensor of the same size), or with ``sliced`` in place,
    one (B, H, Da, Db) slice added to the next at a time.
    """
    outer = a[..., :, None] * b[..., None, :]
    view = xp.flip(outer, axis=2) if reverse else outer
    if not sliced:
        view = xp.cumsum(view, axis=2)
        del outer
        return xp.flip(view, axis=2) if reverse else view
    for i in range(1, view.shape[2]):
        xp.add(view[:, :, i - 1], view[:, :, i], out=view[:, :, i])
    return outer


def appendix_forward(xp: Any, q: Any, k: Any, v: Any, m: Any = None, *, mask: Any = None,
                     eps: float = EPS, sliced: bool = False) -> Any:
    """Causal forward in the cumulative-sum form of the paper's appendix A.

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``; every array belongs to it.
    q, k : array (B, H, S, Dk)
    v : array (B, H, S, Dv)
    m : array (H,), optional
        Stabiliser logits.
    mask : bool array (B, S), optional
        True where the token is real.
    sliced : bool
        Run the cumulative sum in place, slice by slice (``appendix_sliced``).

    Returns
    -------
    o : array (B, H, S, Dv) in the dtype of ``v``.

    Examples
    --------
    >>> o = appendix_forward(np, q, k, v, np.full(H, 0.5))
    """
    x = _prepare(xp, q, k, v, m, mask, eps)
    kv = _outer_cumsum(xp, x.vt, x.kh, reverse=False, sliced=sliced)  # (B, H, S, Dv, Dk)
    return xp.einsum("bhsvk,bhsk->bhsv", kv, x.qh).astype(v.dtype)


def appendix_backward(xp: Any, do: Any, q: Any, k: Any, v: Any, m: Any = None, *,
                      mask: Any = None, eps: float = EPS,
                      sliced: bool = False) -> tuple[Any, Any, Any, Any]:
    """Hand-written backward of :func:`appendix_forward`, in the same cumulative-sum form.

    Parameters
    ----------
    do : array (B, H, S, Dv)
        Gradient arriving at ``o``.
    xp, q, k, v, m, mask, eps, sliced
        As given to :func:`appendix_forward`.

    Returns
    -------
    (dq, dk, dv, dm) : dq, dk, dv like q, k, v; dm (H,) in the accumulation dtype, None when
        ``m`` is None.
    """
    x = _prepare(xp, q, k, v, m, mask, eps)
    dof = do.astype(x.qh.dtype)
    kv = _outer_cumsum(xp, x.vt, x.kh, reverse=False, sliced=sliced)
    dqh = xp.einsum("bhsvk,bhsv->bhsk", kv, dof) * x.real
    del kv
    g = _outer_cumsum(xp, dof, x.qh, reverse=True, sliced=sliced)  # G_j = sum_{i >= j} do_i q̂'_iᵀ
    dkh = xp.einsum("bhsvk,bhsv->bhsk", g, x.vt)
    dvt = xp.einsum("bhsvk,bhsk->bhsv", g, x.kh)
    del g
    return _epilogue(xp, x, dqh, dkh, dvt, q.dtype, eps)


def appendix_sliced_forward(*args: Any, **kwargs: Any) -> Any:
    """:func:`appendix_forward` with ``sliced=True``."""
    return appendix_forward(*args, **kwargs, sliced=True)


def appendix_sliced_backward(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """:func:`appendix_backward` with ``sliced=True``."""
    return appendix_backward(*args, **kwargs, sliced=True)


def _causal_keep(xp: Any, S: int) -> Any:
    """(S, S) bool, True where j <= i."""
    pos = xp.arange(S)
    return pos[:, None] >= pos[None, :]


def quadratic_forward(xp: Any, q: Any, k: Any, v: Any, m: Any = None, *, mask: Any = None,
                      eps: float = EPS) -> Any:
    """Causal forward through the masked (B, H, S, S) score matrix.

    Arguments and result as :func:`appendix_forward`.
    """
    x = _prepare(xp, q, k, v, m, mask, eps)
    scores = x.qh @ x.kh.swapaxes(-1, -2)
    xp.multiply(scores, _causal_keep(xp, q.shape[2]), out=scores)
    return (scores @ x.vt).astype(v.dtype)


def quadratic_backward(xp: Any, do: Any, q: Any, k: Any, v: Any, m: Any = None, *,
                       mask: Any = None, eps: float = EPS) -> tuple[Any, Any, Any, Any]:
    """Backward of :func:`quadratic_forward` through (B, H, S, S) matrices, one at a time.

    Arguments and result as :func:`appendix_backward`.
    """
    x = _prepare(xp, q, k, v, m, mask, eps)
    dof = do.astype(x.qh.dtype)
    keep = _causal_keep(xp, q.shape[2])
    dov = dof @ x.vt.swapaxes(-1, -2)  # (do_i · ṽ_j)
    xp.multiply(dov, keep, out=dov)
    dqh = (dov @ x.kh) * x.real
    dkh = dov.swapaxes(-1, -2) @ x.qh
    del dov
    qk = x.qh @ x.kh.swapaxes(-1, -2)  # (q̂'_i · k̂_j)
    xp.multiply(qk, keep, out=qk)
    dvt = qk.swapaxes(-1, -2) @ dof
    del qk
    return _epilogue(xp, x, dqh, dkh, dvt, q.dtype, eps)


def needed_bytes(form: str, mode: str, B: int, H: int, S: int, Dk: int, Dv: int,
                 dtype: Any) -> int:
    """Peak working memory of one call (inputs excluded, outputs included), in bytes.

    The dominant term is the (B, H, S, Dv, Dk) tensor of outer products of the appendix form with
    its cumulative sum (a second one of the same size, except ``appendix_sliced``, which sums in
    place) or the (B, H, S, S) matrix of the quadratic
    form (plus the (S, S) bool mask); the linear terms count the accumulation-dtype copies of
    q, k, v (and do) and the temporaries of the prologue and epilogue. ``mode`` is ``"fwd"`` or
    ``"fwdbwd"`` (a forward, then a backward).
    """
    if form not in FORMS or mode not in MODES:
        raise ValueError(f"form must be one of {FORMS} and mode one of {MODES}, "
                         f"got {form!r}, {mode!r}")
    a = accumulation_dtype(dtype).itemsize
    e = np.dtype(dtype).itemsize
    rows = B * H * S
    if form.startswith("appendix"):
        big = rows * Dv * Dk * a * (1 if form == "appendix_sliced" else 2)
    else:
        big = B * H * S * S * a + S * S
    linear_fwd = rows * (3 * Dk + 3 * Dv) * a + rows * Dv * e
    linear_bwd = rows * (5 * Dk + 5 * Dv) * a + rows * (2 * Dk + Dv) * e
    if mode == "fwd":
        return big + linear_fwd
    return big + linear_bwd + rows * Dv * e
