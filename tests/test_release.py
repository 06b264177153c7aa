"""tools/release.py's indexes: each CUDA major its own, pip taking the right wheel from each."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = [
    "fastopt-0.1.0+cu130-cp310-abi3-manylinux_2_27_x86_64.whl",
    "fastopt-0.1.0+cu128-cp310-abi3-manylinux_2_28_x86_64.whl",
    "fastopt-0.1.0-cp310-abi3-manylinux_2_27_x86_64.whl",
]


@pytest.fixture()
def release(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("release", ROOT / "tools" / "release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DIST", tmp_path / "dist")
    return module


def _fake_files(dist: Path) -> None:
    dist.mkdir()
    for name in WHEELS:  # what pip download reads of a wheel: its name, tags and metadata
        version = name.split("-")[1]
        info = f"fastopt-{version}.dist-info"
        with zipfile.ZipFile(dist / name, "w") as z:
            z.writestr(
                f"{info}/METADATA", f"Metadata-Version: 2.1\nName: fastopt\nVersion: {version}\n"
            )
            z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
            z.writestr(f"{info}/RECORD", "")
    (dist / "fastopt-0.1.0.tar.gz").write_bytes(b"sdist")


def test_variants_and_replaced_files(release):
    assert [release.variant(w) for w in WHEELS] == ["cu13", "cu12", "cpu"]
    assert release._same_build(WHEELS[0]) == "fastopt-0.1.0+cu130-*.whl"
    # A CPU wheel's glob does not reach the CUDA wheels of its version, nor the reverse.
    assert release._same_build(WHEELS[2]) == "fastopt-0.1.0-*.whl"
    assert release._same_build("fastopt-0.1.0.tar.gz") == "fastopt-0.1.0.tar.gz"


def test_indexes_list_each_variant(release):
    dist = release.DIST
    _fake_files(dist)
    (dist / "simple" / "stale").mkdir(parents=True)  # an earlier run's index is rewritten
    indexes = release.write_indexes()
    assert sorted(p.relative_to(dist).as_posix() for p in indexes) == [
        "cpu/simple", "cu12/simple", "cu13/simple", "simple"
    ]  # fmt: skip
    assert not (dist / "simple" / "stale").exists()
    everything = (dist / "simple" / "fastopt" / "index.html").read_text()
    assert all(name in everything for name in WHEELS)
    assert "fastopt-0.1.0.tar.gz" in everything
    cu12 = (dist / "cu12" / "simple" / "fastopt" / "index.html").read_text()
    assert WHEELS[1] in cu12 and WHEELS[0] not in cu12 and ".tar.gz" not in cu12


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fake wheels are Linux's")
@pytest.mark.parametrize(("index", "expected"), [("cu12", 1), ("cu13", 0), ("simple", 0)])
def test_pip_takes_the_variants_wheel(release, tmp_path, index, expected):
    """pip itself resolves `fastopt` from each index (the links and hashes are right), and
    takes the CUDA 12 wheel only from the CUDA 12 index: from the full one it would take the
    highest local version."""
    _fake_files(release.DIST)
    release.write_indexes()
    url = (release.DIST / index if index != "simple" else release.DIST).as_uri() + "/simple"
    out = tmp_path / "got"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir",
         "--index-url", url, "--only-binary", ":all:", "-d", str(out), "fastopt"],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},  # this index alone
    )  # fmt: skip
    assert [p.name for p in out.iterdir()] == [WHEELS[expected]]
