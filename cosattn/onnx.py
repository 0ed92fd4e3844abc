"""ONNX export of Cottention: the parallel operation and the recurrent step as ONNX graphs.

Each operation is a model-local function in the ``cosattn`` domain, made of standard ONNX
operators only, so any runtime that runs ONNX runs it (ONNX Runtime inlines the functions):

=======================================  ================================================
function                                 inputs -> outputs
=======================================  ================================================
``CausalAttention``                      q, k, v, m, mask, kv0, count0 -> o, kv, count
``BidirectionalAttention``               q, k, v, m, mask -> o
``RecurrentStep``                        q, k, v, m, mask, kv, count -> o, kv_next, count_next
``PoolStep``                             q, k, v, m, mask, state_indices, has_initial_state,
                                         kv, count -> o, kv_next, count_next
=======================================  ================================================

Shapes follow docs/spec.md: q, k (B, H, S, Dk), v (B, H, S, Dv), m (H,), mask (B, S) bool, state
``kv`` (B, H, Dv, Dk) float32 and ``count`` (B,) int64; the step takes one token, q, k (B, H, Dk)
and v (B, H, Dv), and a mask (B,). ``PoolStep`` is that step on a pool of states (docs/spec.md,
"A pool of states"): entry b steps slot ``state_indices[b]`` ((B,) int32 or int64, -1 for a
padding entry, which reads and writes no slot) of the pool ``kv`` (P, H, Dv, Dk), ``count``
(P,), from zero where ``has_initial_state`` (B,) bool is False; ONNX values cannot be written
in place, so it returns the new pool, in which the slots no entry names keep their bits. Without
a stabiliser (``with_m=False``) the functions are named ``...NoStabiliser`` and have no ``m``
input. Attributes: ``eps`` (float, default 1e-12) everywhere, ``chunk`` (int, default 64) for
``CausalAttention``.

q, k, v may be float16 or float32: they are cast to float32 inside, every sum is float32, the
state is float32, and ``o`` is cast back to the dtype of ``q``. The causal form walks the
sequence in chunks of ``chunk`` tokens with a ``Scan`` that carries ``kv``: it pads S to whole
chunks inside the graph and never holds more than one chunk x chunk block of the S x S score
matrix. B and S (and P, unless fixed) are dynamic in every graph.

Padding holds anything (docs/spec.md, "Bad input"): q, k, v at masked positions are selected
away with ``Where``, never multiplied by 0, so NaN or Inf there reaches no result; ``o`` is +0
at masked positions, and a masked row of the step leaves ``kv`` and ``count`` bit for bit as
they were.

:func:`attention_model`, :func:`step_model` and :func:`pool_step_model` wrap the functions into
ready-to-run models; :func:`attention_function`, :func:`step_function` and
:func:`pool_step_function` give the functions themselves to exporters that call them as nodes
(domain :data:`DOMAIN`) in a larger graph.

Example
-------
>>> import numpy as np, onnxruntime as ort
>>> from cosattn.onnx import attention_model
>>> model = attention_model(H=2, Dk=8, Dv=8, m=np.full(2, 0.5, np.float32))
>>> sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
>>> q = k = v = np.ones((1, 2, 5, 8), np.float32)
>>> sess.run(["o"], {"q": q, "k": k, "v": v})[0].shape
(1, 2, 5, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cosattn.onnx needs the onnx package: pip install 'cosattn[onnx]'") from exc

from . import __version__

__all__ = [
    "DOMAIN",
    "IR_VERSION",
    "OPSET",
    "attention_function",
    "attention_model",
    "opset_imports",
    "pool_step_function",
    "pool_step_model",
    "step_function",
    "step_model",
]

DOMAIN = "cosattn"
OPSET = 21
IR_VERSION = 10
DEFAULT_CHUNK = 64
DEFAULT_EPS = 1e-12
_ELEM_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_INDEX_TYPES = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The opsets of a model that calls the functions: ONNX :data:`OPSET` and ``cosattn`` 1."""
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]


