"""Context parallel (cosattn.distributed): runs of ``mpiexec -n 2`` and ``-n 3`` (tests/
mpi_cases.py), and ranks as threads of this process for the many shapes Hypothesis draws.

Every rank's shard is compared with what one process computes on the whole sequence, within
docs/spec.md's bounds; errors must reach every rank, and no rank may be left waiting.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cosattn
from cosattn import distributed

from helpers import MASK_KINDS, assert_close, dm_scale, make_case, reference_backward

HERE = Path(__file__).resolve().parent
MPI_TIMEOUT = 150  # seconds for one mpiexec run (a hang fails the test instead of CI)


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in this environment
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpirun(ranks: int, args: list[str]) -> str:
    """Run ``mpiexec -n ranks python args`` from the checkout with one thread per rank; its
    output (the test fails when it does not finish in MPI_TIMEOUT or exits non-zero)."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec: pip install mpich (the test extra)")
    pytest.importorskip("mpi4py")
    command = [mpiexec, "-n", str(ranks), sys.executable, *args]
    env = dict(os.environ, COSATTN_NUM_THREADS="1")
    run = subprocess.Popen(command, cwd=HERE.parent, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=MPI_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        pytest.fail(f"mpiexec -n {ranks} did not finish in {MPI_TIMEOUT} s:\n{output[-5000:]}")
    assert run.returncode == 0, output[-5000:]
    return output


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_match_one_process_under_mpi(ranks, tmp_path):
    args = [str(HERE / "mpi_cases.py"), str(tmp_path)]
    if ranks == 2 and _has("torch.distributed"):
        args.append("--torch")
    _mpirun(ranks, args)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert all(report.keys() == reports[0].keys() for report in reports)
    assert len(reports[0]) >= 26, sorted(reports[0])
    failures = [f"rank {r}, {name}:\n{why}" for r, report in enumerate(reports)
                for name, why in report.items() if why is not None]
    assert not failures, "\n".join(failures)[-8000:]


def test_the_example_runs_under_mpi():
    output = _mpirun(2, [str(HERE.parent / "examples" / "context_parallel.py"), "--S", "4096",
                         "--check-S", "300"])
    assert "within the float32 bound" in output
    assert re.search(r"rank 1: 2048 tokens, forward .* s, backward .* s, peak memory \d+ MiB, "
                     r"sent \d+ bytes", output), output
    assert "outgoing state counts 4096 tokens on every rank" in output


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- ranks as threads


class ThreadRanks:
    """``size`` ranks as threads of this process, each with a Communicator (for tests)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def run(self, work) -> list:
        """``work(comm)`` on every rank; each rank's result, or the exception it raised."""
        results: list = [None] * self.size

        def rank(r: int) -> None:
            try:
                results[r] = work(_ThreadComm(self, r))
            except Exception as exc:
                results[r] = exc

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


class _ThreadComm:
    def __init__(self, group: ThreadRanks, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def allgather(self, buffer):
        g = self.group
        g.slots[self.rank] = buffer.copy()
        g.barrier.wait()
        out = np.stack(g.slots)
        g.barrier.wait()
        return out


@st.composite
def sharded(draw):
    """A case, the shards' boundaries (any lengths, empty ones included) and the settings."""
    causal = draw(st.booleans())
    S = draw(st.sampled_from([0, 1, 5, 64, 100]))
    size = draw(st.integers(1, 4))
    bounds = sorted(draw(st.lists(st.integers(0, S), min_size=size - 1, max_size=size - 1)))
    case = make_case(np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
                     draw(st.integers(1, 2)), draw(st.integers(1, 3)), S,
                     draw(st.sampled_from([1, 4, 8])), draw(st.sampled_from([1, 5, 8])),
                     draw(st.sampled_from([np.float32, np.float64])),
                     mask=draw(st.sampled_from(MASK_KINDS)), m=draw(st.booleans()),
                     state=causal and draw(st.booleans()),
                     dstate=causal and draw(st.booleans()))
    return case, causal, [0, *bounds, S], draw(st.sampled_from(["bhsd", "bshd"]))


def _shard(x, lo, hi, layout):
    part = x[:, :, lo:hi]
    return np.ascontiguousarray(part if layout == "bhsd" else part.transpose(0, 2, 1, 3))


def _run_sharded(case, causal, bounds, layout, out=False):
    """Forward and backward of ``case`` split at ``bounds`` over ranks as threads; with ``out``,
    into NaN-filled buffers of each rank's, which the calls must return."""
    state = None if case.kv0 is None else cosattn.RecurrentState(case.kv0, case.count0)

    def work(comm):
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        q, k, v, do = (_shard(x, lo, hi, layout) for x in (case.q, case.k, case.v, case.do))
        mask = None if case.mask is None else np.ascontiguousarray(case.mask[:, lo:hi])
        buffers = [np.full_like(x, np.nan) for x in (v, q, k, v)] if out else [None] * 4
        o, ctx = distributed.forward(q, k, v, case.m, comm=comm, causal=causal, mask=mask,
                                     state=state if comm.rank == 0 else None, layout=layout,
                                     out=buffers[0])
        grads = distributed.backward(do, q, k, v, case.m, context=ctx, comm=comm, mask=mask,
                                     dstate=case.dkv, out=tuple(buffers[1:]) if out else None)
        if out:
            assert o is buffers[0]
            assert all(g is b for g, b in zip(grads[:3], buffers[1:], strict=True))
        return o, ctx, grads

    return ThreadRanks(len(bounds) - 1).run(work), state


@settings(max_examples=30)
@given(sharded(), st.booleans())
def test_shards_match_one_process(drawn, out):
    """Any split of a sequence over 1 to 4 ranks gives each rank its part of one process's
    o, dq, dk, dv (into its out= buffers, when drawn), and every rank the whole sequence's dm
    and outgoing state."""
    case, causal, bounds, layout = drawn
    results, state = _run_sharded(case, causal, bounds, layout, out)
    whole = cosattn.forward(case.q, case.k, case.v, case.m, causal=causal, mask=case.mask,
                            state=state, return_state=causal)
    grads = cosattn.backward(case.do, case.q, case.k, case.v, case.m, causal=causal,
                             mask=case.mask, state=state, dstate=case.dkv)
    whole_o = whole[0] if causal else whole
    ref = reference_backward(case, causal)
    dtype = case.dtype
    for r, result in enumerate(results):
        assert not isinstance(result, Exception), result
        o, ctx, got = result
        lo, hi = bounds[r], bounds[r + 1]
        for name, x, w in zip(("o", "dq", "dk", "dv"), (o, *got[:3]), (whole_o, *grads[:3]),
                              strict=True):
            x = x if layout == "bhsd" else x.transpose(0, 2, 1, 3)
            assert_close(x, w[:, :, lo:hi], dtype, f"rank {r} {name}")
        if case.m is not None:
            assert_close(got[3], grads[3], dtype, f"rank {r} dm", dm_scale(case, causal, ref[2]))
            np.testing.assert_array_equal(got[3], results[0][2][3])  # the same bits everywhere
        if causal:
            assert_close(ctx.state.kv, whole[1].kv, dtype, f"rank {r} state.kv")
            np.testing.assert_array_equal(ctx.state.count, whole[1].count)
            np.testing.assert_array_equal(ctx.state.kv, results[0][1].state.kv)
        if state is not None:
            assert len(got) == 5
            if r == 0:
                assert_close(got[4], grads[4], dtype, "dkv0")
            else:
                assert got[4] is None


def test_a_failure_after_the_checks_reaches_every_rank(monkeypatch):
    """A rank whose own work fails between two exchanges (here its absorb) raises its error;
    the others raise the same type naming it, and none waits."""
    real_absorb, this = distributed.absorb, threading.local()

    def absorb(k, v, *args, **kw):
        if this.rank == 2:
            raise RuntimeError("out of memory on purpose")
        return real_absorb(k, v, *args, **kw)

    monkeypatch.setattr(distributed, "absorb", absorb)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 12, 4)).astype(np.float32)

    def work(comm):
        this.rank = comm.rank
        part = x[:, :, 4 * comm.rank: 4 * comm.rank + 4]
        return distributed.forward(part, part, part, np.zeros(2, np.float32), comm=comm)

    results = ThreadRanks(3).run(work)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert str(results[2]) == "out of memory on purpose"
    for r in (0, 1):
        assert "rank 2: RuntimeError: out of memory on purpose" in str(results[r])


