"""Continue a prompt with the tiny language model exported to ONNX, run in ONNX Runtime (CPU).

The graphs are those that ``examples/export_onnx.py`` writes: the prefill graph runs the prompt
in parallel and returns each layer's state; the step graph then takes one byte at a time with
those states, in constant memory. By default it is greedy (``--temperature 0``), and gives the
same bytes as ``examples/generate.py --temperature 0``; with a temperature it samples the way
``generate.py`` does (``tiny_lm.sample``, same ``--seed``)::

    python examples/export_onnx.py                      # once: tiny_lm.npz -> *.onnx
    python examples/generate_onnx.py --prompt "And God said" --tokens 200

If the ``.onnx`` files are missing they are exported from ``--weights`` first.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

import export_onnx
import tiny_lm

HERE = Path(__file__).resolve().parent
States = dict[str, np.ndarray]


class OnnxLM:
    """The prefill and step graphs of one exported model, in ONNX Runtime sessions.

    The states are a dict of the prefill graph's state outputs (``kv.{l}``, ``count.{l}``,
    ``prev.{l}``); the step graph takes them under those names and returns the next ones as
    ``kv_next.{l}``, ... which :meth:`step` renames back.
    """

    def __init__(self, prefill: bytes | str | Path, step: bytes | str | Path) -> None:
        """``prefill``, ``step``: serialised models or paths to ``.onnx`` files."""
        providers = ["CPUExecutionProvider"]
        self.prefill_session = ort.InferenceSession(_source(prefill), providers=providers)
        self.step_session = ort.InferenceSession(_source(step), providers=providers)

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, States]:
        """Run the prompt ``tokens`` (B, S) int64; return the last logits (B, V) and the states."""
        names = [o.name for o in self.prefill_session.get_outputs()]
        logits, *states = self.prefill_session.run(names, {"tokens": tokens})
        return logits[:, -1], dict(zip(names[1:], states, strict=True))

    def step(self, token: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        """Feed one token per row (B,) int64; return its logits (B, V) and the next states."""
        names = [o.name for o in self.step_session.get_outputs()]
        logits, *after = self.step_session.run(names, {"token": token, **states})
        return logits, {n.replace("_next.", "."): a for n, a in zip(names[1:], after, strict=True)}

    def generate(self, prompt: np.ndarray, n: int, *, temperature: float = 0.0,
                 rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
        """Continue ``prompt`` (B, S0) by ``n`` tokens; yields each new token (B,) int64.

        Tokens are picked by ``tiny_lm.sample``: the likeliest with ``temperature`` 0.
        """
        logits, states = self.prefill(np.asarray(prompt, dtype=np.int64))
        for i in range(n):
            token = tiny_lm.sample(logits, temperature, rng).astype(np.int64)
            yield token
            if i + 1 < n:
                logits, states = self.step(token, states)


def _source(model: bytes | str | Path) -> bytes | str:
    return model if isinstance(model, bytes) else str(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", type=Path, default=HERE, help="folder of the .onnx files")
    ap.add_argument("--weights", type=Path, default=HERE / "tiny_lm.npz",
                    help="weights to export from when the .onnx files are missing")
    ap.add_argument("--prompt", default="In the beginning", help="text to continue")
    ap.add_argument("--tokens", type=int, default=400, help="bytes to generate")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 picks the likeliest byte")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompt = args.prompt.encode()
    if not prompt:
        raise SystemExit("--prompt must not be empty")
    prefill, step = args.models / export_onnx.PREFILL_FILE, args.models / export_onnx.STEP_FILE
    if not (prefill.exists() and step.exists()):
        prefill, step = export_onnx.export(args.weights, args.models)
    lm = OnnxLM(prefill, step)
    tokens = np.frombuffer(prompt, dtype=np.uint8).astype(np.int64)[None]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    rng = np.random.default_rng(args.seed)
    for token in lm.generate(tokens, args.tokens, temperature=args.temperature, rng=rng):
        sys.stdout.write(decoder.decode(bytes([int(token[0])])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")


if __name__ == "__main__":
    main()
