"""Bad input of every kind, calls that fail whole, padding that holds anything, and many
threads at once (docs/spec.md, "Bad input"). Run on the numpy backend; the emulated CUDA and
Numba simulator suites run the step checks on theirs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cosattn
from cosattn.backends import _cupy

from helpers import (
    BFLOAT16,
    JUNK,
    assert_close,
    failing_steps,
    make_case,
    reference_forward,
)


def _state(B=2, H=3, Dk=4, Dv=5):
    """A NumPy state holding -0.0 and other values, so that bit-for-bit comparisons bite."""
    kv = np.random.default_rng(0).standard_normal((B, H, Dv, Dk)).astype(np.float32)
    kv[0, 0, 0] = -0.0
    return cosattn.RecurrentState(kv, np.array([3, 0][:B] + [1] * max(B - 2, 0), np.int64))


def _token(B=2, H=3, Dk=4, Dv=5, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, D)).astype(np.float32) for D in (Dk, Dk, Dv))


def _bits(state):
    return state.kv.tobytes(), state.count.tobytes()


# --- a call that fails changes nothing ------------------------------------------------------

@pytest.mark.parametrize(("name", "call", "error", "pattern"), failing_steps(),
                         ids=[c[0] for c in failing_steps()])
def test_a_failed_step_changes_nothing(name, call, error, pattern):
    state = _state()
    before = _bits(state)
    with pytest.raises(error, match=pattern):
        call(state, *_token(), backend="numpy")
    assert _bits(state) == before


def test_a_negative_count_is_refused_everywhere():
    state = _state()
    state.count[0] = -1
    before = _bits(state)
    with pytest.raises(ValueError, match=r"state\.count must be non-negative"):
        state.step(*_token())
    assert _bits(state) == before
    q, k, v = (x[:, :, None] for x in _token())
    with pytest.raises(ValueError, match=r"state\.count must be non-negative"):
        cosattn.forward(q, k, v, state=state)
    with pytest.raises(ValueError, match=r"state\.count must be non-negative"):
        cosattn.backward(v, q, k, v, state=state)
    with pytest.raises(ValueError, match=r"state\.count must be non-negative"):
        cosattn.RecurrentState(state.kv, state.count)


# --- padding holds anything -------------------------------------------------------------------

@pytest.mark.parametrize("junk", [j for j in JUNK if j is not None], ids=str)
def test_a_masked_step_leaves_its_rows_alone(junk):
    state = _state()
    twin = state.copy()
    q, k, v = _token()
    mask = np.array([False, True])
    for x in (q, k, v):
        x[0] = junk
    o = state.step(q, k, v, np.zeros(3, np.float32), mask=mask)
    assert state.kv[0].tobytes() == twin.kv[0].tobytes()
    assert list(state.count) == [3, 1]
    assert np.all(o[0] == 0) and not np.any(np.signbit(o[0]))
    q[0], k[0], v[0] = 0, 0, 0
    ref = twin.step(q, k, v, np.zeros(3, np.float32), mask=mask)
    np.testing.assert_array_equal(o, ref)
    np.testing.assert_array_equal(state.kv, twin.kv)


# --- flags, numbers and names ---------------------------------------------------------------

@pytest.fixture
def case():
    return make_case(np.random.default_rng(0), 2, 3, 10, 4, 5, np.float32, mask="inner")


@pytest.mark.parametrize("flag", ["causal", "return_state", "validate"])
@pytest.mark.parametrize("value", ["no", 1, None, np.array([True])], ids=repr)
def test_flags_must_be_bools(case, flag, value):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        cosattn.forward(case.q, case.k, case.v, **{flag: value})


@pytest.mark.parametrize(("eps", "error"), [("a", TypeError), (None, TypeError),
                                            (True, TypeError), (np.nan, ValueError),
                                            (-1.0, ValueError), (np.inf, ValueError)], ids=repr)
def test_eps_is_a_positive_finite_number(case, eps, error):
    with pytest.raises(error, match="eps must be a"):
        cosattn.forward(case.q, case.k, case.v, eps=eps)
    with pytest.raises(error, match="eps must be a"):
        cosattn.RecurrentState.zeros(2, 3, 4, 5).step(*(x[:, :, 0] for x in
                                                         (case.q, case.k, case.v)), eps=eps)


def test_a_backend_named_by_the_environment_says_so(case, monkeypatch):
    monkeypatch.setenv("COSATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda' given by the environment "
                                         "variable COSATTN_BACKEND"):
        cosattn.forward(case.q, case.k, case.v)
    with pytest.raises(TypeError, match="backend must be None or one of"):
        cosattn.forward(case.q, case.k, case.v, backend=3)


def test_a_backend_that_cannot_run_is_a_runtime_error(case, monkeypatch):
    monkeypatch.setattr(_cupy, "unavailable", lambda: "no GPU in this test")
    with pytest.raises(RuntimeError, match=r"backend 'cupy' .*cannot run here: no GPU in this "):
        cosattn.forward(case.q, case.k, case.v, backend="cupy")


# --- junk arguments: only the three documented errors, and nothing modified -----------------

_DTYPES = st.sampled_from([np.float16, BFLOAT16, np.float32, np.float64, np.int32, np.bool_,
                           np.complex64, object])


@st.composite
def _junk_arrays(draw):
    dtype = draw(_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
    x = np.zeros(shape, dtype=dtype) if dtype is object else np.ones(shape, dtype=dtype)
    if x.ndim and draw(st.booleans()):
        x = x[..., ::-1]  # non-contiguous
    return x


_JUNK_VALUES = st.one_of(
    _junk_arrays(), st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=3),
    st.lists(st.floats(-1, 1), max_size=3), st.just(np.float32(1.0)),
)


def _arguments(draw, names):
    """Good q, k, v, do (zero-size ones included) with a quarter of ``names`` junk."""
    shape = draw(st.sampled_from([(1, 2, 3, 4), (1, 2, 0, 4), (0, 2, 3, 4), (1, 0, 3, 4),
                                  (1, 2, 3, 0)]))
    good = {n: np.ones(shape, np.float32) for n in ("q", "k", "v", "do")}
    return {n: draw(_JUNK_VALUES) if draw(st.integers(0, 3)) == 0 else good.get(n)
            for n in names}


@settings(max_examples=300)
@given(st.data())
def test_junk_arguments_raise_only_documented_errors(data):
    args = _arguments(data.draw, ("q", "k", "v", "do", "m", "mask", "dstate"))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "causal": _JUNK_VALUES | st.booleans(), "eps": _JUNK_VALUES, "layout": _JUNK_VALUES,
        "return_state": _JUNK_VALUES | st.booleans(), "backend": _JUNK_VALUES,
        "state": _JUNK_VALUES | st.just(cosattn.RecurrentState.zeros(1, 2, 4, 4)),
    }))
    arrays = [x for x in list(args.values()) + list(options.values())
              if isinstance(x, np.ndarray)]
    before = [(x.copy(), x.dtype) for x in arrays]
    backward_options = {k: v for k, v in options.items() if k != "return_state"}
    # out= junk, or an input itself, which the call must refuse to write into
    entry = _JUNK_VALUES | st.sampled_from(["q", "k", "v", "do"]).map(args.get)
    out = data.draw(entry)
    outs = data.draw(entry | st.tuples(entry, entry, entry))
    for run in (
        lambda: cosattn.forward(args["q"], args["k"], args["v"], args["m"], mask=args["mask"],
                                out=out, **options),
        lambda: cosattn.backward(args["do"], args["q"], args["k"], args["v"], args["m"],
                                 mask=args["mask"], dstate=args["dstate"], out=outs,
                                 **backward_options),
    ):
        try:
            run()
        except (ValueError, TypeError, RuntimeError):
            pass
    for x, (copy, dtype) in zip(arrays, before, strict=True):
        assert x.dtype == dtype
        np.testing.assert_array_equal(x, copy)


@settings(max_examples=300)
@given(st.data())
def test_junk_step_arguments_raise_only_documented_errors(data):
    state = _state(1, 2, 4, 4)
    good = {"q_t": np.ones((1, 2, 4), np.float32), "k_t": np.ones((1, 2, 4), np.float32),
            "v_t": np.ones((1, 2, 4), np.float32)}
    args = {n: data.draw(_JUNK_VALUES) if data.draw(st.booleans()) else good.get(n)
            for n in ("q_t", "k_t", "v_t", "m", "mask", "out")}
    eps = data.draw(_JUNK_VALUES | st.just(1e-12))
    before = _bits(state)
    try:
        state.step(args["q_t"], args["k_t"], args["v_t"], args["m"], mask=args["mask"],
                   out=args["out"], eps=eps)
    except (ValueError, TypeError, RuntimeError):
        assert _bits(state) == before


# --- many threads at once ----------------------------------------------------------------------

def test_many_threads_give_the_serial_results():
    """Forward, backward and steps from 8 threads at once on shared inputs, each call large
    enough to use the numpy backend's own thread pool: the serial results, no deadlock."""
    case = make_case(np.random.default_rng(4), 2, 4, 700, 64, 64, np.float32, mask="right",
                     state=True, dstate=True)
    state = cosattn.RecurrentState(case.kv0, case.count0)

    def work(i):
        o, out_state = cosattn.forward(case.q, case.k, case.v, case.m, mask=case.mask,
                                       state=state, return_state=True)
        grads = cosattn.backward(case.do, case.q, case.k, case.v, case.m, mask=case.mask,
                                 state=state, dstate=case.dkv)
        mine = state.copy()
        steps = [mine.step(case.q[:, :, t], case.k[:, :, t], case.v[:, :, t], case.m,
                           mask=case.mask[:, t]) for t in range(i, i + 5)]
        return o, out_state.kv, grads, steps, mine.kv

    serial = [work(i) for i in range(8)]
    barrier = threading.Barrier(8)

    def together(i):
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(together, range(8), timeout=600))
    for one, other in zip(serial, parallel, strict=True):
        for a, b in zip(_flatten(one), _flatten(other), strict=True):
            np.testing.assert_array_equal(a, b)
    ref_o = reference_forward(case)[0]
    assert_close(parallel[0][0], ref_o, np.float32, "o")


