"""The one validation layer every backend goes through (SPEC.md, "Bad input").

It imports the caller's arrays as native ones, checks ranks, sizes, dtypes and devices, and
describes the call as a :class:`Problem`. Backends receive only what passed these checks, always
in the canonical ``(B, H, S, D)`` order (as views: nothing is copied here except ``m``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._interop import FLOAT_DTYPES, Device, Imported, import_array

LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class Problem:
    """Sizes and settings of one call, as the backends see it.

    ``dtype`` is the dtype of q, k, v (and do); ``acc`` the accumulation dtype (float64 for float64
    inputs, else float32); ``state_dtype`` the dtype of the recurrent state's ``kv`` (``acc`` when
    no state is given). ``stream`` is the caller's raw CUDA stream handle, None on the CPU.
    """

    B: int
    H: int
    S: int
    Dk: int
    Dv: int
    dtype: np.dtype
    acc: np.dtype
    state_dtype: np.dtype
    causal: bool
    eps: float
    device: Device
    stream: int | None


def _describe(arrays: dict[str, Any]) -> str:
    return ", ".join(f"{n}{tuple(a.shape)}" for n, a in arrays.items())


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps > 0.0:
        raise ValueError(f"eps must be a positive number, got {eps}")
    return eps


def import_all(named: dict[str, Any]) -> dict[str, Imported]:
    """Import every non-None argument and require one framework family and one device."""
    imported = {n: import_array(x, n) for n, x in named.items() if x is not None}
    devices = {str(i.device) for i in imported.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {i.device} ({i.framework})" for n, i in imported.items())
        raise ValueError(
            f"arrays must be on one device; got {where}. Nothing is copied across devices"
        )
    frameworks = {i.framework for i in imported.values()}
    if len(frameworks) > 1:
        which = ", ".join(f"{n} ({i.framework})" for n, i in imported.items())
        raise ValueError(f"arrays must come from one framework; got {which}")
    return imported


def check_float_dtypes(arrays: dict[str, Any]) -> np.dtype:
    """One supported floating dtype shared by every array; returns it."""
    dtypes = {n: np.dtype(a.dtype) for n, a in arrays.items()}
    bad = {n: d for n, d in dtypes.items() if d not in FLOAT_DTYPES}
    if bad:
        got = ", ".join(f"{n} {d}" for n, d in bad.items())
        raise TypeError(
            f"unsupported dtype: {got}; cosattn takes float16, bfloat16, float32 or float64"
        )
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"q, k, v (and do) must share one dtype; got {got}")
    return next(iter(dtypes.values()))


def accumulation_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def to_bhsd(x: Any, layout: str, xp: Any) -> Any:
    """``x`` seen in the (B, H, S, D) order (a view); ``xp`` is its array namespace."""
    return x if layout == "bhsd" else xp.permute_dims(x, (0, 2, 1, 3))


def check_qkv(arrays: dict[str, Any], layout: str) -> tuple[int, int, int, int, int]:
    """Check q, k, v (and do) in ``layout``; return ``(B, H, S, Dk, Dv)``."""
    letters = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for n, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(
                f"{n} must have rank 4 {letters} for layout={layout!r}, got shape {tuple(a.shape)}"
            )
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    B, H, S = q.shape[:3] if layout == "bhsd" else (q.shape[0], q.shape[2], q.shape[1])
    Dk, Dv = q.shape[3], v.shape[3]
    head = q.shape[:3]
    if k.shape != q.shape or v.shape[:3] != head:
        raise ValueError(
            f"q, k and v must agree on {letters[:-4]}) and q, k on D: got {_describe(arrays)}"
        )
    if "do" in arrays and tuple(arrays["do"].shape) != tuple(v.shape):
        raise ValueError(f"do must have the shape of o (that of v): got {_describe(arrays)}")
    return B, H, S, Dk, Dv


def check_mask(mask: Any, shape: tuple[int, ...], letters: str) -> None:
    """``mask`` must be bool of ``shape`` (``letters`` spells it, e.g. "(B, S)")."""
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be bool (True where the token is real), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {letters} = {shape}, got {tuple(mask.shape)}")


def check_m(m: Any, H: int, acc: np.dtype, xp: Any) -> Any:
    """``m`` of shape (H,) and any float dtype; returned as a fresh array in ``acc``."""
    if m.ndim != 1 or m.shape[0] != H:
        raise ValueError(f"m must have shape (H,) = ({H},), got {tuple(m.shape)}")
    if np.dtype(m.dtype).kind != "f" and np.dtype(m.dtype) != FLOAT_DTYPES[1]:
        raise TypeError(f"m must be a float array, got {m.dtype}")
    return xp.astype(m, acc)


def check_state(kv: Any, count: Any, B: int, H: int, Dk: int, Dv: int, acc: np.dtype) -> None:
    if tuple(kv.shape) != (B, H, Dv, Dk):
        raise ValueError(
            f"state.kv must have shape (B, H, Dv, Dk) = {(B, H, Dv, Dk)}, got {tuple(kv.shape)}"
        )
    if tuple(count.shape) != (B,):
        raise ValueError(f"state.count must have shape (B,) = ({B},), got {tuple(count.shape)}")
    if kv.dtype not in (np.float32, np.float64):
        raise TypeError(f"state.kv must be float32 or float64, got {kv.dtype}")
    if acc == np.float64 and kv.dtype != np.float64:
        raise TypeError(
            "float64 inputs need a float64 state (RecurrentState.zeros(..., dtype='float64')), "
            f"got state.kv {kv.dtype}"
        )
    if count.dtype not in (np.int64, np.int32):
        raise TypeError(f"state.count must be int64 (or int32, as JAX keeps it), got {count.dtype}")