class _Nodes:
    """Nodes of one graph or function body, in order; every value gets an explicit name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._shared: set[str] = set()

    def op(self, op_type: str, *inputs: str, out: str, **attrs: Any) -> str:
        """Append ``op_type(*inputs)`` with one output named ``out``; return ``out``."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type: str, *inputs: str, outs: Sequence[str], **attrs: Any) -> list[str]:
        """Append a node with several outputs; return their names."""
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), **attrs))
        return list(outs)

    def once(self, op_type: str, *inputs: str, out: str, **attrs: Any) -> str:
        """Like :meth:`op`, but a second request for ``out`` reuses the first node."""
        if out not in self._shared:
            self._shared.add(out)
            self.op(op_type, *inputs, out=out, **attrs)
        return out

    def call(self, function: onnx.FunctionProto, *inputs: str, outs: Sequence[str],
             **attrs: Any) -> list[str]:
        """Append a call of ``function`` (a node in its domain); return the output names."""
        self.nodes.append(helper.make_node(function.name, list(inputs), list(outs),
                                           domain=function.domain, **attrs))
        return list(outs)

    def inline(self, function: onnx.FunctionProto, *inputs: str, outs: Sequence[str],
               prefix: str) -> list[str]:
        """Append the nodes of ``function`` as a call would run them; return ``outs``.

        The function's formal inputs and outputs become ``inputs`` and ``outs``, and its inner
        values get ``prefix`` so they cannot clash with this graph's. Attribute references stay
        as they are: the enclosing function must declare the same attributes. Only for functions
        without subgraphs (the values inside a subgraph would keep their names).
        """
        names = dict(zip(function.input, inputs, strict=True))
        names.update(zip(function.output, outs, strict=True))
        for node in function.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for values in (copy.input, copy.output):
                values[:] = [names.get(n, prefix + n) if n else n for n in values]
            self.nodes.append(copy)
        return list(outs)

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        """A constant tensor ``name`` (added once, however often it is asked for)."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return self.once("Constant", out=name, value=tensor)

    def attr_const(self, name: str, attr: str, kind: str) -> str:
        """A scalar constant taken from the enclosing function's attribute ``attr``.

        ``kind`` is ``"int"`` (an int64 scalar) or ``"float"`` (a float32 scalar).
        """
        types = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT}
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(helper.make_attribute_ref(f"value_{kind}", types[kind],
                                                        ref_attr_name=attr))
        self.nodes.append(node)
        return name


def _axes(g: _Nodes, *axes: int) -> str:
    return g.const("axes_" + "_".join(str(a).replace("-", "m") for a in axes), list(axes))


def _normalise(g: _Nodes, x: str, eps: str, name: str) -> str:
    """``x / max(||x||_2, eps)`` over the last axis: (..., D) -> (..., D)."""
    sq = g.op("ReduceSumSquare", x, _axes(g, -1), out=f"{name}_sq", keepdims=1)
    norm = g.op("Sqrt", sq, out=f"{name}_norm")
    return g.op("Div", x, g.op("Max", norm, eps, out=f"{name}_den"), out=f"{name}_hat")


def _real(g: _Nodes) -> str:
    """The mask ``real`` (B, S) bool as (B, 1, S, 1), to select (B, H, S, D) rows with."""
    return g.once("Unsqueeze", "mask", _axes(g, 1, 3), out="mask_b1s1")


def _select(g: _Nodes, x: str, out: str) -> str:
    """``real · x`` as docs/spec.md means it: ``x`` (B, H, S, D) where the token is real, +0
    where it is padding (``Where``: NaN · 0 would be NaN, and 0 · -1 is -0)."""
    return g.op("Where", _real(g), x, g.const("zero_f32", 0.0, np.float32), out=out)


def _prologue(g: _Nodes, *, count0: str | None, with_m: bool, eps: str) -> tuple[str, str, str]:
    """docs/spec.md steps 1-4 on the function inputs, in float32.

    Reads ``q``, ``k`` (B, H, S, Dk), ``v`` (B, H, S, Dv), ``mask`` (B, S) bool and ``m`` (H,)
    when ``with_m``. The counts are causal, from the incoming count ``count0`` (B,) int64,
    when that is given, else bidirectional. Returns the names of
    ``q_real`` = real_i q̂_i (B, H, S, Dk), ``k_real`` = real_j k̂_j (B, H, S, Dk) and
    ``v_tilde`` = real_j w_j v_j (B, H, S, Dv), each +0 at padded positions whatever q, k, v
    hold there (the norm of a padded row may be NaN or Inf: it is selected away).
    """
    f32 = TensorProto.FLOAT
    q_hat = _normalise(g, g.op("Cast", "q", out="q_f32", to=f32), eps, "q")
    k_hat = _normalise(g, g.op("Cast", "k", out="k_f32", to=f32), eps, "k")
    v32 = g.op("Cast", "v", out="v_f32", to=f32)
    if with_m:
        ones = g.once("Cast", "mask", out="mask_i64", to=TensorProto.INT64)
        if count0 is not None:  # causal: c_j = count0 + sum_{j' <= j} real_j'  (B, S)
            prefix = g.op("CumSum", ones, g.const("axis_1", 1), out="mask_cumsum")
            start = g.op("Unsqueeze", count0, _axes(g, 1), out="count0_b1")
            count = g.op("Add", prefix, start, out="counts")
        else:  # bidirectional: c_j = L_b for every j  (B, 1)
            count = g.op("ReduceSum", ones, _axes(g, 1), out="counts", keepdims=1)
        floor = g.op("Max", count, g.const("one_i64", 1), out="counts_floor")
        base = g.op("Cast", floor, out="counts_f32", to=f32)
        sig = g.op("Sigmoid", g.op("Cast", "m", out="m_f32", to=f32), out="m_sigmoid")
        power = g.op("Unsqueeze", g.op("Neg", sig, out="m_power"), _axes(g, 0, 2),
                     out="m_power_1h1")  # (1, H, 1)
        w = g.op("Pow", g.op("Unsqueeze", base, _axes(g, 1), out="counts_b1s"), power,
                 out="w")  # (B, H, S) or (B, H, 1)
        v32 = g.op("Mul", v32, g.op("Unsqueeze", w, _axes(g, -1), out="w_bhs1"),
                   out="v_scaled")
    return (_select(g, q_hat, "q_real"), _select(g, k_hat, "k_real"),
            _select(g, v32, "v_tilde"))


def _output(g: _Nodes, o32: str) -> None:
    """``o`` = real_i · ``o32`` (B, H, S, Dv) in the dtype of ``q``."""
    g.op("CastLike", _select(g, o32, "o_real"), "q", out="o")


def _chunk_body() -> onnx.GraphProto:
    """The Scan body: one chunk of the causal form (docs/design.md, "The chunked algorithm").

    Inputs ``kv_in`` (B, H, Dv, Dk) and the chunk's ``q_c``, ``k_c`` (B, H, C, Dk), ``v_c``
    (B, H, C, Dv); outputs ``kv_out = kv_in + v_cᵀ k_c`` and
    ``o_c = tril(q_c k_cᵀ) v_c + q_c kv_inᵀ`` (B, H, C, Dv).
    """
    g = _Nodes()
    k_t = g.op("Transpose", "k_c", out="k_c_t", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", "q_c", k_t, out="scores")  # (B, H, C, C)
    causal_scores = g.op("Trilu", scores, out="scores_tril", upper=0)
    intra = g.op("MatMul", causal_scores, "v_c", out="o_intra")
    kv_t = g.op("Transpose", "kv_in", out="kv_in_t", perm=[0, 1, 3, 2])
    inter = g.op("MatMul", "q_c", kv_t, out="o_inter")
    g.op("Add", intra, inter, out="o_c")
    v_t = g.op("Transpose", "v_c", out="v_c_t", perm=[0, 1, 3, 2])
    delta = g.op("MatMul", v_t, "k_c", out="kv_delta")
    g.op("Add", "kv_in", delta, out="kv_out")
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f32, None) for n in ("kv_in", "q_c", "k_c", "v_c")]
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("kv_out", "o_c")]
    return helper.make_graph(g.nodes, "cosattn_chunk", inputs, outputs)


def _to_chunks(g: _Nodes, x: str, width: str, shapes: dict[str, str], name: str) -> str:
    """(B, H, S, D) -> (B, H, N, C, D), zero-padded from S up to N*C tokens."""
    pads = g.once("Concat", g.const("zeros_6", [0] * 6), shapes["pad"], g.const("zeros_1", [0]),
                out="pads", axis=0)
    padded = g.op("Pad", x, pads, out=f"{name}_padded")
    shape = g.op("Concat", shapes["BH"], shapes["N"], shapes["C"], width, out=f"{name}_chunk_shape",
                 axis=0)
    return g.op("Reshape", padded, shape, out=f"{name}_chunks", allowzero=1)


def _causal_body(g: _Nodes, q_real: str, k_real: str, v_tilde: str) -> None:
    """The causal output ``o`` (B, H, S, Dv) float32 and state ``kv``, ``count`` by chunks."""
    chunk = g.attr_const("chunk", "chunk", "int")
    shapes = {
        "BH": g.op("Shape", "q", out="shape_BH", start=0, end=2),
        "S": g.op("Shape", "q", out="shape_S", start=2, end=3),
        "Dk": g.op("Shape", "q", out="shape_Dk", start=3, end=4),
        "Dv": g.op("Shape", "v", out="shape_Dv", start=3, end=4),
        "C": g.op("Unsqueeze", chunk, _axes(g, 0), out="shape_C"),
    }
    # N = max(ceil(S / C), 1) chunks, pad = N * C - S. At least one chunk (of padding when
    # S = 0): ONNX Runtime's Scan fails on zero iterations along a non-leading axis.
    rounded_up = g.op("Add", shapes["S"], g.op("Sub", shapes["C"], g.const("one_1d", [1]),
                                               out="chunk_minus_one"), out="S_rounded_up")
    n_chunks = g.op("Div", rounded_up, shapes["C"], out="chunks_needed")
    shapes["N"] = g.op("Max", n_chunks, g.const("one_1d", [1]), out="shape_N")
    padded_len = g.op("Mul", shapes["N"], shapes["C"], out="shape_NC")
    shapes["pad"] = g.op("Sub", padded_len, shapes["S"], out="pad_len")
    q_chunks = _to_chunks(g, q_real, shapes["Dk"], shapes, "q")
    k_chunks = _to_chunks(g, k_real, shapes["Dk"], shapes, "k")
    v_chunks = _to_chunks(g, v_tilde, shapes["Dv"], shapes, "v")
    _, o_chunks = g.ops("Scan", "kv0", q_chunks, k_chunks, v_chunks, outs=["kv", "o_chunks"],
                        body=_chunk_body(), num_scan_inputs=3, scan_input_axes=[2, 2, 2],
                        scan_output_axes=[2])
    flat_shape = g.op("Concat", shapes["BH"], padded_len, shapes["Dv"], out="o_padded_shape",
                      axis=0)
    o_padded = g.op("Reshape", o_chunks, flat_shape, out="o_padded", allowzero=1)
    _output(g, g.op("Slice", o_padded, g.const("zeros_1", [0]), shapes["S"],
                    g.const("axis_2", [2]), out="o_f32"))
    ones = g.once("Cast", "mask", out="mask_i64", to=TensorProto.INT64)
    real_len = g.op("ReduceSum", ones, _axes(g, 1), out="real_len", keepdims=0)
    g.op("Add", "count0", real_len, out="count")


def _bidirectional_body(g: _Nodes, q_real: str, k_real: str, v_tilde: str) -> None:
    """The bidirectional output ``o = q' (Ṽᵀ K̂)ᵀ`` (B, H, S, Dv), through one (Dv, Dk) state."""
    v_t = g.op("Transpose", v_tilde, out="v_tilde_t", perm=[0, 1, 3, 2])
    kv = g.op("MatMul", v_t, k_real, out="kv")  # (B, H, Dv, Dk)
    kv_t = g.op("Transpose", kv, out="kv_t", perm=[0, 1, 3, 2])
    _output(g, g.op("MatMul", q_real, kv_t, out="o_f32"))


