"""The benchmark harnesses: baselines against the reference, memory estimates against measured
peaks, the bandwidth, skip and target arithmetic, smoke runs of the CPU benchmark and of the GPU
scripts' NumPy dry paths (tiny sizes, a few seconds in all), and the GPU check's plan: its
steps, time and file limits in a dry run, the precompiler's cache key, the wheel gathering."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import (
    baselines,
    context_parallel,
    cpu_bench,
    gather_wheels,
    gpu_bench,
    gpu_profile,
    gpu_smoke,
    gpu_variants,
    precompile,
    serve_bench,
)
from cosattn import reference

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
                           "--repeats", "2", "--rounds", "1", "--out", str(tmp_path)]) == 0
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
    margin = data["margin"]
    assert {c["name"] for c in margin["checks"]} == set(cpu_bench.MARGIN_TARGETS)
    assert all(c["value"] > 0 for c in margin["checks"])
    assert set(margin["dtype_seconds"]) == {f"{d} {m}" for d in cpu_bench.MARGIN_DTYPES
                                            for m in ("fwd", "fwdbwd")} | {
        f"{cpu_bench.REUSED} fwdbwd"}
    for name, halves in margin["training_step_halves"].items():  # the halves fit in the step
        assert 0 < halves["fwd_s"] + halves["bwd_s"] <= 1.5 * margin["dtype_seconds"][
            f"{name} fwdbwd"]
        assert halves["fwd_faults"] >= 0 and halves["bwd_faults"] >= 0
    md = (tmp_path / "cpu_bench_quick.md").read_text()
    assert data["command"] in md and "## forward + backward" in md and "## Margin rows" in md
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
    assert len(attention) == len(cfg["shapes"]) * len(cfg["dtypes"]) * 2 * 5
    assert {(r["B"], r["H"], r["S"], r["D"]) for r in attention} == {
        tuple(s) for s in gpu_bench.PROFILES["cpu", True]["shapes"]}
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
    assert data["targets"]["measured"] == 0  # the targets' shapes are not in a dry run
    md = (tmp_path / "gpu_bench_dry_quick.md").read_text()
    assert "## Recurrent step" in md and "## Targets (issue 11)" in md


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


def _attention(impl, mode, B, H, S, seconds, fraction=None):
    return {"kind": "attention", "impl": impl, "status": "ok", "dtype": "bfloat16", "D": 128,
            "mode": mode, "B": B, "H": H, "S": S, "median_s": seconds,
            "fraction_of_copy": fraction}


def _step(impl, B, device_s, host_s, fraction):
    return {"kind": "step", "impl": impl, "status": "ok", "dtype": "bfloat16", "D": 128, "B": B,
            "H": 16, "device_time_per_step_s": device_s, "host_time_per_call_s": host_s,
            "fraction_of_copy": fraction}


def test_gpu_bench_evaluates_the_targets_of_issue_11():
    results = [
        _attention("cosattn:cupy", "fwd", 8, 16, 8192, 1.0, 0.95),
        _attention("cosattn:cupy", "fwd", 8, 16, 16384, 2.0, 0.85),
        _attention("cosattn:cupy", "fwd", 1, 8, 65536, 1.0, 0.61),
        _attention("cosattn:cupy", "fwdbwd", 8, 16, 16384, 1.0),
        _attention("fla", "fwdbwd", 8, 16, 16384, 2.5),
        _attention("sdpa", "fwdbwd", 8, 16, 16384, 4.0),
        _attention("cosattn:numba", "fwdbwd", 8, 16, 16384, 2.9),
        _attention("cosattn:numba", "fwd", 8, 16, 8192, 3.5),
        _step("cosattn:cupy", 64, 1e-5, 2e-5, 0.7),
        _step("cosattn:cupy", 1, 8e-6, 5e-5, 0.01),
        _step("cosattn:numba", 1, 2e-5, 5e-5, 0.01),
        {"kind": "attention", "impl": "cosattn:cupy", "mode": "fwd", "B": 8, "H": 16,
         "S": 32768, "D": 128, "dtype": "bfloat16", "status": "error", "reason": "no memory"},
    ]
    targets = gpu_bench.check_targets(results)
    got = {c["name"]: (c["value"], c["met"]) for c in targets["checks"]}
    fwd = "forward bf16 B8 H16 D128 S{}: fraction of copy bandwidth"
    fwdbwd = "forward+backward bf16 B8 H16 D128 S16384: speed-up over {}"
    assert got == {
        fwd.format(8192): (0.95, True), fwd.format(16384): (0.85, False),
        fwd.format(32768): (None, None), fwd.format(65536): (None, None),
        "forward bf16 B1 H8 D128 S65536: fraction of copy bandwidth": (0.61, True),
        fwdbwd.format("fla"): (2.5, True), fwdbwd.format("sdpa"): (4.0, False),
        "step B64 H16 D128 (B*H = 1024): fraction of copy bandwidth on the state": (0.7, False),
        "step B1 H16 D128: device time per step (us)": (pytest.approx(8.0), True),
        "step B1 H16 D128: host time per call (us)": (pytest.approx(50.0), False),
        "numba time over cupy time, worst case on the same shapes": (3.5, False),
    }
    assert targets["measured"] == 9 and targets["all_met"] is False


def test_device_normal_rounds_bfloat16_through_its_bits_as_ml_dtypes_does():
    """The GPU path (integer rounding, no bfloat16 arithmetic), run on NumPy arrays."""
    bf16 = gpu_bench.DTYPES["bfloat16"]
    not_numpy = SimpleNamespace(random=np.random, uint32=np.uint32, uint16=np.uint16,
                                int16=np.int16)
    got = gpu_bench.device_normal(not_numpy, (64, 1000), bf16, seed=4)
    want = np.random.default_rng(4).standard_normal((64, 1000), dtype=np.float32).astype(bf16)
    assert got.dtype == bf16 and got.tobytes() == want.tobytes()


def test_gpu_variants_lists_one_default_variant_without_the_backend_hook(monkeypatch):
    from cosattn.backends import _cupy

    monkeypatch.delattr(_cupy, "VARIANTS", raising=False)
    assert list(gpu_variants.variants()) == ["default"]


def _listed_variants(monkeypatch, names: tuple[str, ...]) -> list[str]:
    """The cupy backend made to list the variants ``names``; returns the names entered, in
    order, as gpu_variants selects them."""
    from cosattn.backends import _cupy

    entered = []

    @contextlib.contextmanager
    def variant(name):
        entered.append(name)
        yield

    monkeypatch.setattr(_cupy, "VARIANTS", names, raising=False)
    monkeypatch.setattr(_cupy, "variant", variant, raising=False)
    return entered


def test_gpu_variants_dry_run_times_and_measures_every_listed_variant(tmp_path, monkeypatch):
    names = ("three-pass", "single-pass")
    entered = _listed_variants(monkeypatch, names)
    assert gpu_variants.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_variants_dry_quick.json").read_text())
    profile = gpu_variants.PROFILES["cpu", True]
    assert [(r["variant"], r["dtype"]) for r in data["results"]] == [
        (n, d) for n in names for d in profile["dtypes"]]
    assert entered == [n for n in names for _ in profile["dtypes"]]
    for r in data["results"]:
        assert set(r["errors"]["random"]) == {"o", "kv", "dq", "dk", "dv", "dm", "dkv0"}
        assert set(r["errors"]["cancelling"]) == {"o", "kv", "dq", "dk", "dv", "dm"}
        assert r["ok"] and all(e <= r["bound"] for kind in gpu_variants.KINDS
                               for e in r["errors"][kind].values())
        assert [(t["shape"], t["mode"]) for t in r["timings"]] == [
            (list(s), m) for s in profile["timing_shapes"] for m in gpu_bench.MODES]
        assert all(t["status"] == "ok" and t["fraction_of_copy"] > 0 for t in r["timings"])
    assert "## Errors" in (tmp_path / "gpu_variants_dry_quick.md").read_text()


def test_gpu_variants_records_a_variant_that_cannot_run_and_runs_the_others(tmp_path,
                                                                           monkeypatch):
    """A variant whose calls raise (a launch the device refuses, say) is recorded with the
    reason, not ok, and the variants after it are still measured; the exit status is 1."""
    current = _listed_variants(monkeypatch, ("broken", "fine"))

    def failing(*args, **kwargs):
        if current[-1] == "broken":
            raise RuntimeError("cluster launch refused")
        return real_forward(*args, **kwargs)

    real_forward = gpu_variants.forward
    monkeypatch.setattr(gpu_variants, "forward", failing)
    assert gpu_variants.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_variants_dry_quick.json").read_text())
    for r in data["results"]:
        if r["variant"] == "broken":
            assert not r["ok"] and r["errors"] == {}
            assert set(r["failed"]) == set(gpu_variants.KINDS)
            assert all("cluster launch refused" in reason for reason in r["failed"].values())
            assert all(t["status"] == "error" for t in r["timings"])
        else:
            assert r["ok"] and r["failed"] == {} and set(r["errors"]) == set(gpu_variants.KINDS)
    assert "cluster launch refused" in (tmp_path / "gpu_variants_dry_quick.md").read_text()


def test_cancelling_inputs_cancel():
    """Each output of the cancelling inputs is a small fraction of the size of its terms."""
    x = gpu_variants.make_inputs("cancelling", 1, 2, 256, 16, np.dtype(np.float32))
    f = {n: x[n].astype(np.float64) for n in ("q", "k", "v")}
    qh, kh = (reference.normalize(f[n])[0] for n in ("q", "k"))
    c = reference.counts(np.ones((1, 256), bool), np.zeros(1, np.int64), True)
    vt = reference.weights(x["m"], c, 2)[..., None] * f["v"]
    o, _, _ = reference.forward(f["q"], f["k"], f["v"], x["m"].astype(np.float64))
    sizes = np.abs(np.tril(qh @ kh.swapaxes(-1, -2))) @ np.abs(vt)
    assert np.linalg.norm(sizes) > 30 * np.linalg.norm(o)


def test_gpu_profile_makes_its_calls_on_the_cpu():
    assert gpu_profile.main(["--device", "cpu"]) == 0


def test_precompile_builds_each_module_through_the_backends_own_build(monkeypatch):
    """Every kernel of the module through _cupy._kernel on device 0, so the cache holds what
    the backend looks up; a failure is reported with its message, not raised."""
    from cosattn.backends import _cupy

    built = []
    monkeypatch.setattr(_cupy, "_kernel", lambda spec, e, device: built.append((spec, e, device)))
    spec = _cupy.all_specs()[0]
    result = precompile.build(spec)
    assert result["ok"] and result["spec"] == spec
    assert built == [(spec, e, 0) for e in spec.expressions]

    def fails(spec, expression, device):
        raise RuntimeError("NVRTC says no")

    monkeypatch.setattr(_cupy, "_kernel", fails)
    result = precompile.build(spec)
    assert not result["ok"] and "NVRTC says no" in result["error"]


def test_precompile_lists_every_module(capsys):
    from cosattn.backends import _cupy

    assert precompile.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(_cupy.all_specs()) + 1


def test_gather_wheels_keeps_the_newest_version_of_each(tmp_path):
    names = ["fla_core-0.5.0-py3-none-any.whl", "fla_core-0.6.0-py3-none-any.whl",
             "setuptools-80.1.0-py3-none-any.whl", "setuptools-80.0.9-py3-none-any.whl",
             "numpy-2.1.0-cp312-cp312-manylinux_2_17_x86_64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    removed = gather_wheels.prune(tmp_path)
    assert sorted(p.name for p in removed) == [names[0], names[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], names[2], names[4]])


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
STATUS = re.compile(r"^(\w+): exit (\d+) after \d+ s \(limit (\d+) s, group (\w)\)$", re.M)


def _dry_check(tmp_path, *args, fail=""):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_FAIL=fail, TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", *args, str(out)],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    return run, out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("mode", "budget"), [("full", 480), ("quick", 180)])
def test_gpu_check_goes_on_after_a_failure_within_its_time_and_file_limits(tmp_path, mode,
                                                                          budget):
    run, out = _dry_check(tmp_path, *(["--quick"] if mode == "quick" else []), fail="memcheck")
    assert run.returncode == 1, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    steps = STATUS.findall(summary)
    names = {"setup", "precompile", "pytest_cupy", "memcheck", "racecheck", "gpu_bench",
             "gpu_variants"}
    if mode == "full":
        names |= {"pytest_numba", "synccheck", "initcheck", "examples", "fla_warmup", "ncu"}
    assert {s[0] for s in steps} == names
    assert {s[0]: s[1] for s in steps} == {n: "1" if n == "memcheck" else "0" for n in names}
    limits: dict[str, int] = {}
    for _, _, limit, group in steps:
        limits[group] = max(limits.get(group, 0), int(limit))
    # each group's longest limit, 5 s to kill an overrunning step, 15 s for the rest
    assert sum(limits.values()) + 5 * len(limits) + 15 <= budget, limits
    assert "command: bash benchmarks/gpu_check.sh --dry-run" in summary
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
    assert {f"{n}.log" for n in names} | {"summary.txt"} <= logs


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    run, out = _dry_check(tmp_path, "--only", "pytest_cupy,ncu")
    assert run.returncode == 0, run.stdout + run.stderr
    ran = {s[0] for s in STATUS.findall((out / "summary.txt").read_text())}
    assert ran == {"setup", "pytest_cupy", "ncu"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_gpu_check_script_passes_shellcheck():
    subprocess.run(["shellcheck", str(GPU_CHECK)], check=True)


def test_context_parallel_costs_use_the_exchanged_bytes(capsys):
    """The scale table counts what cosattn.distributed sends: two B·H·D² sums of 4 bytes and
    the small buffers, 5 all-gathers; the receive side grows as R - 1."""
    sent, messages = context_parallel.exchanged_bytes(1, 32, 128, 128, 4, 4)
    assert messages == 5
    assert 2 * 4 * 32 * 128 * 128 < sent < 2 * 4 * 32 * 128 * 128 + 1024
    context_parallel.main(["costs"])
    out = capsys.readouterr().out
    assert f"| 64 | 16384 | {sent / 2**20:.1f} MiB / {63 * sent / 2**20:.0f} MiB | 5 |" in out
