"""Greedy generation with the tiny language model exported to ONNX, run in ONNX Runtime (CPU).

The same continuation as ``python examples/generate.py`` (greedy), from the graphs that
``examples/export_onnx.py`` writes: the prefill graph runs the prompt in parallel and returns
each layer's recurrent state; the step graph then takes one byte at a time with those states::

    python examples/export_onnx.py                      # once: tiny_lm.npz -> *.onnx
    python examples/generate_onnx.py --prompt "In the beginning" --tokens 200

If the ``.onnx`` files are missing they are exported from ``--weights`` first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import export_onnx
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


class OnnxLM:
    """The prefill and step graphs of one exported model, in ONNX Runtime sessions."""

    def __init__(self, prefill: bytes | str | Path, step: bytes | str | Path) -> None:
        """``prefill``, ``step``: serialised models or paths to ``.onnx`` files."""
        options = {"providers": ["CPUExecutionProvider"]}
        self.prefill_session = ort.InferenceSession(_source(prefill), **options)
        self.step_session = ort.InferenceSession(_source(step), **options)
        self.n_layers = sum(o.name.startswith("kv.") for o in self.prefill_session.get_outputs())

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the prompt ``tokens`` (B, S) int64; return the last logits (B, V) and the states
        (``kv.0``, ``count.0``, ``kv.1``, ...)."""
        logits, *states = self.prefill_session.run(None, {"tokens": tokens})
        return logits[:, -1], states

    def step(self, token: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """Feed one token per row (B,) int64; return its logits (B, V) and the next states."""
        feed = {"token": token}
        for l in range(self.n_layers):
            feed[f"kv.{l}"], feed[f"count.{l}"] = states[2 * l], states[2 * l + 1]
        logits, *states = self.step_session.run(None, feed)
        return logits, states

    def generate(self, prompt: np.ndarray, n_tokens: int) -> np.ndarray:
        """Greedy continuation: ``n_tokens`` new tokens (B, n_tokens) after ``prompt`` (B, S)."""
        logits, states = self.prefill(np.asarray(prompt, dtype=np.int64))
        new = []
        for i in range(n_tokens):
            token = logits.argmax(axis=-1).astype(np.int64)
            new.append(token)
            if i + 1 < n_tokens:
                logits, states = self.step(token, states)
        return np.stack(new, axis=1) if new else np.zeros((len(prompt), 0), np.int64)


def _source(model: bytes | str | Path) -> bytes | str:
    return model if isinstance(model, bytes) else str(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", type=Path, default=HERE, help="folder of the .onnx files")
    ap.add_argument("--weights", type=Path, default=HERE / "tiny_lm.npz",
                    help="weights to export from when the .onnx files are missing")
    ap.add_argument("--prompt", default="In the beginning", help="text to continue")
    ap.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    args = ap.parse_args()
    prefill, step = args.models / export_onnx.PREFILL_FILE, args.models / export_onnx.STEP_FILE
    if not (prefill.exists() and step.exists()):
        prefill, step = export_onnx.export(args.weights, args.models)
    lm = OnnxLM(prefill, step)
    prompt = np.frombuffer(args.prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    new = lm.generate(prompt[None, :], args.tokens)[0]
    print(args.prompt + bytes(new.astype(np.uint8).tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
