"""The numpy backend against the reference: shapes, dtypes, masks, m, states, layouts."""

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cosattn
from cosattn._call import Problem
from cosattn._device import CPU
from cosattn.backends import _cpu_kernels, _numpy

from helpers import (
    DTYPES,
    JUNK,
    MASK_KINDS,
    assert_close,
    case_id,
    check_absorb,
    check_backward,
    check_forward,
    check_total,
    make_case,
    reference_forward,
)

SIZES = st.sampled_from([1, 2, 5, 63, 64, 65, 130])
HEADS = st.sampled_from([1, 3, 16, 48])


@st.composite
def cases(draw):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    S = draw(SIZES)
    Dk = draw(HEADS)
    Dv = draw(st.one_of(st.just(Dk), HEADS))
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans())
    case = make_case(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), B, H, S, Dk, Dv,
                     dtype, mask=draw(st.sampled_from(MASK_KINDS)), m=draw(st.booleans()),
                     state=causal and draw(st.booleans()), dstate=causal and draw(st.booleans()),
                     junk=draw(st.sampled_from(JUNK)))
    return case, causal, draw(st.sampled_from(["bhsd", "bshd"]))


@given(cases(), st.booleans())
def test_forward_matches_reference(drawn, out):
    case, causal, layout = drawn
    check_forward(case, causal=causal, layout=layout, backend="numpy", out=out)


@given(cases(), st.booleans())
def test_backward_matches_reference(drawn, out):
    case, causal, layout = drawn
    check_backward(case, causal=causal, layout=layout, backend="numpy", out=out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 200, 160, 48), (1, 2, 129, 64, 64)],
                         ids=lambda s: case_id(*s))
