"""Cottention inside JAX: cosattn's forward and backward as a ``jax.custom_vjp``.

The primal and the backward rule each call cosattn through ``jax.pure_callback``, so the function
works eagerly, under ``jax.jit`` and inside ``jax.grad``. cosattn takes the callback's JAX arrays
directly (zero-copy on the CPU) and hands its results back as JAX arrays. The check at the bottom
compares values and gradients with JAX's own autograd of the naive quadratic formula
(docs/spec.md, "Forward")::

    python examples/jax_custom_vjp.py

float64 needs JAX's x64 mode (``jax.enable_x64(True)``); without it JAX turns float64 into
float32. On a GPU, ``pure_callback`` moves the arrays through host memory, so this wrapper runs
the CPU backend there: it shows the interface, a native XLA kernel would be the fast way.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cosattn


def _like(x: Any, dtype: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


def _host_forward(q: Any, k: Any, v: Any, m: Any, mask: Any, *, causal: bool) -> Any:
    return cosattn.forward(q, k, v, m, causal=causal, mask=mask)


def _host_backward(do: Any, q: Any, k: Any, v: Any, m: Any, mask: Any, *,
                   causal: bool) -> tuple:
    return cosattn.backward(do, q, k, v, m, causal=causal, mask=mask)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def cottention(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array,
               mask: jax.Array | None = None, causal: bool = True) -> jax.Array:
    """Cottention of q, k (B, H, S, Dk), v (B, H, S, Dv) with stabiliser logits m (H,) and an
    optional bool mask (B, S); differentiable in q, k, v and m. Returns o (B, H, S, Dv)."""
    return jax.pure_callback(partial(_host_forward, causal=causal), _like(v), q, k, v, m, mask)


def _fwd(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array, mask: jax.Array | None,
         causal: bool) -> tuple[jax.Array, tuple]:
    return cottention(q, k, v, m, mask, causal), (q, k, v, m, mask)


def _bwd(causal: bool, saved: tuple, do: jax.Array) -> tuple:
    q, k, v, m, mask = saved
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32  # cosattn's dm precision
    shapes = (_like(q), _like(k), _like(v), _like(m, acc))
    dq, dk, dv, dm = jax.pure_callback(partial(_host_backward, causal=causal), shapes,
                                       do, q, k, v, m, mask)
    return dq, dk, dv, dm.astype(m.dtype), None


cottention.defvjp(_fwd, _bwd)


def naive(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array,
          mask: jax.Array | None = None, causal: bool = True, eps: float = 1e-12) -> jax.Array:
    """docs/spec.md's forward as the quadratic masked form, written in jax.numpy for autograd."""
    B, S = q.shape[0], q.shape[2]
    real = jnp.ones((B, S), q.dtype) if mask is None else mask.astype(q.dtype)

    def unit(x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)

    c = jnp.cumsum(real, axis=1) if causal else jnp.broadcast_to(real.sum(1, keepdims=True), (B, S))
    w = jnp.maximum(c, 1.0)[:, None, :] ** -jax.nn.sigmoid(m)[None, :, None]  # (B, H, S)
    vt = (real[:, None, :] * w)[..., None] * v
    scores = unit(q) @ jnp.swapaxes(unit(k), -1, -2)  # (B, H, S, S)
    if causal:
        scores = jnp.tril(scores)
    return real[:, None, :, None] * (scores @ vt)


def gradient_check(*, B: int = 2, H: int = 3, S: int = 37, Dk: int = 8, Dv: int = 5,
                   dtype: Any = np.float64, causal: bool = True, masked: bool = True,
                   jit: bool = False, seed: int = 0) -> dict[str, float]:
    """Relative errors (docs/spec.md's measure) of :func:`cottention` against JAX autograd of
    :func:`naive`: the output ``o`` and the gradients ``q``, ``k``, ``v``, ``m`` of
    ``sum(o * g)`` for a random ``g``. float64 needs x64 mode (:func:`main` turns it on)."""
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.standard_normal(s), dtype)
                  for s in ((B, H, S, Dk), (B, H, S, Dk), (B, H, S, Dv), (B, H, S, Dv)))
    m = jnp.asarray(rng.standard_normal(H), dtype)
    mask = jnp.asarray(rng.random((B, S)) < 0.8) if masked else None
    results = []
    for fn in (cottention, naive):
        def loss(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array, fn: Any = fn) -> tuple:
            o = fn(q, k, v, m, mask, causal)
            return (o * g).sum(), o

        grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        grads, o = (jax.jit(grad) if jit else grad)(q, k, v, m)
        results.append((o, *grads))
    errors = {}
    for name, x, ref in zip(("o", "q", "k", "v", "m"), *results, strict=True):
        x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        floor = 1e-6 * np.sqrt(ref.size)
        errors[name] = float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))
    return errors


def main() -> None:
    with jax.enable_x64(True):
        for causal in (True, False):
            for jit in (False, True):
                errors = gradient_check(causal=causal, jit=jit)
                shown = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
                print(f"float64, causal={causal}, jit={jit}, masked: relative errors {shown}")
                if max(errors.values()) > 1e-12:
                    raise SystemExit("cosattn and JAX autograd of the naive formula disagree")
    print("cosattn's forward/backward match JAX autograd of the naive formula")


if __name__ == "__main__":
    main()
