"""Builds a release into dist/: the sdist, the wheel of this build (CUDA kernels when torch
and a toolkit are CUDA ones), and a PEP 503 simple index, so that
    pip install --index-url file://$PWD/dist/simple fastopt
installs it. Run from the repository root in the environment to build with (torch installed):
    python tools/release.py

The wheel is tagged cp310-abi3 (setup.py), version +cu<major><minor> for a CUDA build, and
with the oldest manylinux policy that `auditwheel show` confirms for its glibc and libstdc++
symbol versions (manylinux_2_28 needs a build on glibc 2.28, as in the manylinux_2_28 image).
torch's and CUDA's libraries are never vendored: they are torch's, loaded by `import torch`
before ours, and a second copy in our wheel would be a second libtorch in the process.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
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
    shutil.rmtree(DIST, ignore_errors=True)
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
        shutil.move(f, DIST / f.name)
    shutil.rmtree(raw)
    return DIST / sdist.name, DIST / tagged.name


def write_index(files: list[Path]) -> Path:
    """dist/simple/index.html and dist/simple/fastopt/index.html (PEP 503), the links relative
    and each with its sha256, so the dist/ folder can be moved or served as it is."""
    simple = DIST / "simple"
    project = simple / "fastopt"
    project.mkdir(parents=True)
    links = []
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        name = html.escape(f.name)
        links.append(f'<a href="../../{name}#sha256={digest}">{name}</a><br>')
    page = "<!DOCTYPE html>\n<html><body>\n{}\n</body></html>\n"
    (simple / "index.html").write_text(page.format('<a href="fastopt/">fastopt</a><br>'))
    (project / "index.html").write_text(page.format("\n".join(links)))
    return simple


def main() -> int:
    sdist, wheel = build()
    simple = write_index([wheel, sdist])
    print(f"{wheel.name}\n{sdist.name}\nindex: {simple.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