def _flatten(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _flatten(item)]
    return [x]


@settings(max_examples=200)
@given(st.data())
def test_junk_packed_and_pool_arguments_raise_only_documented_errors(data):
    """cu_seqlens, state_indices, has_initial_state and a prefill's or step's out of any
    kind (the pool's own memory among them): forward, backward and a pool's prefill and step
    raise only the documented errors, and a pool call that raises leaves the pool bit for bit
    as it was."""
    x = np.ones((1, 2, 3, 4), np.float32)
    good = {"cu_seqlens": np.array([0, 1, 3]), "state_indices": np.array([1, -1]),
            "has_initial_state": np.array([False, True])}
    args = {n: data.draw(_JUNK_VALUES) if data.draw(st.integers(0, 2)) == 0 else g
            for n, g in good.items()}
    kv = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)
    pool = cosattn.StatePool(kv, np.array([4, 0, 2]))
    out = data.draw(st.one_of(_JUNK_VALUES, st.just(np.empty_like(x)),
                              st.just(kv.reshape(-1)[: x.size].reshape(x.shape))))
    token = np.ones((2, 2, 4), np.float32)
    step_out = data.draw(st.one_of(_JUNK_VALUES, st.just(np.empty_like(token)),
                                   st.just(kv.reshape(-1)[: token.size].reshape(token.shape))))
    slots = {n: args[n] for n in ("state_indices", "has_initial_state")}
    calls = [
        (False, lambda: cosattn.forward(x, x, x, cu_seqlens=args["cu_seqlens"])),
        (False, lambda: cosattn.backward(x, x, x, x, cu_seqlens=args["cu_seqlens"])),
        (True, lambda: pool.prefill(x, x, x, cu_seqlens=args["cu_seqlens"], out=out, **slots)),
        (True, lambda: pool.step(token, token, token, out=step_out, **slots)),
    ]
    for on_pool, run in calls:
        before = pool.kv.tobytes(), pool.count.tobytes()
        try:
            run()
        except (ValueError, TypeError, RuntimeError):
            if on_pool:
                assert (pool.kv.tobytes(), pool.count.tobytes()) == before
