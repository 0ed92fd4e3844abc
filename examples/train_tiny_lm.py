"""Train the tiny byte-level Cottention language model (examples/tiny_lm.py) with Adam.

By default it trains on the Book of Genesis (examples/data/kjv.txt) on the CPU with the NumPy
backend, in a few minutes on two cores, and writes the weights to examples/tiny_lm.npz::

    python examples/train_tiny_lm.py                    # the default run
    python examples/train_tiny_lm.py --steps 50         # a short one
    python examples/train_tiny_lm.py --device cuda      # the same on CuPy arrays

Then ``python examples/generate.py`` continues a prompt with the trained model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tiny_lm

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "data" / "kjv.txt", help="training text")
    ap.add_argument("--out", type=Path, default=HERE / "tiny_lm.npz", help="weights file to write")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: NumPy arrays; cuda: CuPy arrays")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=16, help="windows per step (B)")
    ap.add_argument("--context", type=int, default=128, help="bytes per window (S)")
    ap.add_argument("--d-model", type=int, default=128, help="model width D")
    ap.add_argument("--heads", type=int, default=4, help="attention heads H")
    ap.add_argument("--layers", type=int, default=3, help="Cottention blocks")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm limit")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    ap.add_argument("--eval-batches", type=int, default=4, help="validation batches of B windows")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        import cupy as xp
    else:
        xp = np
    cfg = tiny_lm.Config(d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
                         d_mlp=4 * args.d_model)
    rng = np.random.default_rng(args.seed)
    params = tiny_lm.init_params(cfg, rng, xp=xp)
    data = tiny_lm.TextData(args.data, args.context, xp=xp)
    val = data.val_batches(args.batch, args.eval_batches)
    adam = tiny_lm.Adam(params)
    n_params = sum(int(a.size) for a in params.values())
    print(f"{n_params:,} weights, {len(data.train):,} training bytes, {cfg}")

    start = time.perf_counter()
    val_loss = first_val = tiny_lm.evaluate(params, cfg, val)
    print(f"validation loss before training {first_val:.3f} nats/byte")
    bar = tqdm(range(args.steps), desc="training", unit="step")
    postfix: dict[str, str] = {}  # "val" appears once the validation loss is measured again
    for i in bar:
        loss, grads = tiny_lm.loss_and_grads(params, cfg, *data.batch(rng, args.batch))
        tiny_lm.clip_grads(grads, args.clip)
        adam.update(params, grads, tiny_lm.learning_rate(i, args.steps, args.lr, args.warmup))
        postfix["loss"] = f"{loss:.3f}"
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            val_loss = tiny_lm.evaluate(params, cfg, val)
            postfix["val"] = f"{val_loss:.3f} (step {i + 1})"
        bar.set_postfix(postfix)
    bar.close()
    print(f"validation loss {first_val:.3f} -> {val_loss:.3f} nats/byte "
          f"in {time.perf_counter() - start:.0f} s")
    tiny_lm.save(args.out, params, cfg)
    print(f"weights written to {args.out}")


if __name__ == "__main__":
    main()
