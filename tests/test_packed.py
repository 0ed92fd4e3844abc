"""Packed variable-length sequences and pools of states on the numpy backend, against the
reference's unpack/pack and gather/scatter definitions (docs/spec.md, "Packed variable-length
sequences" and "A pool of states"), and the errors of bad packed and pool input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cosattn
from cosattn import reference
from cosattn._call import ForwardCall, Problem
from cosattn._device import CPU
from cosattn.backends import _cupy, _numpy

from helpers import (
    assert_close,
    check_packed_backward,
    check_packed_forward,
    check_pool_step,
    check_prefill,
    make_case,
    make_packed_case,
    packed_cases,
    packed_lengths,
    pool_steps,
    prefills,
)

# The numpy backend's chunk sizes (_numpy.chunk_size) for the dtypes and head sizes drawn here.
CHUNKS = sorted({_numpy.chunk_size(np.dtype(acc), D) for acc in (np.float32, np.float64)
                 for D in (16, 64)})
LENGTHS = packed_lengths(CHUNKS)
HEADS = st.sampled_from([1, 3, 16, 48])
HEAD_SIZES = HEADS.flatmap(lambda Dk: st.tuples(st.just(Dk), st.one_of(st.just(Dk), HEADS)))


def lengths_id(lengths) -> str:
    return "L" + "_".join(map(str, lengths))


@given(packed_cases(LENGTHS, HEAD_SIZES))
def test_packed_forward_matches_reference(drawn):
    pc, causal, layout = drawn
    check_packed_forward(pc, causal=causal, layout=layout, backend="numpy")


@given(packed_cases(LENGTHS, HEAD_SIZES))
def test_packed_backward_matches_reference(drawn):
    pc, causal, layout = drawn
    check_packed_backward(pc, causal=causal, layout=layout, backend="numpy")


@pytest.mark.parametrize("lengths", [[0], [5], [0, 0, 0], [64, 0, 1, 63, 129], [200]],
                         ids=lengths_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_awkward_packings(lengths, causal):
    pc = make_packed_case(np.random.default_rng(sum(lengths)), lengths, 2, 5, 3, np.float64,
                          mask=True, state=causal, dstate=causal)
    check_packed_forward(pc, causal=causal)
    check_packed_backward(pc, causal=causal)


def test_no_sequences_at_all():
    x = np.zeros((1, 2, 0, 4), np.float32)
    o, state = cosattn.forward(x, x, x, cu_seqlens=np.zeros(1, np.int64), return_state=True)
    assert o.shape == (1, 2, 0, 4) and state.kv.shape == (0, 2, 4, 4)
    *grads, dm = cosattn.backward(x, x, x, x, np.zeros(2), cu_seqlens=np.zeros(1, np.int32))
    assert [g.shape for g in grads] == [(1, 2, 0, 4)] * 3
    np.testing.assert_array_equal(dm, 0)


def test_one_sequence_is_the_unpacked_call():
    case = make_case(np.random.default_rng(1), 1, 3, 150, 8, 6, np.float32, mask="inner",
                     state=True)
    state = cosattn.RecurrentState(case.kv0, case.count0)
    kw = dict(mask=case.mask, state=state, return_state=True)
    o, out = cosattn.forward(case.q, case.k, case.v, case.m, **kw)
    o_packed, out_packed = cosattn.forward(case.q, case.k, case.v, case.m,
                                           cu_seqlens=np.array([0, 150]), **kw)
    np.testing.assert_array_equal(o_packed, o)
    np.testing.assert_array_equal(out_packed.kv, out.kv)


@pytest.mark.parametrize("lengths", [[100, 0, 170, 31], [300], [5] * 40 + [200]],
                         ids=["mixed", "one-long", "many-short"])
def test_calls_split_across_threads_match_reference(lengths, monkeypatch):
    """Packed calls cut into blocks of sequences and heads (parts of 3 heads x 100 tokens here,
    at least one per pretended core)."""
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    monkeypatch.setattr(_numpy, "PART_ELEMENTS", 100 * 3 * 112)
    monkeypatch.setattr(_numpy, "PARALLEL_MIN_ELEMENTS", 1)
    pc = make_packed_case(np.random.default_rng(2), lengths, 3, 64, 48, np.float32, mask=True,
                          state=True, dstate=True)
    for causal in (True, False):
        check_packed_forward(pc, causal=causal)
        check_packed_backward(pc, causal=causal)


@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=30),
       H=st.integers(1, 9), workers=st.integers(1, 4))
def test_packed_parts_cover_every_sequence_and_head_once(lengths, H, workers):
    cu = np.concatenate(([0], np.cumsum(lengths)))
    p = Problem(1, H, int(cu[-1]), 64, 64, np.dtype(np.float32), np.dtype(np.float32), True,
                1e-12, CPU, None)
    x = np.zeros((1, H, p.S, 64), np.float32)
    call = ForwardCall(p=p, q=x, k=x, v=x, m=None, mask=None, kv0=None, count0=None,
                       cu_seqlens=cu, o=x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("os.cpu_count", lambda: workers)
        patch.setattr(_numpy, "PART_ELEMENTS", 100 * 128)
        patch.setattr(_numpy, "PARALLEL_MIN_ELEMENTS", 1)
        blocks = _numpy._packed_parts(call, workers)
    cover = np.zeros((len(lengths), H), int)
    for sequences, heads in blocks:
        cover[sequences, heads] += 1
        part = call.block(sequences, heads)
        np.testing.assert_array_equal(np.diff(part.cu_seqlens), np.diff(cu)[sequences])
        assert part.q.shape == (1, part.p.H, part.p.S, 64)
    np.testing.assert_array_equal(cover, 1)
    if workers > 1 and p.S:
        assert len(blocks) >= min(workers, H * np.count_nonzero(lengths))


def test_reference_packed_equals_calls_one_sequence_at_a_time():
    """The reference's unpack/pack definition against per-sequence reference calls."""
    pc = make_packed_case(np.random.default_rng(3), [7, 0, 12, 1], 2, 4, 3, np.float64,
                          mask=True, state=True, dstate=True)
    f, cu = pc.f64, pc.cu_seqlens
    o, kv, count = reference.forward_packed(f["q"], f["k"], f["v"], f["m"], cu_seqlens=cu,
                                            mask=pc.mask, kv0=f["kv0"], count0=pc.count0)
    for n in range(pc.N):
        s = slice(cu[n], cu[n + 1])
        o_n, kv_n, count_n = reference.forward(
            f["q"][:, :, s], f["k"][:, :, s], f["v"][:, :, s], f["m"], mask=pc.mask[:, s],
            kv0=f["kv0"][n:n + 1], count0=pc.count0[n:n + 1])
        np.testing.assert_allclose(o[:, :, s], o_n, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(kv[n:n + 1], kv_n, rtol=1e-13)
        assert count[n] == count_n[0]


# --- pools ------------------------------------------------------------------------------------

@given(prefills(LENGTHS, st.tuples(st.sampled_from([1, 4, 16]), st.sampled_from([3, 16]))),
       st.booleans())
def test_prefill_matches_reference(drawn, out):
    pc, slots, layout = drawn
    check_prefill(pc, slots, layout=layout, backend="numpy", out=out)


@given(pool_steps(st.tuples(st.sampled_from([1, 5, 16]), st.just(4))))
def test_pool_step_matches_reference(drawn):
    check_pool_step(**drawn, backend="numpy")


def test_prefill_then_steps_equal_one_forward_per_request():
    """Two requests prefilled into a pool and stepped together (with a padding entry between
    them) give each request's own forward over its whole text."""
    rng = np.random.default_rng(4)
    H, D, lengths, tail = 2, 8, [37, 70], 9
    texts = [rng.standard_normal((3, 1, H, L + tail, D)).astype(np.float32) for L in lengths]
    m = np.full(H, 0.5, np.float32)
    pool = cosattn.StatePool.zeros(5, H, D, D)
    prompt = [np.concatenate([t[i][:, :, :L] for t, L in zip(texts, lengths, strict=True)],
                             axis=2) for i in range(3)]
    pool.prefill(*prompt, m, cu_seqlens=np.array([0, 37, 107]), state_indices=np.array([4, 1]))
    steps = []
    for t in range(tail):
        token = [np.stack([texts[0][i][0, :, lengths[0] + t], np.full((H, D), np.nan, np.float32),
                           texts[1][i][0, :, lengths[1] + t]]) for i in range(3)]
        steps.append(pool.step(*token, m, state_indices=np.array([4, -1, 1])))
    for n, slot in ((0, 4), (1, 1)):
        whole, state = cosattn.forward(*texts[n], m, return_state=True)
        got = np.stack([s[2 * n] for s in steps], axis=1)
        assert_close(got, whole[0, :, lengths[n]:], np.float32, f"request {n}")
        assert_close(pool.kv[slot], state.kv[0], np.float32, "slot")
        assert pool.count[slot] == lengths[n] + tail


def test_a_reused_slot_forgets_its_last_request():
    pool = cosattn.StatePool.zeros(2, 1, 4, 4)
    x = np.random.default_rng(5).standard_normal((1, 1, 6, 4)).astype(np.float32)
    pool.prefill(x, x, x, cu_seqlens=np.array([0, 6]), state_indices=np.array([1]))
    fresh = cosattn.StatePool.zeros(2, 1, 4, 4)
    o = pool.prefill(x[:, :, :3], x[:, :, :3], x[:, :, :3], cu_seqlens=np.array([0, 3]),
                     state_indices=np.array([1]), has_initial_state=np.array([False]))
    o_fresh = fresh.prefill(x[:, :, :3], x[:, :, :3], x[:, :, :3], cu_seqlens=np.array([0, 3]),
                            state_indices=np.array([1]))
    np.testing.assert_array_equal(o, o_fresh)
    np.testing.assert_array_equal(pool.kv, fresh.kv)
    np.testing.assert_array_equal(pool.count, [0, 3])


def test_pool_zeros_and_repr():
    pool = cosattn.StatePool.zeros(6, 2, 3, 5)
    assert pool.kv.shape == (6, 2, 5, 3) and pool.count.dtype == np.int64
    assert pool.shape == (6, 2, 3, 5) and pool.nbytes == 6 * 2 * 5 * 3 * 4 + 6 * 8
    assert repr(pool) == "StatePool(P=6, H=2, Dk=3, Dv=5, dtype=float32)"
    assert cosattn.StatePool.zeros(1, 1, 1, 1, like=np.zeros(1)).kv.dtype == np.float64


def test_a_pool_cannot_hold_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="cannot hold JAX arrays"):
        cosattn.StatePool.zeros(2, 1, 4, 4, like=jnp.zeros(1, jnp.float32))
    with pytest.raises(TypeError, match="cannot hold JAX arrays"):
        cosattn.StatePool(jnp.zeros((2, 1, 4, 4)), jnp.zeros(2, jnp.int32))


