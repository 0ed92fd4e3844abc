"""The public API: bad input gets clear errors, inputs stay untouched, frameworks round-trip."""

import numpy as np
import pytest

import cosattn

from helpers import BFLOAT16, assert_close, make_case, reference_backward, reference_forward


@pytest.fixture
def case():
    return make_case(np.random.default_rng(0), 2, 3, 10, 4, 5, np.float32, mask="inner",
                     state=True, dstate=True)


def qkv(case):
    return case.q, case.k, case.v


# --- bad input: one test per error class -----------------------------------------------------

def test_wrong_rank_names_argument_and_shape(case):
    with pytest.raises(ValueError, match=r"q must have rank 4.*\(3, 10, 4\)"):
        cosattn.forward(case.q[0], case.k, case.v)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mismatched_sizes_name_every_shape(case, which):
    args = dict(q=case.q, k=case.k, v=case.v)
    args[which] = args[which][:, :, :7]
    with pytest.raises(ValueError, match=r"q\(2, 3, 10, 4\), k\(2, 3, (10|7), 4\)"):
        cosattn.forward(**args)


def test_mismatched_head_size_of_k(case):
    with pytest.raises(ValueError, match=r"k\(2, 3, 10, 3\)"):
        cosattn.forward(case.q, case.k[..., :3], case.v)


def test_do_must_match_o(case):
    with pytest.raises(ValueError, match=r"do must have the shape of o"):
        cosattn.backward(case.do[..., :2], *qkv(case))


@pytest.mark.parametrize(("mask", "error", "pattern"), [
    (np.ones((2, 9), bool), ValueError, r"mask must have shape \(B, S\) = \(2, 10\), got \(2, 9\)"),
    (np.ones((2, 10), np.int8), TypeError, r"mask must be bool.*int8"),
])
def test_bad_mask(case, mask, error, pattern):
    with pytest.raises(error, match=pattern):
        cosattn.forward(*qkv(case), mask=mask)


@pytest.mark.parametrize(("m", "error", "pattern"), [
    (np.zeros(4), ValueError, r"m must have shape \(H,\) = \(3,\), got \(4,\)"),
    (np.zeros(3, np.int32), TypeError, r"m must be a float array, got int32"),
])
def test_bad_m(case, m, error, pattern):
    with pytest.raises(error, match=pattern):
        cosattn.forward(*qkv(case), m)


def test_bad_state_shape(case):
    state = cosattn.RecurrentState.zeros(2, 3, 5, 4)  # Dk and Dv swapped
    with pytest.raises(ValueError, match=r"state.kv must have shape \(B, H, Dv, Dk\)"):
        cosattn.forward(*qkv(case), state=state)


def test_float64_inputs_need_a_float64_state(case):
    x = [a.astype(np.float64) for a in qkv(case)]
    with pytest.raises(TypeError, match="float64 inputs need a float64 state"):
        cosattn.forward(*x, state=cosattn.RecurrentState.zeros(2, 3, 4, 5))


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_unsupported_dtype(case, dtype):
    with pytest.raises(TypeError, match=rf"unsupported dtype: q {np.dtype(dtype)}"):
        cosattn.forward(case.q.astype(dtype), case.k, case.v)


def test_mixed_dtypes(case):
    with pytest.raises(TypeError, match=r"share one dtype.*q float32, k float64, v float32"):
        cosattn.forward(case.q, case.k.astype(np.float64), case.v)


def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"one framework.*q \(numpy\), k \(torch\)"):
        cosattn.forward(x, torch.zeros(1, 1, 2, 2), x)


def test_non_array_argument():
    with pytest.raises(TypeError, match=r"q must be an array.*got list"):
        cosattn.forward([[[[1.0]]]], np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))


def test_state_only_for_causal(case):
    with pytest.raises(ValueError, match="causal form only"):
        cosattn.forward(*qkv(case), causal=False, state=cosattn.RecurrentState.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="return_state=True needs the causal form"):
        cosattn.forward(*qkv(case), causal=False, return_state=True)
    with pytest.raises(ValueError, match="dstate needs the causal form"):
        cosattn.backward(case.do, *qkv(case), causal=False, dstate=case.dkv)


def test_bad_layout_and_eps(case):
    with pytest.raises(ValueError, match=r"layout must be one of \('bhsd', 'bshd'\), got 'bsdh'"):
        cosattn.forward(*qkv(case), layout="bsdh")
    with pytest.raises(ValueError, match=r"eps must be a positive finite number, got 0\.0"):
        cosattn.forward(*qkv(case), eps=0)


