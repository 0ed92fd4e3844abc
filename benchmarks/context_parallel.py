"""Context parallel on one machine: the collective it uses, and its overhead against one process.

``collectives`` (under ``mpiexec -n R``): the two ways of giving every rank the sum of the
ranks before it and the sum of all, for buffers of the size of one rank's ``Σ ṽ k̂ᵀ``: one
``MPI_Allgather`` followed by a prefix sum in rank order on every rank, against ``MPI_Exscan``
followed by ``MPI_Bcast`` of the total from the last rank. Interleaved, medians.

``costs``: the table of benchmarks/README.md, "Context parallel at scale": per layer and rank,
the bytes and messages of cosattn.distributed's all-gathers (and of an exclusive scan instead)
against ring attention's K/V traffic and the memory-bound compute time, for 8 to 64 GPUs.

``step``: forward and backward of one causal layer (B=1, H=8, D=64, float32, m given). Under
``mpiexec -n R`` each rank takes S/R tokens through :mod:`cosattn.distributed`; with ``--single``
one process takes all S through :func:`cosattn.forward` and :func:`cosattn.backward`. Prints the
median wall time of ``--repeats`` steps after a warm-up (ranks start each step together), each
rank's peak resident memory and bytes sent.

    mpiexec -n 2 python -m benchmarks.context_parallel collectives
    python -m benchmarks.context_parallel costs
    COSATTN_NUM_THREADS=1 mpiexec -n 2 python -m benchmarks.context_parallel step --S 65536
    COSATTN_NUM_THREADS=2 python -m benchmarks.context_parallel step --S 65536 --single
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

import cosattn


def _collectives(repeats: int) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        print(f"{size} ranks; median microseconds of {repeats} calls, interleaved")
        print("| bytes per rank | allgather + prefix | exscan + bcast |")
        print("|---|---|---|")
    for nbytes in (8 * 1024, 128 * 1024, 2 * 1024 * 1024, 8 * 1024 * 1024):
        send = np.full(nbytes // 4, rank + 1, dtype=np.float32)
        gathered = np.empty((size, send.size), np.float32)
        before = np.empty_like(send)
        total = np.empty_like(send)
        times: dict[str, list[float]] = {"allgather": [], "exscan": []}
        for _ in range(repeats + 1):
            comm.Barrier()
            t = time.perf_counter()
            comm.Allgather(send, gathered)
            running = np.zeros_like(send)
            for r in range(size):
                if r == rank:
                    before[...] = running
                running += gathered[r]
            total[...] = running
            times["allgather"].append(time.perf_counter() - t)
            comm.Barrier()
            t = time.perf_counter()
            comm.Exscan(send, before, op=MPI.SUM)
            if rank == size - 1:
                total[...] = send if rank == 0 else before + send
            comm.Bcast(total, root=size - 1)
            times["exscan"].append(time.perf_counter() - t)
        slowest = {k: comm.allreduce(statistics.median(v[1:]), op=MPI.MAX)
                   for k, v in times.items()}
        if rank == 0:
            print(f"| {nbytes} | {slowest['allgather'] * 1e6:.0f} | "
                  f"{slowest['exscan'] * 1e6:.0f} |")


def exchanged_bytes(B: int, H: int, Dk: int, Dv: int, sum_bytes: int, acc_bytes: int,
                    with_m: bool = True) -> tuple[int, int]:
    """Bytes one rank hands to the all-gathers of one forward and backward, and the number of
    all-gathers (docs/spec.md, "Context parallel")."""
    from cosattn.distributed import HEADER

    X = sum_bytes * B * H * Dv * Dk
    forward = 8 * (1 + len(HEADER)) + 8 * (1 + B) + X + (8 if with_m else 0)
    backward = 16 + X + ((8 + acc_bytes * H) if with_m else 0)
    return forward + backward, (3 if with_m else 2) + (2 if with_m else 1)


def _costs(S: int) -> None:
    B, H, D, C = 1, 32, 128, 64
    sent, messages = exchanged_bytes(B, H, D, D, 4, 4)  # bfloat16 inputs, float32 sums
    sums = 2 * 4 * B * H * D * D  # the two sums of a step (Σ ṽ k̂ᵀ, Σ do q̂'ᵀ)
    print(f"B={B}, H={H}, Dk=Dv={D}, S={S} tokens in all, bfloat16 inputs, float32 sums; "
          "per layer (forward + backward) and rank")
    print("| GPUs | tokens per rank | all-gather: sent / received | messages | exclusive scan: "
          "moved | ring attention K/V: sent | memory-bound compute |")
    print("|---|---|---|---|---|---|---|")
    for R in (8, 16, 32, 64):
        n = S // R
        received = (R - 1) * sent
        scan = int(np.ceil(np.log2(R))) * sums  # recursive doubling: log2 R steps of each sum
        # ring attention: K and V of every other rank pass through, forward; the backward moves
        # K, V and their gradients again (twice the forward's bytes)
        ring = 3 * (R - 1) * n * 2 * H * D * 2
        # fewest bytes a rank's forward+backward must move in HBM: read q, k, v, write o; read
        # q, k, v, do, write dq, dk, dv: 11 arrays of n x H x D bfloat16; at 3.35 TB/s (H100)
        hbm = 11 * n * H * D * 2 / 3.35e12
        print(f"| {R} | {n} | {sent / 2**20:.1f} MiB / {received / 2**20:.0f} MiB | "
              f"{messages} | {scan / 2**20:.0f} MiB | {ring / 2**30:.1f} GiB | "
              f"{hbm * 1e3:.2f} ms |")
    flops = 3.5 * (4 * C * D + 4 * D * D) * H  # per token: forward, backward about 2.5 times it
    print(f"compute: about {flops / 1e6:.0f} MFLOP per token for forward + backward")


def _step(S: int, single: bool, repeats: int) -> None:
    B, H, D = 1, 8, 64
    rng = np.random.default_rng(0)
    m = np.full(H, 0.5, np.float32)
    if single:
        rank, size, comm = 0, 1, None
    else:
        from cosattn import distributed

        comm = distributed.MPICommunicator()
        rank, size = comm.rank, comm.size
    n = S // size
    q, k, v, do = (rng.standard_normal((B, H, n, D), dtype=np.float32) for _ in range(4))

    def step() -> None:
        if comm is None:
            cosattn.forward(q, k, v, m)
            cosattn.backward(do, q, k, v, m)
        else:
            _, ctx = distributed.forward(q, k, v, m, comm=comm)
            distributed.backward(do, q, k, v, m, context=ctx, comm=comm)

    times = []
    for _ in range(repeats + 1):
        if comm is not None:
            comm.comm.Barrier()
        t = time.perf_counter()
        step()
        if comm is not None:
            comm.comm.Barrier()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sent = 0 if comm is None else comm.bytes_sent // (repeats + 1)
    print(f"rank {rank}/{size}: S={S} ({n} here) forward+backward median "
          f"{statistics.median(times[1:]) * 1e3:.1f} ms of {repeats}, peak RSS {peak:.0f} MiB, "
          f"{sent} bytes sent per step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["collectives", "costs", "step"])
    parser.add_argument("--S", type=int, default=None,
                        help="tokens in all (step: 65536; costs: 1048576)")
    parser.add_argument("--single", action="store_true", help="one process, no MPI")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.what == "collectives":
        _collectives(args.repeats)
    elif args.what == "costs":
        _costs(args.S or 1 << 20)
    else:
        _step(args.S or 65536, args.single, args.repeats)


if __name__ == "__main__":
    main()
