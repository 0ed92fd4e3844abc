"""The oracle against itself: quadratic form vs the RNN loop, gradients vs finite differences."""

import numpy as np
import pytest

from cosattn import reference

from helpers import make_mask

SHAPES = [(1, 1, 1, 1, 1), (2, 3, 7, 4, 5), (2, 2, 9, 3, 3)]


def _inputs(rng, B, H, S, Dk, Dv, mask_kind):
    return dict(
        q=rng.standard_normal((B, H, S, Dk)), k=rng.standard_normal((B, H, S, Dk)),
        v=rng.standard_normal((B, H, S, Dv)), m=rng.standard_normal(H),
        mask=make_mask(rng, B, S, mask_kind), kv0=rng.standard_normal((B, H, Dv, Dk)),
        count0=rng.integers(0, 9, size=B),
    )


@pytest.mark.parametrize("mask_kind", ["none", "left", "right", "inner"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-S{}-Dk{}-Dv{}".format(*s))
def test_quadratic_equals_rnn(shape, mask_kind):
    x = _inputs(np.random.default_rng(1), *shape, mask_kind)
    o, kv, count = reference.forward(x["q"], x["k"], x["v"], x["m"], mask=x["mask"],
                                     kv0=x["kv0"], count0=x["count0"])
    o2, kv2, count2 = reference.forward_rnn(x["q"], x["k"], x["v"], x["m"], mask=x["mask"],
                                            kv0=x["kv0"], count0=x["count0"])
    np.testing.assert_allclose(o, o2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kv, kv2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(count, count2)


def test_split_is_exact():
    x = _inputs(np.random.default_rng(2), 2, 2, 11, 3, 4, "inner")
    full = reference.forward(x["q"], x["k"], x["v"], x["m"], mask=x["mask"])
    cut = 4
    head = reference.forward(*(x[n][:, :, :cut] for n in "qkv"), x["m"], mask=x["mask"][:, :cut])
    tail = reference.forward(*(x[n][:, :, cut:] for n in "qkv"), x["m"], mask=x["mask"][:, cut:],
                             kv0=head[1], count0=head[2])
    np.testing.assert_allclose(np.concatenate([head[0], tail[0]], axis=2), full[0], atol=1e-12)
    np.testing.assert_allclose(tail[1], full[1], atol=1e-12)


def test_bidirectional_uses_row_length_for_every_position():
    x = _inputs(np.random.default_rng(3), 2, 1, 6, 2, 2, "right")
    o, _, _ = reference.forward(x["q"], x["k"], x["v"], x["m"], causal=False, mask=x["mask"])
    qh, _ = reference.normalize(x["q"])
    kh, _ = reference.normalize(x["k"])
    length = x["mask"].sum(axis=1)
    sig = 1 / (1 + np.exp(-x["m"]))
    w = np.maximum(1, length)[:, None, None, None] ** -sig[None, :, None, None]
    real = x["mask"][:, None, :, None]
    expected = real * ((qh @ np.swapaxes(kh, -1, -2)) @ (real * w * x["v"]))
    np.testing.assert_allclose(o, expected, atol=1e-12)


def test_zero_vectors_are_divided_by_eps():
    q = np.zeros((1, 1, 2, 3))
    qh, _ = reference.normalize(q + np.array([0, 0, 1e-13]))
    np.testing.assert_allclose(qh[0, 0, 0], [0, 0, 0.1])


def _loss(x, do, dkv, causal):
    o, kv, _ = reference.forward(x["q"], x["k"], x["v"], x["m"], causal=causal, mask=x["mask"],
                                 kv0=x["kv0"] if causal else None, count0=x["count0"])
    total = np.sum(o * do)
    if causal and dkv is not None:
        total += np.sum(kv * dkv)
    return total


@pytest.mark.parametrize(("causal", "with_dstate"), [(True, False), (True, True), (False, False)],
                         ids=["causal", "causal-dstate", "bidirectional"])
@pytest.mark.parametrize("mask_kind", ["none", "inner"])
def test_gradients_match_finite_differences(causal, with_dstate, mask_kind):
    rng = np.random.default_rng(4)
    B, H, S, Dk, Dv = 2, 2, 5, 3, 2
    x = _inputs(rng, B, H, S, Dk, Dv, mask_kind)
    x["count0"] = np.array([0, 3]) if causal else None
    do = rng.standard_normal((B, H, S, Dv))
    dkv = rng.standard_normal((B, H, Dv, Dk)) if with_dstate else None
    dq, dk, dv, dm, dkv0 = reference.backward(
        do, x["q"], x["k"], x["v"], x["m"], causal=causal, mask=x["mask"],
        kv0=x["kv0"] if causal else None, count0=x["count0"], dkv=dkv)
    analytic = {"q": dq, "k": dk, "v": dv, "m": dm}
    if causal:
        analytic["kv0"] = dkv0
    h = 1e-6
    for name, grad in analytic.items():
        numeric = np.zeros_like(x[name])
        for idx in np.ndindex(x[name].shape):
            saved = x[name][idx]
            x[name][idx] = saved + h
            up = _loss(x, do, dkv, causal)
            x[name][idx] = saved - h
            down = _loss(x, do, dkv, causal)
            x[name][idx] = saved
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")
