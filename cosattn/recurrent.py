"""The recurrent form: a fixed-size state and one token per step (docs/spec.md, "The RNN form")."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _validate as val
from ._device import CPU, namespace, on_device
from ._dtypes import FLOAT32, FLOAT64, STATE_DTYPES
from ._interop import export_array, import_array


def zero_arrays(sizes: dict[str, Any], like: Any, dtype: Any) -> tuple[Any, Any]:
    """Zero ``kv`` (rows, H, Dv, Dk) and ``count`` (rows,) int64 for ``sizes`` {rows, "H", "Dk",
    "Dv"} (the first key names the rows), in the framework and on the device of ``like``
    (NumPy when None), ``dtype`` float32 or float64 (by default float64 when ``like`` is)."""
    framework, device, like_dtype = "numpy", CPU, FLOAT32
    if like is not None:
        imported = import_array(like, "like")
        framework, device = imported.framework, imported.device
        like_dtype = np.dtype(imported.array.dtype)
    if dtype is None:
        dtype = FLOAT64 if like_dtype == FLOAT64 else FLOAT32
    dtype = np.dtype(dtype)
    if dtype not in STATE_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or isinstance(size, bool):
            raise TypeError(f"{name} must be an int, got {type(size).__name__} {size!r}")
        if size < 0:
            raise ValueError(f"{name} must be non-negative, got {size}")
    rows, H, Dk, Dv = sizes.values()
    xp = namespace(device)
    with on_device(device):
        kv = xp.zeros((rows, H, Dv, Dk), dtype=dtype)
        count = xp.zeros((rows,), dtype=np.int64)
    return export_array(kv, framework), export_array(count, framework)


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

    def __init__(self, kv: Any, count: Any, *, validate: bool = False) -> None:
        imported = val.import_all({"state.kv": kv, "state.count": count})
        ikv, icount = imported["state.kv"], imported["state.count"]
        if ikv.array.ndim != 4:
            raise ValueError(
                f"state.kv must have rank 4 (B, H, Dv, Dk), got {tuple(ikv.array.shape)}"
            )
        B, H, Dv, Dk = ikv.array.shape
        val.check_state(ikv.array, icount.array, B, H, Dk, Dv, FLOAT32)
        if val.values_checked(validate, ikv.device):
            with on_device(ikv.device):
                val.check_count_values(icount.array)
        self.kv = kv
        self.count = count

    @classmethod
    def zeros(cls, B: int, H: int, Dk: int, Dv: int, *, like: Any = None,
              dtype: Any = None) -> RecurrentState:
        """An empty state for B batch rows and H heads of sizes Dk, Dv.

        ``like``: an array whose framework and device the state takes (NumPy when None).
        ``dtype``: float32 or float64; by default float64 when ``like`` is float64, else float32.
        """
        return cls(*zero_arrays({"B": B, "H": H, "Dk": Dk, "Dv": Dv}, like, dtype))

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
             eps: float = 1e-12, out: Any = None, backend: str | None = None,
             validate: bool = False) -> Any:
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
        eps, backend, validate
            As given to :func:`cosattn.forward`.

        Returns
        -------
        o_t : array (B, H, Dv) in the dtype and framework of the inputs (``out`` when given).
        """
        prepared = val.step_call(self.kv, self.count, q_t, k_t, v_t, m, mask=mask, eps=eps,
                                 out=out, backend=backend, validate=validate)
        call = prepared.call
        with on_device(call.p.device):
            prepared.backend.step(call)
        if prepared.framework == "jax":  # immutable arrays: the state is new arrays
            self.kv = export_array(call.kv, prepared.framework)
            self.count = export_array(call.count, prepared.framework)
        return prepared.result("o", out)
