"""The backend protocol, the registry and the choice of a backend.

A backend is a module that satisfies :class:`Backend`. It is given a call description of
:mod:`cosattn._call` whose every argument passed :mod:`cosattn._validate`; it writes the call's
preallocated outputs (``o``; ``dq``, ``dk``, ``dv``) and never its inputs; only a step changes
the state it is given, in place.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Protocol, cast

import numpy as np

from .._call import BackwardCall, ForwardCall, StepCall
from .._device import Device


class Backend(Protocol):
    DEVICE: str  # "cpu" or "cuda": the kind of arrays it runs on
    VARLEN: bool  # whether it takes packed sequences (cu_seqlens) and pools of states

    def unavailable(self) -> str | None:
        """Why it cannot run here; None when it can."""

    def forward(self, call: ForwardCall) -> tuple[Any, Any] | None:
        """Write ``call.o``; return the outgoing ``(kv, count)`` when ``call.want_state``; with
        ``call.state_indices``, write the outgoing states into the named slots instead."""

    def backward(self, call: BackwardCall) -> tuple[Any, Any]:
        """Write ``call.dq``, ``call.dk``, ``call.dv``; return ``(dm, dkv0)``."""

    def step(self, call: StepCall) -> None:
        """Update ``call.kv`` and ``call.count`` in place (the named slots, with
        ``call.state_indices``) and write ``call.o``."""


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, for non-negative integers."""
    return -(-a // b)


def packed_tokens(xp: Any, cu_seqlens: Any, mask: Any, S: int) -> Any:
    """The real tokens of each sequence of a packed row, (N,) int64, in the array module ``xp``
    of the arrays (no host sync on a device): ``cu_seqlens`` (N+1,) clamped into 0..S as the
    kernels clamp them, ``mask`` (1, S) bool or None."""
    cu = xp.clip(cu_seqlens.astype(np.int64), 0, S)
    if mask is None:
        return xp.diff(cu)
    real = xp.cumsum(mask[0], dtype=np.int64)
    return xp.diff(xp.concatenate((xp.zeros(1, dtype=np.int64), real))[cu])


NAMES = ("numpy", "cupy", "numba")
ENV_VAR = "COSATTN_BACKEND"


@functools.cache
def load(name: str) -> Backend:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    return cast(Backend, importlib.import_module(f"{__name__}._{name}"))


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


def select(name: Any, device: Device) -> Backend:
    """The backend for arrays on ``device``: ``name``, else ``$COSATTN_BACKEND``, else a default.

    An unknown name is a ``ValueError`` naming where it came from; a backend that cannot run
    here is a ``RuntimeError`` saying why (never a silent fallback).
    """
    given_by = "backend="
    if name is None and os.environ.get(ENV_VAR):
        name, given_by = os.environ[ENV_VAR], f"the environment variable {ENV_VAR}"
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
    if not isinstance(name, str):
        raise TypeError(f"backend must be None or one of {NAMES}, got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r} given by {given_by}; choose one of {NAMES}")
    reason = _reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} ({given_by}) cannot run here: {reason}")
    backend = load(name)
    if backend.DEVICE != device.kind:
        raise ValueError(
            f"backend {name!r} runs on {backend.DEVICE} arrays but the inputs are on {device}; "
            "nothing is copied across devices"
        )
    return backend
