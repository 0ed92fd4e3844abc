"""One long sequence sharded over MPI ranks: cosattn.distributed forward and backward.

    mpiexec -n 2 python examples/context_parallel.py [--S 262144] [--check-S 4096]

First a sequence short enough for one process (``--check-S`` tokens) is sharded over the ranks
and every rank's o, dq, dk, dv and the shared dm and outgoing state are compared with one
process's results on the whole of it. Then each rank makes only its own shard of a long
sequence (``--S`` tokens in all) and runs a causal forward and backward over it, printing its
time, its peak memory and the bytes it sent. Ranks on one machine share its cores:
``COSATTN_NUM_THREADS`` is set to the cores per rank unless it is already set.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from mpi4py import MPI

import cosattn
from cosattn import distributed

B, H, D = 1, 8, 64


def shard_bounds(S: int, size: int) -> list[int]:
    return [S * r // size for r in range(size + 1)]


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-6 * np.sqrt(ref.size)))


def check(comm: distributed.MPICommunicator, S: int) -> float:
    """The largest error of this rank's results against one process on all S tokens."""
    rng = np.random.default_rng(0)  # the same sequence on every rank
    q, k, v, do = (rng.standard_normal((B, H, S, D), dtype=np.float32) for _ in range(4))
    m = np.full(H, 0.5, np.float32)
    mask = rng.random((B, S)) < 0.9
    lo, hi = shard_bounds(S, comm.size)[comm.rank: comm.rank + 2]
    part = [np.ascontiguousarray(x[:, :, lo:hi]) for x in (q, k, v, do)]
    o, ctx = distributed.forward(*part[:3], m, comm=comm, mask=mask[:, lo:hi])
    dq, dk, dv, dm = distributed.backward(part[3], *part[:3], m, context=ctx, comm=comm,
                                          mask=mask[:, lo:hi])
    whole_o, whole_state = cosattn.forward(q, k, v, m, mask=mask, return_state=True)
    grads = cosattn.backward(do, q, k, v, m, mask=mask)
    errors = [rel_err(x, w[:, :, lo:hi]) for x, w in zip((o, dq, dk, dv), (whole_o, *grads[:3]),
                                                         strict=True)]
    errors += [rel_err(dm, grads[3]), rel_err(ctx.state.kv, whole_state.kv)]
    return max(errors)


def long_sequence(comm: distributed.MPICommunicator, S: int) -> dict:
    """Forward and backward of this rank's S/R tokens of an S-token sequence."""
    lo, hi = shard_bounds(S, comm.size)[comm.rank: comm.rank + 2]
    rng = np.random.default_rng(1 + comm.rank)  # only this rank's shard is ever made
    q, k, v, do = (rng.standard_normal((B, H, hi - lo, D), dtype=np.float32) for _ in range(4))
    m = np.full(H, 0.5, np.float32)
    sent = comm.bytes_sent
    comm.comm.Barrier()
    start = time.perf_counter()
    _, ctx = distributed.forward(q, k, v, m, comm=comm)
    middle = time.perf_counter()
    distributed.backward(do, q, k, v, m, context=ctx, comm=comm)
    end = time.perf_counter()
    return {"tokens": hi - lo, "forward_s": middle - start, "backward_s": end - middle,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bytes_sent": comm.bytes_sent - sent, "outgoing_count": int(ctx.state.count[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--S", type=int, default=262144, help="tokens of the long sequence")
    parser.add_argument("--check-S", type=int, default=4096, help="tokens of the checked one")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # ranks on this machine
    os.environ.setdefault("COSATTN_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))
    comm = distributed.MPICommunicator(world)

    error = check(comm, args.check_S)
    errors = world.gather(error)
    if comm.rank == 0:
        worst = max(errors)
        verdict = "within" if worst <= 1e-5 else "OUTSIDE"
        print(f"{comm.size} ranks, COSATTN_NUM_THREADS={os.environ['COSATTN_NUM_THREADS']}: "
              f"S={args.check_S} against one process, largest error {worst:.2e} ({verdict} the "
              "float32 bound 1e-5)")
    report = long_sequence(comm, args.S)
    reports = world.gather(report)
    if comm.rank == 0:
        print(f"S={args.S} (B={B}, H={H}, D={D}, float32, causal), forward + backward:")
        for r, rep in enumerate(reports):
            print(f"  rank {r}: {rep['tokens']} tokens, forward {rep['forward_s']:.2f} s, "
                  f"backward {rep['backward_s']:.2f} s, peak memory {rep['peak_rss_mib']:.0f} "
                  f"MiB, sent {rep['bytes_sent']} bytes")
        print(f"outgoing state counts {reports[0]['outgoing_count']} tokens on every rank")
        if max(errors) > 1e-5:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