def test_bad_dstate(case):
    with pytest.raises(ValueError, match=r"dstate must have the shape of state.kv"):
        cosattn.backward(case.do, *qkv(case), dstate=case.dkv[:, :2])


def test_backend_choice_errors(case, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        cosattn.forward(*qkv(case), backend="bogus")
    monkeypatch.setenv("COSATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        cosattn.forward(*qkv(case))
    monkeypatch.setenv("COSATTN_BACKEND", "numpy")
    assert cosattn.forward(*qkv(case)).shape == (2, 3, 10, 5)


@pytest.mark.parametrize("name", ["cupy", "numba"])
def test_gpu_backend_on_cpu_arrays_is_refused(case, name):
    reason = cosattn.available_backends()[name]
    expected = RuntimeError if reason is not None else ValueError
    with pytest.raises(expected, match=name):
        cosattn.forward(*qkv(case), backend=name)


def test_available_backends_reports_every_backend():
    report = cosattn.available_backends()
    assert set(report) == {"numpy", "cupy", "numba"}
    assert report["numpy"] is None
    assert all(r is None or (isinstance(r, str) and r) for r in report.values())


def test_step_errors():
    state = cosattn.RecurrentState.zeros(2, 3, 4, 5)
    q = np.zeros((2, 3, 4), np.float32)
    v = np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ValueError, match=r"q_t must have rank 3"):
        state.step(q[None], q, v)
    with pytest.raises(ValueError, match=r"q_t\(2, 3, 4\), k_t\(2, 3, 3\)"):
        state.step(q, q[..., :3], v)
    with pytest.raises(ValueError, match=r"mask must have shape \(B,\) = \(2,\)"):
        state.step(q, q, v, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"out must have shape \(B, H, Dv\)"):
        state.step(q, q, v, out=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"state.kv must have shape"):
        state.step(q, q, v[..., :4])
    np.testing.assert_array_equal(state.count, 0)


def test_out_errors_name_the_buffer(case):
    good = np.empty_like(case.v)
    with pytest.raises(ValueError, match=r"out must have the shape of v, \(2, 3, 10, 5\), got "
                                         r"\(2, 3, 10, 4\)"):
        cosattn.forward(*qkv(case), out=np.empty_like(case.q))
    with pytest.raises(TypeError, match=r"out must have the dtype of v, float32, got float64"):
        cosattn.forward(*qkv(case), out=good.astype(np.float64))
    with pytest.raises(ValueError, match=r"out must be C-contiguous .*strides"):
        cosattn.forward(*qkv(case), out=np.empty((2, 3, 5, 10), np.float32).swapaxes(2, 3))
    bshd = [a.transpose(0, 2, 1, 3) for a in qkv(case)]
    with pytest.raises(ValueError, match=r"out must be C-contiguous"):
        cosattn.forward(*bshd, out=np.empty_like(case.v).transpose(0, 2, 1, 3), layout="bshd")
    good.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        cosattn.forward(*qkv(case), out=good)
    with pytest.raises(TypeError, match=r"out must be a tuple \(dq, dk, dv\).*ndarray"):
        cosattn.backward(case.do, *qkv(case), out=np.empty_like(case.q))
    with pytest.raises(TypeError, match=r"out must be a tuple \(dq, dk, dv\).*tuple"):
        cosattn.backward(case.do, *qkv(case), out=(np.empty_like(case.q),) * 2)
    with pytest.raises(ValueError, match=r"out\[1\] must have the shape of k"):
        cosattn.backward(case.do, *qkv(case), out=(None, np.empty_like(case.v), None))
    with pytest.raises(TypeError, match=r"out must be an array .*got list"):
        cosattn.forward(*qkv(case), out=[[0.0]])


def test_out_may_not_share_memory_with_any_argument(case):
    with pytest.raises(ValueError, match=r"out shares memory with v: an output may not overlap"):
        cosattn.forward(*qkv(case), out=case.v)
    memory = np.zeros(case.v.size + 1, np.float32)  # v, and out one element further on
    v, out = memory[:-1].reshape(case.v.shape), memory[1:].reshape(case.v.shape)
    with pytest.raises(ValueError, match=r"out shares memory with v"):
        cosattn.forward(case.q, case.k, v, out=out)
    dq = np.empty_like(case.q)
    dstate = dq.reshape(-1)[: case.dkv.size].reshape(case.dkv.shape)
    state = cosattn.RecurrentState(case.kv0, case.count0)
    for outs, dkv, pattern in (((dq, dq, None), case.dkv, r"out\[0\] shares memory with out\[1\]"),
                               ((None, None, case.do), case.dkv, r"out\[2\] shares memory with do"),
                               ((dq, None, None), dstate, r"out\[0\] shares memory with dstate")):
        with pytest.raises(ValueError, match=pattern):
            cosattn.backward(case.do, *qkv(case), case.m, mask=case.mask, state=state,
                             dstate=dkv, out=outs)


def test_out_receives_the_result_and_is_returned(case):
    """The same bits as a call that allocates, in the caller's buffers (NaN-filled first),
    which the call returns; a None entry of backward's out gets a new array."""
    state = cosattn.RecurrentState(case.kv0, case.count0)
    kw = dict(mask=case.mask, state=state)
    o, kv = cosattn.forward(*qkv(case), case.m, return_state=True, **kw)
    buffer = np.full_like(case.v, np.nan)
    given, kv_given = cosattn.forward(*qkv(case), case.m, return_state=True, out=buffer, **kw)
    assert given is buffer
    np.testing.assert_array_equal(buffer, o)
    np.testing.assert_array_equal(kv_given.kv, kv.kv)
    grads = cosattn.backward(case.do, *qkv(case), case.m, dstate=case.dkv, **kw)
    outs = (np.full_like(case.q, np.nan), None, np.full_like(case.v, np.nan))
    given = cosattn.backward(case.do, *qkv(case), case.m, dstate=case.dkv, out=outs, **kw)
    assert given[0] is outs[0] and given[2] is outs[2]
    for a, b in zip(given, grads, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failing_call_leaves_out_alone(case):
    buffer = np.full_like(case.v, 7.0)
    with pytest.raises(ValueError, match=r"m must have shape"):
        cosattn.forward(*qkv(case), np.zeros(4), out=buffer)
    outs = tuple(np.full_like(a, 7.0) for a in qkv(case))
    with pytest.raises(ValueError, match=r"shares memory"):
        cosattn.backward(case.do, *qkv(case), out=(*outs[:2], case.v))
    for a in (buffer, *outs):
        assert (a == 7.0).all()


def test_a_step_out_may_not_share_memory_with_the_state():
    """A step's out= that overlaps the state (or a pool) is refused before the state moves."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 3, 4), dtype=np.float32) for _ in range(3))
    state = cosattn.RecurrentState.zeros(2, 3, 4, 4)
    state.kv[...] = 1.0
    inside = state.kv.reshape(-1)[: v.size].reshape(v.shape)
    with pytest.raises(ValueError, match=r"out shares memory with state.kv"):
        state.step(q, k, v, out=inside)
    with pytest.raises(ValueError, match=r"out shares memory with k_t"):
        state.step(q, k, v, out=k)
    assert (state.kv == 1.0).all() and (state.count == 0).all()
    pool = cosattn.StatePool.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"out shares memory with pool.kv"):
        pool.step(q, k, v, state_indices=np.array([2, 0]),
                  out=pool.kv.reshape(-1)[: v.size].reshape(v.shape))
    assert (pool.kv == 0).all()


def test_a_pool_prefill_writes_out_and_checks_it():
    """StatePool.prefill(out=): the same bits as a call that allocates, in the caller's buffer,
    which it returns; an out that overlaps the pool is refused before anything is written."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 3, 9, 4), dtype=np.float32) for _ in range(3))
    slots = dict(cu_seqlens=np.array([0, 4, 9]), state_indices=np.array([3, 0]))
    pool = cosattn.StatePool.zeros(4, 3, 4, 4)
    o = pool.prefill(q, k, v, **slots)
    given_pool = cosattn.StatePool.zeros(4, 3, 4, 4)
    buffer = np.full_like(v, np.nan)
    assert given_pool.prefill(q, k, v, out=buffer, **slots) is buffer
    np.testing.assert_array_equal(buffer, o)
    np.testing.assert_array_equal(given_pool.kv, pool.kv)
    inside = given_pool.kv.reshape(-1)[: v.size].reshape(v.shape)
    kv_before = given_pool.kv.copy()
    with pytest.raises(ValueError, match=r"out shares memory with pool.kv"):
        given_pool.prefill(q, k, v, out=inside, **slots)
    np.testing.assert_array_equal(given_pool.kv, kv_before)
    with pytest.raises(ValueError, match=r"out must have the shape of v, \(1, 3, 9, 4\)"):
        given_pool.prefill(q, k, v, out=np.empty_like(q[..., :3]), **slots)


# --- ownership: nothing is modified in place but the stepped state ---------------------------

def test_inputs_are_never_modified(case):
    before = {n: getattr(case, n).copy() for n in ("q", "k", "v", "do", "m", "mask", "kv0",
                                                   "count0", "dkv")}
    state = cosattn.RecurrentState(case.kv0, case.count0)
    cosattn.forward(*qkv(case), case.m, mask=case.mask, state=state, return_state=True)
    cosattn.backward(case.do, *qkv(case), case.m, mask=case.mask, state=state, dstate=case.dkv)
    cosattn.forward(*qkv(case), case.m, causal=False, mask=case.mask)
    for n, a in before.items():
        np.testing.assert_array_equal(getattr(case, n), a, err_msg=n)
    assert state.kv is case.kv0 and state.count is case.count0


def test_step_updates_only_the_state(case):
    state = cosattn.RecurrentState(case.kv0.copy(), case.count0.copy())
    twin = state.copy()
    q, k, v = (a[:, :, 0].copy() for a in qkv(case))
    saved = [a.copy() for a in (q, k, v)]
    state.step(q, k, v, case.m)
    for a, b in zip((q, k, v), saved, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state.count, case.count0 + 1)
    np.testing.assert_array_equal(twin.count, case.count0)
    np.testing.assert_array_equal(twin.kv, case.kv0)
    assert not np.array_equal(state.kv, case.kv0)


def test_zeros_dtype_and_like():
    assert cosattn.RecurrentState.zeros(1, 2, 3, 4).kv.dtype == np.float32
    assert cosattn.RecurrentState.zeros(1, 2, 3, 4, like=np.zeros(1)).kv.dtype == np.float64
    state = cosattn.RecurrentState.zeros(1, 2, 3, 4, dtype="float64")
    assert state.kv.shape == (1, 2, 4, 3) and state.count.dtype == np.int64
    assert state.shape == (1, 2, 3, 4)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        cosattn.RecurrentState.zeros(1, 1, 1, 1, dtype=np.float16)


# --- frameworks through DLPack ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16], ids=str)
def test_torch_cpu_round_trip(dtype):
    torch = pytest.importorskip("torch")
    case = make_case(np.random.default_rng(3), 2, 2, 9, 4, 3, dtype, mask="right", state=True)
    assert case.mask.sum(axis=1).min() > 0  # real tokens in every row

    def to_torch(a):
        if a.dtype == BFLOAT16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()

    q, k, v, do, m = map(to_torch, (case.q, case.k, case.v, case.do, case.m))
    mask = torch.from_numpy(case.mask)
    state = cosattn.RecurrentState(torch.from_numpy(case.kv0), torch.from_numpy(case.count0))
    o, out_state = cosattn.forward(q, k, v, m, mask=mask, state=state, return_state=True)
    assert isinstance(o, torch.Tensor) and o.dtype == q.dtype
    assert isinstance(out_state.kv, torch.Tensor) and out_state.count.dtype == torch.int64
    ref = reference_forward(case)
    assert_close(to_numpy(o), ref[0], dtype, "o")
    grads = cosattn.backward(do, q, k, v, m, mask=mask, state=state)
    ref_grads = reference_backward(case)
    for g, r in zip(grads, ref_grads, strict=True):
        assert isinstance(g, torch.Tensor)
        assert_close(to_numpy(g), r, dtype)
    buffers = [torch.full_like(x, float("nan")) for x in (v, q, k, v)]
    given, _ = cosattn.forward(q, k, v, m, mask=mask, state=state, return_state=True,
                               out=buffers[0])
    assert given is buffers[0] and torch.equal(given, o)
    given = cosattn.backward(do, q, k, v, m, mask=mask, state=state, out=buffers[1:])
    for g, b, fresh in zip(given, buffers[1:], grads, strict=False):
        assert g is b and torch.equal(g, fresh)
    step_state = cosattn.RecurrentState.zeros(2, 2, 4, 3, like=q)
    assert isinstance(step_state.kv, torch.Tensor)
    kv_tensor = step_state.kv
    step_state.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], m)
    assert step_state.kv is kv_tensor and int(step_state.count[0]) == 1
    assert kv_tensor.abs().sum() > 0
    pool, again = (cosattn.StatePool.zeros(3, 2, 4, 3, like=q) for _ in range(2))
    packed = [x[:1] for x in (q, k, v)]  # two sequences: tokens 0-3 and 4-8 of row 0
    slots = dict(cu_seqlens=torch.tensor([0, 4, 9]), state_indices=torch.tensor([2, 0]))
    fresh = pool.prefill(*packed, m, **slots)
    buffer = torch.full_like(packed[2], float("nan"))
    assert again.prefill(*packed, m, out=buffer, **slots) is buffer
    assert torch.equal(buffer, fresh) and torch.equal(again.kv, pool.kv)


