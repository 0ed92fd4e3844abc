"""The benchmark harnesses: baselines against the reference, memory estimates against measured
peaks, the bandwidth and skip arithmetic, and smoke runs of the CPU benchmark and of the GPU
benchmark's NumPy dry path (tiny sizes, a few seconds in all)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import baselines, cpu_bench, gpu_bench, gpu_smoke, serve_bench

from helpers import TOL, case_id, make_case, reference_backward, reference_forward, rel_err

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("form", baselines.FORMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("mask", ["none", "left", "inner"])
@pytest.mark.parametrize("shape", [(2, 3, 67, 16, 12), (1, 2, 1, 5, 3)],
                         ids=lambda s: case_id(*s))
def test_baseline_matches_reference(form, dtype, mask, shape):
    case = make_case(np.random.default_rng(7), *shape, dtype, mask=mask)
    o = getattr(baselines, f"{form}_forward")(np, case.q, case.k, case.v, case.m, mask=case.mask)
    grads = getattr(baselines, f"{form}_backward")(np, case.do, case.q, case.k, case.v, case.m,
                                                   mask=case.mask)
    o_ref, _, _ = reference_forward(case)
    assert o.dtype == case.dtype
    assert rel_err(o, o_ref) <= TOL[np.dtype(dtype)]
    for name, got, ref in zip(("dq", "dk", "dv", "dm"), grads, reference_backward(case)[:4],
                              strict=True):
        assert rel_err(got, ref) <= TOL[np.dtype(dtype)], name


@pytest.mark.parametrize("form", baselines.FORMS)
@pytest.mark.parametrize("mode", baselines.MODES)
def test_needed_bytes_bounds_the_measured_peak(form, mode):
    B, H, S, D = 1, 4, 256, 32
    x = cpu_bench.make_inputs(B, H, S, D, D, np.float32)
    peak = cpu_bench.peak_extra_bytes(cpu_bench.case(form, mode, x))
    estimate = baselines.needed_bytes(form, mode, B, H, S, D, D, np.float32)
    assert 0.6 * estimate <= peak <= estimate


def test_needed_bytes_counts_the_second_scan_buffer_of_the_printed_form():
    args = ("fwd", 2, 3, 64, 16, 8, np.float32)
    big = 2 * 3 * 64 * 16 * 8 * 4
    assert (baselines.needed_bytes("appendix", *args)
            - baselines.needed_bytes("appendix_sliced", *args)) == big


def test_min_bytes_and_bandwidth_arithmetic():
    # forward: read q, k (Dk=2) and v (Dv=3), write o: (2 + 2 + 3 + 3) values per row of 2 bytes
    assert gpu_bench.min_bytes("fwd", 1, 1, 1, 2, 3, 2) == 20
    # backward adds: read q, k, v, do, write dq, dk, dv: (4 * 2 + 3 * 3) values
    assert gpu_bench.min_bytes("fwdbwd", 2, 1, 1, 2, 3, 2) == 2 * (20 + 34)
    assert gpu_bench.step_state_bytes(2, 3, 4, 5) == 2 * (2 * 3 * 5 * 4) * 4
    bw = gpu_bench.bandwidth(10**9, 0.5, 4e9)
    assert bw == {"bytes_per_s": 2e9, "fraction_of_copy": 0.5}
    assert gpu_bench.bandwidth(10, 1.0, None)["fraction_of_copy"] is None
    with pytest.raises(ValueError, match="mode"):
        gpu_bench.min_bytes("bwd", 1, 1, 1, 1, 1, 4)


class _SmallMachine(gpu_bench.CpuRuntime):
    def __init__(self, free: int) -> None:
        self.free = free

    def free_bytes(self) -> int:
        return self.free


def test_gpu_case_over_the_free_memory_is_skipped_with_its_need():
    x = gpu_bench.make_inputs(np, 1, 2, 128, 16, np.dtype(np.float32))
    args = gpu_bench.parse_args(["--device", "cpu", "--quick"])
    need = gpu_bench.needed_bytes("appendix", "fwd", 1, 2, 128, 16, np.float32)
    tight = _SmallMachine(int(need / gpu_bench.MEMORY_FRACTION) - 100)
    rec = gpu_bench.run_case(tight, "appendix", "fwd", x, None, args)
    assert rec["status"] == "skipped"
    assert rec["needed_bytes"] == need > rec["budget_bytes"]
    roomy = _SmallMachine(int(need / gpu_bench.MEMORY_FRACTION) + 100)
    rec = gpu_bench.run_case(roomy, "appendix", "fwd", x, None, args)
    assert rec["status"] == "ok" and rec["fraction_of_copy"] is None


def test_cpu_bench_quick_writes_its_results(tmp_path):
    B, H, D, sizes = 1, 2, 16, (128, 192)
    assert cpu_bench.main(["--quick", "--S", *map(str, sizes), "--H", str(H), "--D", str(D),
                           "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu_bench_quick.json").read_text())
    assert data["command"].startswith("python -m benchmarks.cpu_bench --quick")
    for key in ("cpu", "cpu_count", "numpy", "blas", "python", "load_average"):
        assert key in data["machine"]
    assert data["agreement"]["ok"]
    assert {(c["impl"], c["dtype"]) for c in data["agreement"]["cases"]} == {
        (i, d) for i in cpu_bench.IMPLS for d in ("float64", "float32")}
    for c in data["agreement"]["cases"]:
        assert max(c["errors"].values()) <= c["tolerance"]
    results = {(r["impl"], r["mode"], r["S"]): r for r in data["results"]}
    assert set(results) == {(i, m, S) for i in cpu_bench.IMPLS for m in cpu_bench.MODES
                            for S in sizes}
    for (impl, _mode, S), r in results.items():
        assert r["status"] == "ok" and r["repeats"] == 2 and r["median_s"] > 0
        o_bytes = B * H * S * D * 4
        assert r["qkvo_bytes"] == 4 * o_bytes
        assert r["peak_extra_bytes"] >= o_bytes  # the output is allocated inside the call
        if impl.startswith("appendix"):  # ... and the cumulative sum, (B, H, S, D, D) float32
            assert r["peak_extra_bytes"] >= B * H * S * D * D * 4
    assert not data["targets"]["evaluated"]
    md = (tmp_path / "cpu_bench_quick.md").read_text()
    assert data["command"] in md and "## forward + backward" in md
    assert (tmp_path / "cpu_bench_quick.png").stat().st_size > 0


def test_cpu_bench_skips_baselines_over_the_budget(tmp_path):
    argv = ["--quick", "--S", "256", "--H", "2", "--D", "16", "--memory-budget-gb", "1e-4",
            "--out", str(tmp_path)]
    assert cpu_bench.main(argv) == 0
    data = json.loads((tmp_path / "cpu_bench_quick.json").read_text())
    for r in data["results"]:
        if r["impl"] == "cosattn":
            assert r["status"] == "ok"
        else:
            assert r["status"] == "skipped"
            need = baselines.needed_bytes(r["impl"], r["mode"], 1, 2, 256, 16, 16, np.float32)
            assert r["needed_bytes"] == need > r["budget_bytes"] == 100_000


def test_cpu_bench_evaluates_targets_at_8192_only_in_the_default_configuration():
    config = {"B": 1, "H": 8, "Dk": 64, "Dv": 64, "dtype": "float32", "S": [8192]}
    ok = {"status": "ok", "S": 8192}
    results = [ok | {"impl": "cosattn", "mode": "fwd", "median_s": 0.05, "peak_extra_ratio": 2},
               ok | {"impl": "cosattn", "mode": "fwdbwd", "median_s": 0.3, "peak_extra_ratio": 3},
               ok | {"impl": "appendix", "mode": "fwd", "median_s": 5.0},
               ok | {"impl": "appendix", "mode": "fwdbwd", "median_s": 6.0}]
    targets = cpu_bench.check_targets(results, config)
    met = {c["name"]: c["met"] for c in targets["checks"]}
    assert met == {"fwd median (s)": True, "fwd speedup over the appendix form": True,
                   "fwd peak extra memory / bytes(q, k, v, o)": True,
                   "fwdbwd median (s)": False, "fwdbwd speedup over the appendix form": False,
                   "fwdbwd peak extra memory / bytes(q, k, v, o)": True}
    assert targets["all_met"] is False
    assert not cpu_bench.check_targets(results, config | {"H": 4})["evaluated"]


def test_gpu_bench_dry_run_on_the_cpu(tmp_path):
    assert gpu_bench.main(["--device", "cpu", "--quick", "--dtypes", "float32", "bfloat16",
                           "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_bench_dry_quick.json").read_text())
    assert data["command"].startswith("python -m benchmarks.gpu_bench --device cpu")
    assert data["copy_bandwidth"]["bytes_per_s"] > 0
    assert data["agreement"]["ok"]
    checked = {c["impl"] for c in data["agreement"]["cases"] if c["status"] == "ok"}
    assert checked == {"cosattn:numpy", "appendix", "quadratic"}
    attention = [r for r in data["results"] if r["kind"] == "attention"]
    cfg = data["config"]
    assert len(attention) == len(cfg["S"]) * len(cfg["dtypes"]) * len(cfg["D"]) * 2 * 5
    for r in attention:
        if r["impl"] == "fla" or (r["impl"] == "sdpa" and not HAS_TORCH):
            assert r["status"] == "unavailable"
            continue
        assert r["status"] == "ok", r
        itemsize = np.dtype(gpu_bench.DTYPES[r["dtype"]]).itemsize
        assert r["min_bytes"] == gpu_bench.min_bytes(r["mode"], r["B"], r["H"], r["S"], r["D"],
                                                     r["D"], itemsize)
        assert r["bytes_per_s"] == pytest.approx(r["min_bytes"] / r["median_s"])
        assert r["fraction_of_copy"] == pytest.approx(
            r["bytes_per_s"] / data["copy_bandwidth"]["bytes_per_s"])
    steps = [r for r in data["results"] if r["kind"] == "step"]
    assert len(steps) == 2 * len(cfg["dtypes"])
    for r in steps:
        assert r["status"] == "ok" and r["host_time_per_call_s"] > 0
        assert r["steps_queued_ahead"] is None  # the CPU is its own device
        assert r["bytes_per_s"] == pytest.approx(
            gpu_bench.step_state_bytes(r["B"], r["H"], r["D"], r["D"])
            / r["device_time_per_step_s"])
    assert "## Recurrent step" in (tmp_path / "gpu_bench_dry_quick.md").read_text()


def test_serve_bench_quick_writes_its_results(tmp_path):
    argv = ["--quick", "--sequences", "5", "--max-len", "200", "--H", "2", "--D", "16",
            "--active", "3", "64", "--pool-slots", "70", "--calls", "2", "--repeats", "2",
            "--out", str(tmp_path)]
    assert serve_bench.main(argv) == 0
    data = json.loads((tmp_path / "serve_bench_quick.json").read_text())
    assert data["command"].startswith("python -m benchmarks.serve_bench --quick")
    packed = data["packed"]
    L = serve_bench.lengths(5, 16, 200, 0)
    assert packed["lengths"] == L.tolist() and packed["T"] == L.sum()
    assert packed["padded_tokens"] == 5 * L.max()
    assert packed["agreement"]["ok"]
    assert set(packed["results"]) == {"packed", "padded", "single"}
    assert all(r["repeats"] == 2 for r in packed["results"].values())
    assert [t["limit"] for t in packed["targets"]] == [
        serve_bench.PACKED_VS_SINGLE_MAX, packed["padded_over_real"] / serve_bench.PADDING_DISCOUNT]
    records = {r["active"]: r for r in data["pool"]["records"]}
    assert set(records) == {3, 64}
    for A, r in records.items():
        assert r["state_bytes_per_step"] == 2 * A * 2 * 16 * 16 * 4
        per_step = {n: x["median_s"] for n, x in r["results"].items()}
        assert r["bytes_per_s"]["copy"] == pytest.approx(r["state_bytes_per_step"]
                                                         / per_step["copy"])
        assert r["tokens_per_s"]["pool"] == pytest.approx(A / per_step["pool"])
    assert [t["name"].split(",")[0] for t in data["pool"]["targets"]] == [
        "pool step / batched step throughput", "pool step bandwidth / copy bandwidth"]
    md = (tmp_path / "serve_bench_quick.md").read_text()
    assert data["command"] in md and "## Targets (issue 14)" in md


def test_serve_bench_lengths_are_log_uniform_and_fixed_by_the_seed():
    L = serve_bench.lengths(2000, 16, 4096, 3)
    assert L.min() >= 16 and L.max() <= 4096
    assert np.array_equal(L, serve_bench.lengths(2000, 16, 4096, 3))
    quarters = np.histogram(np.log(L + 0.5), bins=4, range=(np.log(16), np.log(4096)))[0]
    assert quarters.min() > 0.8 * quarters.max()  # each quarter of the log range equally often


def test_gpu_smoke_checks_pass_on_the_numpy_backend():
    assert gpu_smoke.main(["--device", "cpu"]) == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
