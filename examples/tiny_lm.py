"""A tiny byte-level causal language model on Cottention, with a hand-written backward.

Everything is written against an array namespace ``xp`` (NumPy on the CPU, CuPy on CUDA): the
namespace is that of the parameters. Attention is :func:`cosattn.forward` and
:func:`cosattn.backward`; the other layers (embedding, layer norm, linear maps, GELU, the tied
output head, cross-entropy) have their backward written out here.

The model (pre-LN transformer, the output head tied to the embedding)::

    x = embed[tokens]                                        (B, S, D)
    for l in range(n_layers):                                # "layers.{l}." below
        h = layer_norm(x, ln1.g, ln1.b)
        s = h + mix * (shift(h) - h)                         shift(h)_t = h_{t-1}, 0 at t = 0
        q, k, v = s @ wq, s @ wk, s @ wv                     (B, S, D) seen as (B, S, H, Dh)
        x = x + cosattn.forward(q, k, v, m, causal=True, layout="bshd") @ wo
        h = layer_norm(x, ln2.g, ln2.b)
        x = x + gelu(h @ w1 + b1) @ w2 + b2
    logits = layer_norm(x, ln_f.g, ln_f.b) @ embed.T         (B, S, V)

``layer_norm(x, g, b) = (x - mean) / sqrt(var + 1e-5) * g + b`` over the last axis (biased
variance); ``gelu`` is the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``;
``m`` (H,) is each layer's learned per-head stabiliser logit, initialised to 0.5. Head ``h`` of
q, k, v is columns ``h*Dh:(h+1)*Dh``. Tokens are bytes (V = 256); text is UTF-8.

There are no positional embeddings: order reaches the model through the causal attention and the
token shift, a learned per-channel mix ``mix`` (D,) of each position with the one before it (as
in RWKV). It costs one (B, D) vector per layer in the recurrent form and lowers the loss of this
small model a lot (on the default data, 1.64 nats/byte after a 300-step run; without it the
same model stalled near 2.3).

Weights file (``.npz``, written by :func:`save`, read by :func:`load`; no pickled objects):

============================  ===========  ===================================================
name                          shape        meaning
============================  ===========  ===================================================
``config``                    () str       JSON of :class:`Config`: ``vocab`` V, ``d_model``
                                           D, ``n_heads`` H, ``n_layers``, ``d_mlp`` F
``embed``                     (V, D)       token embedding, also the output head
``layers.{l}.ln1.g``, ``.b``  (D,)         layer norm before attention
``layers.{l}.attn.wq``        (D, D)       query projection (``q = s @ wq``)
``layers.{l}.attn.wk``        (D, D)       key projection
``layers.{l}.attn.wv``        (D, D)       value projection
``layers.{l}.attn.wo``        (D, D)       output projection
``layers.{l}.attn.m``         (H,)         stabiliser logits
``layers.{l}.attn.mix``       (D,)         token-shift mix
``layers.{l}.ln2.g``, ``.b``  (D,)         layer norm before the MLP
``layers.{l}.mlp.w1``         (D, F)       MLP input weight; ``mlp.b1`` (F,) its bias
``layers.{l}.mlp.w2``         (F, D)       MLP output weight; ``mlp.b2`` (D,) its bias
``ln_f.g``, ``ln_f.b``        (D,)         final layer norm
============================  ===========  ===================================================

All weights share one float dtype (float32 from training). ``l`` runs over ``0..n_layers-1``.

Generation runs the same model as an RNN: :func:`prefill` runs :func:`forward` on the prompt
with ``return_state=True`` and keeps each layer's :class:`cosattn.RecurrentState` (and last
``h``, for the token shift); :func:`step` then feeds one token at a time through
:meth:`cosattn.RecurrentState.step`, in constant memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cosattn

Params = dict[str, Any]
LN_EPS = 1e-5
M_INIT = 0.5
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


@dataclass(frozen=True)
class Config:
    """Sizes of the model: vocabulary V, width D, heads H (D % H == 0), layers, MLP width F."""

    vocab: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 3
    d_mlp: int = 512

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def namespace(x: Any) -> Any:
    """NumPy for NumPy arrays, CuPy for CuPy arrays."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


# ----------------------------------------------------------------------------- parameters

