"""Backend registry and selection.

A backend is a module with:

- ``DEVICE``: ``"cpu"`` or ``"cuda"``, the kind of arrays it runs on;
- ``unavailable() -> str | None``: why it cannot run here (None when it can);
- ``forward(p, q, k, v, m, mask, kv0, count0, o, *, want_state) -> (kv, count) | (None, None)``;
- ``backward(p, do, q, k, v, m, mask, kv0, count0, dkv, dq, dk, dv) -> (dm, dkv0)``;
- ``step(p, kv, count, q, k, v, m, mask, o) -> None``.

Arguments are native arrays (NumPy or CuPy) that passed :mod:`cosattn._validate`, in the
``(B, H, S, D)`` order as possibly strided views; ``p`` is the :class:`~cosattn._validate.Problem`.
``m`` is None or an ``(H,)`` array in ``p.acc``; ``mask`` None or ``(B, S)`` bool; ``kv0``,
``count0`` and ``dkv`` may be None (a zero state). Outputs ``o``, ``dq``, ``dk``, ``dv`` are
preallocated in the input dtype and written by the backend; a backend never writes its inputs.
``step`` updates ``kv`` (B, H, Dv, Dk) and ``count`` (B,) in place and writes ``o`` (B, H, Dv).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .._interop import Device

NAMES = ("numpy", "cupy", "numba")
ENV_VAR = "COSATTN_BACKEND"


def load(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    return importlib.import_module(f"{__name__}._{name}")


def _reason(name: str) -> str | None:
    try:
        module = load(name)
    except ImportError as exc:
        return f"cannot import it: {exc}"
    return module.unavailable()


def available_backends() -> dict[str, str | None]:
    """Every backend with None when it can run here, else the reason it cannot.

    Examples
    --------
    >>> cosattn.available_backends()["numpy"] is None
    True
    """
    return {name: _reason(name) for name in NAMES}


def select(name: str | None, device: Device) -> ModuleType:
    """The backend for arrays on ``device``: ``name``, else ``$COSATTN_BACKEND``, else a default."""
    name = name or os.environ.get(ENV_VAR) or None
    if name is None:
        if device.kind == "cpu":
            return load("numpy")
        reasons = {}
        for candidate in ("cupy", "numba"):
            reasons[candidate] = _reason(candidate)
            if reasons[candidate] is None:
                return load(candidate)
        why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise RuntimeError(f"no GPU backend can run the arrays on {device} ({why})")
    reason = _reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    module = load(name)
    if module.DEVICE != device.kind:
        raise ValueError(
            f"backend {name!r} runs on {module.DEVICE} arrays but the inputs are on {device}; "
            "nothing is copied across devices"
        )
    return module
