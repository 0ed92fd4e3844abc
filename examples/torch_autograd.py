"""Cottention inside PyTorch autograd: cosattn's forward and backward as a torch.autograd.Function.

cosattn takes torch tensors directly (zero-copy through DLPack) and hands results back as torch
tensors on the same device; it does not record autograd itself, so tensors that require grad are
passed ``.detach()``-ed and the gradients come from :func:`cosattn.backward`. The check at the
bottom compares the function, values and gradients, with torch's own autograd of the naive
quadratic formula (docs/spec.md)::

    python examples/torch_autograd.py
"""

from __future__ import annotations

from typing import Any

import torch

import cosattn


class Cottention(torch.autograd.Function):
    """``o = cottention(q, k, v, m, mask, causal)`` with gradients for q, k, v and m."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        q, k, v, m = (t.detach() for t in (q, k, v, m))
        ctx.save_for_backward(q, k, v, m)
        ctx.mask, ctx.causal = mask, causal
        return cosattn.forward(q, k, v, m, causal=causal, mask=mask)

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple:
        q, k, v, m = ctx.saved_tensors
        dq, dk, dv, dm = cosattn.backward(do.detach(), q, k, v, m,
                                          causal=ctx.causal, mask=ctx.mask)
        return dq, dk, dv, dm.to(m.dtype), None, None


def cottention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor, *,
               causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cottention of q, k (B, H, S, Dk), v (B, H, S, Dv) with stabiliser logits m (H,) and an
    optional bool mask (B, S); differentiable in q, k, v and m. Returns o (B, H, S, Dv)."""
    return Cottention.apply(q, k, v, m, mask, causal)


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor, *,
          causal: bool = True, mask: torch.Tensor | None = None,
          eps: float = 1e-12) -> torch.Tensor:
    """docs/spec.md's forward as the quadratic masked form, written in torch for autograd."""
    B, S = q.shape[0], q.shape[2]
    real = torch.ones(B, S, dtype=q.dtype) if mask is None else mask.to(q.dtype)
    qh = torch.nn.functional.normalize(q, dim=-1, eps=eps)
    kh = torch.nn.functional.normalize(k, dim=-1, eps=eps)
    c = real.cumsum(dim=1) if causal else real.sum(dim=1, keepdim=True).expand(B, S)
    w = c.clamp(min=1.0)[:, None, :] ** -torch.sigmoid(m)[None, :, None]  # (B, H, S)
    vt = (real[:, None, :] * w)[..., None] * v
    scores = qh @ kh.transpose(-1, -2)  # (B, H, S, S)
    if causal:
        scores = scores.tril()
    return real[:, None, :, None] * (scores @ vt)


def gradient_check(*, B: int = 2, H: int = 3, S: int = 37, Dk: int = 8, Dv: int = 5,
                   dtype: torch.dtype = torch.float64, causal: bool = True,
                   masked: bool = True, seed: int = 0) -> dict[str, float]:
    """Relative errors (docs/spec.md's measure) of :func:`cottention` against torch autograd of
    :func:`naive`: the output ``o`` and the gradients ``q``, ``k``, ``v``, ``m`` of
    ``sum(o * g)`` for a random ``g``."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    q, k, v, m = leaf(B, H, S, Dk), leaf(B, H, S, Dk), leaf(B, H, S, Dv), leaf(H)
    mask = torch.rand(B, S, generator=gen) < 0.8 if masked else None
    g = torch.randn(B, H, S, Dv, generator=gen, dtype=dtype)
    errors = {}
    results = []
    for fn in (cottention, naive):
        o = fn(q, k, v, m, causal=causal, mask=mask)
        grads = torch.autograd.grad((o * g).sum(), (q, k, v, m))
        results.append((o.detach(), *grads))
    for name, x, ref in zip(("o", "q", "k", "v", "m"), *results, strict=True):
        floor = 1e-6 * ref.numel() ** 0.5
        errors[name] = float((x - ref).norm() / max(float(ref.norm()), floor))
    return errors


def main() -> None:
    for causal in (True, False):
        errors = gradient_check(causal=causal)
        shown = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
        print(f"float64, causal={causal}, masked: relative errors {shown}")
        if max(errors.values()) > 1e-12:
            raise SystemExit("cosattn and torch autograd of the naive formula disagree")
    print("cosattn's forward/backward match torch autograd of the naive formula")


if __name__ == "__main__":
    main()