def init_params(cfg: Config, rng: np.random.Generator, *, xp: Any = np,
                dtype: Any = np.float32) -> Params:
    """Random weights: N(0, 0.02) embedding, N(0, 1/fan_in) projections (residual outputs scaled
    by 1/sqrt(2 n_layers)), zero biases, unit layer-norm gains, ``m`` = 0.5."""
    D, F, H = cfg.d_model, cfg.d_mlp, cfg.n_heads
    residual = 1.0 / math.sqrt(2 * cfg.n_layers)

    def normal(std: float, *shape: int) -> np.ndarray:
        return std * rng.standard_normal(shape)

    p = {"embed": normal(0.02, cfg.vocab, D)}
    for l in range(cfg.n_layers):
        pre = f"layers.{l}."
        p[pre + "ln1.g"], p[pre + "ln1.b"] = np.ones(D), np.zeros(D)
        for name in ("wq", "wk", "wv"):
            p[pre + "attn." + name] = normal(D ** -0.5, D, D)
        p[pre + "attn.wo"] = normal(D ** -0.5 * residual, D, D)
        p[pre + "attn.m"] = np.full(H, M_INIT)
        p[pre + "attn.mix"] = np.full(D, 0.5)
        p[pre + "ln2.g"], p[pre + "ln2.b"] = np.ones(D), np.zeros(D)
        p[pre + "mlp.w1"], p[pre + "mlp.b1"] = normal(D ** -0.5, D, F), np.zeros(F)
        p[pre + "mlp.w2"], p[pre + "mlp.b2"] = normal(F ** -0.5 * residual, F, D), np.zeros(D)
    p["ln_f.g"], p["ln_f.b"] = np.ones(D), np.zeros(D)
    return {name: xp.asarray(a, dtype=dtype) for name, a in p.items()}


def save(path: str | Path, params: Params, cfg: Config) -> None:
    """Write ``params`` and ``cfg`` to an ``.npz`` file (format in the module docstring)."""
    arrays = {name: to_numpy(a) for name, a in params.items()}
    np.savez(path, config=np.array(json.dumps(asdict(cfg))), **arrays)


def load(path: str | Path, *, xp: Any = np) -> tuple[Params, Config]:
    """Read a file written by :func:`save`; the weights come back as ``xp`` arrays."""
    with np.load(path, allow_pickle=False) as f:
        cfg = Config(**json.loads(str(f["config"])))
        params = {name: xp.asarray(f[name]) for name in f.files if name != "config"}
    return params, cfg


# ----------------------------------------------------------------------------- layers

def layer_norm(x: Any, g: Any, b: Any) -> tuple[Any, tuple]:
    """``(x - mean) / sqrt(var + eps) * g + b`` over the last axis; returns ``(y, cache)``."""
    xp = namespace(x)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def layer_norm_backward(dy: Any, cache: tuple) -> tuple[Any, Any, Any]:
    """``(dx, dg, db)`` of :func:`layer_norm`."""
    xhat, rstd, g = cache
    D = xhat.shape[-1]
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    flat = dy.reshape(-1, D)
    return dx, (flat * xhat.reshape(-1, D)).sum(axis=0), flat.sum(axis=0)


def gelu(x: Any) -> tuple[Any, Any]:
    """GELU, tanh approximation; returns ``(y, t)``, ``t`` the tanh, for :func:`gelu_backward`."""
    xp = namespace(x)
    t = xp.tanh(GELU_C * x * (1.0 + GELU_A * x * x))
    return 0.5 * x * (1.0 + t), t


def gelu_backward(dy: Any, x: Any, t: Any) -> Any:
    return dy * (0.5 * (1.0 + t) + 0.5 * GELU_C * x * (1.0 - t * t) * (1.0 + 3 * GELU_A * x * x))


def linear(x: Any, w: Any) -> Any:
    """``x @ w`` for x (..., Din), w (Din, Dout), as one 2-D matmul."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape((*x.shape[:-1], w.shape[1]))


def linear_backward(dy: Any, x: Any, w: Any) -> tuple[Any, Any]:
    """``(dx, dw)`` of :func:`linear`."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = (dy2 @ w.T).reshape(x.shape)
    return dx, x.reshape(-1, x.shape[-1]).T @ dy2


def token_shift(h: Any, prev: Any, mix: Any) -> Any:
    """``h + mix * (shift(h) - h)``: each position mixed with the one before it.

    ``h`` (B, S, D); ``shift(h)_t = h_{t-1}``, with ``prev`` (B, D) standing before position 0
    (zeros for a fresh sequence); ``mix`` (D,).
    """
    xp = namespace(h)
    shifted = xp.concatenate([prev[:, None], h[:, :-1]], axis=1)
    return h + mix * (shifted - h)


