"""The ONNX export (cosattn.onnx) run in ONNX Runtime (CPU) against the float64 reference."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cosattn import reference

from helpers import (
    JUNK,
    MASK_KINDS,
    Case,
    Slots,
    assert_close,
    assert_padding_zero,
    assert_same_bits,
    case_id,
    check_pool,
    make_case,
    pool_steps,
    reference_forward,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from cosattn import onnx as cosattn_onnx  # noqa: E402  (after the importorskip guards)

DTYPES = ("float32", "float16")
SHAPES = [(2, 3, 37, 5, 7), (1, 2, 1, 4, 4), (3, 1, 32, 16, 8), (2, 2, 0, 3, 5)]
CHUNK = 8
# docs/spec.md, "Bad input": padding holds anything. The junk values, and the mask kinds that
# have padding to hold them.
JUNK_VALUES = [j for j in JUNK if j is not None]
PADDED_KINDS = [kind for kind in MASK_KINDS if kind != "none"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _session(model) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@cache
def _attention(H, Dk, Dv, causal, dtype, mask, state, m_input=True) -> ort.InferenceSession:
    return _session(cosattn_onnx.attention_model(
        H=H, Dk=Dk, Dv=Dv, causal=causal, dtype=dtype, m_input=m_input, mask=mask,
        state=state, chunk=CHUNK))


@cache
def _step(H, Dk, Dv, dtype, mask) -> ort.InferenceSession:
    return _session(cosattn_onnx.step_model(H=H, Dk=Dk, Dv=Dv, dtype=dtype, m_input=True,
                                            mask=mask))


@cache
def _pool_step(H, Dk, Dv, dtype, mask, with_m, index_dtype) -> ort.InferenceSession:
    return _session(cosattn_onnx.pool_step_model(H=H, Dk=Dk, Dv=Dv, dtype=dtype, m_input=with_m,
                                                 mask=mask, index_dtype=index_dtype))


def _run_attention(case: Case, *, causal: bool, state: bool, lo: int = 0, hi: int | None = None,
                   kv0=None, count0=None) -> list[np.ndarray]:
    """Run the cached attention model on tokens ``lo:hi`` of ``case`` (m as an input)."""
    _, H, S, Dk = case.q.shape
    hi = S if hi is None else hi
    sess = _attention(H, Dk, case.v.shape[-1], causal, case.dtype.name, case.mask is not None,
                      state)
    feed = {"q": case.q[:, :, lo:hi], "k": case.k[:, :, lo:hi], "v": case.v[:, :, lo:hi],
            "m": case.m}
    if case.mask is not None:
        feed["mask"] = case.mask[:, lo:hi]
    if state:
        feed["kv0"] = case.kv0 if kv0 is None else kv0
        feed["count0"] = case.count0 if count0 is None else count0
    return sess.run(None, feed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("shape", SHAPES, ids=[case_id(*s) for s in SHAPES])
def test_forward_matches_reference(shape, causal, dtype):
    case = make_case(np.random.default_rng(sum(shape)), *shape, dtype, mask="inner",
                     state=causal)
    out = _run_attention(case, causal=causal, state=causal)
    o, kv, count = reference_forward(case, causal)
    assert out[0].dtype == case.dtype and out[0].shape == o.shape
    assert_close(out[0], o, dtype, "o")
    if causal:
        assert out[1].dtype == np.float32
        assert_close(out[1], kv, np.float32, "kv")
        np.testing.assert_array_equal(out[2], count)


@pytest.mark.parametrize("m_mode", ["input", "initializer", "none"])
@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_forward_options(causal, mask, m_mode):
    """Masks of every kind, ``m`` as an input, an initializer or absent, no incoming state."""
    B, H, S, Dk, Dv = 3, 2, 21, 6, 4
    case = make_case(np.random.default_rng(7), B, H, S, Dk, Dv, "float32", mask=mask,
                     m=m_mode != "none")
    model = cosattn_onnx.attention_model(
        H=H, Dk=Dk, Dv=Dv, causal=causal, m=case.m if m_mode == "initializer" else None,
        m_input=m_mode == "input", mask=mask != "none", chunk=CHUNK)
    names = [i.name for i in model.graph.input]
    assert ("m" in names) == (m_mode == "input")
    assert ("mask" in names) == (mask != "none")
    feed = {"q": case.q, "k": case.k, "v": case.v, "m": case.m, "mask": case.mask}
    (o,) = _session(model).run(None, {n: feed[n] for n in names})
    assert_close(o, reference_forward(case, causal)[0], np.float32, "o")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [0, 5, CHUNK, 2 * CHUNK + 3, 30])
def test_split_state_consistency(split, dtype):
    """Prefix with the outgoing state, then the suffix from it: the same as one call."""
    case = make_case(np.random.default_rng(split), 2, 3, 30, 5, 6, dtype, mask="inner",
                     state=True)
    o1, kv1, count1 = _run_attention(case, causal=True, state=True, hi=split)
    o2, kv2, count2 = _run_attention(case, causal=True, state=True, lo=split, kv0=kv1,
                                     count0=count1)
    whole, kv, count = _run_attention(case, causal=True, state=True)
    o_ref, kv_ref, count_ref = reference_forward(case)
    joined = np.concatenate([o1, o2], axis=2)
    assert_close(joined, whole, dtype, "split o vs one call")
    assert_close(joined, o_ref, dtype, "split o vs reference")
    assert_close(kv2, kv, np.float32, "split kv vs one call")
    assert_close(kv2, kv_ref, np.float32, "split kv vs reference")
    np.testing.assert_array_equal(count2, count_ref)
    np.testing.assert_array_equal(count, count_ref)


@pytest.mark.parametrize("mask", ["none", "inner"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_graph_equals_parallel_graph(dtype, mask):
    """The step model run token by token gives the parallel model's outputs and state."""
    B, H, S, Dk, Dv = 2, 3, 41, 5, 7
    case = make_case(np.random.default_rng(3), B, H, S, Dk, Dv, dtype, mask=mask, state=True)
    o_par, kv_par, count_par = _run_attention(case, causal=True, state=True)
    step = _step(H, Dk, Dv, dtype, mask != "none")
    kv, count = case.kv0, case.count0
    outs = []
    for t in range(S):
        feed = {"q": case.q[:, :, t], "k": case.k[:, :, t], "v": case.v[:, :, t], "m": case.m,
                "kv": kv, "count": count}
        if case.mask is not None:
            feed["mask"] = case.mask[:, t]
        o, kv, count = step.run(None, feed)
        assert o.dtype == case.dtype
        outs.append(o)
    o_steps = np.stack(outs, axis=2)
    assert_close(o_steps, o_par, dtype, "steps vs parallel o")
    assert_close(o_steps, reference_forward(case)[0], dtype, "steps vs reference o")
    assert_close(kv, kv_par, np.float32, "steps vs parallel kv")
    np.testing.assert_array_equal(count, count_par)


