"""kernels/ ships as fastopt.kernels (a top-level `kernels` package belongs to another
project: Hugging Face's kernel hub, which transformers imports), from a wheel and from the
editable install, and a checkout's root never shadows that other package."""

from __future__ import annotations

import importlib.metadata
import os
import re
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
        "import fastopt, fastopt.kernels, fastopt._C, fastopt.train.cli, importlib.util;"
        "print(fastopt.kernels.__file__);"
        "spec = importlib.util.find_spec('kernels');"
        "print(spec.origin if spec else None)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=True).stdout.splitlines()  # fmt: skip
    assert out[0].startswith(str(target / "fastopt" / "kernels"))
    # A top-level `kernels` may be installed (Hugging Face's): it must not be one of ours.
    assert not out[1].startswith(str(target)), out[1]


def _import_from_root(code: str, *flags: str, env: dict | None = None):
    """Runs `code` with the checkout's root as the current folder, first on sys.path (as
    `python -m pytest` and any script started there have it)."""
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)  # fmt: skip


def test_checkout_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHOSE = 'the installed package'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    probe = _import_from_root("import kernels; print(kernels.WHOSE); print(kernels.__file__)",
                              env=env)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == ["the installed package", str(other / "__init__.py")]


def test_checkout_kernels_folder_is_no_top_level_package():
    # -S: no site-packages, so no other `kernels` exists; the folder must not stand in for one.
    probe = _import_from_root("import kernels", "-S")
    assert probe.returncode == 1
    last = probe.stderr.strip().splitlines()[-1]
    expected = "ModuleNotFoundError: No module named 'kernels' (the kernels/ folder of a fastopt"
    assert last.startswith(expected), probe.stderr


def test_hugging_face_kernels_imports_from_checkout_root():
    """What broke transformers' Trainer when run from the root (transformers >= 5 imports it)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5 does not need it)")
    probe = _import_from_root("import kernels, transformers.trainer; print(kernels.__file__)")
    assert probe.returncode == 0, probe.stderr
    origin = Path(probe.stdout.splitlines()[-1]).resolve()
    assert origin != ROOT / "kernels" / "__init__.py", origin  # (a venv may be inside ROOT)
    assert Path(dist.locate_file("kernels/__init__.py")).resolve() == origin


def test_package_exports():
    for name in fastopt.__all__:
        assert hasattr(fastopt, name), name


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly (kernels/ is mapped): a new subpackage
    missing there works in the editable install and is absent from the wheel."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", text, re.M)[1]))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "fastopt").rglob("__init__.py")
    }
    assert found | {"fastopt.kernels"} == listed, sorted(found ^ listed)
