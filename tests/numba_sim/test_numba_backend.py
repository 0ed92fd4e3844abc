"""The numba backend against the reference, in the Numba CUDA simulator or on a GPU.

Without a GPU the main test run skips this module (marker ``gpu``) and tests/test_numba.py runs
it in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``, where the same kernels run on Python threads
with the backend's small simulator sizes: hence the small shapes and few Hypothesis examples.
On a GPU the main run executes it for real. Inputs are Numba device arrays (``to_device``);
on a GPU the CuPy and torch paths are checked as well.
"""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cosattn
from cosattn import reference

from helpers import (
    BFLOAT16,
    DTYPES,
    JUNK,
    MASK_KINDS,
    TOL,
    assert_close,
    assert_padding_zero,
    case_id,
    check_absorb,
    check_backward,
    check_forward,
    check_total,
    make_case,
    reference_forward,
    rel_err,
)

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = [] if SIMULATED else [pytest.mark.gpu]

cuda = pytest.importorskip("numba.cuda")
_numba = pytest.importorskip("cosattn.backends._numba")


def to_device(x):
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    return x.copy_to_host()


def check(case, *, causal, layout="bhsd", out=False):
    kw = dict(causal=causal, layout=layout, backend="numba", to_native=to_device,
              to_host=to_host, out=out)
    check_forward(case, **kw)
    check_backward(case, **kw)


# (B, H, S, Dk, Dv, dtype, mask, m, state, dstate, causal, layout, junk): every dtype, causal
# and bidirectional, S = 1, S a multiple of the chunk (16 in the simulator) or not, D = 1,
# Dk != Dv, every mask kind, m on and off, states in and out, dstate, both layouts; the padding
# of q, k, v and do holds junk (docs/spec.md, "Bad input": padding holds anything).
CASES = [
    (2, 2, 37, 8, 5, np.float64, "inner", True, True, True, True, "bhsd", np.nan),
    (1, 2, 70, 16, 16, np.float32, "left", True, True, False, True, "bshd", np.inf),
    (2, 1, 33, 6, 9, np.float16, "right", True, False, False, True, "bhsd", -np.inf),
    (2, 2, 20, 4, 4, BFLOAT16, "none", False, True, True, True, "bshd", None),
    (2, 2, 32, 3, 11, np.float64, "none", True, False, True, True, "bhsd", None),
    (1, 1, 1, 1, 1, np.float32, "none", True, True, True, True, "bhsd", None),
    (2, 1, 40, 7, 5, np.float32, "inner", True, False, False, False, "bhsd", -np.inf),
    (1, 2, 25, 5, 8, BFLOAT16, "left", False, False, False, False, "bshd", np.nan),
    (2, 1, 17, 1, 3, np.float64, "right", True, False, False, False, "bshd", 1e30),
    (1, 1, 1, 4, 2, np.float16, "none", True, False, False, False, "bhsd", None),
]


def full_case_id(c) -> str:
    direction = "causal" if c[10] else "bidir"
    junk = "" if c[12] is None else f"-pad={c[12]:g}"
    return f"{case_id(*c[:5])}-{np.dtype(c[5])}-{c[6]}-{direction}-{c[11]}{junk}"


@pytest.mark.parametrize(
    "B, H, S, Dk, Dv, dtype, mask, m, state, dstate, causal, layout, junk", CASES,
    ids=[full_case_id(c) for c in CASES])
def test_matches_reference(B, H, S, Dk, Dv, dtype, mask, m, state, dstate, causal, layout,
                           junk):
    rng = np.random.default_rng(S * 31 + Dk)
    case = make_case(rng, B, H, S, Dk, Dv, dtype, mask=mask, m=m, state=state, dstate=dstate,
                     junk=junk)
    check(case, causal=causal, layout=layout)


# (B, H, S, Dk, Dv, dtype, mask, m, state, causal, cut): the state alone (causal from a state or
# not, bidirectional with a whole sequence's count) and the parts of a cut bidirectional sequence.
PRIMITIVES = [
    (2, 2, 37, 8, 5, np.float64, "inner", True, True, True, 0),
    (1, 2, 20, 4, 4, BFLOAT16, "none", False, False, True, 0),
    (2, 1, 33, 6, 9, np.float32, "right", True, False, False, 17),
    (1, 2, 25, 5, 8, np.float16, "left", False, False, False, 9),
    (2, 1, 16, 3, 3, np.float64, "inner", True, False, False, 16),
]


@pytest.mark.parametrize(
    "B, H, S, Dk, Dv, dtype, mask, m, state, causal, cut", PRIMITIVES,
    ids=[f"{case_id(*c[:5])}-{np.dtype(c[5])}-{c[6]}-{'causal' if c[9] else 'bidir'}"
         for c in PRIMITIVES])
