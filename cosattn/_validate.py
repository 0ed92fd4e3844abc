"""The one validation layer (docs/spec.md, "Bad input"): every argument checked once.

:func:`forward_call`, :func:`backward_call`, :func:`step_call` and, for a pool of states,
:func:`prefill_call` import the caller's arrays as native ones, check flags, ranks, sizes,
dtypes, devices and (where asked) values, allocate the outputs, choose the backend, and describe
the call (:mod:`cosattn._call`). Nothing here writes
the caller's arrays; a call that fails here changes nothing.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from ._call import BackwardCall, Call, ForwardCall, Problem, StepCall
from ._device import Device, namespace, on_device
from ._dtypes import INPUT_DTYPES, STATE_DTYPES, accumulation, is_float
from ._interop import Imported, export_array, import_array
from .backends import Backend, select

LAYOUTS = ("bhsd", "bshd")
VALIDATE_ENV_VAR = "COSATTN_VALIDATE"

C = TypeVar("C", bound=Call)


@dataclass(frozen=True)
class Prepared(Generic[C]):
    """A checked call: its description, the backend to run it, the caller's framework, and the
    outputs as the caller will receive them (in the caller's layout, before export)."""

    call: C
    backend: Backend
    framework: str
    results: dict[str, Any]

    def result(self, name: str, given: Any = None) -> Any:
        """Output ``name`` as the caller receives it: ``given``, the caller's own ``out=``
        object, when there is one, else the result exported to the caller's framework."""
        return given if given is not None else export_array(self.results[name], self.framework)


def _describe(arrays: dict[str, Any]) -> str:
    return ", ".join(f"{n}{tuple(a.shape)}" for n, a in arrays.items())


def check_flag(value: Any, name: str) -> bool:
    """A bool flag (Python or NumPy bool); anything else is a ``TypeError`` naming it."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool | np.bool_) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not 0.0 < eps < np.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    return eps


def check_layout(layout: Any) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def values_checked(validate: Any, device: Device) -> bool:
    """Whether value checks run: always on host arrays; on device arrays when asked."""
    asked = check_flag(validate, "validate")
    return device.kind == "cpu" or asked or os.environ.get(VALIDATE_ENV_VAR) == "1"


def import_all(named: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Imported]:
    """Import every non-None argument (the ``required`` ones must be there) and require one
    framework family and one device."""
    for n in required:
        if named[n] is None:
            raise TypeError(f"{n} must be an array, got None")
    imported = {n: import_array(x, n) for n, x in named.items() if x is not None}
    if len({str(i.device) for i in imported.values()}) > 1:
        where = ", ".join(f"{n} on {i.device} ({i.framework})" for n, i in imported.items())
        raise ValueError(
            f"arrays must be on one device; got {where}. Nothing is copied across devices"
        )
    if len({i.framework for i in imported.values()}) > 1:
        which = ", ".join(f"{n} ({i.framework})" for n, i in imported.items())
        raise ValueError(f"arrays must come from one framework; got {which}")
    return imported


def check_float_dtypes(arrays: dict[str, Any]) -> np.dtype:
    """One supported floating dtype shared by every array; returns it."""
    dtypes = {n: np.dtype(a.dtype) for n, a in arrays.items()}
    bad = {n: d for n, d in dtypes.items() if d not in INPUT_DTYPES}
    if bad:
        got = ", ".join(f"{n} {d}" for n, d in bad.items())
        raise TypeError(
            f"unsupported dtype: {got}; cosattn takes float16, bfloat16, float32 or float64"
        )
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"{', '.join(dtypes)} must share one dtype; got {got}")
    return next(iter(dtypes.values()))


def to_bhsd(x: Any, layout: str, xp: Any) -> Any:
    """``x`` seen in the (B, H, S, D) order (a view); ``xp`` is its array namespace."""
    return x if layout == "bhsd" else xp.permute_dims(x, (0, 2, 1, 3))


def check_qkv(arrays: dict[str, Any], layout: str) -> tuple[int, int, int, int, int]:
    """Check q (when given), k, v (and do) in ``layout``; return ``(B, H, S, Dk, Dv)``."""
    letters = "(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)"
    for n, a in arrays.items():
        if a.ndim != 4:
            raise ValueError(
                f"{n} must have rank 4 {letters} for layout={layout!r}, got shape {tuple(a.shape)}"
            )
    k, v = arrays["k"], arrays["v"]
    q = arrays.get("q", k)
    B, H, S = q.shape[:3] if layout == "bhsd" else (q.shape[0], q.shape[2], q.shape[1])
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        agree = (f"q, k and v must agree on {letters[:-4]}) and q, k on D" if "q" in arrays
                 else f"k and v must agree on {letters[:-4]})")
        raise ValueError(f"{agree}: got {_describe(arrays)}")
    if "do" in arrays and tuple(arrays["do"].shape) != tuple(v.shape):
        raise ValueError(f"do must have the shape of o (that of v): got {_describe(arrays)}")
    return B, H, S, q.shape[3], v.shape[3]


def check_mask(mask: Any, shape: tuple[int, ...], letters: str) -> Any:
    """``mask`` must be bool of ``shape`` (``letters`` spells it, e.g. "(B, S)")."""
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be bool (True where the token is real), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {letters} = {shape}, got {tuple(mask.shape)}")
    return mask


def check_m(m: Any, H: int, acc: np.dtype, xp: Any) -> Any:
    """``m`` of shape (H,) and any float dtype; returned as a fresh array in ``acc``."""
    if m.ndim != 1 or m.shape[0] != H:
        raise ValueError(f"m must have shape (H,) = ({H},), got {tuple(m.shape)}")
    if not is_float(m.dtype):
        raise TypeError(f"m must be a float array, got {m.dtype}")
    return xp.astype(m, acc)


def check_count(count: Any, B: int, name: str, rows: str = "B") -> None:
    """Shape and dtype of counts ``name`` (B,): int64, or int32 as JAX keeps them (``rows``: the
    letter of the axis in messages)."""
    if tuple(count.shape) != (B,):
        raise ValueError(f"{name} must have shape ({rows},) = ({B},), got {tuple(count.shape)}")
    if count.dtype not in (np.int64, np.int32):
        raise TypeError(f"{name} must be int64 (or int32, as JAX keeps it), got {count.dtype}")


def check_state(kv: Any, count: Any, B: int, H: int, Dk: int, Dv: int, acc: np.dtype,
                name: str = "state", *, rows: str = "B") -> None:
    """Shapes and dtypes of a state ``kv`` (B, H, Dv, Dk), ``count`` (B,) for inputs in ``acc``.

    ``name`` is "state", "pool", or "total" for the bidirectional form's whole-sequence sum;
    ``rows`` the letter of the first axis in messages ("B", "N" for one state per sequence, "P"
    for a pool's slots).
    """
    if tuple(kv.shape) != (B, H, Dv, Dk):
        raise ValueError(
            f"{name}.kv must have shape ({rows}, H, Dv, Dk) = {(B, H, Dv, Dk)}, "
            f"got {tuple(kv.shape)}"
        )
    check_count(count, B, f"{name}.count", rows)
    if np.dtype(kv.dtype) not in STATE_DTYPES:
        raise TypeError(f"{name}.kv must be float32 or float64, got {kv.dtype}")
    if acc == np.float64 and kv.dtype != np.float64:
        zeros = "StatePool" if name == "pool" else "RecurrentState"
        raise TypeError(
            f"float64 inputs need a float64 {name} ({zeros}.zeros(..., dtype='float64')), "
            f"got {name}.kv {kv.dtype}"
        )


def check_dstate(dkv: Any, p: Problem, of: str = "state", N: int | None = None,
                 rows: str = "B") -> None:
    """``dstate`` has the shape of the ``of`` state's kv (N, H, Dv, Dk) (N: B unless given),
    float32 or float64 (``rows``: the letter of its first axis in messages)."""
    N = p.B if N is None else N
    if tuple(dkv.shape) != (N, p.H, p.Dv, p.Dk):
        raise ValueError(
            f"dstate must have the shape of {of}.kv ({rows}, H, Dv, Dk) = "
            f"{(N, p.H, p.Dv, p.Dk)}, got {tuple(dkv.shape)}"
        )
    if np.dtype(dkv.dtype) not in STATE_DTYPES:
        raise TypeError(f"dstate must be float32 or float64, got {dkv.dtype}")


def host(x: Any) -> np.ndarray:
    """A NumPy copy of a device array (a device→host copy, which waits for the stream); NumPy
    arrays as they are."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "copy_to_host"):  # a Numba device array
        return x.copy_to_host()
    return x.get()


def check_count_values(count: Any, name: str = "state.count") -> None:
    """Counts are never negative (a device→host copy on CUDA)."""
    count = host(count)
    if count.shape[0] and bool((count < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {count}")


def check_index_array(x: Any, name: str, N: int, of: str, dtypes: tuple[Any, ...],
                      what: str) -> None:
    """``x`` is a (N,) array of one of ``dtypes`` (``what`` names them); ``of`` says where N
    comes from."""
    if np.dtype(x.dtype) not in dtypes:
        raise TypeError(f"{name} must be {what}, got {x.dtype}")
    if tuple(x.shape) != (N,):
        raise ValueError(f"{name} must have shape (N,) = ({N},) for the {N} {of}, "
                         f"got {tuple(x.shape)}")


INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_cu_seqlens(cu: Any) -> int:
    """dtype and rank of ``cu_seqlens``, (N+1,) int32 or int64; returns N."""
    if np.dtype(cu.dtype) not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape (N+1,) for N sequences, "
                         f"got {tuple(cu.shape)}")
    return cu.shape[0] - 1


def check_cu_seqlens_values(cu: Any, S: int) -> None:
    """``cu_seqlens`` starts at 0, never decreases and ends at S (a device→host copy on CUDA)."""
    cu = host(cu)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    steps = np.diff(cu)
    if (steps < 0).any():
        n = int(np.argmax(steps < 0))
        raise ValueError(f"cu_seqlens must not decrease, got {cu[n]} then {cu[n + 1]} "
                         f"(entries {n} and {n + 1})")
    if cu[-1] != S:
        raise ValueError(f"cu_seqlens must end at the packed length S = {S}, got {cu[-1]}")


def check_slot_values(indices: Any, P: int) -> None:
    """``state_indices`` lie in -1..P-1 and name no slot twice (a device→host copy on CUDA).
    Cheap on the hot path of a decode loop: two reductions and a set of the named slots."""
    indices = host(indices)
    if not indices.size:
        return
    if indices.min() < -1 or indices.max() >= P:
        bad = indices[(indices < -1) | (indices >= P)]
        raise ValueError(f"state_indices must lie in -1..P-1 = -1..{P - 1} (-1: a padding "
                         f"entry), got {bad.tolist()}")
    named = indices[indices >= 0].tolist()
    if len(set(named)) < len(named):
        twice = next(s for i, s in enumerate(named) if s in named[:i])
        raise ValueError(f"state_indices names slot {twice} more than once; two sequences "
                         "cannot share a slot")


def require_varlen(backend: Backend, what: str) -> None:
    """A packed or pool call needs a backend that takes them (``Backend.VARLEN``)."""
    if not backend.VARLEN:
        name = backend.__name__.rsplit("._", 1)[-1]
        raise RuntimeError(f"the {name} backend does not take cu_seqlens/state pools yet "
                           f"({what} given); use backend='numba'")

def _writable(x: Any, name: str) -> None:
    """Arrays a call writes in place must be writable (NumPy's flag; device arrays always are)."""
    flags = getattr(x, "flags", None)
    if isinstance(x, np.ndarray) and flags is not None and not flags.writeable:
        raise ValueError(f"{name} is read-only, but this call writes it in place")


def check_writable_state(kv: Any, count: Any, name: str) -> None:
    """A state or pool updated in place: int64 counts, writable arrays."""
    if count.dtype != np.int64:
        raise TypeError(f"{name}.count must be int64 to be updated in place, got {count.dtype}")
    _writable(kv, f"{name}.kv")
    _writable(count, f"{name}.count")


@dataclass(frozen=True)
class Inputs:
    """What forward, backward, absorb and a pool's prefill share once their arrays are
    checked."""

    p: Problem
    xp: Any
    arrays: dict[str, Any]  # the named inputs in the caller's layout
    m: Any
    mask: Any
    kv0: Any
    count0: Any
    cu_seqlens: Any
    framework: str
    backend: Backend
    checked: bool  # whether values are checked (host arrays, or validate=)

    def bhsd(self, name: str, layout: str) -> Any:
        return to_bhsd(self.arrays[name], layout, self.xp)

    def output(self, like: str, layout: str, given: Any = None) -> tuple[Any, Any]:
        """An output shaped like input ``like`` in the caller's layout: ``given`` (an ``out=``
        array :func:`check_outputs` passed), else a new one; and its bhsd view."""
        out = self.xp.empty(self.arrays[like].shape, dtype=self.p.dtype) if given is None else given
        return out, to_bhsd(out, layout, self.xp)

    @property
    def N(self) -> int:
        """The number of sequences."""
        return self.p.B if self.cu_seqlens is None else self.cu_seqlens.shape[0] - 1


def _address_and_strides(x: Any) -> tuple[int, tuple[int, ...]]:
    """Where an array's first element lies and its strides in bytes, from its array interface
    (``__cuda_array_interface__`` on a device, ``__array_interface__`` on the host)."""
    face = getattr(x, "__cuda_array_interface__", None) or x.__array_interface__
    strides = face.get("strides")
    if strides is None:  # C-contiguous
        step, reversed_strides = np.dtype(x.dtype).itemsize, []
        for n in reversed(x.shape):
            reversed_strides.append(step)
            step *= n
        strides = reversed_strides[::-1]
    return face["data"][0], tuple(strides)


def _byte_span(x: Any) -> tuple[int, int]:
    """The bytes ``[first, end)`` between an array's lowest and highest element (empty for no
    elements): what :func:`numpy.may_share_memory` compares."""
    if math.prod(x.shape) == 0:
        return 0, 0
    low, strides = _address_and_strides(x)
    high = low
    for s, n in zip(strides, x.shape, strict=True):
        if s < 0:
            low += s * (n - 1)
        else:
            high += s * (n - 1)
    return low, high + np.dtype(x.dtype).itemsize


def _c_contiguous(x: Any) -> bool:
    item = np.dtype(x.dtype).itemsize
    _, strides = _address_and_strides(x)
    expected = item
    for n, s in zip(reversed(x.shape), reversed(strides), strict=True):
        if n > 1 and s != expected:
            return False
        expected *= n
    return True


def check_outputs(imported: dict[str, Imported], x: Inputs,
                  like: dict[str, str]) -> dict[str, Any]:
    """The caller's ``out=`` arrays among ``imported``, by name (``like`` names the input each
    is shaped like), checked: the input's shape and dtype, C-contiguous and writable, and no
    memory shared with any other array of the call (:func:`_check_no_overlap`)."""
    given = {n: imported[n].array for n in like if n in imported}
    if given and x.framework == "jax":
        raise ValueError("out= cannot be written for JAX arrays, which are immutable")
    for n, a in given.items():
        shape = tuple(x.arrays[like[n]].shape)
        if tuple(a.shape) != shape:
            raise ValueError(f"{n} must have the shape of {like[n]}, {shape}, got {tuple(a.shape)}")
        if np.dtype(a.dtype) != x.p.dtype:
            raise TypeError(f"{n} must have the dtype of {like[n]}, {x.p.dtype}, got {a.dtype}")
        if not _c_contiguous(a):
            raise ValueError(
                f"{n} must be C-contiguous (as empty_like({like[n]}) makes it), got strides "
                f"{_address_and_strides(a)[1]} (bytes) for shape {shape}"
            )
        _writable(a, n)
    _check_no_overlap(given, imported)
    return given


def _check_no_overlap(given: dict[str, Any], imported: dict[str, Imported]) -> None:
    """No output in ``given`` (by name, among ``imported``) shares memory with any other array
    of the call, so that the call reads none of what it writes. Bounds are compared, as
    :func:`numpy.may_share_memory` does: by NumPy itself for host arrays (a step with ``out=``
    pays well under a microsecond a pair), else from each array's interface, once."""
    if not given:
        return
    arrays = {n: i.array for n, i in imported.items()}
    if all(isinstance(a, np.ndarray) for a in arrays.values()):
        def shared(n: str, other: str) -> bool:
            return bool(np.may_share_memory(arrays[n], arrays[other]))
    else:
        spans = {n: _byte_span(a) for n, a in arrays.items()}

        def shared(n: str, other: str) -> bool:
            (first, end), (o_first, o_end) = spans[n], spans[other]
            return first < o_end and o_first < end
    for n in given:
        for other in arrays:
            if other != n and shared(n, other):
                raise ValueError(
                    f"{n} shares memory with {other}: an output may not overlap an input or "
                    "another output"
                )


def inputs(named: dict[str, Any], m: Any, mask: Any, state: tuple[Any, Any] | None, causal: Any,
           eps: Any, layout: Any, backend: Any, validate: Any, *, cu_seqlens: Any = None,
           pool: bool = False, extra: dict[str, Any] | None = None,
           total: tuple[Any, Any] | None = None, total_count: Any = None,
           ) -> tuple[Inputs, dict[str, Imported]]:
    """Check what forward, backward, absorb and prefill share. ``state`` (causal) is
    ``(kv, count)``: one state per sequence, or a pool's arrays when ``pool`` (whose slots
    ``extra`` names). ``total`` (bidirectional) is the whole sequence's sum and count,
    ``total_count`` its count alone: either becomes the call's ``kv0``, ``count0``. Packed
    sequences (``cu_seqlens``) are whole sequences: ``total``/``total_count`` are refused with
    them."""
    causal = check_flag(causal, "causal")
    layout = check_layout(layout)
    eps = check_eps(eps)
    if state is not None and not causal:
        raise ValueError("a recurrent state exists for the causal form only (causal=False given)")
    for given, name in ((total, "total"), (total_count, "total_count")):
        if given is not None and causal:
            raise ValueError(f"{name}= belongs to the bidirectional form (causal=True given)")
        if given is not None and cu_seqlens is not None:
            raise ValueError(
                f"{name}= cannot be combined with cu_seqlens: packed sequences are whole "
                f"sequences, while {name}= says the call holds a part of a longer one"
            )
    everything = dict(named, m=m, mask=mask, cu_seqlens=cu_seqlens, **(extra or {}))
    given_state = None
    if state is not None:
        given_state = "pool" if pool else "state"
    elif total is not None:
        given_state = "total"
    if given_state is not None:
        kv, count = state if total is None else total
        everything.update({f"{given_state}.kv": kv, f"{given_state}.count": count})
    if total_count is not None:
        everything["total_count"] = total_count
    imported = import_all(everything, required=tuple(named))
    raw = {n: imported[n].array for n in named}
    dtype = check_float_dtypes(raw)
    B, H, S, Dk, Dv = check_qkv(raw, layout)
    acc = accumulation(dtype)
    first = imported[next(iter(named))]
    xp = namespace(first.device)
    native_cu = None
    N = B
    if cu_seqlens is not None:
        native_cu = imported["cu_seqlens"].array
        N = check_cu_seqlens(native_cu)
        if B != 1:
            raise ValueError(
                "packed sequences (cu_seqlens given) lie back to back in one row: q, k, v must "
                f"have B = 1, got {_describe(raw)}"
            )
    native_mask = None if mask is None else check_mask(imported["mask"].array, (B, S), "(B, S)")
    kv0 = count0 = None
    count_name = "total_count"
    state_dtype = acc
    if given_state is not None:
        kv0, count0 = (imported[f"{given_state}.{n}"].array for n in ("kv", "count"))
        if pool:
            check_state(kv0, count0, kv0.shape[0] if kv0.ndim == 4 else 0, H, Dk, Dv, acc,
                        "pool", rows="P")
        else:
            check_state(kv0, count0, N, H, Dk, Dv, acc, given_state,
                        rows="B" if native_cu is None else "N")
        state_dtype = np.dtype(kv0.dtype)
        count_name = f"{given_state}.count"
    elif total_count is not None:
        count0 = imported["total_count"].array
        check_count(count0, B, "total_count")
    checked = values_checked(validate, first.device)
    chosen = select(backend, first.device)
    if native_cu is not None:
        require_varlen(chosen, "cu_seqlens")
    with on_device(first.device):
        native_m = None if m is None else check_m(imported["m"].array, H, acc, xp)
        if native_cu is not None:
            if checked:
                check_cu_seqlens_values(native_cu, S)
            native_cu = xp.astype(native_cu, np.int64, copy=False)
        if count0 is not None:
            if checked:
                check_count_values(count0, count_name)
            if not pool:
                count0 = xp.astype(count0, np.int64, copy=False)
    p = Problem(B, H, S, Dk, Dv, dtype, state_dtype, causal, eps, first.device, first.stream)
    return Inputs(p, xp, raw, native_m, native_mask, kv0, count0, native_cu, first.framework,
                  chosen, checked), imported


def forward_call(q: Any, k: Any, v: Any, m: Any, *, causal: Any, mask: Any,
                 state: tuple[Any, Any] | None, return_state: Any, eps: Any, layout: Any,
                 backend: Any, validate: Any, cu_seqlens: Any = None,
                 total: tuple[Any, Any] | None = None, out: Any = None) -> Prepared[ForwardCall]:
    if check_flag(return_state, "return_state") and not check_flag(causal, "causal"):
        raise ValueError("return_state=True needs the causal form (causal=False given)")
    x, imported = inputs({"q": q, "k": k, "v": v}, m, mask, state, causal, eps, layout, backend,
                         validate, cu_seqlens=cu_seqlens, total=total, extra={"out": out})
    given = check_outputs(imported, x, {"out": "v"})
    with on_device(x.p.device):
        o, o_bhsd = x.output("v", layout, given.get("out"))
    call = ForwardCall(p=x.p, q=x.bhsd("q", layout), k=x.bhsd("k", layout),
                       v=x.bhsd("v", layout), m=x.m, mask=x.mask, kv0=x.kv0, count0=x.count0,
                       cu_seqlens=x.cu_seqlens, o=o_bhsd, want_state=bool(return_state))
    return Prepared(call, x.backend, x.framework, {"o": o})


def absorb_call(k: Any, v: Any, m: Any, *, causal: Any, mask: Any,
                state: tuple[Any, Any] | None, total_count: Any, eps: Any, layout: Any,
                backend: Any, validate: Any) -> Prepared[ForwardCall]:
    """A forward that asks for ``(kv, count)`` alone (``o`` and ``q`` None)."""
    x, _ = inputs({"k": k, "v": v}, m, mask, state, causal, eps, layout, backend, validate,
                  total_count=total_count)
    call = ForwardCall(p=x.p, q=None, k=x.bhsd("k", layout), v=x.bhsd("v", layout), m=x.m,
                       mask=x.mask, kv0=x.kv0, count0=x.count0, o=None, want_state=True)
    return Prepared(call, x.backend, x.framework, {})


# The entries of backward's out= by name, and the input each is shaped like.
BACKWARD_OUTPUTS = {"out[0]": "q", "out[1]": "k", "out[2]": "v"}


def backward_outputs(out: Any) -> dict[str, Any]:
    """Backward's ``out=`` (None, or a tuple (dq, dk, dv)) by name (``out[0]`` ..): the
    entries :func:`check_outputs` checks once they are imported."""
    if out is None:
        return {}
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise TypeError(
            f"out must be a tuple (dq, dk, dv) of three arrays or None, got {type(out).__name__}"
        )
    return dict(zip(BACKWARD_OUTPUTS, out, strict=True))


def backward_call(do: Any, q: Any, k: Any, v: Any, m: Any, *, causal: Any, mask: Any,
                  state: tuple[Any, Any] | None, dstate: Any, eps: Any, layout: Any, backend: Any,
                  validate: Any, cu_seqlens: Any = None,
                  total: tuple[Any, Any] | None = None,
                  out: Any = None) -> Prepared[BackwardCall]:
    if dstate is not None and total is None and not check_flag(causal, "causal"):
        raise ValueError("dstate needs the causal form, or total= (causal=False given)")
    x, imported = inputs({"q": q, "k": k, "v": v, "do": do}, m, mask, state, causal, eps,
                         layout, backend, validate, cu_seqlens=cu_seqlens,
                         extra={"dstate": dstate, **backward_outputs(out)}, total=total)
    given = check_outputs(imported, x, BACKWARD_OUTPUTS)
    p = x.p
    dkv = None
    if dstate is not None:
        dkv = imported["dstate"].array
        check_dstate(dkv, p, "total" if total is not None else "state", x.N,
                     "B" if x.cu_seqlens is None else "N")
    with on_device(p.device):
        if total is not None and dkv is None:  # no gradient reaches total.kv
            dkv = x.xp.zeros((p.B, p.H, p.Dv, p.Dk), dtype=p.state_dtype)
        (dq, dq_bhsd), (dk, dk_bhsd), (dv, dv_bhsd) = (
            x.output(n, layout, given.get(f"out[{i}]")) for i, n in enumerate("qkv"))
    call = BackwardCall(p=p, q=x.bhsd("q", layout), k=x.bhsd("k", layout),
                        v=x.bhsd("v", layout), m=x.m, mask=x.mask, do=x.bhsd("do", layout),
                        kv0=x.kv0, count0=x.count0, cu_seqlens=x.cu_seqlens, dkv=dkv,
                        dq=dq_bhsd, dk=dk_bhsd, dv=dv_bhsd)
    return Prepared(call, x.backend, x.framework, {"dq": dq, "dk": dk, "dv": dv})


def _slots(imported: dict[str, Imported], N: int, of: str, P: int, checked: bool,
           xp: Any) -> tuple[Any, Any]:
    """``state_indices`` (N,) as int64 and ``has_initial_state`` (N,) bool (or None), checked
    against a pool of P slots; ``of`` says where N comes from."""
    indices = imported["state_indices"].array
    check_index_array(indices, "state_indices", N, of, INDEX_DTYPES, "int32 or int64")
    initial = None
    if "has_initial_state" in imported:
        initial = imported["has_initial_state"].array
        check_index_array(initial, "has_initial_state", N, of, (np.dtype(np.bool_),),
                          "bool (False: start from a zero state)")
    if checked:
        check_slot_values(indices, P)
    return xp.astype(indices, np.int64, copy=False), initial


def prefill_call(kv: Any, count: Any, q: Any, k: Any, v: Any, m: Any, *, cu_seqlens: Any,
                 state_indices: Any, has_initial_state: Any, mask: Any, eps: Any, layout: Any,
                 backend: Any, validate: Any, out: Any = None) -> Prepared[ForwardCall]:
    """Check a pool's prefill: the packed causal forward from the named slots of the pool
    ``(kv, count)``, whose outgoing states the backend writes back into those slots."""
    if cu_seqlens is None:
        raise TypeError("cu_seqlens must be an array, got None (a prefill takes packed prompts)")
    if state_indices is None:
        raise TypeError("state_indices must be an array, got None")
    x, imported = inputs({"q": q, "k": k, "v": v}, m, mask, (kv, count), True, eps, layout,
                         backend, validate, cu_seqlens=cu_seqlens, pool=True,
                         extra={"state_indices": state_indices,
                                "has_initial_state": has_initial_state, "out": out})
    check_writable_state(x.kv0, x.count0, "pool")
    given = check_outputs(imported, x, {"out": "v"})
    with on_device(x.p.device):
        indices, initial = _slots(imported, x.N, "sequences of cu_seqlens", x.kv0.shape[0],
                                  x.checked, x.xp)
        o, o_bhsd = x.output("v", layout, given.get("out"))
    call = ForwardCall(p=x.p, q=x.bhsd("q", layout), k=x.bhsd("k", layout),
                       v=x.bhsd("v", layout), m=x.m, mask=x.mask, kv0=x.kv0, count0=x.count0,
                       cu_seqlens=x.cu_seqlens, o=o_bhsd, state_indices=indices,
                       has_initial=initial)
    return Prepared(call, x.backend, x.framework, {"o": o})


def step_call(kv: Any, count: Any, q_t: Any, k_t: Any, v_t: Any, m: Any, *, mask: Any,
              eps: Any, out: Any, backend: Any, validate: Any, state_indices: Any = None,
              has_initial_state: Any = None) -> Prepared[StepCall]:
    """Check a step on the state ``(kv, count)``, or on the slots ``state_indices`` of the pool
    ``(kv, count)``. The call holds the state's own arrays, to be updated in place, except for
    JAX, whose arrays are immutable: copies (count in int64) that the caller makes the new
    state. (A pool never holds JAX arrays.)"""
    eps = check_eps(eps)
    pool = state_indices is not None
    name = "pool" if pool else "state"
    if has_initial_state is not None and not pool:
        raise ValueError("has_initial_state needs state_indices (a pool's step)")
    imported = import_all({"q_t": q_t, "k_t": k_t, "v_t": v_t, "m": m, "mask": mask,
                           "out": out, f"{name}.kv": kv, f"{name}.count": count,
                           "state_indices": state_indices,
                           "has_initial_state": has_initial_state},
                          required=("q_t", "k_t", "v_t", f"{name}.kv", f"{name}.count"))
    raw = {n: imported[n].array for n in ("q_t", "k_t", "v_t")}
    dtype = check_float_dtypes(raw)
    for n, a in raw.items():
        if a.ndim != 3:
            raise ValueError(f"{n} must have rank 3 (B, H, D), got shape {tuple(a.shape)}")
    q, k, v = raw["q_t"], raw["k_t"], raw["v_t"]
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q_t, k_t and v_t must agree on (B, H) and q_t, k_t on D: got {_describe(raw)}"
        )
    B, H, Dk = q.shape
    Dv = v.shape[2]
    acc = accumulation(dtype)
    native_kv, native_count = imported[f"{name}.kv"].array, imported[f"{name}.count"].array
    if pool:
        P = native_kv.shape[0] if native_kv.ndim == 4 else 0
        check_state(native_kv, native_count, P, H, Dk, Dv, acc, "pool", rows="P")
    else:
        check_state(native_kv, native_count, B, H, Dk, Dv, acc)
    first = imported["q_t"]
    framework, xp = first.framework, namespace(first.device)
    native_mask = None if mask is None else check_mask(imported["mask"].array, (B,), "(B,)")
    immutable = framework == "jax"
    if immutable and out is not None:
        raise ValueError("out= cannot be written for JAX arrays, which are immutable")
    if immutable and pool:
        raise TypeError("a StatePool cannot hold JAX arrays, which cannot be written in place")
    if not immutable:
        check_writable_state(native_kv, native_count, name)
    native_out = None
    if out is not None:
        native_out = imported["out"].array
        if tuple(native_out.shape) != (B, H, Dv):
            raise ValueError(
                f"out must have shape (B, H, Dv) = {(B, H, Dv)}, got {tuple(native_out.shape)}"
            )
        if native_out.dtype != dtype:
            raise TypeError(f"out must have the dtype of v_t, {dtype}, got {native_out.dtype}")
        _writable(native_out, "out")
        _check_no_overlap({"out": native_out}, imported)
    chosen = select(backend, first.device)
    if pool:
        require_varlen(chosen, "state_indices")
    checked = values_checked(validate, first.device)
    indices = initial = None
    with on_device(first.device):
        native_m = None if m is None else check_m(imported["m"].array, H, acc, xp)
        if pool:
            indices, initial = _slots(imported, B, "rows of q_t", native_kv.shape[0], checked,
                                      xp)
        if checked:
            check_count_values(native_count, f"{name}.count")
        if immutable:
            native_kv = xp.astype(native_kv, native_kv.dtype, copy=True)
            native_count = xp.astype(native_count, np.int64, copy=True)
        o = xp.empty((B, H, Dv), dtype=dtype) if native_out is None else native_out
    p = Problem(B, H, 1, Dk, Dv, dtype, np.dtype(native_kv.dtype), True, eps, first.device,
                first.stream)
    call = StepCall(p=p, q=q, k=k, v=v, m=native_m, mask=native_mask, kv=native_kv,
                    count=native_count, o=o, state_indices=indices, has_initial=initial)
    return Prepared(call, chosen, framework, {"o": o})