def test_torch_requires_grad_is_refused_with_advice():
    torch = pytest.importorskip("torch")
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"q requires grad.*q.detach\(\)"):
        cosattn.forward(x, x.detach(), x.detach())


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16], ids=str)
def test_jax_cpu_round_trip(dtype):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    case = make_case(np.random.default_rng(2), 1, 2, 7, 4, 4, dtype, mask="left")
    q, k, v, m = (jnp.asarray(a) for a in (case.q, case.k, case.v, case.m))
    o, state = cosattn.forward(q, k, v, m, mask=jnp.asarray(case.mask), return_state=True)
    assert isinstance(o, jax.Array) and o.dtype == q.dtype
    assert_close(np.asarray(o), reference_forward(case)[0], dtype, "o")
    before = np.asarray(state.kv).copy()
    state.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], m)
    assert isinstance(state.kv, jax.Array)
    assert not np.array_equal(np.asarray(state.kv), before)
    assert int(state.count[0]) == int(case.mask[0].sum()) + 1


def test_any_dlpack_producer_is_accepted():
    class Producer:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kwargs):
            return self.a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    case = make_case(np.random.default_rng(3), 1, 1, 5, 2, 2, np.float32)
    o = cosattn.forward(*(Producer(a) for a in qkv(case)), Producer(case.m))
    assert isinstance(o, np.ndarray)
    assert_close(o, reference_forward(case)[0], np.float32, "o")


