"""The recurrent form: a fixed-size state and one token per step (SPEC.md, "The RNN form")."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate as val
from ._interop import export_array, import_array, namespace, on_device
from .backends import select


class RecurrentState:
    """The running state of causal Cottention: ``kv`` (B, H, Dv, Dk) and ``count`` (B,) int64.

    ``kv`` is the sum of the scaled value-key outer products absorbed so far (float32, or
    float64 for float64 inputs), ``count`` the number of real tokens absorbed per batch row.
    The arrays live in the framework and on the device of the inputs that produced them.
    :func:`cosattn.forward` with ``return_state=True`` returns one and never changes one it is
    given; :meth:`step` is the only thing that changes a state, in place.

    Examples
    --------
    >>> state = cosattn.RecurrentState.zeros(1, 2, 4, 4)
    >>> o_t = state.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], m)
    >>> int(state.count[0])
    1
    """

    def __init__(self, kv: Any, count: Any) -> None:
        ikv, icount = import_array(kv, "state.kv"), import_array(count, "state.count")
        if ikv.array.ndim != 4:
            raise ValueError(
                f"state.kv must have rank 4 (B, H, Dv, Dk), got {tuple(ikv.array.shape)}"
            )
        B, H, Dv, Dk = ikv.array.shape
        val.check_state(ikv.array, icount.array, B, H, Dk, Dv, np.dtype(np.float32))
        self.kv = kv
        self.count = count

    @classmethod
    def zeros(cls, B: int, H: int, Dk: int, Dv: int, *, like: Any = None,
              dtype: Any = None) -> RecurrentState:
        """An empty state for B batch rows and H heads of sizes Dk, Dv.

        ``like``: an array whose framework and device the state takes (NumPy when None).
        ``dtype``: float32 or float64; by default float64 when ``like`` is float64, else float32.
        """
        if like is None:
            framework, device = "numpy", val.Device("cpu")
            like_dtype = None
        else:
            imported = import_array(like, "like")
            framework, device = imported.framework, imported.device
            like_dtype = imported.array.dtype
        if dtype is None:
            dtype = np.float64 if like_dtype == np.float64 else np.float32
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        for name, size in {"B": B, "H": H, "Dk": Dk, "Dv": Dv}.items():
            if int(size) < 0:
                raise ValueError(f"{name} must be non-negative, got {size}")
        xp = namespace(device)
        with on_device(device):
            kv = xp.zeros((B, H, Dv, Dk), dtype=dtype)
            count = xp.zeros((B,), dtype=np.int64)
        return cls(export_array(kv, framework), export_array(count, framework))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Dk, Dv)``, the arguments of :meth:`zeros`."""
        B, H, Dv, Dk = self.kv.shape
        return B, H, Dk, Dv

    def copy(self) -> RecurrentState:
        """An independent state with the same contents."""
        kv, count = import_array(self.kv, "state.kv"), import_array(self.count, "state.count")
        xp = namespace(kv.device)
        with on_device(kv.device):
            return RecurrentState(export_array(xp.copy(kv.array), kv.framework),
                                  export_array(xp.copy(count.array), count.framework))

    def __repr__(self) -> str:
        B, H, Dk, Dv = self.shape
        return f"RecurrentState(B={B}, H={H}, Dk={Dk}, Dv={Dv}, dtype={self.kv.dtype})"

    def step(self, q_t: Any, k_t: Any, v_t: Any, m: Any = None, *, mask: Any = None,
             eps: float = 1e-12, out: Any = None, backend: str | None = None) -> Any:
        """Absorb one token per batch row and return its output, updating the state in place.

        Parameters
        ----------
        q_t, k_t : array (B, H, Dk)
        v_t : array (B, H, Dv)
            Same dtype (float16, bfloat16, float32 or float64) and device as the state.
        m : array (H,), optional
            Stabiliser logits, as given to :func:`cosattn.forward`.
        mask : bool array (B,), optional
            False for rows whose token is padding: they output zeros and leave the state alone.
        out : array (B, H, Dv), optional
            Where to write the output (same dtype as v_t), so a decode loop reuses one buffer.

        Returns
        -------
        o_t : array (B, H, Dv) in the dtype and framework of the inputs (``out`` when given).
        """
        eps = val.check_eps(eps)
        imported = val.import_all({"q_t": q_t, "k_t": k_t, "v_t": v_t, "m": m, "mask": mask,
                                   "out": out, "state.kv": self.kv, "state.count": self.count})
        raw = {n: imported[n].array for n in ("q_t", "k_t", "v_t")}
        dtype = val.check_float_dtypes(raw)
        for n, a in raw.items():
            if a.ndim != 3:
                raise ValueError(f"{n} must have rank 3 (B, H, D), got shape {tuple(a.shape)}")
        q, k, v = raw["q_t"], raw["k_t"], raw["v_t"]
        if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
            raise ValueError(
                "q_t, k_t and v_t must agree on (B, H) and q_t, k_t on D: got "
                + ", ".join(f"{n}{tuple(a.shape)}" for n, a in raw.items())
            )
        B, H, Dk = q.shape
        Dv = v.shape[2]
        acc = val.accumulation_dtype(dtype)
        kv, count = imported["state.kv"].array, imported["state.count"].array
        val.check_state(kv, count, B, H, Dk, Dv, acc)
        first = imported["q_t"]
        framework, xp = first.framework, namespace(first.device)
        native_mask = None
        if mask is not None:
            native_mask = imported["mask"].array
            val.check_mask(native_mask, (B,), "(B,)")
        immutable = framework == "jax"
        if immutable:
            if out is not None:
                raise ValueError("out= cannot be written for JAX arrays, which are immutable")
            kv = np.array(kv)
        counts = xp.astype(count, np.int64, copy=immutable)
        with on_device(first.device):
            native_m = None if m is None else val.check_m(imported["m"].array, H, acc, xp)
            if out is None:
                o = xp.empty((B, H, Dv), dtype=dtype)
            else:
                o = imported["out"].array
                if tuple(o.shape) != (B, H, Dv) or o.dtype != dtype:
                    raise ValueError(
                        f"out must have shape (B, H, Dv) = {(B, H, Dv)} and dtype {dtype}, "
                        f"got {tuple(o.shape)} {o.dtype}"
                    )
            p = val.Problem(B, H, 1, Dk, Dv, dtype, acc, np.dtype(kv.dtype), True, eps,
                            first.device, first.stream)
            select(backend, first.device).step(p, kv, counts, q, k, v, native_m, native_mask, o)
            if counts is not count and not immutable:
                count[...] = counts
        if immutable:
            self.kv, self.count = export_array(kv, framework), export_array(counts, framework)
        return out if out is not None else export_array(o, framework)