def test_absorb_and_total_match_reference(B, H, S, Dk, Dv, dtype, mask, m, state, causal, cut):
    rng = np.random.default_rng(S * 7 + Dv)
    case = make_case(rng, B, H, S, Dk, Dv, dtype, mask=mask, m=m, state=state)
    kw = dict(backend="numba", to_native=to_device, to_host=to_host)
    check_absorb(case, causal=causal, rng=rng, **kw)
    if not causal:
        check_total(case, cut, **kw)


@st.composite
def cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    S = draw(st.sampled_from([1, 2, 15, 16, 17, 45]))
    Dk, Dv = draw(st.sampled_from([1, 3, 8, 16])), draw(st.sampled_from([1, 5, 16]))
    causal = draw(st.booleans())
    case = make_case(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), B, H, S, Dk, Dv,
                     draw(st.sampled_from(DTYPES)), mask=draw(st.sampled_from(MASK_KINDS)),
                     m=draw(st.booleans()), state=causal and draw(st.booleans()),
                     dstate=causal and draw(st.booleans()), junk=draw(st.sampled_from(JUNK)))
    return case, causal, draw(st.sampled_from(["bhsd", "bshd"]))


@settings(max_examples=12 if SIMULATED else 60)
@given(cases(), st.booleans())
def test_matches_reference_drawn(drawn, out):
    case, causal, layout = drawn
    check(case, causal=causal, layout=layout, out=out)


@pytest.mark.parametrize("config", ["GPU", "SIMULATOR"])
def test_launch_sizes(monkeypatch, config):
    """Both launch configurations compute the same thing (the simulator runs the small one)."""
    monkeypatch.setattr(_numba, "CONFIG", getattr(_numba, config))
    case = make_case(np.random.default_rng(3), 1, 1, 40, 6, 3, np.float32, mask="inner",
                     state=True, dstate=True, junk=np.nan)
    check(case, causal=True)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16, np.float64], ids=dtype_name)
def test_step_loop_matches_parallel_form(dtype):
    B, H, S, Dk, Dv = 2, 2, 9, 5, 7
    case = make_case(np.random.default_rng(5), B, H, S, Dk, Dv, dtype, mask="inner",
                     junk=np.nan)
    q, k, v, m, mask = (to_device(a) for a in (case.q, case.k, case.v, case.m, case.mask))
    state = cosattn.RecurrentState.zeros(B, H, Dk, Dv, like=q)
    steps = [to_host(state.step(q[:, :, t], k[:, :, t], v[:, :, t], m, mask=mask[:, t],
                                backend="numba")) for t in range(S)]
    o_steps = np.stack(steps, axis=2)
    f = case.f64
    ref_o, ref_kv, ref_count = reference.forward_rnn(f["q"], f["k"], f["v"], f["m"],
                                                    mask=case.mask)
    assert_close(o_steps, ref_o, dtype, "step outputs")
    assert_close(to_host(state.kv), ref_kv, dtype, "state.kv")
    np.testing.assert_array_equal(to_host(state.count), ref_count)
    o, parallel = cosattn.forward(q, k, v, m, mask=mask, return_state=True, backend="numba")
    assert rel_err(o_steps, to_host(o)) <= 2 * TOL[np.dtype(dtype)]
    assert rel_err(to_host(state.kv), to_host(parallel.kv)) <= 2 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16, np.float64], ids=dtype_name)
def test_padded_step_keeps_the_state_bit_for_bit(dtype):
    """A padded row's step leaves its kv (-0.0 entries included) and count bit for bit and
    outputs +0, whatever its q_t, k_t, v_t hold; the real rows step as the reference does."""
    junk = [j for j in JUNK if j is not None]
    mask = np.array([True, *[False] * len(junk), True])
    B, H, Dk, Dv = len(mask), 2, 5, 3
    case = make_case(np.random.default_rng(37), B, H, 1, Dk, Dv, dtype, state=True)
    q, k, v = (a[:, :, 0] for a in (case.q, case.k, case.v))
    for row, value in zip(np.flatnonzero(~mask), junk, strict=True):
        for x in (q, k, v):
            x[row] = value
    kv0 = case.kv0.copy()
    kv0[..., ::2] = -0.0
    state = cosattn.RecurrentState(to_device(kv0), to_device(case.count0))
    o = to_host(state.step(*(to_device(a) for a in (q, k, v, case.m)), mask=to_device(mask),
                           backend="numba"))
    kv, count = to_host(state.kv), to_host(state.count)
    assert kv[~mask].tobytes() == kv0[~mask].tobytes()
    assert count[~mask].tobytes() == case.count0[~mask].tobytes()
    assert_padding_zero(o[:, :, None], mask[:, None], "o")
    f = case.f64
    ref_o, ref_kv, ref_count = reference.forward_rnn(
        *(f[n][mask] for n in ("q", "k", "v")), f["m"], kv0=kv0[mask].astype(np.float64),
        count0=case.count0[mask])
    assert_close(o[mask], ref_o[:, :, 0], dtype, "o")
    assert_close(kv[mask], ref_kv, dtype, "state.kv")
    np.testing.assert_array_equal(count[mask], ref_count)