def _function_name(base: str, with_m: bool) -> str:
    return base if with_m else base + "NoStabiliser"


def attention_function(*, causal: bool = True, with_m: bool = True) -> onnx.FunctionProto:
    """The parallel operation as a function in the ``cosattn`` domain.

    Parameters
    ----------
    causal : bool
        ``CausalAttention`` (inputs ``q, k, v, m, mask, kv0, count0``, outputs ``o, kv, count``,
        attributes ``chunk`` and ``eps``) or ``BidirectionalAttention`` (inputs
        ``q, k, v, m, mask``, output ``o``, attribute ``eps``).
    with_m : bool
        With the stabiliser input ``m`` (H,); without it the name ends in ``NoStabiliser``,
        ``m`` is not an input and ``w = 1``.

    Returns
    -------
    onnx.FunctionProto
        q, k (B, H, S, Dk) and v (B, H, S, Dv) in float16 or float32; mask (B, S) bool (pass all
        True for no padding); kv0 (B, H, Dv, Dk) float32 and count0 (B,) int64 (zeros for no
        incoming state). o (B, H, S, Dv) has the dtype of q; kv, count are the outgoing state.
    """
    g = _Nodes()
    eps = g.attr_const("eps", "eps", "float")
    q_real, k_real, v_tilde = _prologue(g, count0="count0" if causal else None, with_m=with_m,
                                        eps=eps)
    inputs = ["q", "k", "v"] + (["m"] if with_m else []) + ["mask"]
    attributes = [helper.make_attribute("eps", DEFAULT_EPS)]
    if causal:
        _causal_body(g, q_real, k_real, v_tilde)
        inputs += ["kv0", "count0"]
        outputs = ["o", "kv", "count"]
        attributes.append(helper.make_attribute("chunk", DEFAULT_CHUNK))
    else:
        _bidirectional_body(g, q_real, k_real, v_tilde)
        outputs = ["o"]
    name = _function_name("CausalAttention" if causal else "BidirectionalAttention", with_m)
    doc = f"Cottention ({', '.join(inputs)}) -> ({', '.join(outputs)}); see cosattn.onnx"
    return helper.make_function(DOMAIN, name, inputs, outputs, g.nodes,
                                [helper.make_opsetid("", OPSET)], attribute_protos=attributes,
                                doc_string=doc)


