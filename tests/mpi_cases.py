"""Context parallel under MPI: run by tests/test_distributed.py as ``mpiexec -n R python
tests/mpi_cases.py REPORT_DIR``; every rank writes ``REPORT_DIR/rank<r>.json``.

Each case shards a sequence over the ranks (uneven, some shards empty), runs
cosattn.distributed.forward and backward, and compares this rank's shard with what one process
computes on the whole sequence (docs/spec.md's bound); bad arguments on some ranks must raise on
every rank, and the calls after them must still work. A failed check is recorded, never raised,
so that every rank goes on making the same collective calls: no rank is left waiting.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import numpy as np

import cosattn
from cosattn import distributed

from helpers import assert_close, dm_scale, make_case, reference_backward

ROOT = Path(__file__).resolve().parents[1]
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
HEADER_BYTES = 8 * (1 + len(distributed.HEADER))


def cuts(S: int, size: int, empty: int | None) -> list[int]:
    """Shard boundaries: uneven lengths (rank r gets about r + 1 parts), shard ``empty``
    (a rank) of length 0."""
    weights = np.array([0 if r == empty else r + 1 for r in range(size)], dtype=float)
    ends = np.round(np.cumsum(weights) / weights.sum() * S).astype(int)
    return [0, *ends.tolist()]


def shard(x, lo: int, hi: int, layout: str = "bhsd"):
    part = np.ascontiguousarray(x[:, :, lo:hi])
    return part if layout == "bhsd" else np.ascontiguousarray(part.transpose(0, 2, 1, 3))


def unshard(x, layout: str):
    return x if layout == "bhsd" else x.transpose(0, 2, 1, 3)


def expected_bytes(case, causal: bool) -> tuple[int, int]:
    """Bytes and messages one rank hands to the all-gathers of one forward and one backward:
    a status word per message, the header, the counts (B int64), the sums (B·H·Dv·Dk in the
    state's dtype); in the backward Σ do q̂'ᵀ (with a flag) and dm (H in the accumulation dtype).
    Counts and sums share one message when there is no m."""
    B, H, _, Dk = case.q.shape
    Dv = case.v.shape[-1]
    a = 8 if case.dtype == F64 else 4
    s = a if case.kv0 is None else case.kv0.dtype.itemsize
    sums = s * B * H * Dv * Dk
    with_m = case.m is not None
    forward = HEADER_BYTES + 8 * (1 + B) + sums + (8 if with_m else 0)
    backward = 16 + sums + ((8 + a * H) if with_m else 0)
    return forward + backward, (3 if with_m else 2) + (2 if with_m else 1)


def run_case(comm, case, *, causal: bool, bounds: list[int], layout: str = "bhsd"):
    """This rank's forward and backward; returns them with the single-process results."""
    r = comm.rank
    lo, hi = bounds[r], bounds[r + 1]
    state = None
    if case.kv0 is not None:
        state = cosattn.RecurrentState(case.kv0, case.count0)
    dstate = case.dkv
    mask = None if case.mask is None else np.ascontiguousarray(case.mask[:, lo:hi])
    q, k, v, do = (shard(x, lo, hi, layout) for x in (case.q, case.k, case.v, case.do))
    o, ctx = distributed.forward(q, k, v, case.m, comm=comm, causal=causal, mask=mask,
                                 state=state if r == 0 else None, layout=layout)
    grads = distributed.backward(do, q, k, v, case.m, context=ctx, comm=comm, mask=mask,
                                 dstate=dstate)
    whole = cosattn.forward(case.q, case.k, case.v, case.m, causal=causal, mask=case.mask,
                            state=state, return_state=causal)
    whole_grads = cosattn.backward(case.do, case.q, case.k, case.v, case.m, causal=causal,
                                   mask=case.mask, state=state, dstate=dstate)
    return (o, ctx, grads), (whole, whole_grads), (lo, hi)


def check_case(comm, case, *, causal: bool, bounds: list[int], layout: str = "bhsd") -> None:
    (o, ctx, grads), (whole, whole_grads), (lo, hi) = run_case(comm, case, causal=causal,
                                                                 bounds=bounds, layout=layout)
    dtype = case.dtype
    whole_o = whole[0] if causal else whole
    assert o.dtype == dtype and grads[0].dtype == dtype
    assert_close(unshard(o, layout), whole_o[:, :, lo:hi], dtype, "o")
    for name, g, w in zip(("dq", "dk", "dv"), grads[:3], whole_grads[:3], strict=True):
        assert_close(unshard(g, layout), w[:, :, lo:hi], dtype, name)
    if case.m is None:
        assert grads[3] is None
    else:
        ref = reference_backward(case, causal)
        assert_close(grads[3], whole_grads[3], dtype, "dm", dm_scale(case, causal, ref[2]))
    if causal:
        assert_close(ctx.state.kv, whole[1].kv, dtype, "state.kv")
        assert ctx.state.kv.dtype == whole[1].kv.dtype
        np.testing.assert_array_equal(ctx.state.count, whole[1].count)
    else:
        assert ctx.state is None
    if case.kv0 is None:
        assert len(grads) == 4
    else:
        assert len(grads) == 5
        if comm.rank == 0:
            assert_close(grads[4], whole_grads[4], dtype, "dkv0")
        else:
            assert grads[4] is None


def cases(size: int) -> list[tuple[str, dict, dict]]:
    """(name, make_case arguments, check arguments)."""
    last = size - 1
    return [
        ("f64-causal-m-inner-state-dstate", dict(dtype=F64, mask="inner", state=True,
                                                 dstate=True), dict(causal=True, empty=None)),
        ("f32-causal-m-right-dstate-empty-last", dict(dtype=F32, mask="right", dstate=True),
         dict(causal=True, empty=last)),
        ("f32-causal-state-empty-first-bshd", dict(dtype=F32, m=False, state=True),
         dict(causal=True, empty=0, layout="bshd")),
        ("f64-causal-left-nan-padding", dict(dtype=F64, mask="left", m=False, junk=np.nan),
         dict(causal=True, empty=None)),
        ("f32-bidirectional-m-inner", dict(dtype=F32, mask="inner"),
         dict(causal=False, empty=None)),
        ("f64-bidirectional-bshd-empty-first", dict(dtype=F64, m=False),
         dict(causal=False, empty=0, layout="bshd")),
        ("f64-bidirectional-m-right-empty-last", dict(dtype=F64, mask="right"),
         dict(causal=False, empty=last)),
        ("f32-causal-m-state-dstate-empty-first", dict(dtype=F32, mask="inner", state=True,
                                                       dstate=True),
         dict(causal=True, empty=0)),
    ]


def expect_error(comm, error: type, pattern: str, call) -> None:
    """``call()`` raises ``error`` matching ``pattern`` on this rank."""
    try:
        call()
    except error as exc:
        assert re.search(pattern, str(exc)), f"{error.__name__} {exc!s} does not match {pattern}"
        return
    raise AssertionError(f"no {error.__name__} on rank {comm.rank}")


def error_checks(comm) -> dict:
    """Bad arguments on some ranks: the same kind of error on every rank, and no hang."""
    r, last = comm.rank, comm.size - 1
    rng = np.random.default_rng(5)

    def qkv(B=2, H=2, S=5, D=4, dtype=F32):
        return [rng.standard_normal((B, H, S, D)).astype(dtype) for _ in range(3)]

    def fwd(*args, **kw):
        return lambda: distributed.forward(*args, comm=comm, **kw)

    last_H = 3 if r == last else 2
    last_B = 3 if r == last else 2
    last_dtype = F64 if r == last else F32
    mask = np.ones((2, 6 if r == last else 5), bool)  # wrong S on the last rank only
    state = cosattn.RecurrentState.zeros(2, 2, 4, 4)
    return {
        "mismatched-H": (ValueError, rf"same H; got .*rank 0 2.*rank {last} 3",
                         fwd(*qkv(H=last_H))),
        "mismatched-B": (ValueError, r"same B", fwd(*qkv(B=last_B))),
        "mismatched-D": (ValueError, r"same Dk", fwd(*qkv(D=8 if r == last else 4))),
        "mismatched-dtype": (TypeError, r"same dtype; got rank 0 float32.*float64",
                             fwd(*qkv(dtype=last_dtype))),
        "bad-mask-on-last-rank": (ValueError, r"mask must have shape"
                                  if r == last else rf"rank {last}: ValueError: mask",
                                  fwd(*qkv(), mask=mask)),
        "state-on-rank-1": (ValueError, r"state is given on rank 0 only; ranks \[1\]",
                            fwd(*qkv(), state=state if r == 1 else None)),
        "m-on-rank-0-only": (ValueError, r"m must be given on every rank or on none",
                             fwd(*qkv(), np.zeros(2, F32) if r == 0 else None)),
        "causal-differs": (ValueError, r"causal differs", fwd(*qkv(), causal=r != last)),
    }


def torch_communicator_case(comm) -> None:
    """The torch.distributed adapter of docs/design.md (gloo), against MPICommunicator."""
    import torch.distributed as dist

    text = (ROOT / "docs" / "design.md").read_text()
    snippet = re.search(r"```python\n(class TorchCommunicator.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)
    port = comm.comm.bcast(29500 + int(np.random.default_rng().integers(0, 2000)), root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                            world_size=comm.size)
    try:
        torch_comm = namespace["TorchCommunicator"]()
        case = make_case(np.random.default_rng(9), 1, 2, 40, 8, 8, F32, mask="inner",
                         state=True, dstate=True)
        bounds = cuts(40, comm.size, None)
        results = []
        for c in (comm, torch_comm):
            (o, ctx, grads), _, _ = run_case(c, case, causal=True, bounds=bounds)
            results.append((o, ctx.state.kv, *grads[:4]))
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    comm = distributed.MPICommunicator()
    report: dict[str, str | None] = {}

    def record(name, check, *args, **kwargs):
        try:
            check(*args, **kwargs)
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc(limit=6)

    for i, (name, make, check) in enumerate(cases(comm.size)):
        S = 97 + 13 * i
        make = {"m": True, **make}
        case = make_case(np.random.default_rng(i), 2, 3, S, 8, 6, make.pop("dtype"), **make)
        causal = check["causal"]
        before = (comm.bytes_sent, comm.messages)
        record(name, check_case, comm, case, causal=causal,
               bounds=cuts(S, comm.size, check["empty"]), layout=check.get("layout", "bhsd"))
        sent = (comm.bytes_sent - before[0], comm.messages - before[1])
        record(f"{name}: bytes and messages", _equal, sent, expected_bytes(case, causal))
    for name, (error, pattern, call) in error_checks(comm).items():
        record(f"error: {name}", expect_error, comm, error, pattern, call)
    # the same problem at two lengths sends the same bytes: the formula has no S in it
    sent = []
    for S in (64, 4096):
        case = make_case(np.random.default_rng(1), 1, 2, S, 8, 8, F32, mask="inner")
        before = comm.bytes_sent
        record(f"after the errors, S={S}", check_case, comm, case, causal=True,
               bounds=cuts(S, comm.size, None))
        sent.append(comm.bytes_sent - before)
    record("bytes independent of S", _equal, sent[0], sent[1])
    if comm.size == 2 and "--torch" in sys.argv:
        record("torch-distributed-communicator", torch_communicator_case, comm)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(report, indent=1))


def _equal(a, b) -> None:
    assert a == b, f"{a} != {b}"


if __name__ == "__main__":
    main()