def test_split_sequence_continues_from_the_state():
    case = make_case(np.random.default_rng(7), 2, 2, 30, 6, 4, np.float32, mask="right")
    q, k, v, m, mask = (to_device(a) for a in (case.q, case.k, case.v, case.m, case.mask))
    whole = to_host(cosattn.forward(q, k, v, m, mask=mask, backend="numba"))
    cut = 19
    head, state = cosattn.forward(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], m,
                                  mask=mask[:, :cut], return_state=True, backend="numba")
    tail = cosattn.forward(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], m, mask=mask[:, cut:],
                           state=state, backend="numba")
    assert_close(np.concatenate([to_host(head), to_host(tail)], axis=2), whole, np.float32,
                 "split forward")
    last = state.step(q[:, :, cut], k[:, :, cut], v[:, :, cut], m, mask=mask[:, cut],
                      backend="numba")
    assert_close(to_host(last), whole[:, :, cut], np.float32, "step after the split")


def test_empty_sequence_keeps_the_state():
    case = make_case(np.random.default_rng(11), 2, 2, 0, 3, 5, np.float32, state=True,
                     dstate=True)
    args = [to_device(a) for a in (case.do, case.q, case.k, case.v)]
    state = cosattn.RecurrentState(to_device(case.kv0), to_device(case.count0))
    o, out = cosattn.forward(*args[1:], to_device(case.m), state=state, return_state=True,
                             backend="numba")
    assert o.shape == (2, 2, 0, 5)
    np.testing.assert_array_equal(to_host(out.kv), case.kv0)
    np.testing.assert_array_equal(to_host(out.count), case.count0)
    *grads, dm, dkv0 = cosattn.backward(*args, to_device(case.m), state=state,
                                        dstate=to_device(case.dkv), backend="numba")
    assert [g.shape for g in grads] == [(2, 2, 0, 3), (2, 2, 0, 3), (2, 2, 0, 5)]
    np.testing.assert_array_equal(to_host(dm), np.zeros(2, np.float32))
    np.testing.assert_array_equal(to_host(dkv0), case.dkv)


def test_inputs_unchanged_and_results_deterministic():
    case = make_case(np.random.default_rng(13), 2, 2, 21, 4, 6, np.float32, mask="inner",
                     state=True, dstate=True)
    names = ("do", "q", "k", "v", "m", "mask", "kv0", "count0", "dkv")
    device = {n: to_device(getattr(case, n)) for n in names}
    state = cosattn.RecurrentState(device["kv0"], device["count0"])
    a = device

    def grads():
        return cosattn.backward(a["do"], a["q"], a["k"], a["v"], a["m"], mask=a["mask"],
                                state=state, dstate=a["dkv"], backend="numba")

    first, second = grads(), grads()
    for g1, g2 in zip(first, second, strict=True):
        np.testing.assert_array_equal(to_host(g1), to_host(g2))
    cosattn.forward(a["q"], a["k"], a["v"], a["m"], mask=a["mask"], state=state,
                    return_state=True, backend="numba")
    for n in names:
        np.testing.assert_array_equal(to_host(device[n]), getattr(case, n), err_msg=n)


def test_chosen_for_numba_arrays(monkeypatch):
    case = make_case(np.random.default_rng(17), 1, 1, 5, 3, 3, np.float32, m=False)
    q, k, v = (to_device(a) for a in (case.q, case.k, case.v))
    ref = reference_forward(case)[0]
    assert cosattn.available_backends()["numba"] is None
    monkeypatch.setenv("COSATTN_BACKEND", "numba")
    o = cosattn.forward(q, k, v)
    assert type(o) is type(q)
    assert_close(to_host(o), ref, np.float32, "COSATTN_BACKEND=numba")
    monkeypatch.delenv("COSATTN_BACKEND")
    if cosattn.available_backends()["cupy"] is not None:
        assert_close(to_host(cosattn.forward(q, k, v)), ref, np.float32, "default backend")


