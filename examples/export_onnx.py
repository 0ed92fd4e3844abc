"""Export the tiny language model (examples/tiny_lm.py) to ONNX: a prefill graph and a step graph.

The two graphs are the model of ``tiny_lm.py`` written with standard ONNX operators, calling the
Cottention functions of :mod:`cosattn.onnx` (domain ``cosattn``) for attention; the weights of
the ``.npz`` file become initializers under the same names. With L layers, H heads and head size
Dh = D / H:

* prefill (``tiny_lm_prefill.onnx``): ``tokens`` (B, S) int64 -> ``logits`` (B, S, V) float32
  and, for each layer l, its state after the prompt: the attention state ``kv.{l}``
  (B, H, Dh, Dh) float32 and ``count.{l}`` (B,) int64, and the token shift's last input
  ``prev.{l}`` (B, D) float32. Attention is ``CausalAttention`` (chunked, causal).
* step (``tiny_lm_step.onnx``): ``token`` (B,) int64 and the states ``kv.{l}``, ``count.{l}``,
  ``prev.{l}`` -> ``logits`` (B, V) and the states after the token, ``kv_next.{l}``,
  ``count_next.{l}``, ``prev_next.{l}``. Attention is ``RecurrentStep``: constant memory and
  work per token.

B and S are dynamic::

    python examples/export_onnx.py                      # examples/tiny_lm.npz -> examples/*.onnx
    python examples/export_onnx.py --weights w.npz --out-dir /tmp

``python examples/generate_onnx.py`` runs the exported graphs in ONNX Runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cosattn import onnx as cosattn_onnx

import tiny_lm

HERE = Path(__file__).resolve().parent
PREFILL_FILE = "tiny_lm_prefill.onnx"
STEP_FILE = "tiny_lm_step.onnx"


class _Graph:
    """Nodes and initializers of one graph; :meth:`op` appends a node and returns its output."""

    def __init__(self, params: tiny_lm.Params) -> None:
        self.params = params
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}

    def op(self, op_type: str, *inputs: str, out: str | list[str], domain: str = "",
           **attrs: Any) -> Any:
        outs = [out] if isinstance(out, str) else out
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return out

    def weight(self, name: str) -> str:
        """The model weight ``name`` as a float32 initializer (added on first use)."""
        if name not in self.initializers:
            array = np.asarray(tiny_lm.to_numpy(self.params[name]), dtype=np.float32)
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def const(self, name: str, values: int | list[int]) -> str:
        """An int64 initializer (shapes, axes, indices)."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(values, np.int64), name)
        return name


def _layer_norm(g: _Graph, x: str, pre: str, out: str) -> str:
    """``tiny_lm.layer_norm`` over the last axis with the weights ``{pre}.g`` and ``{pre}.b``."""
    return g.op("LayerNormalization", x, g.weight(pre + ".g"), g.weight(pre + ".b"), out=out,
                axis=-1, epsilon=tiny_lm.LN_EPS)


def _linear(g: _Graph, x: str, w: str, out: str, bias: str | None = None) -> str:
    """``x @ w`` (+ ``bias``) for x (..., Din) and the weight w (Din, Dout)."""
    y = g.op("MatMul", x, g.weight(w), out=out if bias is None else out + "_nobias")
    return y if bias is None else g.op("Add", y, g.weight(bias), out=out)