def token_shift_backward(ds: Any, h: Any, mix: Any) -> tuple[Any, Any]:
    """``(dh, dmix)`` of :func:`token_shift` with ``prev`` = 0."""
    xp = namespace(h)
    shifted = xp.concatenate([xp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    dh = (1.0 - mix) * ds
    dh[:, :-1] += mix * ds[:, 1:]
    dmix = ((shifted - h) * ds).reshape(-1, h.shape[-1]).sum(axis=0)
    return dh, dmix


def attention(p: Params, pre: str, h: Any, cfg: Config, *,
              return_state: bool) -> tuple[Any, tuple, cosattn.RecurrentState | None]:
    """Causal Cottention of one layer on ``h`` (B, S, D); returns ``(out, cache, state)``."""
    B, S, D = h.shape
    mix = p[pre + "attn.mix"]
    s = token_shift(h, namespace(h).zeros_like(h[:, 0]), mix)
    heads = (B, S, cfg.n_heads, cfg.head_dim)
    q, k, v = (linear(s, p[pre + n]).reshape(heads) for n in ("attn.wq", "attn.wk", "attn.wv"))
    m = p[pre + "attn.m"]
    state = None
    if return_state:
        o, state = cosattn.forward(q, k, v, m, causal=True, layout="bshd", return_state=True)
    else:
        o = cosattn.forward(q, k, v, m, causal=True, layout="bshd")
    o = o.reshape(B, S, D)
    return linear(o, p[pre + "attn.wo"]), (h, s, q, k, v, o), state


def attention_backward(da: Any, p: Params, pre: str, cache: tuple, grads: Params) -> Any:
    """Add the attention weights' gradients to ``grads``; return the gradient of its input."""
    h, s, q, k, v, o = cache
    do, grads[pre + "attn.wo"] = linear_backward(da, o, p[pre + "attn.wo"])
    dq, dk, dv, dm = cosattn.backward(do.reshape(v.shape), q, k, v, p[pre + "attn.m"],
                                      causal=True, layout="bshd")
    grads[pre + "attn.m"] = dm.astype(p[pre + "attn.m"].dtype)
    ds = 0
    for name, d in (("attn.wq", dq), ("attn.wk", dk), ("attn.wv", dv)):
        ds_part, grads[pre + name] = linear_backward(d.reshape(s.shape), s, p[pre + name])
        ds = ds + ds_part
    dh, grads[pre + "attn.mix"] = token_shift_backward(ds, h, p[pre + "attn.mix"])
    return dh


def mlp(p: Params, pre: str, h: Any) -> tuple[Any, tuple]:
    """``gelu(h @ w1 + b1) @ w2 + b2``; returns ``(out, cache)``."""
    z = linear(h, p[pre + "mlp.w1"]) + p[pre + "mlp.b1"]
    a, t = gelu(z)
    return linear(a, p[pre + "mlp.w2"]) + p[pre + "mlp.b2"], (h, z, t, a)


def mlp_backward(dy: Any, p: Params, pre: str, cache: tuple, grads: Params) -> Any:
    h, z, t, a = cache
    da, grads[pre + "mlp.w2"] = linear_backward(dy, a, p[pre + "mlp.w2"])
    grads[pre + "mlp.b2"] = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    dz = gelu_backward(da, z, t)
    dh, grads[pre + "mlp.w1"] = linear_backward(dz, h, p[pre + "mlp.w1"])
    grads[pre + "mlp.b1"] = dz.reshape(-1, dz.shape[-1]).sum(axis=0)
    return dh


# ----------------------------------------------------------------------------- the model

@dataclass
class Tape:
    """What :func:`forward` keeps for :func:`backward`, and the layers' outgoing states."""

    tokens: Any
    layers: list[tuple] = field(default_factory=list)
    final: tuple = ()
    states: list[cosattn.RecurrentState] = field(default_factory=list)


def forward(params: Params, cfg: Config, tokens: Any, *,
            return_state: bool = False) -> tuple[Any, Tape]:
    """Logits (B, S, V) for integer ``tokens`` (B, S), and the :class:`Tape` for :func:`backward`.

    With ``return_state`` the tape also holds each layer's :class:`cosattn.RecurrentState`.
    """
    tape = Tape(tokens)
    x = params["embed"][tokens]
    for l in range(cfg.n_layers):
        pre = f"layers.{l}."
        h, ln1 = layer_norm(x, params[pre + "ln1.g"], params[pre + "ln1.b"])
        a, att, state = attention(params, pre, h, cfg, return_state=return_state)
        x = x + a
        h, ln2 = layer_norm(x, params[pre + "ln2.g"], params[pre + "ln2.b"])
        f, ff = mlp(params, pre, h)
        x = x + f
        tape.layers.append((ln1, att, ln2, ff))
        if state is not None:
            tape.states.append(state)
    hf, lnf = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    tape.final = (hf, lnf)
    return linear(hf, params["embed"].T), tape


def backward(params: Params, cfg: Config, tape: Tape, dlogits: Any) -> Params:
    """Gradients of every weight, given ``dlogits`` (B, S, V) = dL/dlogits of :func:`forward`."""
    grads: Params = {}
    hf, lnf = tape.final
    dhf, dembed_t = linear_backward(dlogits, hf, params["embed"].T)
    dx, grads["ln_f.g"], grads["ln_f.b"] = layer_norm_backward(dhf, lnf)
    for l in reversed(range(cfg.n_layers)):
        pre = f"layers.{l}."
        ln1, att, ln2, ff = tape.layers[l]
        dh = mlp_backward(dx, params, pre, ff, grads)
        dh, grads[pre + "ln2.g"], grads[pre + "ln2.b"] = layer_norm_backward(dh, ln2)
        dx = dx + dh
        dh = attention_backward(dx, params, pre, att, grads)
        dh, grads[pre + "ln1.g"], grads[pre + "ln1.b"] = layer_norm_backward(dh, ln1)
        dx = dx + dh
    xp = namespace(dx)
    onehot = (tape.tokens.reshape(-1, 1) == xp.arange(cfg.vocab)).astype(dx.dtype)
    grads["embed"] = dembed_t.T + onehot.T @ dx.reshape(-1, cfg.d_model)
    return grads


def cross_entropy(logits: Any, targets: Any) -> tuple[Any, Any]:
    """Mean negative log-likelihood (nats per token) of ``targets`` (B, S), and dL/dlogits."""
    xp = namespace(logits)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
    onehot = (targets[..., None] == xp.arange(logits.shape[-1])).astype(logits.dtype)
    loss = -(logp * onehot).sum() / targets.size
    return loss, (xp.exp(logp) - onehot) / targets.size


def loss_and_grads(params: Params, cfg: Config, inputs: Any, targets: Any) -> tuple[float, Params]:
    """Cross-entropy of predicting ``targets`` from ``inputs`` (both (B, S)) and its gradients."""
    logits, tape = forward(params, cfg, inputs)
    loss, dlogits = cross_entropy(logits, targets)
    return float(loss), backward(params, cfg, tape, dlogits)


def evaluate(params: Params, cfg: Config, batches: list[tuple[Any, Any]]) -> float:
    """Mean cross-entropy (nats per byte) over ``batches`` of ``(inputs, targets)``."""
    total = 0.0
    for inputs, targets in batches:
        logits, _ = forward(params, cfg, inputs)
        total += float(cross_entropy(logits, targets)[0])
    return total / len(batches)


# ----------------------------------------------------------------------------- recurrent form

@dataclass
class LayerState:
    """One layer's memory in the recurrent form: the attention state and the last ``h`` (B, D)
    that the token shift mixes into the next position."""

    attn: cosattn.RecurrentState
    prev: Any

    @property
    def nbytes(self) -> int:
        return int(self.attn.kv.nbytes + self.attn.count.nbytes + self.prev.nbytes)


def prefill(params: Params, cfg: Config, tokens: Any) -> tuple[Any, list[LayerState]]:
    """Run the prompt ``tokens`` (B, S) in parallel; return the last logits (B, V) and the
    layers' states, ready for :func:`step`."""
    logits, tape = forward(params, cfg, tokens, return_state=True)
    prevs = [att[0][:, -1].copy() for _, att, _, _ in tape.layers]
    return logits[:, -1], [LayerState(a, h) for a, h in zip(tape.states, prevs, strict=True)]


def step(params: Params, cfg: Config, token: Any, states: list[LayerState]) -> Any:
    """Feed one token per row (B,) through the recurrent form; return its logits (B, V).

    ``states`` (one per layer, from :func:`prefill`) are updated in place.
    """
    x = params["embed"][token]
    B = x.shape[0]
    heads = (B, cfg.n_heads, cfg.head_dim)
    for l, state in enumerate(states):
        pre = f"layers.{l}."
        h, _ = layer_norm(x, params[pre + "ln1.g"], params[pre + "ln1.b"])
        s = h + params[pre + "attn.mix"] * (state.prev - h)
        state.prev = h
        q, k, v = ((s @ params[pre + n]).reshape(heads) for n in ("attn.wq", "attn.wk", "attn.wv"))
        o = state.attn.step(q, k, v, params[pre + "attn.m"])
        x = x + o.reshape(B, cfg.d_model) @ params[pre + "attn.wo"]
        h, _ = layer_norm(x, params[pre + "ln2.g"], params[pre + "ln2.b"])
        x = x + mlp(params, pre, h)[0]
    hf, _ = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return hf @ params["embed"].T


def sample(logits: Any, temperature: float, rng: np.random.Generator | None) -> np.ndarray:
    """Next tokens (B,) int64 on the CPU from ``logits`` (B, V): the most likely one when
    ``temperature`` is 0, else a draw from ``softmax(logits / temperature)``."""
    z = to_numpy(logits).astype(np.float64)
    if temperature == 0:
        return z.argmax(axis=-1)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng")
    z = (z - z.max(axis=-1, keepdims=True)) / temperature
    cdf = np.cumsum(np.exp(z), axis=-1)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), z.shape[-1] - 1)


