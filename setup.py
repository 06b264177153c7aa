"""Builds fastopt and its torch extensions: fastopt._C (the op schemas and the C++ CPU kernels)
and fastopt._C_cuda (the CUDA kernels).

fastopt._C is always built. fastopt._C_cuda is built where its kernels can run: torch is a
CUDA build, a CUDA toolkit is found and a GPU is visible, for the visible GPUs' architectures.
FASTOPT_CUDA=1 builds it without a GPU too (CI and releases), for DEFAULT_CUDA_ARCHS;
FASTOPT_CUDA=0 never builds it. torch's own TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured.
Build against the torch already installed:
    pip install --no-build-isolation -e .

Both libraries use only PyTorch's stable ABI (targeting torch 2.10) and Python's limited API
(3.10), so one build loads into every torch from 2.10 on and every CPython from 3.10 on: the
wheel is tagged cp310-abi3. The CUDA library needs torch's CUDA major to be the one it was
built with (fastopt/_ext.py checks before loading it).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

# The oldest torch the binaries load into: torch/csrc/stable/version.h's encoding of 2.10.0.
# With it defined, including an ATen or c10 header (not part of the stable ABI) is an error.
TORCH_TARGET_VERSION = "0x020a000000000000"  # 2.10
TORCH_TARGET = f"{int(TORCH_TARGET_VERSION[2:4], 16)}.{int(TORCH_TARGET_VERSION[4:6], 16)}"

# Architectures built with FASTOPT_CUDA=1 when TORCH_CUDA_ARCH_LIST is unset: machine code for
# the data-centre and workstation GPUs of each generation (A100, H100, B200, RTX 50xx / RTX
# PRO), and PTX of the newest (compute_120) for GPUs after it, compiled by the driver at load
# time. sm_86/89 run the sm_80 code; sm_103 the sm_100 code; sm_121 the sm_120 code. nvcc 13
# knows nothing older than sm_75, and nothing older than sm_80 runs torch's CUDA 13 wheels.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"

ROOT = os.path.dirname(os.path.abspath(__file__))
# What a build records of itself, beside the libraries (fastopt/_build.py reads it).
BUILD_INFO = "_build_info.json"
# setuptools' name for a build's directories: build/temp.linux-x86_64-cpython-311.
PLATFORM = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


def _find_cuda_home():
    """The toolkit root, for when CUDA_HOME is unset.

    torch guesses it from the nvcc on PATH, which is wrong when that nvcc is a wrapper script
    outside the toolkit; nvcc itself reports its real root on a dry run (the TOP= line).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True
        ).stderr
    except OSError:
        return None
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line.split("=", 1)[1].strip())
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    found = _find_cuda_home()
    if found:
        os.environ["CUDA_HOME"] = found

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    _get_cuda_arch_flags,  # noqa: E402
)