def test_state_belongs_to_the_device():
    q = to_device(np.ones((2, 3, 4, 5), np.float32))
    state = cosattn.RecurrentState.zeros(2, 3, 5, 6, like=q)
    assert type(state.kv) is type(q) and state.kv.shape == (2, 3, 6, 5)
    twin = state.copy()
    state.step(q[:, :, 0], q[:, :, 0], to_device(np.ones((2, 3, 6), np.float32)),
               backend="numba")
    np.testing.assert_array_equal(to_host(twin.kv), 0)
    np.testing.assert_array_equal(to_host(state.count), [1, 1])
    np.testing.assert_array_equal(to_host(twin.count), [0, 0])


def run_steps(S, tol):
    """S float32 steps from a zero state, against the float64 RNN reference."""
    B, H, Dk, Dv = 1, 2, 8, 8
    case = make_case(np.random.default_rng(29), B, H, S, Dk, Dv, np.float32, mask="inner")
    q, k, v, m, mask = (to_device(a) for a in (case.q, case.k, case.v, case.m, case.mask))
    o = cuda.device_array((B, H, S, Dv), np.float32)
    state = cosattn.RecurrentState.zeros(B, H, Dk, Dv, like=q)
    for t in range(S):
        state.step(q[:, :, t], k[:, :, t], v[:, :, t], m, mask=mask[:, t], out=o[:, :, t],
                   backend="numba")
    f = case.f64
    ref_o, ref_kv, _ = reference.forward_rnn(f["q"], f["k"], f["v"], f["m"], mask=case.mask)
    assert rel_err(to_host(o), ref_o) <= tol
    assert rel_err(to_host(state.kv), ref_kv) <= tol


def test_step_writes_into_out():
    run_steps(12, TOL[np.dtype(np.float32)])


@pytest.mark.slow
@pytest.mark.skipif(SIMULATED, reason="10^5 steps are for a GPU")
def test_float32_step_stays_accurate_over_1e5_tokens():
    run_steps(100_000, 3e-5)  # docs/spec.md, "Numbers"


@pytest.mark.skipif(SIMULATED, reason="CuPy and torch CUDA arrays need a GPU")
@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16], ids=dtype_name)
def test_gpu_frameworks_round_trip(framework, dtype):
    """CuPy and torch CUDA arrays reach the kernels without a copy and come back as they were."""
    case = make_case(np.random.default_rng(19), 2, 2, 50, 8, 8, dtype, mask="left",
                     state=True, dstate=True)
    if framework == "cupy":
        cupy = pytest.importorskip("cupy")

        def native(x):
            bits = cupy.asarray(x.view(np.int16)) if x.dtype == BFLOAT16 else cupy.asarray(x)
            return bits.view(BFLOAT16) if x.dtype == BFLOAT16 else bits

        def host(x):
            return cupy.asnumpy(x.view(np.int16)).view(BFLOAT16) if x.dtype == BFLOAT16 \
                else cupy.asnumpy(x)
    else:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA")

        def native(x):
            if x.dtype == BFLOAT16:
                return torch.from_numpy(x.view(np.int16)).cuda().view(torch.bfloat16)
            return torch.from_numpy(np.ascontiguousarray(x)).cuda()

        def host(x):
            if x.dtype == torch.bfloat16:
                return x.view(torch.int16).cpu().numpy().view(BFLOAT16)
            return x.cpu().numpy()

    kw = dict(causal=True, layout="bshd", backend="numba", to_native=native, to_host=host)
    check_forward(case, **kw)
    check_backward(case, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_name)
def test_zero_rows_are_divided_by_eps(dtype):
    case = make_case(np.random.default_rng(23), 1, 2, 18, 4, 3, dtype, mask="inner",
                     state=True, dstate=True)
    case.q[0, 0, 3] = 0
    case.k[0, 1, 5] = 0
    case.k[0, 0, 7] = 1e-13  # below eps = 1e-12 as well
    case.f64.update(q=case.q.astype(np.float64), k=case.k.astype(np.float64))
    check(case, causal=True)


def test_bad_input_is_refused_before_any_launch():
    q = to_device(np.ones((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="rank 4"):
        cosattn.forward(q[0], q[0], q[0], backend="numba")
    with pytest.raises(ValueError, match="one device"):
        cosattn.forward(q, np.ones((1, 2, 3, 4), np.float32), q, backend="numba")
    with pytest.raises(TypeError, match="share one dtype"):
        cosattn.forward(q, q, to_device(np.ones((1, 2, 3, 4), np.float64)), backend="numba")
    with pytest.raises(ValueError, match=r"m must have shape \(H,\)"):
        cosattn.forward(q, q, q, to_device(np.zeros(3, np.float32)), backend="numba")
