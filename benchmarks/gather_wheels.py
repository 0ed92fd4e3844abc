"""Gather the wheels a GPU host without internet needs into one folder, to carry there.

Run on a machine with internet access, from the repository root::

    python -m benchmarks.gather_wheels                  # -> .whl/ (ignored by git)
    python -m benchmarks.gather_wheels --deps --extras cuda13   # a bare air-gapped cluster

By default it fetches what benchmarks/gpu_check.sh needs beyond the GPU host's image (Python
3.12 with CuPy, torch, JAX, numba-cuda, pytest, ...): ``fla-core`` (flash-linear-attention,
pure Python, for the benchmark's fla baseline), ``setuptools>=77`` (to install the checkout
offline with ``pip install -e .``), and this project's own wheel, built from the checkout.
``--deps`` adds the project's dependencies (and those of ``--extras``) for the target Python
and platform, for a host that has none of them. Only one version of each distribution is kept.

On the offline host::

    python3 -m pip install --no-index --find-links .whl cosattn[cuda13]   # a user's install
    bash benchmarks/gpu_check.sh                    # installs from .whl what the image lacks
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MODULE = "benchmarks.gather_wheels"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fla-core", "setuptools>=77")
# The wheel tags an x86-64 Linux host with glibc 2.28 or newer accepts (pip matches each exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")


def target(python_version: str) -> list[str]:
    """pip options that choose wheels for the host rather than for this machine."""
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def prune(folder: Path) -> list[Path]:
    """Delete every wheel of ``folder`` that an newer wheel of the same distribution replaces
    (two versions of one distribution stop a whole ``pip install``); returns those deleted."""
    newest: dict[str, tuple[Version, Path]] = {}
    removed = []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        kept = newest.get(canonicalize_name(name))
        if kept is None or version > kept[0]:
            if kept is not None:
                removed.append(kept[1])
            newest[canonicalize_name(name)] = (version, path)
        else:
            removed.append(path)
    for path in removed:
        path.unlink()
    return removed


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("packages", nargs="*", default=list(PACKAGES),
                   help=f"requirements to fetch without their dependencies (default: "
                        f"{' '.join(PACKAGES)})")
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the folder to fill")
    p.add_argument("--python-version", default="3.12", help="the host's Python")
    p.add_argument("--no-project", action="store_true", help="do not build cosattn's wheel")
    p.add_argument("--deps", action="store_true",
                   help="also fetch cosattn's dependencies for the host (implies its wheel)")
    p.add_argument("--extras", nargs="*", default=[], help="extras whose dependencies --deps "
                                                          "fetches too, e.g. cuda13 bench")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    if args.packages:
        pip("download", "--no-deps", *target(args.python_version), "--dest", str(args.dest),
            *args.packages)
    if not args.no_project or args.deps:
        for old in args.dest.glob("cosattn-*.whl"):
            old.unlink()
        pip("wheel", "--no-deps", "--wheel-dir", str(args.dest), str(ROOT))
    if args.deps:
        (wheel,) = args.dest.glob("cosattn-*.whl")
        extras = f"[{','.join(args.extras)}]" if args.extras else ""
        pip("download", *target(args.python_version), "--dest", str(args.dest),
            f"{wheel}{extras}")
    for path in prune(args.dest):
        print(f"removed {path.name}: a newer version of it is there")
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print("\n".join(w.name for w in wheels))
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
