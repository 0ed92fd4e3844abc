"""The calls ncu profiles in gpu_check.sh: the cupy backend's main kernels once each, at the
target shapes of issue 11.

- forward and backward, bfloat16, B8 H16 S16384 D128 (the forward+backward target);
- forward, bfloat16, B1 H8 S65536 D128 (one long sequence: too few (b, h) to fill the GPU);
- one step, bfloat16 inputs and a float32 state, B64 H16 D128 (B*H = 1024) and B1 H16 D128.

Each call runs once, the kernels having been compiled beforehand (benchmarks/precompile.py), so
ncu sees one launch per kernel and shape::

    ncu --clock-control none --kernel-name-base demangled -k regex:cosattn:: \\
        python -m benchmarks.gpu_profile

``--device cpu`` makes the same calls with the numpy backend at tiny shapes (a dry run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

import cosattn

from . import gpu_bench as gb

MODULE = "benchmarks.gpu_profile"
SHAPES = {"cuda": {"fwdbwd": (8, 16, 16384, 128), "fwd": (1, 8, 65536, 128),
                   "steps": ((64, 16, 128), (1, 16, 128))},
          "cpu": {"fwdbwd": (2, 2, 96, 16), "fwd": (1, 2, 160, 16),
                  "steps": ((4, 2, 16), (1, 2, 16))}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import cupy as xp

        backend = "cupy"
    else:
        xp, backend = np, "numpy"
    shapes = SHAPES[args.device]
    bf16 = gb.DTYPES["bfloat16"]
    x = gb.make_inputs(xp, *shapes["fwdbwd"], bf16)
    o = cosattn.forward(x["q"], x["k"], x["v"], x["m"], backend=backend)
    grads = cosattn.backward(x["do"], x["q"], x["k"], x["v"], x["m"], backend=backend)
    print(f"forward + backward {gb.shape_label(*shapes['fwdbwd'])}: o {o.shape}, "
          f"dq {grads[0].shape}, dm {grads[3].shape}", flush=True)
    del x, o, grads
    x = gb.make_inputs(xp, *shapes["fwd"], bf16)
    o = cosattn.forward(x["q"], x["k"], x["v"], x["m"], backend=backend)
    print(f"forward {gb.shape_label(*shapes['fwd'])}: o {o.shape}", flush=True)
    del x, o
    for B, H, D in shapes["steps"]:
        q, k, v = (gb.device_normal(xp, (B, H, D), bf16, seed) for seed in range(3))
        state = cosattn.RecurrentState.zeros(B, H, D, D, like=q)
        o_t = state.step(q, k, v, xp.full((H,), 0.5, dtype=np.float32), backend=backend)
        print(f"step B{B} H{H} D{D}: o_t {o_t.shape}, state {state.kv.dtype}", flush=True)
    if args.device == "cuda":
        xp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