def _want_cuda():
    forced = os.environ.get("FASTOPT_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"FASTOPT_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError(
                "FASTOPT_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return forced == "1"
    # Unasked, only where the kernels can run: compiling four architectures' kernels takes most
    # of an install's time, wasted on a machine whose GPU-less torch merely has a toolkit beside.
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST when set; else the visible GPUs' architectures, or, when the build
    was asked for with FASTOPT_CUDA=1 (no GPU needed), DEFAULT_CUDA_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if os.environ.get("FASTOPT_CUDA") == "1" or not torch.cuda.is_available():
        return DEFAULT_CUDA_ARCHS
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _extensions():
    cuda = _want_cuda()
    stable = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    # -fno-math-errno: lets GCC vectorise sqrtf in the AdamW loop.
    # -ffp-contract=off: GCC fused multiply-adds differently in the vector body and the scalar
    # peel/tail of one loop, so an element's result depended on its address's alignment.
    # -fno-trapping-math: lets GCC if-convert the selects between float values of the 8-bit
    # codes' encode and decode (both sides computed, one kept), which it otherwise leaves as
    # branches, running those loops scalar; results are unchanged, only FP exception flags.
    # -Wno-psabi: GCC notes that 64-byte vectors passed between target clones change the ABI;
    # they never cross the library's boundary.
    # -fvisibility=hidden: the modules export PyInit_* alone, so no inline function of the
    # header-only torch code compiled in here interposes libtorch's own, nor the reverse.
    # No -fopenmp: the stable parallel_for runs the loop on libtorch's own thread pool.
    # -ffile-prefix-map: __FILE__ (in torch's error checks) and the debug info name the files
    # csrc/... and torch/include/..., not by this machine's paths, which a wheel would carry to
    # its users. GCC applies the last map that matches: torch may lie inside ROOT (a venv).
    hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    prefix_maps = [f"-ffile-prefix-map={ROOT}/=", f"-ffile-prefix-map={torch_dir}=torch"]
    # -include csrc/glibc_compat.h: the wheel loads on glibc 2.28 though built on a newer one.
    compat = [f"-include{ROOT}/csrc/glibc_compat.h"] if sys.platform.startswith("linux") else []
    host = [*hidden, *prefix_maps, *compat]
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
           "-Wno-psabi", *host]  # fmt: skip
    cxx += stable
    cpu_cxx = list(cxx)
    if cuda:
        # The toolkit has torch's CUDA major: torch's build_ext refuses any other.
        major, minor = torch.version.cuda.split(".")[:2]
        cpu_cxx += [f"-DFASTOPT_CUDA_MAJOR={int(major)}", f"-DFASTOPT_CUDA_MINOR={int(minor)}"]
    extensions = [
        CppExtension(
            "fastopt._C",
            ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            extra_compile_args={"cxx": cpu_cxx},
            py_limited_api=True,
        )
    ]
    if not cuda:
        return extensions
    # Set, not only read: _get_cuda_arch_flags() reads it, and _build_info() records it.
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    # -fmad=false: nvcc's counterpart of -ffp-contract=off. With contraction the vector and
    # scalar paths of one kernel rounded differently, so a result depended on the tensor's
    # alignment, and the GPU disagreed with the CPU kernel; the kernels are memory-bound, so
    # separate multiplies and adds cost nothing measurable.
    # USE_CUDA: declares the CUDA parts of the stable shim (the current stream, error checks).
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-fmad=false"]
    # The -gencode flags explicitly, from TORCH_CUDA_ARCH_LIST: torch adds them only when no
    # flag contains "arch", and ours name the checkout's path (-ffile-prefix-map, -include),
    # which may (".../research/fastopt"): the library was then built for nvcc's default sm_75.
    nvcc += _get_cuda_arch_flags()
    extensions.append(
        CUDAExtension(
            "fastopt._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={
                "cxx": [*cxx, "-DUSE_CUDA"],
                "nvcc": [*nvcc, *[f"-Xcompiler={f}" for f in host], *stable, "-DUSE_CUDA"],
            },
            py_limited_api=True,
        )
    )
    return extensions


def _version():
    """fastopt.__version__; with FASTOPT_LOCAL_VERSION=1 (tools/release.py sets it for the
    wheel) and CUDA kernels, the toolkit as a local version, "0.1.0+cu130", so an index can
    hold a wheel per CUDA major. Opt-in: an sdist and the wheel pip builds from it must agree
    on the version, whatever the machine that builds it."""
    with open(os.path.join(ROOT, "fastopt", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    if os.environ.get("FASTOPT_LOCAL_VERSION") == "1" and _want_cuda():
        version += "+cu" + "".join(torch.version.cuda.split(".")[:2])
    return version


def _output_line(*cmd, containing=""):
    """The first line of cmd's output containing `containing`; None if it fails or has none."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line for line in out.splitlines() if containing in line), None)


def _build_info(cuda):
    git = ["git", "-C", ROOT]
    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    commit = _output_line(*git, "rev-parse", "HEAD")  # None when built from an sdist
    return {
        "version": _version(),
        "git_commit": commit,
        "git_dirty": bool(commit and _output_line(*git, "status", "--porcelain", "--", ".")),
        "torch": torch.__version__,
        "stable_abi_target": TORCH_TARGET,
        "python_limited_api": "3.10",
        "cuda": torch.version.cuda if cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "cxx": _output_line(sysconfig.get_config_var("CXX").split()[0], "--version"),
        "nvcc": _output_line(nvcc, "--version", containing="release") if cuda else None,
    }


class BuildWithInfo(BuildExtension.with_options(use_ninja=True)):
    """Builds the extensions, then writes fastopt/_build_info.json beside them (in the build
    tree, which the wheel is made from, and in the source tree too for an in-place build)."""

    def finalize_options(self):
        super().finalize_options()
        # The objects go where a plain build puts them, for an editable install too (setuptools
        # gives that a new temporary directory, overriding setup()'s options): with the same
        # torch and flags, the wheel and the editable install of one checkout share one
        # compilation, which is what lets CI build the CUDA kernels once.
        self.build_temp = os.path.join(ROOT, "build", f"temp.{PLATFORM}")

    def run(self):
        super().run()
        text = json.dumps(_build_info(_want_cuda()), indent=2) + "\n"
        dirs = [os.path.join(self.build_lib, "fastopt")]
        if self.inplace:
            dirs.append(os.path.join(ROOT, "fastopt"))
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, BUILD_INFO), "w") as f:
                f.write(text)


setup(
    version=_version(),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildWithInfo},
    # One wheel for every CPython from 3.10: the modules use only the limited API.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