def test_awkward_shapes_every_dtype(shape, dtype):
    case = make_case(np.random.default_rng(5), *shape, dtype, mask="inner", state=True,
                     dstate=True)
    check_forward(case, causal=True)
    check_backward(case, causal=True)
    check_forward(case, causal=False, out=True)
    check_backward(case, causal=False, out=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_split_then_continue_equals_one_call(dtype, data):
    S = data.draw(st.integers(2, 140))
    cut = data.draw(st.integers(0, S))
    case = make_case(np.random.default_rng(cut), 2, 2, S, 8, 6, dtype,
                     mask=data.draw(st.sampled_from(MASK_KINDS)))
    whole = cosattn.forward(case.q, case.k, case.v, case.m, mask=case.mask)
    head_mask = None if case.mask is None else case.mask[:, :cut]
    tail_mask = None if case.mask is None else case.mask[:, cut:]
    o1, state = cosattn.forward(case.q[:, :, :cut], case.k[:, :, :cut], case.v[:, :, :cut],
                                case.m, mask=head_mask, return_state=True)
    o2, state2 = cosattn.forward(case.q[:, :, cut:], case.k[:, :, cut:], case.v[:, :, cut:],
                                 case.m, mask=tail_mask, state=state, return_state=True)
    assert_close(np.concatenate([o1, o2], axis=2), whole, dtype, "split o")
    assert_close(np.concatenate([o1, o2], axis=2), reference_forward(case)[0], dtype, "vs ref")
    np.testing.assert_array_equal(state2.count, reference_forward(case)[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_step_loop_equals_forward(dtype, mask_kind):
    B, H, S, Dk, Dv = 2, 3, 37, 16, 8
    case = make_case(np.random.default_rng(6), B, H, S, Dk, Dv, dtype, mask=mask_kind)
    ref_o, ref_kv, ref_count = reference_forward(case)
    state = cosattn.RecurrentState.zeros(B, H, Dk, Dv, like=case.q)
    outs = []
    for t in range(S):
        mask_t = None if case.mask is None else case.mask[:, t]
        outs.append(state.step(case.q[:, :, t], case.k[:, :, t], case.v[:, :, t], case.m,
                               mask=mask_t))
    o = np.stack(outs, axis=2)
    assert o.dtype == dtype
    assert_close(o, ref_o, dtype, "step o")
    assert_close(state.kv, ref_kv, dtype, "step kv")
    np.testing.assert_array_equal(state.count, ref_count)


def test_prefill_then_steps_equals_one_call():
    case = make_case(np.random.default_rng(7), 2, 2, 90, 12, 12, np.float32, mask="right")
    _, state = cosattn.forward(case.q[:, :, :70], case.k[:, :, :70], case.v[:, :, :70], case.m,
                               mask=case.mask[:, :70], return_state=True)
    out = np.empty((2, 2, 12), dtype=np.float32)
    tail = []
    for t in range(70, 90):
        returned = state.step(case.q[:, :, t], case.k[:, :, t], case.v[:, :, t], case.m,
                              mask=case.mask[:, t], out=out)
        assert returned is out
        tail.append(out.copy())
    assert_close(np.stack(tail, axis=2), reference_forward(case)[0][:, :, 70:], np.float32, "o")


def test_long_float32_step_run_stays_accurate():
    B, H, S, D = 1, 2, 20000, 8
    case = make_case(np.random.default_rng(8), B, H, S, D, D, np.float32)
    o = cosattn.forward(case.q, case.k, case.v, case.m)
    state = cosattn.RecurrentState.zeros(B, H, D, D)
    last = [state.step(case.q[:, :, t], case.k[:, :, t], case.v[:, :, t], case.m)
            for t in range(S)][-1]
    ref_last = reference_forward(case)[0][:, :, -1]
    assert np.linalg.norm(last - ref_last) / np.linalg.norm(ref_last) < 3e-5
    assert np.linalg.norm(o[:, :, -1] - ref_last) / np.linalg.norm(ref_last) < 1e-5


def test_empty_sequence_keeps_state():
    case = make_case(np.random.default_rng(9), 2, 2, 0, 4, 3, np.float32, state=True)
    state = cosattn.RecurrentState(case.kv0, case.count0)
    o, out_state = cosattn.forward(case.q, case.k, case.v, case.m, state=state,
                                   return_state=True)
    assert o.shape == (2, 2, 0, 3)
    np.testing.assert_array_equal(out_state.kv, case.kv0)
    np.testing.assert_array_equal(out_state.count, case.count0)
    assert out_state.kv is not state.kv
    dq, _, dv, dm, dkv0 = cosattn.backward(case.do, case.q, case.k, case.v, case.m, state=state)
    assert dq.shape == (2, 2, 0, 4) and dv.shape == (2, 2, 0, 3)
    np.testing.assert_array_equal(dm, 0)
    np.testing.assert_array_equal(dkv0, 0)


def test_nan_propagates_without_crashing():
    case = make_case(np.random.default_rng(10), 1, 1, 70, 4, 4, np.float32)
    case.v[0, 0, 3, 0] = np.nan
    o, state = cosattn.forward(case.q, case.k, case.v, case.m, return_state=True)
    assert np.isnan(o[0, 0, 3:, 0]).all()
    assert np.isnan(state.kv[0, 0, 0]).all()


@pytest.mark.parametrize("heads", [(1, 4), (3, 1), (2, 3)],
                         ids=["split-heads", "split-rows", "split-tiles"])
def test_calls_split_across_threads_match_reference(heads, monkeypatch):
    """Parts of 2 heads at most (S=900, Dk+Dv=112), at least one per (pretended) core."""
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    monkeypatch.setattr("cosattn.backends._numpy.PART_ELEMENTS", 2 * 900 * 112)
    B, H = heads
    case = make_case(np.random.default_rng(12), B, H, 900, 64, 48, np.float32, mask="left",
                     state=True, dstate=True)
    check_forward(case, causal=True)
    check_backward(case, causal=True)
    check_forward(case, causal=False)
    check_backward(case, causal=False)


def test_zero_vectors_use_eps_floor():
    case = make_case(np.random.default_rng(11), 1, 2, 9, 4, 4, np.float64, mask="none")
    case.q[0, 0, 2] = 0
    case.k[0, 1, 4] = 0
    case.f64["q"][0, 0, 2] = 0
    case.f64["k"][0, 1, 4] = 0
    check_forward(case, causal=True)
    check_backward(case, causal=True)


@pytest.mark.parametrize(("B", "H", "S", "workers"), [(1, 8, 8192, 2), (2, 3, 900, 3),
                                                      (16, 4, 256, 2), (1, 1, 70000, 2)])
def test_parts_tile_every_row_and_head_once(B, H, S, workers):
    p = Problem(B, H, S, 64, 64, np.dtype(np.float32), np.dtype(np.float32), True, 1e-12, CPU,
                None)
    parts = _numpy._parts(p, workers)
    cover = np.zeros((B, H), int)
    for b, h in parts:
        cover[b, h] += 1
        heads, rows = len(range(H)[h]), len(range(B)[b])
        assert rows == 1 or heads == H  # a block of heads of one row, or whole rows
        assert rows * heads == 1 or rows * heads * S * 128 <= _numpy.PART_ELEMENTS
    np.testing.assert_array_equal(cover, 1)
    assert len(parts) >= min(workers, B * H)


def _threads_seen(monkeypatch, part_name):
    """Wrap ``_numpy.<part_name>`` to record, per part, its thread and the BLAS thread count."""
    seen = []
    original = getattr(_numpy, part_name)

    def part(call):
        blas = [lib["num_threads"] for lib in _numpy._blas().info()
                if lib["user_api"] == "blas"]
        seen.append((threading.get_ident(), blas))
        return original(call)

    monkeypatch.setattr(_numpy, part_name, part)
    return seen


@pytest.mark.parametrize("threads", ["1", "2"])
def test_num_threads_bounds_workers_and_blas(threads, monkeypatch):
    """COSATTN_NUM_THREADS=n: at most n threads run parts, each with one BLAS thread (n = 1:
    the calling thread alone, with one BLAS thread); results do not change."""
    case = make_case(np.random.default_rng(2), 1, 8, 8192, 32, 32, np.float32)
    expected = cosattn.forward(case.q, case.k, case.v, case.m)
    seen = _threads_seen(monkeypatch, "_forward_part")
    monkeypatch.setenv(_numpy.THREADS_ENV_VAR, threads)
    o = cosattn.forward(case.q, case.k, case.v, case.m)
    np.testing.assert_array_equal(o, expected)
    n = int(threads)
    assert len({ident for ident, _ in seen}) <= n
    if n == 1:
        assert seen == [(threading.get_ident(), [1] * len(seen[0][1]))]
    else:
        assert len(seen) >= n
        assert all(blas == [1] * len(blas) for _, blas in seen)


def test_num_threads_leaves_the_blas_setting_as_it_was(monkeypatch):
    before = [lib["num_threads"] for lib in _numpy._blas().info()]
    monkeypatch.setenv(_numpy.THREADS_ENV_VAR, "1")
    case = make_case(np.random.default_rng(3), 1, 2, 100, 8, 8, np.float32)
    cosattn.backward(case.do, case.q, case.k, case.v, case.m)
    assert [lib["num_threads"] for lib in _numpy._blas().info()] == before


def test_parts_run_with_one_blas_thread_each(monkeypatch):
    """Unset COSATTN_NUM_THREADS: a call cut into parts runs each with one BLAS thread (one
    BLAS pool per worker would oversubscribe the cores); results do not change."""
    monkeypatch.delenv(_numpy.THREADS_ENV_VAR, raising=False)
    monkeypatch.setattr(_numpy.os, "cpu_count", lambda: 2)
    case = make_case(np.random.default_rng(5), 1, 8, 1024, 16, 16, np.float32)
    expected = reference_forward(case)[0]
    seen = _threads_seen(monkeypatch, "_forward_part")
    o = cosattn.forward(case.q, case.k, case.v, case.m)
    assert_close(o, expected, np.float32)
    assert len(seen) >= 2
    assert all(blas == [1] * len(blas) for _, blas in seen)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_num_threads_must_be_a_positive_integer(value, monkeypatch):
    monkeypatch.setenv(_numpy.THREADS_ENV_VAR, value)
    case = make_case(np.random.default_rng(4), 1, 1, 5, 4, 4, np.float32)
    with pytest.raises(ValueError, match=f"COSATTN_NUM_THREADS must be a positive integer, "
                                         f"got '{value}'"):
        cosattn.forward(case.q, case.k, case.v)


@st.composite
def split_cases(draw):
    """A case for the primitives of context parallel, and where to cut it."""
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    S = draw(st.sampled_from([1, 2, 63, 64, 65, 130]))
    Dk, Dv = draw(st.sampled_from([1, 5, 16])), draw(st.sampled_from([1, 7, 16]))
    causal = draw(st.booleans())
    case = make_case(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), B, H, S, Dk, Dv,
                     draw(st.sampled_from(DTYPES)), mask=draw(st.sampled_from(MASK_KINDS)),
                     m=draw(st.booleans()), state=causal and draw(st.booleans()),
                     junk=draw(st.sampled_from(JUNK)))
    return case, causal, draw(st.integers(0, S)), draw(st.sampled_from(["bhsd", "bshd"]))


@given(split_cases())
def test_absorb_and_total_match_the_reference(drawn):
    """absorb: the forward's state without o (causal), a part's sum weighted with a whole
    sequence's count (bidirectional); forward/backward with total= on the parts of a cut
    sequence give the whole sequence's results."""
    case, causal, cut, layout = drawn
    check_absorb(case, causal=causal, layout=layout, rng=np.random.default_rng(cut))
    if not causal:
        check_total(case, cut, layout=layout)


def test_absorb_continues_a_state():
    """Absorbing a sequence in two parts (the second from the first's state) gives the state of
    the whole, and forward's: the sums are the same up to rounding."""
    case = make_case(np.random.default_rng(21), 2, 3, 150, 8, 6, np.float64, mask="inner",
                     state=True)
    state = cosattn.RecurrentState(case.kv0, case.count0)
    first = cosattn.absorb(case.k[:, :, :70], case.v[:, :, :70], case.m,
                           mask=case.mask[:, :70], state=state)
    whole = cosattn.absorb(case.k[:, :, 70:], case.v[:, :, 70:], case.m,
                           mask=case.mask[:, 70:], state=first)
    _, forward_state = cosattn.forward(case.q, case.k, case.v, case.m, mask=case.mask,
                                       state=state, return_state=True)
    assert_close(whole.kv, forward_state.kv, np.float64, "kv")
    np.testing.assert_array_equal(whole.count, forward_state.count)
    np.testing.assert_array_equal(state.kv, case.kv0)  # the incoming state is not modified


def _float_bits_near_halves() -> np.ndarray:
    """float32 bit patterns that exercise float32 -> float16 rounding: every half's value, the
    midpoints between neighbouring halves (ties) and the floats just either side of them, the
    overflow and underflow thresholds, NaNs with payloads in every position, and random bits."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(np.unique(halves[np.isfinite(halves)].astype(np.float64)))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32).view(np.uint32)  # exact
    values = halves.astype(np.float32).view(np.uint32)
    edges = np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x32FFFFFF, 0x33000001,
                      0x387FFFFF, 0x38800000, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7F802000,
                      0x7FFFFFFF, 0x00000001], dtype=np.uint32)
    random = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    bits = np.concatenate([values, mids, mids - 1, mids + 1, edges, random.astype(np.uint32)])
    return np.concatenate([bits, bits | np.uint32(0x80000000)])


def test_float16_casts_equal_numpys_bit_for_bit():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(1, 1, -1, 1)
    floats = np.empty(halves.shape, np.uint32)
    _cpu_kernels.half_to_float(halves, floats)
    assert np.array_equal(floats, halves.view(np.float16).astype(np.float32).view(np.uint32))
    bits = _float_bits_near_halves().reshape(1, 1, -1, 1)
    out = np.empty(bits.shape, np.uint16)
    _cpu_kernels.float_to_half(bits, out)
    with np.errstate(over="ignore"):
        expected = bits.view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(out, expected)


def test_float16_casts_take_any_strides():
    x = np.random.default_rng(1).standard_normal((2, 5, 3, 4)).astype(np.float16)
    strided = x.transpose(0, 2, 1, 3)
    out = np.empty(strided.shape, np.float32)
    _cpu_kernels.half_to_float(strided.view(np.uint16), out.view(np.uint32))
    assert np.array_equal(out, strided.astype(np.float32))
    target = np.empty((2, 5, 3, 4), np.float16).transpose(0, 2, 1, 3)
    _cpu_kernels.float_to_half(out.view(np.uint32), target.view(np.uint16))
    assert np.array_equal(target, strided)