def step_function(*, with_m: bool = True) -> onnx.FunctionProto:
    """The recurrent step (docs/spec.md, "The RNN form") as a function in the ``cosattn`` domain.

    Parameters
    ----------
    with_m : bool
        With the stabiliser input ``m`` (H,) (``RecurrentStep``) or without
        (``RecurrentStepNoStabiliser``, ``w = 1``).

    Returns
    -------
    onnx.FunctionProto
        Inputs ``q``, ``k`` (B, H, Dk), ``v`` (B, H, Dv) in float16 or float32, ``m`` (H,),
        ``mask`` (B,) bool, ``kv`` (B, H, Dv, Dk) float32, ``count`` (B,) int64; outputs ``o``
        (B, H, Dv) in the dtype of q, ``kv_next`` and ``count_next`` (the state after the
        token; a masked row's are its ``kv`` and ``count``, bit for bit). Attribute ``eps``.
    """
    g = _Nodes()
    eps = g.attr_const("eps", "eps", "float")
    # one token is the causal form with S = 1: reuse its prologue on (B, H, 1, D) and (B, 1)
    for name in ("q", "k", "v"):
        g.op("Unsqueeze", f"{name}_token", _axes(g, 2), out=name)
    g.op("Unsqueeze", "mask_token", _axes(g, 1), out="mask")
    q_real, k_real, v_tilde = _prologue(g, count0="count", with_m=with_m, eps=eps)
    v_t = g.op("Transpose", v_tilde, out="v_tilde_t", perm=[0, 1, 3, 2])
    kv_sum = g.op("Add", "kv", g.op("MatMul", v_t, k_real, out="kv_delta"), out="kv_sum")
    # a masked row skips the write (-0.0 + 0.0 would be +0.0)
    g.op("Where", _real(g), kv_sum, "kv", out="kv_next")
    o32 = g.op("MatMul", q_real, g.op("Transpose", "kv_next", out="kv_next_t", perm=[0, 1, 3, 2]),
               out="o_f32")  # (B, H, 1, Dv)
    o_real = g.op("Squeeze", _select(g, o32, "o_real"), _axes(g, 2), out="o_token_f32")
    g.op("CastLike", o_real, "q_token", out="o")
    real = g.op("Cast", "mask_token", out="mask_token_i64", to=TensorProto.INT64)
    g.op("Add", "count", real, out="count_next")
    inputs = (["q_token", "k_token", "v_token"] + (["m"] if with_m else [])
              + ["mask_token", "kv", "count"])
    outputs = ["o", "kv_next", "count_next"]
    doc = f"Cottention step ({', '.join(inputs)}) -> ({', '.join(outputs)}); see cosattn.onnx"
    return helper.make_function(DOMAIN, _function_name("RecurrentStep", with_m), inputs,
                                outputs, g.nodes, [helper.make_opsetid("", OPSET)],
                                attribute_protos=[helper.make_attribute("eps", DEFAULT_EPS)],
                                doc_string=doc)


