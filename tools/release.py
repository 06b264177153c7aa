"""Builds a release into dist/: the sdist, the wheel of this build (CUDA kernels when torch
and a toolkit are CUDA ones), and PEP 503 simple indexes, so that
    pip install --index-url file://$PWD/dist/cu13/simple fastopt
installs it. Run from the repository root in the environment to build with (torch installed):
    python tools/release.py [--clean]

One CUDA major per build: a CUDA 12 wheel is built the same way on a machine with a CUDA 12
toolkit and a CUDA 12 torch, into the same dist/ (copied there, or a shared folder). Each run
replaces its own wheel and the sdist of its version, keeps the other variants' wheels, and
writes the indexes over everything in dist/: dist/simple lists every file, dist/cu<major>/simple
only that CUDA major's wheels (pip takes the highest local version from an index that lists
several, so a CUDA 12 cluster uses its own), and dist/cpu/simple the wheel without CUDA
kernels. --clean empties dist/ first.

The wheel is tagged cp310-abi3 (setup.py), version +cu<major><minor> for a CUDA build, and
with the oldest manylinux policy that `auditwheel show` confirms for its glibc and libstdc++
symbol versions (manylinux_2_28 needs a build on glibc 2.28, as in the manylinux_2_28 image).
torch's and CUDA's libraries are never vendored: they are torch's, loaded by `import torch`
before ours, and a second copy in our wheel would be a second libtorch in the process.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
# Sonames that belong to torch or to the CUDA toolkit and driver: never vendored.
NOT_OURS = ("libtorch*.so*", "libc10*.so*", "libcudart.so*", "libcuda.so*", "libshm.so*")


def run(*cmd: str, env: dict | None = None) -> str:
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    return out.stdout


def manylinux_tag(wheel: Path) -> str:
    """The oldest manylinux policy `auditwheel show` confirms for the wheel, given that the
    only libraries it needs from outside the system are torch's and CUDA's."""
    report = json.loads(run(sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)))
    foreign = [lib for lib in report["external_libs"] if not any(fnmatch(lib, p) for p in NOT_OURS)]
    if foreign:
        raise SystemExit(f"release: {wheel.name} needs libraries that are not torch's: {foreign}")
    tag = report["sym_tag"]  # what its glibc and libstdc++ symbol versions allow
    if not tag.startswith("manylinux_"):
        raise SystemExit(f"release: auditwheel confirms no manylinux policy for {wheel.name}")
    return tag


def build() -> tuple[Path, Path]:
    """(sdist, manylinux wheel) in dist/."""
    raw = DIST / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    # The wheel is made of build/lib.*: no file of an earlier build (a library of a CUDA build in
    # a CPU one, a module since deleted) may ride along. The objects, in build/temp.*, stay.
    for lib in (ROOT / "build").glob("lib.*"):
        shutil.rmtree(lib)
    # --no-isolation: against the torch of this environment; from the source tree (not from the
    # sdist), so the objects of an earlier build in build/ are reused.
    run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--outdir", str(raw))
    env = dict(os.environ, FASTOPT_LOCAL_VERSION="1")  # the wheel says its CUDA: +cu130
    run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(raw), env=env)
    (sdist,) = raw.glob("fastopt-*.tar.gz")
    (wheel,) = raw.glob("fastopt-*.whl")
    # Retagged, not repaired: nothing is to be grafted (torch's and CUDA's libraries must not
    # be), and `auditwheel repair` would rewrite the libraries' RPATH for nothing.
    out = run(sys.executable, "-m", "wheel", "tags", "--platform-tag", manylinux_tag(wheel),
              str(wheel))  # fmt: skip
    tagged = raw / out.split()[-1]
    for f in (tagged, sdist):
        for old in DIST.glob(_same_build(f.name)):
            old.unlink()
        shutil.move(f, DIST / f.name)
    shutil.rmtree(raw)
    return DIST / sdist.name, DIST / tagged.name


def _same_build(name: str) -> str:
    """A glob for the files in dist/ that a new file named ``name`` replaces: the sdist of its
    version, or the wheel of its version and local version (any platform tag)."""
    if name.endswith(".tar.gz"):
        return name
    return name.split("-")[1].join(("fastopt-", "-*.whl"))


def variant(wheel: str) -> str:
    """The index a wheel belongs to: "cu13" for fastopt-0.1.0+cu130-..., "cpu" without a
    local version."""
    match = re.match(r"fastopt-[^-+]+\+cu(\d+?)(\d)-", wheel)
    return f"cu{match.group(1)}" if match else "cpu"


def write_index(simple: Path, files: list[Path]) -> Path:
    """simple/index.html and simple/fastopt/index.html (PEP 503) for ``files`` in dist/, the
    links relative and each with its sha256, so the dist/ folder can be moved or served as it
    is."""
    project = simple / "fastopt"
    project.mkdir(parents=True)
    up = os.path.relpath(DIST, project)
    links = []
    for f in sorted(files):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        name = html.escape(f.name)
        links.append(f'<a href="{up}/{name}#sha256={digest}">{name}</a><br>')
    page = "<!DOCTYPE html>\n<html><body>\n{}\n</body></html>\n"
    (simple / "index.html").write_text(page.format('<a href="fastopt/">fastopt</a><br>'))
    (project / "index.html").write_text(page.format("\n".join(links)))
    return simple


def write_indexes() -> list[Path]:
    """dist/simple over every wheel and sdist in dist/, and dist/<variant>/simple over each
    variant's wheels; indexes of earlier runs are rewritten."""
    files = sorted(DIST.glob("fastopt-*.whl")) + sorted(DIST.glob("fastopt-*.tar.gz"))
    variants: dict[str, list[Path]] = {}
    for f in files:
        if f.suffix == ".whl":
            variants.setdefault(variant(f.name), []).append(f)
    for old in [*DIST.glob("simple"), *DIST.glob("*/simple")]:
        shutil.rmtree(old)
    indexes = [write_index(DIST / "simple", files)]
    indexes += [write_index(DIST / name / "simple", wheels) for name, wheels in variants.items()]
    return indexes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="empty dist/ first")
    args = parser.parse_args(argv)
    if args.clean:
        shutil.rmtree(DIST, ignore_errors=True)
    sdist, wheel = build()
    indexes = write_indexes()
    print(f"{wheel.name}\n{sdist.name}")
    for simple in indexes:
        print(f"index: {simple.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
