"""Serve the tiny Cottention language model to many requests at once: continuous batching.

Requests with prompts of different lengths arrive over time. Each one gets a free slot of a
:class:`cosattn.StatePool` (one pool per layer, plus the token shift's last vector per slot).
New requests are prefilled together, their prompts packed back to back (``cu_seqlens``,
``state_indices``, ``has_initial_state=False``: a reused slot forgets its last request); then
every active request is decoded together, one byte per step, as a fixed batch of one entry per
slot with ``-1`` for free slots. A request that has its bytes leaves and frees its slot for the
next. Decoding is greedy, so each request's text is what ``generate.py --temperature 0`` prints
for its prompt alone::

    python examples/train_tiny_lm.py          # writes examples/tiny_lm.npz
    python examples/serve.py --requests 16 --slots 4

It prints each request's text as it finishes, then the throughput and the pool's memory.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cosattn

import tiny_lm

HERE = Path(__file__).resolve().parent


@dataclass
class Request:
    """A prompt that arrives at decode step ``arrival`` and wants ``tokens`` bytes back."""

    number: int
    prompt: bytes
    tokens: int
    arrival: int
    slot: int = -1
    out: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.out) == self.tokens

    @property
    def text(self) -> str:
        return (self.prompt + bytes(self.out)).decode("utf-8", errors="replace")


@dataclass
class Server:
    """The model and, per layer, a pool of attention states and the token shift's last ``h``
    (P, D) of every slot."""

    params: tiny_lm.Params
    cfg: tiny_lm.Config
    pools: list[cosattn.StatePool]
    prevs: list[np.ndarray]

    @classmethod
    def empty(cls, params: tiny_lm.Params, cfg: tiny_lm.Config, slots: int) -> Server:
        dtype = params["embed"].dtype
        Dh = cfg.head_dim
        pools = [cosattn.StatePool.zeros(slots, cfg.n_heads, Dh, Dh,
                                         dtype=np.float64 if dtype == np.float64 else None)
                 for _ in range(cfg.n_layers)]
        prevs = [np.zeros((slots, cfg.d_model), dtype) for _ in range(cfg.n_layers)]
        return cls(params, cfg, pools, prevs)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools) + sum(p.nbytes for p in self.prevs)

    def prefill(self, prompts: list[bytes], slots: np.ndarray) -> np.ndarray:
        """Run the prompts, packed into one row, into their (reused) slots; return each
        prompt's last logits (N, V)."""
        p, cfg = self.params, self.cfg
        cu = np.concatenate(([0], np.cumsum([len(t) for t in prompts]))).astype(np.int64)
        tokens = np.frombuffer(b"".join(prompts), dtype=np.uint8).astype(np.int64)
        starts, lasts = cu[:-1], cu[1:] - 1
        fresh = np.zeros(len(prompts), dtype=bool)  # new requests: no initial state
        T = len(tokens)
        x = p["embed"][tokens][None]  # (1, T, D)
        for l in range(cfg.n_layers):
            pre = f"layers.{l}."
            h, _ = tiny_lm.layer_norm(x, p[pre + "ln1.g"], p[pre + "ln1.b"])
            shifted = np.concatenate([np.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
            shifted[:, starts] = 0  # the shift does not cross into the previous prompt
            s = h + p[pre + "attn.mix"] * (shifted - h)
            q, k, v = (tiny_lm.linear(s, p[pre + n]).reshape(1, T, cfg.n_heads, cfg.head_dim)
                       for n in ("attn.wq", "attn.wk", "attn.wv"))
            o = self.pools[l].prefill(q, k, v, p[pre + "attn.m"], cu_seqlens=cu,
                                      state_indices=slots, has_initial_state=fresh,
                                      layout="bshd")
            x = x + tiny_lm.linear(o.reshape(1, T, cfg.d_model), p[pre + "attn.wo"])
            h2, _ = tiny_lm.layer_norm(x, p[pre + "ln2.g"], p[pre + "ln2.b"])
            x = x + tiny_lm.mlp(p, pre, h2)[0]
            self.prevs[l][slots] = h[0, lasts]
        hf, _ = tiny_lm.layer_norm(x[0, lasts], p["ln_f.g"], p["ln_f.b"])
        return hf @ p["embed"].T

    def decode(self, tokens: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One byte for each entry of a fixed batch (B,), entry b in slot ``slots[b]`` (-1: a
        free place, whose logits mean nothing); returns the logits (B, V)."""
        p, cfg = self.params, self.cfg
        live = slots >= 0
        B = len(tokens)
        x = p["embed"][tokens]
        for l in range(cfg.n_layers):
            pre = f"layers.{l}."
            h, _ = tiny_lm.layer_norm(x, p[pre + "ln1.g"], p[pre + "ln1.b"])
            prev = np.where(live[:, None], self.prevs[l][np.where(live, slots, 0)], 0)
            s = h + p[pre + "attn.mix"] * (prev - h)
            self.prevs[l][slots[live]] = h[live]
            q, k, v = ((s @ p[pre + n]).reshape(B, cfg.n_heads, cfg.head_dim)
                       for n in ("attn.wq", "attn.wk", "attn.wv"))
            o = self.pools[l].step(q, k, v, p[pre + "attn.m"], state_indices=slots)
            x = x + o.reshape(B, cfg.d_model) @ p[pre + "attn.wo"]
            h2, _ = tiny_lm.layer_norm(x, p[pre + "ln2.g"], p[pre + "ln2.b"])
            x = x + tiny_lm.mlp(p, pre, h2)[0]
        hf, _ = tiny_lm.layer_norm(x, p["ln_f.g"], p["ln_f.b"])
        return hf @ p["embed"].T


def make_requests(text: bytes, n: int, rng: np.random.Generator, *, prompt_bytes: tuple[int, int],
                  tokens: tuple[int, int], gap: int) -> list[Request]:
    """``n`` prompts cut from ``text`` at random places, of random lengths and wanted bytes,
    arriving 0 to ``gap`` decode steps after one another."""
    requests, arrival = [], 0
    for i in range(n):
        length = int(rng.integers(prompt_bytes[0], prompt_bytes[1] + 1))
        start = int(rng.integers(0, len(text) - length))
        requests.append(Request(i, text[start:start + length],
                                int(rng.integers(tokens[0], tokens[1] + 1)), arrival))
        arrival += int(rng.integers(0, gap + 1))
    return requests


def serve(server: Server, requests: list[Request], *, report: Any = print) -> dict[str, Any]:
    """Run every request to its end; ``report(request)`` is called as each one finishes."""
    P = len(server.prevs[0])
    waiting = deque(sorted(requests, key=lambda r: r.arrival))
    owner: list[Request | None] = [None] * P
    step = steps = generated = prefilled = 0
    start = time.perf_counter()

    def emit(request: Request, logits: np.ndarray) -> None:
        nonlocal generated
        request.out.append(int(tiny_lm.sample(logits[None], 0.0, None)[0]))
        generated += 1
        if request.done:
            owner[request.slot] = None
            report(request)

    while waiting or any(owner):
        if not any(owner) and waiting[0].arrival > step:
            step = waiting[0].arrival  # nothing to decode: skip ahead to the next arrival
        free = [s for s in range(P) if owner[s] is None]
        admitted = []
        while waiting and waiting[0].arrival <= step and len(admitted) < len(free):
            request = waiting.popleft()
            request.slot = free[len(admitted)]
            owner[request.slot] = request
            admitted.append(request)
        if admitted:
            logits = server.prefill([r.prompt for r in admitted],
                                    np.array([r.slot for r in admitted], dtype=np.int64))
            prefilled += sum(len(r.prompt) for r in admitted)
            for request, row in zip(admitted, logits, strict=True):
                emit(request, row)
        if any(owner):
            slots = np.array([s if r is not None else -1 for s, r in enumerate(owner)],
                             dtype=np.int64)
            tokens = np.array([r.out[-1] if r is not None else 0 for r in owner],
                              dtype=np.int64)
            logits = server.decode(tokens, slots)
            for s, request in enumerate(list(owner)):
                if request is not None:
                    emit(request, logits[s])
            steps += 1
        step += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "generated": generated, "prefilled": prefilled,
            "decode_steps": steps}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", type=Path, default=HERE / "tiny_lm.npz",
                    help="weights written by train_tiny_lm.py")
    ap.add_argument("--text", type=Path, default=HERE / "data" / "kjv.txt",
                    help="text the prompts are cut from")
    ap.add_argument("--requests", type=int, default=16, help="requests to serve")
    ap.add_argument("--slots", type=int, default=4, help="slots in the pool (P)")
    ap.add_argument("--prompt-bytes", type=int, nargs=2, default=(8, 160), metavar=("MIN", "MAX"),
                    help="range of prompt lengths")
    ap.add_argument("--tokens", type=int, nargs=2, default=(20, 120), metavar=("MIN", "MAX"),
                    help="range of bytes each request wants")
    ap.add_argument("--gap", type=int, default=8, help="most decode steps between two arrivals")
    ap.add_argument("--json", type=Path, help="also write every request and its text here")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    params, cfg = tiny_lm.load(args.weights)
    rng = np.random.default_rng(args.seed)
    requests = make_requests(args.text.read_bytes(), args.requests, rng,
                             prompt_bytes=tuple(args.prompt_bytes), tokens=tuple(args.tokens),
                             gap=args.gap)
    server = Server.empty(params, cfg, args.slots)

    def report(r: Request) -> None:
        print(f"request {r.number:3d}  slot {r.slot}  arrived at step {r.arrival:4d}  "
              f"{len(r.prompt):4d} + {r.tokens:4d} bytes: {r.text!r}", flush=True)

    stats = serve(server, requests, report=report)
    print(f"\n{len(requests)} requests on {args.slots} slots: {stats['prefilled']:,} prompt bytes "
          f"prefilled, {stats['generated']:,} bytes generated in {stats['decode_steps']:,} "
          f"batched steps, {stats['seconds']:.2f} s: "
          f"{stats['generated'] / stats['seconds']:,.0f} generated bytes per second")
    per_slot = server.nbytes / args.slots
    print(f"memory of the pool: {server.nbytes / 1024:,.1f} KiB for {args.slots} slots "
          f"({per_slot / 1024:,.1f} KiB per request, whatever its length: {cfg.n_layers} layers "
          f"x (H x Dh x Dh state + count + token-shift vector))")
    if args.json:
        args.json.write_text(json.dumps(
            [{"prompt": r.prompt.decode("utf-8", errors="replace"), "tokens": r.tokens,
              "arrival": r.arrival, "text": r.text} for r in requests], indent=1) + "\n")


if __name__ == "__main__":
    main()