def generate(params: Params, cfg: Config, prompt: Any, n: int, *, temperature: float = 0.0,
             rng: np.random.Generator | None = None,
             ) -> Iterator[tuple[np.ndarray, list[LayerState]]]:
    """Continue ``prompt`` (B, S0) tokens by ``n`` tokens through :func:`prefill` and :func:`step`.

    Yields ``(token, states)`` per new token: ``token`` (B,) int64 NumPy, ``states`` the layers'
    states, which have absorbed every token before it (``states[0].attn.count``).
    """
    xp = namespace(params["embed"])
    logits, states = prefill(params, cfg, prompt)
    for i in range(n):
        token = sample(logits, temperature, rng)
        yield token, states
        if i + 1 < n:
            logits = step(params, cfg, xp.asarray(token), states)


# ----------------------------------------------------------------------------- training

class Adam:
    """Adam (Kingma & Ba) with bias correction; moments kept in the dtype of each weight."""

    def __init__(self, params: Params, *, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8) -> None:
        xp = namespace(params["embed"])
        self.betas, self.eps, self.t = betas, eps, 0
        self.m1 = {n: xp.zeros_like(a) for n, a in params.items()}
        self.m2 = {n: xp.zeros_like(a) for n, a in params.items()}

    def update(self, params: Params, grads: Params, lr: float) -> None:
        """One step of size ``lr``, changing ``params`` in place."""
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        xp = namespace(params["embed"])
        for name, g in grads.items():
            m1, m2 = self.m1[name], self.m2[name]
            m1 *= b1
            m1 += (1.0 - b1) * g
            m2 *= b2
            m2 += (1.0 - b2) * g * g
            params[name] -= (lr / c1) * m1 / (xp.sqrt(m2 / c2) + self.eps)