def pool_step_function(*, with_m: bool = True) -> onnx.FunctionProto:
    """One recurrent step on a pool of states (docs/spec.md, "A pool of states"), a function in
    the ``cosattn`` domain: what ``StatePool.step`` does, with the pool in and the new pool out.

    Parameters
    ----------
    with_m : bool
        With the stabiliser input ``m`` (H,) (``PoolStep``) or without
        (``PoolStepNoStabiliser``, ``w = 1``).

    Returns
    -------
    onnx.FunctionProto
        Inputs ``q``, ``k`` (B, H, Dk), ``v`` (B, H, Dv) in float16 or float32, ``m`` (H,),
        ``mask`` (B,) bool, ``state_indices`` (B,) int32 or int64 (an entry's slot, -1 for a
        padding entry), ``has_initial_state`` (B,) bool (False: the entry starts from a zero
        state, not from its slot), the pool ``kv`` (P, H, Dv, Dk) float32 and ``count`` (P,)
        int64; outputs ``o`` (B, H, Dv) in the dtype of q (+0 for padding entries and masked
        rows) and the new pool ``kv_next``, ``count_next``. Attribute ``eps``.

    Notes
    -----
    Entry b steps slot ``state_indices[b]`` as ``RecurrentStep`` (inlined, not copied) steps a
    state, and the outgoing state replaces the slot. Padding entries, and indices outside
    0 .. P-1, read and write no slot; slots no entry names keep their bits, and so does the
    slot of a masked entry that starts from it (one that starts from zero gets the zero state,
    as ``StatePool.step`` gives it). No two entries may name the same slot: ``ScatterND``
    leaves the order of duplicate writes undefined.
    """
    g = _Nodes()
    slots = g.op("Cast", "state_indices", out="slots", to=TensorProto.INT64)
    # An entry is live when it names a slot of the pool: -1 marks padding, and an index outside
    # the pool (a bad value nobody checked) is treated as padding, so nothing below reads or
    # writes outside the pool.
    pool_size = g.op("Shape", "kv", out="pool_size", start=0, end=1)
    live = g.op("And", g.op("GreaterOrEqual", slots, g.const("zero_i64", 0), out="slot_not_neg"),
                g.op("Less", slots, pool_size, out="slot_in_pool"), out="live")
    # Step the live entries only, compacted to L rows: the -1 entries then cannot collide with
    # a live entry's slot in the ScatterND writes, and they cost nothing.
    entries = g.op("Transpose", g.op("NonZero", live, out="live_nonzero"), out="entries",
                   perm=[1, 0])  # (L, 1) positions in the batch
    live_slots = g.op("GatherND", g.op("Unsqueeze", slots, _axes(g, 1), out="slots_b1"), entries,
                      out="live_slots")  # (L, 1) slots in the pool
    q, k, v, mask, initial = (g.op("GatherND", name, entries, out=f"{name}_live")
                              for name in ("q", "k", "v", "mask", "has_initial_state"))
    # A new request in a reused slot starts from zero: the slot's junk (NaN, say) is selected
    # away with Where, never multiplied by 0.
    kv_slot = g.op("GatherND", "kv", live_slots, out="kv_slot")
    kv_start = g.op("Where", g.op("Unsqueeze", initial, _axes(g, 1, 2, 3), out="initial_b111"),
                    kv_slot, g.const("zero_f32", 0.0, np.float32), out="kv_start")
    count_start = g.op("Where", initial, g.op("GatherND", "count", live_slots, out="count_slot"),
                       g.const("zero_i64", 0), out="count_start")
    step = step_function(with_m=with_m)
    o_live, kv_live, count_live = g.inline(
        step, q, k, v, *(["m"] if with_m else []), mask, kv_start, count_start,
        outs=["o_live", "kv_live_next", "count_live_next"], prefix="step_")
    zeros = g.op("ConstantOfShape", g.op("Shape", "v", out="shape_o"), out="zeros_o_f32",
                 value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]))
    g.op("ScatterND", g.op("CastLike", zeros, "q", out="zeros_o"), entries, o_live, out="o")
    g.op("ScatterND", "kv", live_slots, kv_live, out="kv_next")
    g.op("ScatterND", "count", live_slots, count_live, out="count_next")
    inputs = (["q", "k", "v"] + (["m"] if with_m else [])
              + ["mask", "state_indices", "has_initial_state", "kv", "count"])
    outputs = ["o", "kv_next", "count_next"]
    doc = (f"Cottention step on a pool ({', '.join(inputs)}) -> ({', '.join(outputs)}); "
           "see cosattn.onnx")
    return helper.make_function(DOMAIN, _function_name("PoolStep", with_m), inputs, outputs,
                                g.nodes, [helper.make_opsetid("", OPSET)],
                                attribute_protos=[helper.make_attribute("eps", DEFAULT_EPS)],
                                doc_string=doc)