def _zeros_in_padding(case: Case) -> Case:
    """``case`` with zeros at the padded positions of q, k, v and do."""
    real = case.mask[:, None, :, None]
    return dataclasses.replace(case, **{n: np.where(real, getattr(case, n), 0).astype(case.dtype)
                                        for n in ("q", "k", "v", "do")})


@pytest.mark.parametrize("junk", JUNK_VALUES, ids=str)
@pytest.mark.parametrize("mask", PADDED_KINDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_holds_anything(dtype, causal, mask, junk):
    """Junk in the padding of q, k, v: o (and the outgoing state) bit for bit those of zeros
    there, o = +0 at padded positions (causal with a state in and out)."""
    case = make_case(np.random.default_rng(8), 3, 2, 21, 5, 6, dtype, mask=mask, state=causal,
                     junk=junk)
    assert not case.mask.all()
    got = _run_attention(case, causal=causal, state=causal)
    expected = _run_attention(_zeros_in_padding(case), causal=causal, state=causal)
    for name, x, y in zip(("o", "kv", "count"), got, expected, strict=False):  # o alone if bidir.
        assert_same_bits(x, y, name)
    assert_padding_zero(got[0], case.mask, "o")
    ref = reference_forward(case, causal)
    assert_close(got[0], ref[0], dtype, "o")
    if causal:
        assert_close(got[1], ref[1], np.float32, "kv")
        np.testing.assert_array_equal(got[2], ref[2])


@pytest.mark.parametrize("junk", JUNK_VALUES, ids=str)
@pytest.mark.parametrize("mask", PADDED_KINDS)
def test_step_graph_padding_holds_anything(mask, junk):
    """Junk in a masked row's token: the step leaves kv (signed zeros included) and count bit for
    bit as they were and gives o = +0; the real rows go on as with zeros there."""
    B, H, S, Dk, Dv = 3, 2, 9, 4, 5
    case = make_case(np.random.default_rng(9), B, H, S, Dk, Dv, "float32", mask=mask,
                     state=True, junk=junk)
    assert not case.mask.all()
    for kv0 in (case.kv0, case.f64["kv0"]):  # -0.0 + 0.0 is +0.0: a masked row must skip the write
        kv0[..., ::2] = -0.0
    step = _step(H, Dk, Dv, "float32", True)

    def run(c: Case):
        kv, count = c.kv0, c.count0
        outs = []
        for t in range(S):
            o, kv_next, count_next = step.run(None, {
                "q": c.q[:, :, t], "k": c.k[:, :, t], "v": c.v[:, :, t], "m": c.m,
                "mask": c.mask[:, t], "kv": kv, "count": count})
            padded = ~c.mask[:, t]
            assert_same_bits(kv_next[padded], kv[padded], f"kv after masked step {t}")
            assert_same_bits(count_next[padded], count[padded], f"count after masked step {t}")
            outs.append(o)
            kv, count = kv_next, count_next
        return np.stack(outs, axis=2), kv, count

    got = run(case)
    for name, x, y in zip(("o", "kv", "count"), got, run(_zeros_in_padding(case)), strict=True):
        assert_same_bits(x, y, name)
    assert_padding_zero(got[0], case.mask, "o")
    o_ref, kv_ref, count_ref = reference_forward(case)
    assert_close(got[0], o_ref, np.float32, "o")
    assert_close(got[1], kv_ref, np.float32, "kv")
    np.testing.assert_array_equal(got[2], count_ref)


def _run_pool_step(sess, slots: Slots, q, k, v, m, real) -> list[np.ndarray]:
    feed = {"q": q, "k": k, "v": v, "m": m, "mask": real, "state_indices": slots.indices,
            "has_initial_state": (np.ones(len(slots.indices), bool) if slots.initial is None
                                  else slots.initial),
            "kv": slots.kv, "count": slots.count}
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


@given(data=pool_steps(st.sampled_from([(4, 4), (5, 3)]),
                       dtypes=(np.dtype(np.float32), np.dtype(np.float16))),
       with_m=st.booleans())
def test_pool_step_matches_reference(data, with_m):
    """The pool step model against reference.pool_step: random distinct slots, -1 entries,
    reused slots holding NaN where has_initial_state is False, masked rows, junk in the rows
    nobody reads. o is +0 for -1 entries and masked rows; slots not named, and the slots of
    masked rows that start from them, keep their bits."""
    rng, H, Dk, Dv, dtype = (data[n] for n in ("rng", "H", "Dk", "Dv", "dtype"))
    # the graph's pool is float32 (pool_steps may draw float64 pools, for float64 backends)
    slots = dataclasses.replace(data["slots"], kv=data["slots"].kv.astype(np.float32))
    N = len(slots.indices)
    q, k, v = (rng.standard_normal((N, H, D)).astype(dtype) for D in (Dk, Dk, Dv))
    m = rng.uniform(-2, 2, size=H).astype(np.float32) if with_m else None
    real = rng.random(N) < 0.7 if data["mask"] else None
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    padded = (slots.indices < 0) if real is None else (slots.indices < 0) | ~real
    if data["junk"] is not None:
        with np.errstate(over="ignore"):
            for x, x64 in zip((q, k, v), f64, strict=True):
                x[padded] = data["junk"]
                x64[padded] = 0
    ref_o, ref_kv, ref_count = reference.pool_step(
        slots.kv.astype(np.float64), slots.count, *f64, None if m is None else m.astype(float),
        state_indices=slots.indices, has_initial_state=slots.initial, mask=real)
    sess = _pool_step(H, Dk, Dv, np.dtype(dtype).name, real is not None, with_m,
                      slots.indices.dtype.name)
    o, kv, count = _run_pool_step(sess, slots, q, k, v, m, real)
    assert o.dtype == dtype and o.shape == (N, H, Dv)
    assert kv.dtype == np.float32 and count.dtype == np.int64
    assert_close(o, ref_o, dtype, "o")
    assert_padding_zero(o[:, :, None], ~padded[:, None], "o")  # one token per entry
    after = dataclasses.replace(slots, kv=kv, count=count)  # check_pool reads .kv and .count
    check_pool(after, slots, ref_kv, ref_count, np.float32, np.asarray)
    if real is not None:
        kept = slots.indices[(slots.indices >= 0) & ~real
                             & (True if slots.initial is None else slots.initial)]
        assert_same_bits(kv[kept], slots.kv[kept], "kv of masked rows")
        assert_same_bits(count[kept], slots.count[kept], "count of masked rows")


def test_pool_step_indices_outside_the_pool_are_padding():
    """Unchecked bad slots (below -1, P and beyond) read and write nothing, like -1; a fixed P
    in the graph; an empty batch; no entry live."""
    H, Dk, Dv, P = 2, 3, 4, 5
    rng = np.random.default_rng(12)
    model = cosattn_onnx.pool_step_model(H=H, Dk=Dk, Dv=Dv, P=P, m=np.zeros(H, np.float32),
                                         index_dtype="int32")
    (pool,) = [i for i in model.graph.input if i.name == "kv"]
    assert [d.dim_value for d in pool.type.tensor_type.shape.dim] == [P, H, Dv, Dk]
    sess = _session(model)
    kv = rng.standard_normal((P, H, Dv, Dk)).astype(np.float32)
    kv[..., 0] = -0.0
    count = rng.integers(0, 9, size=P)
    for indices in ([P, -7, 2 * P, -1], [], [1, P, 3]):
        B = len(indices)
        slots = Slots(kv, count, np.array(indices, np.int32), rng.random(B) < 0.5)
        q, k = (rng.standard_normal((B, H, Dk)).astype(np.float32) for _ in range(2))
        v = rng.standard_normal((B, H, Dv)).astype(np.float32)
        o, kv_next, count_next = _run_pool_step(sess, slots, q, k, v, None, None)
        live = (slots.indices >= 0) & (slots.indices < P)
        assert_padding_zero(o[:, :, None], live[:, None], "o")
        untouched = np.setdiff1d(np.arange(P), slots.indices[live])
        assert_same_bits(kv_next[untouched], kv[untouched], "kv")
        assert_same_bits(count_next[untouched], count[untouched], "count")
        ref_o, ref_kv, ref_count = reference.pool_step(
            kv.astype(np.float64), count, q.astype(np.float64), k.astype(np.float64),
            v.astype(np.float64), np.zeros(H), state_indices=np.where(live, slots.indices, -1),
            has_initial_state=slots.initial)
        assert_close(o, ref_o, np.float32, "o")
        assert_close(kv_next, ref_kv, np.float32, "kv")
        np.testing.assert_array_equal(count_next, ref_count)


def test_pool_step_function_is_self_contained():
    """PoolStep inlines RecurrentStep: one function of standard operators, none of its own
    domain, so exporters add just this function."""
    for with_m in (True, False):
        function = cosattn_onnx.pool_step_function(with_m=with_m)
        assert function.name == "PoolStep" + ("" if with_m else "NoStabiliser")
        assert {n.domain for n in function.node} == {""}
        step_ops = [n.op_type for n in cosattn_onnx.step_function(with_m=with_m).node]
        ops = [n.op_type for n in function.node]
        n = len(step_ops)
        assert sum(ops[i:i + n] == step_ops for i in range(len(ops))) == 1  # inlined once
        model = cosattn_onnx.pool_step_model(H=1, Dk=2, Dv=2, m_input=with_m)
        assert [f.name for f in model.functions] == [function.name]


def test_dynamic_batch_and_length():
    """One model, several (B, S): the graph's B and S are symbolic."""
    model = cosattn_onnx.attention_model(H=2, Dk=4, Dv=3, m_input=True, chunk=CHUNK)
    q_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert q_dims == ["B", 2, "S", 4]
    sess = _session(model)
    for B, S in [(1, 3), (4, 17), (2, 64)]:
        case = make_case(np.random.default_rng(B * S), B, 2, S, 4, 3, "float32")
        (o,) = sess.run(None, {"q": case.q, "k": case.k, "v": case.v, "m": case.m})
        assert_close(o, reference_forward(case)[0], np.float32, f"B{B}-S{S}")


def test_models_declare_opset_and_ir_version():
    for model in (cosattn_onnx.attention_model(H=1, Dk=2, Dv=2),
                  cosattn_onnx.step_model(H=1, Dk=2, Dv=2),
                  cosattn_onnx.pool_step_model(H=1, Dk=2, Dv=2)):
        assert model.ir_version == cosattn_onnx.IR_VERSION
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets == {"": cosattn_onnx.OPSET, cosattn_onnx.DOMAIN: 1}
        assert cosattn_onnx.OPSET >= 21
        assert [f.domain for f in model.functions] == [cosattn_onnx.DOMAIN]


def test_causal_scores_are_one_chunk_at_a_time():
    """Every MatMul of the causal function sits in the Scan body (per chunk), none outside it."""
    function = cosattn_onnx.attention_function(causal=True)
    top_ops = [n.op_type for n in function.node]
    assert "MatMul" not in top_ops and top_ops.count("Scan") == 1
    (scan,) = [n for n in function.node if n.op_type == "Scan"]
    body_ops = [n.op_type for n in scan.attribute[0].g.node]
    assert "Trilu" in body_ops and body_ops.count("MatMul") == 4


def test_chunk_size_does_not_change_the_result():
    case = make_case(np.random.default_rng(11), 2, 2, 50, 4, 4, "float32", mask="left",
                     state=True)
    ref = reference_forward(case)[0]
    for chunk in (1, 7, 64):
        model = cosattn_onnx.attention_model(H=2, Dk=4, Dv=4, m_input=True, mask=True,
                                             state=True, chunk=chunk)
        feed = {"q": case.q, "k": case.k, "v": case.v, "m": case.m, "mask": case.mask,
                "kv0": case.kv0, "count0": case.count0}
        assert_close(_session(model).run(["o"], feed)[0], ref, np.float32, f"chunk {chunk}")


@pytest.mark.parametrize(("options", "error"), [
    ({"causal": False, "state": True}, ValueError),
    ({"m": np.zeros(2, np.float32), "m_input": True}, ValueError),
    ({"m": np.zeros(3, np.float32)}, ValueError),
    ({"dtype": "float64"}, TypeError),
    ({"chunk": 0}, ValueError),
    ({"eps": 0.0}, ValueError),
    ({"H": 0}, ValueError),
])
def test_bad_options_are_refused(options, error):
    with pytest.raises(error):
        cosattn_onnx.attention_model(**{"H": 2, "Dk": 4, "Dv": 4, **options})


@pytest.mark.parametrize(("options", "error"), [
    ({"P": -1}, ValueError),
    ({"P": 2.0}, ValueError),
    ({"index_dtype": "float32"}, TypeError),
    ({"dtype": "bfloat16"}, TypeError),
])
def test_bad_pool_options_are_refused(options, error):
    with pytest.raises(error):
        cosattn_onnx.pool_step_model(**{"H": 2, "Dk": 4, "Dv": 4, **options})


def test_importing_cosattn_does_not_import_onnx():
    code = "import sys, cosattn; sys.exit('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """A tiny random language model saved as .npz and exported to the two ONNX graphs."""
    sys.path.insert(0, str(EXAMPLES))
    import export_onnx
    import tiny_lm

    cfg = tiny_lm.Config(d_model=32, n_heads=4, n_layers=2, d_mlp=64)
    params = tiny_lm.init_params(cfg, np.random.default_rng(5))
    folder = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm.save(folder / "tiny_lm.npz", params, cfg)
    prefill, step = export_onnx.export(folder / "tiny_lm.npz", folder)
    yield params, cfg, prefill, step
    sys.path.remove(str(EXAMPLES))


def test_tiny_lm_graphs_match_the_example(lm_files):
    """Prefill logits and states, then one step's logits and states, against tiny_lm.py."""
    import generate_onnx
    import tiny_lm

    params, cfg, prefill, step = lm_files
    lm = generate_onnx.OnnxLM(prefill, step)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, size=(2, 37))
    logits, _ = tiny_lm.forward(params, cfg, tokens)
    (onnx_logits,) = lm.prefill_session.run(["logits"], {"tokens": tokens})
    assert_close(onnx_logits, logits, np.float32, "prefill logits")
    last, expected = tiny_lm.prefill(params, cfg, tokens)
    onnx_last, states = lm.prefill(tokens)
    assert_close(onnx_last, last, np.float32, "prefill last logits")

    def check_states(what):
        for l, state in enumerate(expected):
            assert_close(states[f"kv.{l}"], state.attn.kv, np.float32, f"{what} kv.{l}")
            np.testing.assert_array_equal(states[f"count.{l}"], state.attn.count)
            assert_close(states[f"prev.{l}"], state.prev, np.float32, f"{what} prev.{l}")

    check_states("prefill")
    token = tokens[:, 0]
    step_logits, states = lm.step(token, states)
    assert_close(step_logits, tiny_lm.step(params, cfg, token, expected), np.float32,
                 "step logits")
    check_states("step")


