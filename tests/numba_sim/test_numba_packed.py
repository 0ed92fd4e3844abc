"""Packed sequences and pools of states on the numba backend, against the reference, in the
Numba CUDA simulator (tests/test_numba.py starts it) or on a GPU. The simulator runs chunks of
16 tokens: the lengths put sequence boundaries inside chunks and on their edges."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cosattn

from helpers import (
    BFLOAT16,
    JUNK,
    check_packed_backward,
    check_packed_forward,
    check_pool_step,
    check_prefill,
    make_packed_case,
    make_slots,
)

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [] if SIMULATED else [pytest.mark.gpu]

cuda = pytest.importorskip("numba.cuda")


def to_device(x):
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    return x.copy_to_host()


ON_DEVICE = dict(backend="numba", to_native=to_device, to_host=to_host)

# (lengths, H, Dk, Dv, dtype, mask, state, dstate, causal, layout, index dtype)
CASES = [
    ([5, 0, 17, 1, 16], 2, 4, 3, np.float64, True, True, True, True, "bhsd", np.int64),
    ([33, 15], 1, 8, 8, np.float32, False, True, False, True, "bshd", np.int32),
    ([0, 20, 2], 2, 3, 5, BFLOAT16, True, False, False, False, "bhsd", np.int32),
    ([0], 1, 4, 4, np.float32, False, True, True, True, "bhsd", np.int64),
]


@pytest.mark.parametrize(
    "lengths, H, Dk, Dv, dtype, mask, state, dstate, causal, layout, index", CASES,
    ids=[f"L{'_'.join(map(str, c[0]))}-H{c[1]}-Dk{c[2]}-Dv{c[3]}-{np.dtype(c[4])}-"
         f"{'mask' if c[5] else 'nomask'}-{'causal' if c[8] else 'bidir'}-{c[9]}"
         for c in CASES])
def test_packed_matches_reference(lengths, H, Dk, Dv, dtype, mask, state, dstate, causal, layout,
                                  index):
    pc = make_packed_case(np.random.default_rng(sum(lengths)), lengths, H, Dk, Dv, dtype,
                          mask=mask, state=state, dstate=dstate, index_dtype=index,
                          junk=np.nan if mask else None)
    check_packed_forward(pc, causal=causal, layout=layout, **ON_DEVICE)
    check_packed_backward(pc, causal=causal, layout=layout, **ON_DEVICE)


@settings(max_examples=4 if SIMULATED else 40)
@given(st.data())
def test_packed_matches_reference_drawn(data):
    lengths = data.draw(st.lists(st.sampled_from([0, 1, 15, 16, 17, 30]), min_size=1,
                                 max_size=4))
    causal = data.draw(st.booleans())
    pc = make_packed_case(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), lengths,
                          data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 4, 8])),
                          data.draw(st.sampled_from([3, 8])),
                          data.draw(st.sampled_from([np.float32, np.float64, BFLOAT16])),
                          mask=True, m=data.draw(st.booleans()),
                          state=causal and data.draw(st.booleans()),
                          dstate=causal and data.draw(st.booleans()),
                          junk=data.draw(st.sampled_from(JUNK)))
    check_packed_forward(pc, causal=causal, **ON_DEVICE)
    check_packed_backward(pc, causal=causal, **ON_DEVICE)


@pytest.mark.parametrize(("dtype", "out"), [(np.float32, False), (np.float64, True)],
                         ids=["float32", "float64-out"])
def test_prefill_into_named_slots(dtype, out):
    rng = np.random.default_rng(3)
    lengths = [17, 0, 5, 16, 3, 0]
    pc = make_packed_case(rng, lengths, 2, 4, 3, dtype, mask=True, junk=np.inf)
    slots = make_slots(rng, len(lengths), 7, 2, 4, 3, np.float32 if dtype == np.float32
                       else np.float64, index_dtype=np.int32)
    slots.indices[1] = -1
    slots.initial[2] = False
    # from slots 4 and 5 (free): a sequence whose tokens are all masked, and an empty one
    pc.mask[0, 38:41] = False
    slots.indices[4:] = [4, 5]
    slots.initial[4:] = True
    slots.kv[4:6] = -0.0
    check_prefill(pc, slots, out=out, **ON_DEVICE)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_pool_step_on_named_slots(mask):
    rng = np.random.default_rng(4)
    slots = make_slots(rng, 5, 8, 2, 4, 3, np.float32)
    slots.indices[[0, 3]] = [-1, 6]
    check_pool_step(rng, slots, 2, 4, 3, np.float32, mask=mask, junk=np.nan, **ON_DEVICE)


def test_device_values_are_checked_when_asked_and_never_read_outside():
    """Bad cu_seqlens and slots on device arrays: a ValueError with validate=True; without it,
    unspecified results, but the kernels stay inside their arrays (the simulator would raise
    on any access outside them)."""
    x = to_device(np.ones((1, 1, 6, 4), np.float32))
    bad = to_device(np.array([0, 9, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        cosattn.forward(x, x, x, cu_seqlens=bad, backend="numba", validate=True)
    cosattn.forward(x, x, x, cu_seqlens=bad, return_state=True, backend="numba")
    cosattn.backward(x, x, x, x, cu_seqlens=to_device(np.array([3, -5, 60])), backend="numba")
    pool = cosattn.StatePool.zeros(2, 1, 4, 4, like=x)
    slots = to_device(np.array([5, 1, -7]))
    with pytest.raises(ValueError, match=r"state_indices must lie in -1\.\.P-1"):
        pool.prefill(x, x, x, cu_seqlens=to_device(np.array([0, 2, 4, 6])),
                     state_indices=slots, backend="numba", validate=True)
    pool.prefill(x, x, x, cu_seqlens=to_device(np.array([0, 2, 4, 6])), state_indices=slots,
                 backend="numba")
    t = to_device(np.ones((3, 1, 4), np.float32))
    o = pool.step(t, t, t, state_indices=slots, backend="numba")
    assert to_host(o)[[0, 2]].tolist() == np.zeros((2, 1, 4)).tolist()