class _Prefill:
    """How a block sees the sequence in the prefill graph: (B, S, D), chunked causal attention."""

    def __init__(self, g: _Graph, cfg: tiny_lm.Config, chunk: int) -> None:
        self.g, self.cfg, self.chunk = g, cfg, chunk
        self.function = cosattn_onnx.attention_function(causal=True)
        batch = g.op("Shape", "tokens", out="shape_B", start=0, end=1)
        g.op("ConstantOfShape", g.op("Shape", "tokens", out="shape_BS"), out="mask",
             value=helper.make_tensor("", TensorProto.BOOL, [1], [True]))
        g.op("ConstantOfShape", batch, out="count_zero",
             value=helper.make_tensor("", TensorProto.INT64, [1], [0]))
        kv_shape = g.op("Concat", batch, g.const("shape_HDhDh", [cfg.n_heads, cfg.head_dim,
                                                                  cfg.head_dim]),
                        out="shape_kv", axis=0)
        g.op("ConstantOfShape", kv_shape, out="kv_zero",
             value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0]))

    def shifted(self, h: str, l: int) -> str:
        """``shift(h)`` (B, S, D): h one position later, zeros first; outputs ``prev.{l}``, the
        last position's h (B, D)."""
        g = self.g
        g.op("Gather", h, g.const("last", -1), out=f"prev.{l}", axis=1)
        padded = g.op("Pad", h, g.const("pads_shift", [0, 1, 0, 0, 0, 0]),
                      out=f"layers.{l}.h1_padded")
        return g.op("Slice", padded, g.const("zero", [0]), g.const("minus_one", [-1]),
                    g.const("axis_1", [1]), out=f"layers.{l}.h1_shifted")

    def attend(self, q: str, k: str, v: str, l: int) -> str:
        """Heads of (B, S, D) q, k, v through ``CausalAttention``; outputs ``kv.{l}``,
        ``count.{l}``; returns (B, S, D)."""
        g, H, Dh = self.g, self.cfg.n_heads, self.cfg.head_dim
        heads = []
        for name in (q, k, v):  # (B, S, D) -> (B, S, H, Dh) -> (B, H, S, Dh)
            split = g.op("Reshape", name, g.const("shape_BSHDh", [0, 0, H, Dh]),
                         out=f"{name}_split")
            heads.append(g.op("Transpose", split, out=f"{name}_heads", perm=[0, 2, 1, 3]))
        o = f"layers.{l}.o_heads"
        g.op(self.function.name, *heads, g.weight(f"layers.{l}.attn.m"), "mask", "kv_zero",
             "count_zero", out=[o, f"kv.{l}", f"count.{l}"], domain=cosattn_onnx.DOMAIN,
             chunk=self.chunk)
        merged = g.op("Transpose", o, out=f"layers.{l}.o_merged", perm=[0, 2, 1, 3])
        return g.op("Reshape", merged, g.const("shape_BSD", [0, 0, self.cfg.d_model]),
                    out=f"layers.{l}.o")


class _Step:
    """How a block sees one token in the step graph: (B, D), the recurrent step."""

    def __init__(self, g: _Graph, cfg: tiny_lm.Config) -> None:
        self.g, self.cfg = g, cfg
        self.function = cosattn_onnx.step_function()
        g.op("ConstantOfShape", g.op("Shape", "token", out="shape_B"), out="mask",
             value=helper.make_tensor("", TensorProto.BOOL, [1], [True]))

    def shifted(self, h: str, l: int) -> str:
        """``prev.{l}``, the previous token's h (B, D); outputs ``prev_next.{l}`` = h."""
        self.g.op("Identity", h, out=f"prev_next.{l}")
        return f"prev.{l}"

    def attend(self, q: str, k: str, v: str, l: int) -> str:
        """Heads of (B, D) q, k, v through ``RecurrentStep`` with the state ``kv.{l}``,
        ``count.{l}``; outputs ``kv_next.{l}``, ``count_next.{l}``; returns (B, D)."""
        g, H, Dh = self.g, self.cfg.n_heads, self.cfg.head_dim
        heads = [g.op("Reshape", name, g.const("shape_BHDh", [0, H, Dh]), out=f"{name}_heads")
                 for name in (q, k, v)]  # (B, D) -> (B, H, Dh)
        o = f"layers.{l}.o_heads"
        g.op(self.function.name, *heads, g.weight(f"layers.{l}.attn.m"), "mask", f"kv.{l}",
             f"count.{l}", out=[o, f"kv_next.{l}", f"count_next.{l}"],
             domain=cosattn_onnx.DOMAIN)
        return g.op("Reshape", o, g.const("shape_BD", [0, self.cfg.d_model]),
                    out=f"layers.{l}.o")


def _block(g: _Graph, x: str, l: int, form: _Prefill | _Step) -> str:
    """One pre-LN block (``tiny_lm`` docstring) on ``x`` (..., D) in the given form."""
    pre = f"layers.{l}."
    h = _layer_norm(g, x, pre + "ln1", out=f"{pre}h1")
    shift = g.op("Sub", form.shifted(h, l), h, out=f"{pre}shift_delta")
    mixed = g.op("Mul", g.weight(pre + "attn.mix"), shift, out=f"{pre}shift_mixed")
    s = g.op("Add", h, mixed, out=f"{pre}s")
    q, k, v = (_linear(g, s, pre + f"attn.w{n}", out=f"{pre}{n}") for n in "qkv")
    a = _linear(g, form.attend(q, k, v, l), pre + "attn.wo", out=f"{pre}attn_out")
    x = g.op("Add", x, a, out=f"{pre}x_attn")
    h = _layer_norm(g, x, pre + "ln2", out=f"{pre}h2")
    z = _linear(g, h, pre + "mlp.w1", out=f"{pre}z", bias=pre + "mlp.b1")
    act = g.op("Gelu", z, out=f"{pre}gelu", approximate="tanh")
    f = _linear(g, act, pre + "mlp.w2", out=f"{pre}mlp_out", bias=pre + "mlp.b2")
    return g.op("Add", x, f, out=f"{pre}x_out")