# --- bad input: clear errors, nothing changed ------------------------------------------------

def _packed(H=2, D=4, dtype=np.float32):
    """q = k = v (1, H, 10, D): three sequences of lengths 3, 0, 7."""
    x = np.random.default_rng(6).standard_normal((1, H, 10, D)).astype(dtype)
    return x, np.array([0, 3, 3, 10])


FORWARD_ERRORS = [
    ("cu_seqlens not starting at 0", dict(cu_seqlens=np.array([1, 3, 10])), ValueError,
     "cu_seqlens must start at 0, got 1"),
    ("cu_seqlens decreasing", dict(cu_seqlens=np.array([0, 6, 4, 10])), ValueError,
     r"cu_seqlens must not decrease, got 6 then 4 \(entries 1 and 2\)"),
    ("cu_seqlens not ending at T", dict(cu_seqlens=np.array([0, 3, 9])), ValueError,
     "cu_seqlens must end at the packed length S = 10, got 9"),
    ("cu_seqlens of floats", dict(cu_seqlens=np.array([0.0, 10.0])), TypeError,
     "cu_seqlens must be int32 or int64, got float64"),
    ("cu_seqlens of int16", dict(cu_seqlens=np.array([0, 10], np.int16)), TypeError,
     "cu_seqlens must be int32 or int64, got int16"),
    ("cu_seqlens of rank 2", dict(cu_seqlens=np.array([[0, 10]])), ValueError,
     r"cu_seqlens must have shape \(N\+1,\) for N sequences, got \(1, 2\)"),
    ("cu_seqlens empty", dict(cu_seqlens=np.zeros(0, np.int64)), ValueError,
     r"cu_seqlens must have shape \(N\+1,\)"),
    ("mask of the wrong length", dict(mask=np.ones((1, 9), bool)), ValueError,
     r"mask must have shape \(B, S\) = \(1, 10\), got \(1, 9\)"),
    ("state with one row per batch row", dict(state=cosattn.RecurrentState.zeros(1, 2, 4, 4)),
     ValueError, r"state.kv must have shape \(N, H, Dv, Dk\) = \(3, 2, 4, 4\)"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "pattern"), FORWARD_ERRORS,
                         ids=[e[0] for e in FORWARD_ERRORS])