def test_tiny_lm_greedy_generation_matches_the_example(lm_files):
    """ONNX Runtime's greedy bytes are those of tiny_lm.generate (what generate.py runs)."""
    import generate_onnx
    import tiny_lm

    params, cfg, prefill, step = lm_files
    prompt = np.frombuffer(b"In the beginning God", dtype=np.uint8).astype(np.int64)
    prompt = np.stack([prompt, prompt[::-1]])
    expected = [token for token, _ in tiny_lm.generate(params, cfg, prompt, 40)]
    got = list(generate_onnx.OnnxLM(prefill, step).generate(prompt, 40))
    np.testing.assert_array_equal(np.stack(got, axis=1), np.stack(expected, axis=1))


def test_generate_onnx_script_prints_what_generate_prints(lm_files, tmp_path):
    """The two example programs, greedy, from one weights file: the same continuation.

    ``generate_onnx.py`` is pointed at an empty folder, so it exports the graphs itself.
    """
    weights = lm_files[2].parent / "tiny_lm.npz"
    common = ["--weights", str(weights), "--prompt", "And God said", "--tokens", "60"]

    def run(script, *extra):
        return subprocess.run([sys.executable, str(EXAMPLES / script), *common, *extra],
                              check=True, capture_output=True, text=True).stdout

    ours = run("generate_onnx.py", "--models", str(tmp_path))
    theirs = run("generate.py", "--temperature", "0")
    assert (tmp_path / "tiny_lm_step.onnx").exists()
    text = ours.rstrip("\n")
    assert len(text) > len("And God said") and theirs.startswith(text)