def test_backward_must_get_the_forwards_shard():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 10, 4)).astype(np.float32)

    def work(comm):
        part = x[:, :, 5 * comm.rank: 5 * comm.rank + 5]
        _, ctx = distributed.forward(part, part, part, comm=comm)
        wrong = part[:, :, :4] if comm.rank == 1 else part
        return distributed.backward(wrong, wrong, wrong, wrong, context=ctx, comm=comm)

    results = ThreadRanks(2).run(work)
    assert isinstance(results[1], ValueError)
    assert "backward's shard must be the forward's" in str(results[1])
    assert isinstance(results[0], ValueError) and "rank 1" in str(results[0])


def test_a_bad_out_on_one_rank_fails_every_rank_before_any_writes():
    """out= is checked with the other arguments: a rank whose out overlaps its inputs raises
    that, the other ranks the same type naming it, and no rank's buffer is written."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 8, 4)).astype(np.float32)
    buffers = [np.full_like(x[:, :, :4], 7.0) for _ in range(2)]

    def work(comm):
        part = x[:, :, 4 * comm.rank: 4 * comm.rank + 4].copy()
        return distributed.forward(part, part, part, comm=comm,
                                   out=part if comm.rank == 1 else buffers[comm.rank])

    results = ThreadRanks(2).run(work)
    assert isinstance(results[1], ValueError) and "out shares memory with q" in str(results[1])
    assert isinstance(results[0], ValueError) and "rank 1" in str(results[0])
    assert (buffers[0] == 7.0).all()

    def backward_work(comm):
        part = x[:, :, 4 * comm.rank: 4 * comm.rank + 4].copy()
        _, ctx = distributed.forward(part, part, part, comm=comm)
        outs = (buffers[0], None) if comm.rank == 0 else None  # two entries, not three
        return distributed.backward(part, part, part, part, context=ctx, comm=comm, out=outs)

    results = ThreadRanks(2).run(backward_work)
    assert isinstance(results[0], TypeError) and "out must be a tuple (dq, dk, dv)" in str(
        results[0])
    assert isinstance(results[1], TypeError) and "rank 0" in str(results[1])
    assert (buffers[0] == 7.0).all()


def test_dstate_on_some_ranks_only_is_refused():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 1, 6, 3)).astype(np.float32)
    dstate = np.ones((1, 1, 3, 3), np.float32)

    def work(comm):
        part = x[:, :, 3 * comm.rank: 3 * comm.rank + 3]
        _, ctx = distributed.forward(part, part, part, comm=comm)
        return distributed.backward(part, part, part, part, context=ctx, comm=comm,
                                    dstate=dstate if comm.rank == 0 else None)

    for result in ThreadRanks(2).run(work):
        assert isinstance(result, ValueError)
        assert "dstate must be given on every rank or on none" in str(result)


def test_comm_and_context_types():
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(TypeError, match=r"comm must be a cosattn\.distributed\.Communicator"):
        distributed.forward(x, x, x, comm=object())
    comm = _ThreadComm(ThreadRanks(1), 0)
    with pytest.raises(TypeError, match="context must be the Context forward returned"):
        distributed.backward(x, x, x, x, context=None, comm=comm)


@pytest.mark.parametrize(("kinds", "aware"), [("mpi,system", False), (None, False),
                                              ("system,cuda:device", True),
                                              ("mpi,cuda", True), ("cuda:host", False)])
def test_cuda_awareness_is_read_from_the_memory_kinds(kinds, aware):
    info = SimpleNamespace(Get=lambda key: kinds if key == "mpi_memory_alloc_kinds" else None)
    assert distributed._mpi_cuda_aware(SimpleNamespace(Get_info=lambda: info)) is aware