def _head(g: _Graph, x: str) -> str:
    """Final layer norm and the tied output head: ``logits = ln_f(x) @ embedᵀ``."""
    hf = _layer_norm(g, x, "ln_f", out="h_final")
    embed_t = g.op("Transpose", g.weight("embed"), out="embed_t", perm=[1, 0])
    return g.op("MatMul", hf, embed_t, out="logits")


def _state_values(cfg: tiny_lm.Config, suffix: str = "") -> list[onnx.ValueInfoProto]:
    """Each layer's ``kv{suffix}.{l}``, ``count{suffix}.{l}`` and ``prev{suffix}.{l}``."""
    H, Dh, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    values = []
    for l in range(cfg.n_layers):
        values += [
            helper.make_tensor_value_info(f"kv{suffix}.{l}", TensorProto.FLOAT, ["B", H, Dh, Dh]),
            helper.make_tensor_value_info(f"count{suffix}.{l}", TensorProto.INT64, ["B"]),
            helper.make_tensor_value_info(f"prev{suffix}.{l}", TensorProto.FLOAT, ["B", D]),
        ]
    return values


def _model(g: _Graph, name: str, inputs: list, outputs: list, function: onnx.FunctionProto,
           doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs,
                              initializer=list(g.initializers.values()), doc_string=doc)
    return helper.make_model(graph, opset_imports=cosattn_onnx.opset_imports(),
                             functions=[function], ir_version=cosattn_onnx.IR_VERSION,
                             producer_name="cosattn examples/export_onnx.py", doc_string=doc)


def prefill_model(params: tiny_lm.Params, cfg: tiny_lm.Config, *,
                  chunk: int = cosattn_onnx.DEFAULT_CHUNK) -> onnx.ModelProto:
    """``tiny_lm.prefill`` as ONNX: ``tokens`` (B, S) -> ``logits`` (B, S, V) and each layer's
    state after the prompt, ``kv.{l}``, ``count.{l}``, ``prev.{l}``."""
    g = _Graph(params)
    form = _Prefill(g, cfg, chunk)
    x = g.op("Gather", g.weight("embed"), "tokens", out="x_embed", axis=0)
    for l in range(cfg.n_layers):
        x = _block(g, x, l, form)
    _head(g, x)
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "S"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", cfg.vocab])]
    return _model(g, "tiny_lm_prefill", inputs, outputs + _state_values(cfg), form.function,
                  f"tiny_lm prefill, {cfg}")


def step_model(params: tiny_lm.Params, cfg: tiny_lm.Config) -> onnx.ModelProto:
    """``tiny_lm.step`` as ONNX: ``token`` (B,) and each layer's ``kv.{l}``, ``count.{l}``,
    ``prev.{l}`` -> ``logits`` (B, V) and ``kv_next.{l}``, ``count_next.{l}``,
    ``prev_next.{l}``."""
    g = _Graph(params)
    form = _Step(g, cfg)
    x = g.op("Gather", g.weight("embed"), "token", out="x_embed", axis=0)
    for l in range(cfg.n_layers):
        x = _block(g, x, l, form)
    _head(g, x)
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, ["B"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", cfg.vocab])]
    return _model(g, "tiny_lm_step", inputs + _state_values(cfg),
                  outputs + _state_values(cfg, "_next"), form.function, f"tiny_lm step, {cfg}")


def export(weights: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write the prefill and step graphs of the weights file ``weights`` into ``out_dir``."""
    params, cfg = tiny_lm.load(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / PREFILL_FILE, out_dir / STEP_FILE
    for model, path in zip((prefill_model(params, cfg), step_model(params, cfg)), paths,
                           strict=True):
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", type=Path, default=HERE / "tiny_lm.npz",
                    help="weights written by train_tiny_lm.py")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where the .onnx files go")
    args = ap.parse_args()
    for path in export(args.weights, args.out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
