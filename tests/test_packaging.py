"""kernels/ ships as fastopt.kernels (a top-level `kernels` package belongs to another
project), from a wheel and from the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastopt

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_into_fastopt():
    import fastopt.kernels

    assert Path(fastopt.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(fastopt.kernels.adamw_step)


@pytest.mark.slow
def test_wheel_installs_kernels_as_fastopt_kernels(tmp_path):
    env = dict(os.environ, FASTOPT_CUDA="0", MAX_JOBS="2")  # the CPU build is enough here
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, env=env, timeout=900,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fastopt-*.whl")
    # One wheel for every CPython from 3.10: the modules use the limited API only.
    assert "-cp310-abi3-" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastopt/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package"
    assert "fastopt/_C.abi3.so" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300)  # fmt: skip
    probe = (
        "import fastopt, fastopt.kernels, fastopt._C, importlib.util;"
        "print(fastopt.kernels.__file__);"
        "print(importlib.util.find_spec('kernels'))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=True).stdout.splitlines()  # fmt: skip
    assert out[0].startswith(str(target / "fastopt" / "kernels"))
    assert out[1] == "None"


def test_package_exports():
    for name in fastopt.__all__:
        assert hasattr(fastopt, name), name
