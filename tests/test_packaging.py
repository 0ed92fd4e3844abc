"""The package as users get it: the wheel's contents, and CI running README's test command."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text()


def test_wheel_ships_cuda_sources_reference_and_types(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("cosattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "cuda").iterdir() if re.search(r"\.cuh?$", p.name))
    for name in sources:
        assert f"cosattn/cuda/{name}" in names
    assert "cosattn/reference/__init__.py" in names
    assert "cosattn/py.typed" in names
    assert not any(n.startswith(("reference/", "cuda/", "tests/")) for n in names)
