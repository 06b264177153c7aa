"""The build's record of itself (fastopt/_build_info.json, which setup.py writes beside the
libraries), what `python -m fastopt info` shows of it, and the checks import makes with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import _C
from fastopt._build import build_info, version_tuple


def test_records_this_build():
    info = build_info()
    assert info is not None, "no fastopt/_build_info.json beside the built libraries"
    assert info["cuda"] == _C._cuda_version
    local = "+cu" + "".join(info["cuda"].split(".")[:2]) if info["cuda"] else ""
    # The local version only where asked for (tools/release.py's wheel).
    assert info["version"] in (fastopt.__version__, fastopt.__version__ + local), info
    assert version_tuple(info["stable_abi_target"]) == (2, 10)
    assert version_tuple(info["torch"]) >= (2, 10)
    assert info["python_limited_api"] == "3.10"
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert info["cxx"], info
    if info["cuda"]:
        assert f"release {info['cuda']}" in info["nvcc"], info["nvcc"]
        assert info["cuda_archs"], info
    else:
        assert info["nvcc"] is None and info["cuda_archs"] is None


def test_version_tuple_reads_major_and_minor():
    assert version_tuple("2.10") == (2, 10)
    assert version_tuple("2.10.0+cu128") == (2, 10)
    assert version_tuple("2.11.0a0+git1234") == (2, 11)
    assert version_tuple("2.9.1") < version_tuple("2.10")


def test_info_command_shows_the_build_beside_the_running_torch():
    info = build_info()
    out = subprocess.run([sys.executable, "-m", "fastopt", "info"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert f"built: fastopt {info['version']} from commit " in out, out
    assert f"against torch {info['torch']} (stable ABI: loads into torch >= 2.10)" in out, out
    assert (f"CUDA {info['cuda']}, architectures {info['cuda_archs']}" if info["cuda"]
            else "CUDA: none") in out, out  # fmt: skip
    assert f"running: python {sys.version.split()[0]}, torch {torch.__version__}, " in out, out
    rows = [line.split(maxsplit=3) for line in out.split("usable here  why\n", 1)[1].splitlines()]
    usable = {(name, device): flag for name, device, flag, _why in rows}
    assert usable[("reference", "cpu")] == "yes", out
    if not torch.cuda.is_available():
        # Nothing runs on CUDA without a GPU, whatever the software would support.
        assert {usable[(name, "cuda")] for name in ("reference", "cuda", "triton")} == {"no"}, out
        assert "no CUDA GPU is visible" in out, out


# Imports fastopt with fastopt/_build.py reading the record from `path` instead, and prints
# the backend 'auto' picks on cpu and every fastopt warning.
_PROBE = """
import importlib.util, pathlib, sys, warnings
root = pathlib.Path(importlib.util.find_spec("fastopt").origin).parent
spec = importlib.util.spec_from_file_location("fastopt._build", root / "_build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
build._PATH = pathlib.Path({path!r})
sys.modules["fastopt._build"] = build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastopt
print(fastopt.select_backend("auto", "cpu"))
for w in caught:
    if str(w.message).startswith("fastopt"):
        print(str(w.message).replace(chr(10), " "))
"""


@pytest.mark.parametrize(
    "change,message",
    [
        ({"stable_abi_target": "99.0"}, "needs torch >= 99.0, found torch "),
        ({"cuda": "11.8"}, "fastopt/_build_info.json says CUDA 11.8 and "),
        (None, "has no fastopt/_build_info.json beside it: it is left from an older build"),
    ],
    ids=["torch-too-old", "other-build", "missing"],
)
def test_import_checks_the_build_against_torch_and_the_library(tmp_path, change, message):
    """A torch older than the build targets, or a record of another build (or none), leaves
    fastopt._C unloaded with one warning saying why; import never fails."""
    path = tmp_path / "_build_info.json"
    if change is not None:
        path.write_text(json.dumps({**build_info(), **change}))
    probe = _PROBE.format(path=str(path))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.splitlines()  # fmt: skip
    backend, *warnings = out
    assert backend == "reference"
    assert len(warnings) == 1, warnings
    assert "fastopt._C could not be loaded" in warnings[0] and message in warnings[0], warnings