def test_absorb_and_total_bad_input(case):
    """The primitives of context parallel refuse what does not fit, naming the argument."""
    total = cosattn.RecurrentState(np.zeros((2, 3, 5, 4), np.float32), np.full(2, 10))
    with pytest.raises(ValueError, match="total= belongs to the bidirectional form"):
        cosattn.forward(*qkv(case), total=total)
    with pytest.raises(ValueError, match="total_count= belongs to the bidirectional form"):
        cosattn.absorb(case.k, case.v, total_count=np.full(2, 10))
    with pytest.raises(ValueError, match=r"k and v must agree on \(B, H, S\)"):
        cosattn.absorb(case.k, case.v[:, :, :3])
    with pytest.raises(ValueError, match=r"total\.kv must have shape \(B, H, Dv, Dk\)"):
        bad = cosattn.RecurrentState(np.zeros((2, 3, 4, 4), np.float32), np.full(2, 10))
        cosattn.forward(*qkv(case), causal=False, total=bad)
    with pytest.raises(ValueError, match=r"total_count must be non-negative"):
        cosattn.absorb(case.k, case.v, causal=False, total_count=np.array([3, -1]))
    with pytest.raises(ValueError, match=r"total_count must have shape \(B,\)"):
        cosattn.absorb(case.k, case.v, causal=False, total_count=np.array([3]))
    with pytest.raises(TypeError, match=r"total must be a cosattn\.RecurrentState"):
        cosattn.forward(*qkv(case), causal=False, total=(total.kv, total.count))
    with pytest.raises(ValueError, match=r"dstate must have the shape of total\.kv"):
        cosattn.backward(case.do, *qkv(case), causal=False, total=total,
                         dstate=np.zeros((2, 3, 4, 4), np.float32))


def test_total_without_dstate_gives_k_and_v_no_gradient(case):
    total = cosattn.absorb(case.k, case.v, case.m, causal=False, mask=case.mask)
    dq, dk, dv, dm = cosattn.backward(case.do, *qkv(case), case.m, causal=False, mask=case.mask,
                                      total=total)
    assert not dk.any() and not dv.any() and not dm.any()
    expected = cosattn.backward(case.do, *qkv(case), case.m, causal=False, mask=case.mask)
    np.testing.assert_allclose(dq, expected[0], rtol=1e-5, atol=1e-6)