def clip_grads(grads: Params, max_norm: float) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm."""
    norm = math.sqrt(float(sum((g * g).sum() for g in grads.values())))  # one device sync
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def learning_rate(i: int, steps: int, peak: float, warmup: int) -> float:
    """Rate at step ``i`` of ``steps``: linear warm-up to ``peak`` over ``warmup`` steps, then
    cosine decay to ``peak / 10``."""
    if i < warmup:
        return peak * (i + 1) / warmup
    t = (i - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * t)))


class TextData:
    """A byte file cut into a training part and a validation part (the last ``val_fraction``).

    Batches are windows of ``context + 1`` bytes: inputs are the first ``context``, targets the
    last ``context``, as int64 ``xp`` arrays (B, context).
    """

    def __init__(self, path: str | Path, context: int, *, val_fraction: float = 0.1,
                 xp: Any = np) -> None:
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int64)
        split = int(len(data) * (1.0 - val_fraction))
        self.train, self.val = data[:split], data[split:]
        if min(len(self.train), len(self.val)) <= context:
            raise ValueError(f"{path}: too short for windows of {context + 1} bytes")
        self.context, self.xp = context, xp

    def _windows(self, data: np.ndarray, starts: np.ndarray) -> tuple[Any, Any]:
        rows = data[starts[:, None] + np.arange(self.context + 1)]
        return self.xp.asarray(rows[:, :-1]), self.xp.asarray(rows[:, 1:])

    def batch(self, rng: np.random.Generator, B: int) -> tuple[Any, Any]:
        """B windows at random places in the training part."""
        return self._windows(self.train, rng.integers(0, len(self.train) - self.context, size=B))

    def val_batches(self, B: int, n: int) -> list[tuple[Any, Any]]:
        """Up to ``n`` batches of B windows spread evenly over the validation part (fixed)."""
        count = min(B * n, (len(self.val) - 1) // self.context)
        starts = np.linspace(0, len(self.val) - self.context - 1, count).astype(np.int64)
        return [self._windows(self.val, starts[i:i + B]) for i in range(0, count, B)]