def test_bad_packed_input_names_the_argument(name, kwargs, error, pattern):
    x, cu = _packed()
    kwargs = {"cu_seqlens": cu, **kwargs}
    with pytest.raises(error, match=pattern):
        cosattn.forward(x, x, x, **kwargs)
    with pytest.raises(error, match=pattern):
        cosattn.backward(x, x, x, x, **kwargs)


def test_packed_inputs_have_one_row():
    x = np.zeros((2, 1, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"must have B = 1, got q\(2, 1, 5, 4\)"):
        cosattn.forward(x, x, x, cu_seqlens=np.array([0, 5]))


def test_dstate_has_one_row_per_sequence():
    x, cu = _packed()
    with pytest.raises(ValueError, match=r"dstate must have the shape of state.kv "
                                         r"\(N, H, Dv, Dk\) = \(3, 2, 4, 4\), got \(1, 2, 4, 4\)"):
        cosattn.backward(x, x, x, x, cu_seqlens=cu, dstate=np.zeros((1, 2, 4, 4), np.float32))


def test_total_is_refused_with_cu_seqlens():
    """total= says a call holds a part of one longer sequence; packed sequences are whole."""
    x, cu = _packed()
    total = cosattn.RecurrentState(np.zeros((3, 2, 4, 4), np.float32), np.full(3, 10))
    pattern = r"total= cannot be combined with cu_seqlens"
    with pytest.raises(ValueError, match=pattern):
        cosattn.forward(x, x, x, causal=False, cu_seqlens=cu, total=total)
    with pytest.raises(ValueError, match=pattern):
        cosattn.backward(x, x, x, x, causal=False, cu_seqlens=cu, total=total,
                         dstate=np.zeros((3, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="total= belongs to the bidirectional form"):
        cosattn.forward(x, x, x, cu_seqlens=cu, total=total)


@pytest.mark.parametrize("causal", [True, False])
def test_absorb_of_each_sequence_agrees_with_a_packed_call(causal):
    """absorb and packed calls are independent options: each packed sequence's own state (and,
    bidirectional, its outputs through total=) is what absorb gives for it alone."""
    rng = np.random.default_rng(11)
    lengths = [70, 0, 5, 130]
    cu = np.concatenate(([0], np.cumsum(lengths)))
    q, k, v = (rng.standard_normal((1, 3, int(cu[-1]), 8)).astype(np.float32)
               for _ in range(3))
    m = rng.standard_normal(3).astype(np.float32)
    mask = rng.random((1, int(cu[-1]))) < 0.8
    if causal:
        o, state = cosattn.forward(q, k, v, m, mask=mask, cu_seqlens=cu, return_state=True)
    else:
        o = cosattn.forward(q, k, v, m, mask=mask, causal=False, cu_seqlens=cu)
    for n, (a, b) in enumerate(itertools.pairwise(cu)):
        seq = (slice(None), slice(None), slice(a, b))
        own = cosattn.absorb(k[seq], v[seq], m, causal=causal, mask=mask[:, a:b])
        if causal:
            assert_close(own.kv[0], state.kv[n], np.float32)
            assert int(own.count[0]) == int(state.count[n])
        elif b > a:
            part = cosattn.forward(q[seq], k[seq], v[seq], m, mask=mask[:, a:b], causal=False,
                                   total=own)
            assert_close(part, o[seq], np.float32)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_packed_calls_under_cosattn_num_threads(threads, monkeypatch):
    """COSATTN_NUM_THREADS bounds the blocks of whole sequences a packed call is cut into."""
    monkeypatch.setenv("COSATTN_NUM_THREADS", threads)
    monkeypatch.setattr(_numpy, "PART_ELEMENTS", 100 * 3 * 112)
    monkeypatch.setattr(_numpy, "PARALLEL_MIN_ELEMENTS", 1)
    pc = make_packed_case(np.random.default_rng(3), [100, 0, 170, 31], 3, 64, 48, np.float32,
                          mask=True, state=True, dstate=True)
    for causal in (True, False):
        check_packed_forward(pc, causal=causal)
        check_packed_backward(pc, causal=causal)


def _pool(P=4, H=2, D=4, dtype=np.float32):
    rng = np.random.default_rng(7)
    kv = rng.standard_normal((P, H, D, D)).astype(dtype)
    kv[0, 0, 0, 0] = -0.0
    return cosattn.StatePool(kv, rng.integers(0, 9, P).astype(np.int64))


POOL_ERRORS = [
    ("slot out of range", dict(state_indices=np.array([0, 4, 1])), ValueError,
     r"state_indices must lie in -1..P-1 = -1..3 \(-1: a padding entry\), got \[4\]"),
    ("slot below -1", dict(state_indices=np.array([0, -2, 1])), ValueError,
     r"state_indices must lie in -1..P-1 = -1..3.*got \[-2\]"),
    ("slot repeated", dict(state_indices=np.array([2, -1, 2])), ValueError,
     "state_indices names slot 2 more than once"),
    ("state_indices of floats", dict(state_indices=np.array([0.0, 1.0, 2.0])), TypeError,
     "state_indices must be int32 or int64, got float64"),
    ("state_indices of another N", dict(state_indices=np.array([0, 1])), ValueError,
     r"state_indices must have shape \(N,\) = \(3,\) for the 3 sequences of cu_seqlens"),
    ("has_initial_state of another N", dict(has_initial_state=np.ones(4, bool)), ValueError,
     r"has_initial_state must have shape \(N,\) = \(3,\) for the 3 sequences of cu_seqlens"),
    ("has_initial_state not bool", dict(has_initial_state=np.ones(3, np.int64)), TypeError,
     "has_initial_state must be bool"),
    ("cu_seqlens of another N", dict(cu_seqlens=np.array([0, 10])), ValueError,
     r"state_indices must have shape \(N,\) = \(1,\) for the 1 sequences of cu_seqlens, "
     r"got \(3,\)"),
    ("cu_seqlens decreasing", dict(cu_seqlens=np.array([0, 7, 5, 10])), ValueError,
     "cu_seqlens must not decrease"),
    ("inputs of another head size", dict(D=5), ValueError,
     r"pool.kv must have shape \(P, H, Dv, Dk\) = \(4, 2, 5, 5\), got \(4, 2, 4, 4\)"),
    ("inputs of another head count", dict(H=3), ValueError,
     r"pool.kv must have shape \(P, H, Dv, Dk\) = \(4, 3, 4, 4\)"),
    ("float64 inputs, float32 pool", dict(dtype=np.float64), TypeError,
     r"float64 inputs need a float64 pool \(StatePool.zeros\(..., dtype='float64'\)\)"),
    ("no cu_seqlens", dict(cu_seqlens=None), TypeError, "cu_seqlens must be an array"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "pattern"), POOL_ERRORS,
                         ids=[e[0] for e in POOL_ERRORS])
def test_a_failed_prefill_names_the_argument_and_changes_nothing(name, kwargs, error, pattern):
    shape = {n: kwargs.pop(n) for n in ("H", "D", "dtype") if n in kwargs}
    x, cu = _packed(**shape)
    pool = _pool()
    before = pool.kv.tobytes(), pool.count.tobytes()
    args = {"cu_seqlens": cu, "state_indices": np.array([3, -1, 0]), **kwargs}
    with pytest.raises(error, match=pattern):
        pool.prefill(x, x, x, **args)
    assert (pool.kv.tobytes(), pool.count.tobytes()) == before


STEP_ERRORS = [
    ("slot out of range", dict(state_indices=np.array([0, 4])), ValueError,
     r"state_indices must lie in -1..P-1 = -1..3"),
    ("slot repeated", dict(state_indices=np.array([1, 1])), ValueError,
     "state_indices names slot 1 more than once"),
    ("state_indices of another N", dict(state_indices=np.array([0, 1, 2])), ValueError,
     r"state_indices must have shape \(N,\) = \(2,\) for the 2 rows of q_t"),
    ("has_initial_state of another N", dict(has_initial_state=np.ones(1, bool)), ValueError,
     r"has_initial_state must have shape \(N,\) = \(2,\) for the 2 rows of q_t"),
    ("out of the wrong shape", dict(out=np.empty((3, 2, 4), np.float32)), ValueError,
     r"out must have shape \(B, H, Dv\)"),
    ("mask of another N", dict(mask=np.ones(3, bool)), ValueError, r"mask must have shape"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "pattern"), STEP_ERRORS,
                         ids=[e[0] for e in STEP_ERRORS])
def test_a_failed_pool_step_names_the_argument_and_changes_nothing(name, kwargs, error, pattern):
    pool = _pool()
    before = pool.kv.tobytes(), pool.count.tobytes()
    x = np.ones((2, 2, 4), np.float32)
    with pytest.raises(error, match=pattern):
        pool.step(x, x, x, **{"state_indices": np.array([3, -1]), **kwargs})
    assert (pool.kv.tobytes(), pool.count.tobytes()) == before


def test_a_pool_of_read_only_arrays_is_refused():
    kv = np.zeros((2, 1, 4, 4), np.float32)
    kv.flags.writeable = False
    with pytest.raises(ValueError, match=r"pool\.kv is read-only"):
        cosattn.StatePool(kv, np.zeros(2, np.int64))
    with pytest.raises(TypeError, match=r"pool\.count must be int64 to be updated in place"):
        cosattn.StatePool(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"pool\.count must be non-negative"):
        cosattn.StatePool(np.zeros((2, 1, 4, 4), np.float32), np.array([0, -1]))


def test_a_backend_without_varlen_refuses_packed_and_pool_calls(monkeypatch):
    """A backend that declares VARLEN = False (none does today; the cupy backend stands in for
    one) is refused before any launch, as validation: a RuntimeError that names the numba
    backend, and the pool unchanged."""
    monkeypatch.setattr(_cupy, "unavailable", lambda: None)
    monkeypatch.setattr(_cupy, "DEVICE", "cpu")  # take the CPU arrays of this test
    monkeypatch.setattr(_cupy, "VARLEN", False)
    x, cu = _packed()
    pattern = r"the cupy backend does not take cu_seqlens/state pools yet.*backend='numba'"
    with pytest.raises(RuntimeError, match=pattern):
        cosattn.forward(x, x, x, cu_seqlens=cu, backend="cupy")
    with pytest.raises(RuntimeError, match=pattern):
        cosattn.backward(x, x, x, x, cu_seqlens=cu, backend="cupy")
    pool = _pool()
    before = pool.kv.tobytes()
    with pytest.raises(RuntimeError, match=pattern):
        pool.prefill(x, x, x, cu_seqlens=cu, state_indices=np.array([0, 1, 2]), backend="cupy")
    with pytest.raises(RuntimeError, match=pattern):
        pool.step(x[0, :, :2].swapaxes(0, 1), x[0, :, :2].swapaxes(0, 1),
                  x[0, :, :2].swapaxes(0, 1), state_indices=np.array([0, 1]), backend="cupy")
    assert pool.kv.tobytes() == before


def test_torch_tensors_round_trip_and_the_pool_is_written_in_place():
    torch = pytest.importorskip("torch")
    pc = make_packed_case(np.random.default_rng(8), [3, 0, 9], 2, 4, 4, np.float32, mask=True)
    q, k, v = (torch.from_numpy(a) for a in (pc.q, pc.k, pc.v))
    cu = torch.from_numpy(pc.cu_seqlens.astype(np.int32))
    mask = torch.from_numpy(pc.mask)
    o, state = cosattn.forward(q, k, v, cu_seqlens=cu, mask=mask, return_state=True)
    assert isinstance(o, torch.Tensor) and isinstance(state.kv, torch.Tensor)
    ref_o, ref_kv, _ = reference.forward_packed(pc.f64["q"], pc.f64["k"], pc.f64["v"],
                                                cu_seqlens=pc.cu_seqlens, mask=pc.mask)
    assert_close(o.numpy(), ref_o, np.float32, "o")
    pool = cosattn.StatePool.zeros(4, 2, 4, 4, like=q)
    kv = pool.kv
    assert isinstance(kv, torch.Tensor)
    pool.prefill(q, k, v, cu_seqlens=cu, mask=mask, state_indices=torch.tensor([2, -1, 0]))
    assert pool.kv is kv
    assert_close(kv[[2, 0]].numpy(), ref_kv[[0, 2]], np.float32, "pool.kv")
    np.testing.assert_array_equal(pool.count.numpy(), [int(pc.mask[0, 3:].sum()), 0,
                                                       int(pc.mask[0, :3].sum()), 0])
