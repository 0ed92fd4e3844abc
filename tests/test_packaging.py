"""The package as users get it: the wheel's contents, and CI running README's test command."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from this checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(folder), str(ROOT)],
        check=True, capture_output=True,
    )
    (built,) = folder.glob("cosattn-*.whl")
    return built


def test_wheel_ships_cuda_sources_reference_and_types(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "cuda").iterdir() if re.search(r"\.cuh?$", p.name))
    for name in sources:
        assert f"cosattn/cuda/{name}" in names
    assert "cosattn/reference/__init__.py" in names
    assert "cosattn/py.typed" in names
    assert not any(n.startswith(("reference/", "cuda/", "tests/")) for n in names)


def test_installed_wheel_finds_its_cuda_sources(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = subprocess.run(
        [sys.executable, "-c", "from cosattn.backends import _cupy; "
         "print(_cupy.source_folder()); print(len(_cupy.source_text('forward.cu')))"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    ).stdout.split()
    assert Path(found[0]) == site / "cosattn" / "cuda"
    assert int(found[1]) > 0


def test_a_checkout_on_sys_path_hides_nothing():
    """The top-level cuda/ is a plain folder: NVIDIA's ``cuda`` namespace package (CuPy needs
    it) stays importable from a checkout, and the reference loads under one name only."""
    pytest.importorskip("cuda.bindings")
    script = ("import sys, cuda.bindings, cosattn, cosattn.reference, helpers; "
              "print(sorted(m for m in sys.modules if m.split('.')[-1] == 'reference'))")
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    ).stdout
    assert out.split() == ["['cosattn.reference']"]