def _value(name: str, elem: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _check_options(H: int, Dk: int, Dv: int, dtype: str, m: Any, m_input: bool,
                   eps: float) -> int:
    """Validate the common builder options; return the ONNX element type of ``dtype``."""
    sizes = {"H": H, "Dk": Dk, "Dv": Dv}
    bad = {n: s for n, s in sizes.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise ValueError(f"H, Dk, Dv must be positive integers, got {bad}")
    if dtype not in _ELEM_TYPES:
        raise TypeError(f"dtype must be one of {sorted(_ELEM_TYPES)}, got {dtype!r}")
    if m is not None and m_input:
        raise ValueError("give m (an initializer) or m_input=True (a graph input), not both")
    if m is not None and np.shape(m) != (H,):
        raise ValueError(f"m must have shape (H,) = ({H},), got {np.shape(m)}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be a positive number, got {eps}")
    return _ELEM_TYPES[dtype]


def _stabiliser(H: int, m: Any, m_input: bool, inputs: list, inits: list) -> list[str]:
    """The ``m`` argument of a function call: a graph input, an initializer, or none."""
    if m_input:
        inputs.append(_value("m", TensorProto.FLOAT, [H]))
    elif m is not None:
        inits.append(numpy_helper.from_array(np.asarray(m, dtype=np.float32), "m"))
    return ["m"] if m_input or m is not None else []


def _model(g: _Nodes, name: str, inputs: list, outputs: list, inits: list,
           function: onnx.FunctionProto, doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=inits, doc_string=doc)
    return helper.make_model(graph, opset_imports=opset_imports(), functions=[function],
                             ir_version=IR_VERSION, producer_name="cosattn",
                             producer_version=__version__, doc_string=doc)


def attention_model(*, H: int, Dk: int, Dv: int, causal: bool = True, dtype: str = "float32",
                    m: Any = None, m_input: bool = False, mask: bool = False,
                    state: bool = False, chunk: int = DEFAULT_CHUNK,
                    eps: float = DEFAULT_EPS) -> onnx.ModelProto:
    """A model running the parallel operation (``cosattn.forward``) with dynamic B and S.

    Parameters
    ----------
    H, Dk, Dv : int
        Heads, key/query head size, value head size (fixed in the graph).
    causal : bool
        Causal (chunked ``Scan`` carrying the state) or bidirectional.
    dtype : {"float32", "float16"}
        Dtype of q, k, v and o; everything inside is computed in float32.
    m : array_like of shape (H,), optional
        Stabiliser logits stored in the model as a float32 initializer named ``m``.
    m_input : bool
        Take ``m`` (H,) float32 as a graph input instead. Neither ``m`` nor ``m_input``: no
        stabiliser (``w = 1``).
    mask : bool
        Take a ``mask`` (B, S) bool input (True where the token is real); else all are real.
    state : bool
        Causal only: take the incoming state ``kv0`` (B, H, Dv, Dk) float32 and ``count0`` (B,)
        int64, and return the outgoing ``kv`` and ``count`` after ``o``.
    chunk : int
        Chunk length C of the causal form (the largest score block is C x C).
    eps : float
        Norm floor of the cosine normalisation.

    Returns
    -------
    onnx.ModelProto
        Inputs ``q`` (B, H, S, Dk), ``k`` (B, H, S, Dk), ``v`` (B, H, S, Dv), then ``m``,
        ``mask``, ``kv0``, ``count0`` when asked for; outputs ``o`` (B, H, S, Dv), then ``kv``,
        ``count`` with ``state``. Opset :data:`OPSET`, IR version :data:`IR_VERSION`.

    Raises
    ------
    ValueError
        ``state=True`` with ``causal=False``, ``m`` and ``m_input`` together, ``m`` not of shape
        (H,), non-positive sizes, ``chunk`` or ``eps``.
    TypeError
        An unsupported ``dtype``.
    """
    elem = _check_options(H, Dk, Dv, dtype, m, m_input, eps)
    if state and not causal:
        raise ValueError("state=True needs causal=True: the bidirectional form has no state")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    g = _Nodes()
    inputs = [_value("q", elem, ["B", H, "S", Dk]), _value("k", elem, ["B", H, "S", Dk]),
              _value("v", elem, ["B", H, "S", Dv])]
    inits: list[onnx.TensorProto] = []
    args = ["q", "k", "v", *_stabiliser(H, m, m_input, inputs, inits), "mask"]
    batch = g.op("Shape", "q", out="shape_B", start=0, end=1)
    if mask:
        inputs.append(_value("mask", TensorProto.BOOL, ["B", "S"]))
    else:
        length = g.op("Shape", "q", out="shape_S", start=2, end=3)
        shape = g.op("Concat", batch, length, out="shape_BS", axis=0)
        g.op("ConstantOfShape", shape, out="mask", value=helper.make_tensor("", TensorProto.BOOL,
                                                                            [1], [True]))
    outputs = [_value("o", elem, ["B", H, "S", Dv])]
    attrs: dict[str, Any] = {"eps": float(eps)}
    if causal:
        args += ["kv0", "count0"]
        attrs["chunk"] = chunk
        state_values = [_value("kv0", TensorProto.FLOAT, ["B", H, Dv, Dk]),
                        _value("count0", TensorProto.INT64, ["B"])]
        if state:
            inputs += state_values
            outputs += [_value("kv", TensorProto.FLOAT, ["B", H, Dv, Dk]),
                        _value("count", TensorProto.INT64, ["B"])]
        else:
            kv_shape = g.op("Concat", batch, g.const("shape_HDvDk", [H, Dv, Dk]),
                            out="shape_kv", axis=0)
            g.op("ConstantOfShape", kv_shape, out="kv0",
                 value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]))
            g.op("ConstantOfShape", batch, out="count0",
                 value=helper.make_tensor("", TensorProto.INT64, [1], [0]))
    function = attention_function(causal=causal, with_m=m_input or m is not None)
    g.call(function, *args, outs=["o", "kv", "count"] if causal else ["o"], **attrs)
    kind = "causal" if causal else "bidirectional"
    return _model(g, f"cosattn_{kind}_attention", inputs, outputs, inits, function,
                  f"Cottention, {kind}, H={H} Dk={Dk} Dv={Dv}, {dtype}; see cosattn.onnx")


