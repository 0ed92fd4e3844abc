"""Continue a prompt with the tiny Cottention language model, one byte at a time.

The prompt runs through the parallel form (``cosattn.forward(..., return_state=True)``); every
further byte goes through ``cosattn.RecurrentState.step``, so the memory stays the same however
long the text grows: per layer, the attention state (H x Dh x Dh numbers and a count) and the
token shift's last vector (D numbers). At the end a table compares it with what a softmax
transformer of the same shape would keep in its KV cache at each length::

    python examples/train_tiny_lm.py          # writes examples/tiny_lm.npz
    python examples/generate.py --prompt "And God said" --tokens 600
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import numpy as np

import tiny_lm

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", type=Path, default=HERE / "tiny_lm.npz",
                    help="weights written by train_tiny_lm.py")
    ap.add_argument("--prompt", default="In the beginning", help="text to continue")
    ap.add_argument("--tokens", type=int, default=400, help="bytes to generate")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 picks the likeliest byte")
    ap.add_argument("--report-every", type=int, default=100,
                    help="context lengths (in bytes) between memory readings")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: NumPy arrays; cuda: CuPy arrays")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        import cupy as xp
    else:
        xp = np
    params, cfg = tiny_lm.load(args.weights, xp=xp)
    prompt = args.prompt.encode()
    if not prompt:
        raise SystemExit("--prompt must not be empty")
    itemsize = params["embed"].dtype.itemsize
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    readings = []
    tokens = xp.asarray(np.frombuffer(prompt, dtype=np.uint8).astype(np.int64)[None])
    rng = np.random.default_rng(args.seed)
    for i, (token, states) in enumerate(tiny_lm.generate(params, cfg, tokens, args.tokens,
                                                          temperature=args.temperature, rng=rng)):
        sys.stdout.write(decoder.decode(bytes([int(token[0])])))
        sys.stdout.flush()
        context = int(states[0].attn.count[0])
        if i == 0 or i + 1 == args.tokens or context % args.report_every == 0:
            readings.append((context, sum(s.nbytes for s in states)))
    sys.stdout.write(decoder.decode(b"", final=True) + "\n\n")

    print(f"{'context (bytes)':>16}  {'recurrent state':>18}  {'softmax KV cache':>18}")
    for context, state_bytes in readings:
        # a softmax transformer keeps every past key and value: 2 x D numbers per layer and byte
        cache = 2 * cfg.n_layers * context * cfg.d_model * itemsize
        print(f"{context:>16,}  {kib(state_bytes):>18}  {kib(cache):>18}")


if __name__ == "__main__":
    main()
