"""The oracle against itself: quadratic form vs the RNN loop, gradients vs finite differences."""

import numpy as np
import pytest

from cosattn import reference

from helpers import JUNK, MASK_KINDS, assert_padding_zero, assert_same_bits, make_mask

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


# docs/spec.md, "Bad input": padding holds anything. The junk values (helpers.JUNK but None, which
# means zeros), and the mask kinds that have padding to hold them.
JUNK_VALUES = [j for j in JUNK if j is not None]
PADDED_KINDS = [kind for kind in MASK_KINDS if kind != "none"]


def _fill_padding(x, mask, value):
    """``x`` (B, H, S, D) with ``value`` at every padded position."""
    return np.where(mask[:, None, :, None], x, value)


@pytest.mark.parametrize("junk", JUNK_VALUES, ids=str)
@pytest.mark.parametrize("mask_kind", PADDED_KINDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_holds_anything(causal, mask_kind, junk):
    """Junk in the padding of q, k, v, do: every result is the one on zeros there, bit for bit,
    and o, dq, dk, dv are +0 at padded positions (with a state, dstate and m when causal)."""
    rng = np.random.default_rng(5)
    B, H, S, Dk, Dv = 3, 2, 9, 3, 4
    x = _inputs(rng, B, H, S, Dk, Dv, mask_kind)
    mask = x["mask"]
    assert not mask.all()
    do = rng.standard_normal((B, H, S, Dv))
    state = dict(kv0=x["kv0"], count0=x["count0"]) if causal else {}
    dkv = rng.standard_normal((B, H, Dv, Dk)) if causal else None

    def run(fill):
        q, k, v, d = (_fill_padding(a, mask, fill) for a in (x["q"], x["k"], x["v"], do))
        o, kv, count = reference.forward(q, k, v, x["m"], causal=causal, mask=mask, **state)
        dq, dk, dv, dm, dkv0 = reference.backward(d, q, k, v, x["m"], causal=causal, mask=mask,
                                                  dkv=dkv, **state)
        return dict(o=o, kv=kv, count=count, dq=dq, dk=dk, dv=dv, dm=dm, dkv0=dkv0)

    got = run(junk)
    expected = run(0.0)
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert_same_bits(got[name], value, name)
    for name in ("o", "dq", "dk", "dv"):
        assert_padding_zero(got[name], mask, name)


@pytest.mark.parametrize("junk", JUNK_VALUES, ids=str)
@pytest.mark.parametrize("mask_kind", PADDED_KINDS)
def test_rnn_padding_holds_anything(mask_kind, junk):
    """The recurrent form on junk in padding: o, kv, count of zeros there, bit for bit; a masked
    step leaves kv (signed zeros included) and count as they were, and gives o = +0."""
    rng = np.random.default_rng(6)
    B, H, S, Dk, Dv = 3, 2, 9, 3, 4
    x = _inputs(rng, B, H, S, Dk, Dv, mask_kind)
    mask = x["mask"]
    assert not mask.all()
    x["kv0"][..., ::2] = -0.0  # -0.0 + 0.0 is +0.0: a masked step must skip the write
    q, k, v = (_fill_padding(x[n], mask, junk) for n in "qkv")
    o, kv, count = reference.forward_rnn(q, k, v, x["m"], mask=mask, kv0=x["kv0"],
                                         count0=x["count0"])
    zeros = [_fill_padding(x[n], mask, 0.0) for n in "qkv"]
    expected = reference.forward_rnn(*zeros, x["m"], mask=mask, kv0=x["kv0"], count0=x["count0"])
    for name, got, value in zip(("o", "kv", "count"), (o, kv, count), expected, strict=True):
        assert_same_bits(got, value, name)
    assert_padding_zero(o, mask, "o")
    kv, count = x["kv0"], x["count0"]
    for t in range(S):
        token = (a[:, :, t:t + 1] for a in (q, k, v))
        _, kv_next, count_next = reference.forward_rnn(*token, x["m"], mask=mask[:, t:t + 1],
                                                       kv0=kv, count0=count)
        padded = ~mask[:, t]
        assert_same_bits(kv_next[padded], kv[padded], f"kv after masked step {t}")
        assert_same_bits(count_next[padded], count[padded], f"count after masked step {t}")
        kv, count = kv_next, count_next