def step_model(*, H: int, Dk: int, Dv: int, dtype: str = "float32", m: Any = None,
               m_input: bool = False, mask: bool = False,
               eps: float = DEFAULT_EPS) -> onnx.ModelProto:
    """A model running one recurrent step (``RecurrentState.step``) with dynamic B.

    Parameters
    ----------
    H, Dk, Dv, dtype, m, m_input, eps
        As in :func:`attention_model`.
    mask : bool
        Take a ``mask`` (B,) bool input (False: the token of that row is padding).

    Returns
    -------
    onnx.ModelProto
        Inputs ``q`` (B, H, Dk), ``k`` (B, H, Dk), ``v`` (B, H, Dv), then ``m`` and ``mask``
        when asked for, then the state ``kv`` (B, H, Dv, Dk) float32 and ``count`` (B,) int64;
        outputs ``o`` (B, H, Dv) and the state after the token, ``kv_next`` and ``count_next``.
        Start from zeros; feed ``kv_next``/``count_next`` back as ``kv``/``count``.
    """
    elem = _check_options(H, Dk, Dv, dtype, m, m_input, eps)
    g = _Nodes()
    inputs = [_value("q", elem, ["B", H, Dk]), _value("k", elem, ["B", H, Dk]),
              _value("v", elem, ["B", H, Dv])]
    inits: list[onnx.TensorProto] = []
    args = ["q", "k", "v", *_stabiliser(H, m, m_input, inputs, inits), "mask", "kv", "count"]
    if mask:
        inputs.append(_value("mask", TensorProto.BOOL, ["B"]))
    else:
        batch = g.op("Shape", "q", out="shape_B", start=0, end=1)
        g.op("ConstantOfShape", batch, out="mask",
             value=helper.make_tensor("", TensorProto.BOOL, [1], [True]))
    inputs += [_value("kv", TensorProto.FLOAT, ["B", H, Dv, Dk]),
               _value("count", TensorProto.INT64, ["B"])]
    outputs = [_value("o", elem, ["B", H, Dv]),
               _value("kv_next", TensorProto.FLOAT, ["B", H, Dv, Dk]),
               _value("count_next", TensorProto.INT64, ["B"])]
    function = step_function(with_m=m_input or m is not None)
    g.call(function, *args, outs=["o", "kv_next", "count_next"], eps=float(eps))
    return _model(g, "cosattn_recurrent_step", inputs, outputs, inits, function,
                  f"Cottention recurrent step, H={H} Dk={Dk} Dv={Dv}, {dtype}; see cosattn.onnx")



def pool_step_model(*, H: int, Dk: int, Dv: int, P: int | None = None, dtype: str = "float32",
                    m: Any = None, m_input: bool = False, mask: bool = False,
                    index_dtype: str = "int64", eps: float = DEFAULT_EPS) -> onnx.ModelProto:
    """A model running one step on a pool of states (``StatePool.step``) with dynamic B.

    Parameters
    ----------
    H, Dk, Dv, dtype, m, m_input, eps
        As in :func:`attention_model`.
    P : int, optional
        Slots in the pool, fixed in the graph; dynamic (``"P"``) when None.
    mask : bool
        Take a ``mask`` (B,) bool input (False: the token of that entry is padding).
    index_dtype : {"int64", "int32"}
        Dtype of the ``state_indices`` input.

    Returns
    -------
    onnx.ModelProto
        Inputs ``q`` (B, H, Dk), ``k`` (B, H, Dk), ``v`` (B, H, Dv), then ``m`` and ``mask``
        when asked for, then ``state_indices`` (B,) (-1 for a padding entry),
        ``has_initial_state`` (B,) bool and the pool ``kv`` (P, H, Dv, Dk) float32 and
        ``count`` (P,) int64; outputs ``o`` (B, H, Dv) and the new pool ``kv_next``,
        ``count_next`` (see :func:`pool_step_function`). Start from a zero pool; feed
        ``kv_next``/``count_next`` back as ``kv``/``count``.
    """
    elem = _check_options(H, Dk, Dv, dtype, m, m_input, eps)
    if P is not None and (not isinstance(P, int) or P < 0):
        raise ValueError(f"P must be a non-negative integer or None, got {P!r}")
    if index_dtype not in _INDEX_TYPES:
        raise TypeError(f"index_dtype must be one of {sorted(_INDEX_TYPES)}, got {index_dtype!r}")
    pool = "P" if P is None else P
    g = _Nodes()
    inputs = [_value("q", elem, ["B", H, Dk]), _value("k", elem, ["B", H, Dk]),
              _value("v", elem, ["B", H, Dv])]
    inits: list[onnx.TensorProto] = []
    args = ["q", "k", "v", *_stabiliser(H, m, m_input, inputs, inits), "mask", "state_indices",
            "has_initial_state", "kv", "count"]
    if mask:
        inputs.append(_value("mask", TensorProto.BOOL, ["B"]))
    else:
        batch = g.op("Shape", "q", out="shape_B", start=0, end=1)
        g.op("ConstantOfShape", batch, out="mask",
             value=helper.make_tensor("", TensorProto.BOOL, [1], [True]))
    inputs += [_value("state_indices", _INDEX_TYPES[index_dtype], ["B"]),
               _value("has_initial_state", TensorProto.BOOL, ["B"]),
               _value("kv", TensorProto.FLOAT, [pool, H, Dv, Dk]),
               _value("count", TensorProto.INT64, [pool])]
    outputs = [_value("o", elem, ["B", H, Dv]),
               _value("kv_next", TensorProto.FLOAT, [pool, H, Dv, Dk]),
               _value("count_next", TensorProto.INT64, [pool])]
    function = pool_step_function(with_m=m_input or m is not None)
    g.call(function, *args, outs=["o", "kv_next", "count_next"], eps=float(eps))
    return _model(g, "cosattn_pool_step", inputs, outputs, inits, function,
                  f"Cottention step on a pool of states, H={H} Dk={Dk} Dv={Dv} P={pool}, "
                  f"{dtype}; see cosattn.onnx")
