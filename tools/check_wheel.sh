#!/usr/bin/env bash
# Checks a built fastopt wheel as a user gets it, without building anything:
#   1. its name and tags (cp310-abi3, manylinux, the +cu local version of a CUDA build);
#   2. its ABI: abi3audit (limited API 3.10) and auditwheel show (no torch or CUDA library in it);
#   3. in a fresh venv with torch 2.14.1 (CUDA 13): the CUDA library carries machine code for
#      sm_80/90/100/120 and PTX of 12.0, resolves every symbol once torch is loaded, and without a
#      GPU the cuda backend is unavailable with its reason (no warning) and the CPU kernels run;
#   4. in a fresh venv with torch 2.13.0 (a CPU build, older than the torch it was built
#      against), the wheel installed from its release index as the README says: import,
#      `python -m fastopt info`, and the lockstep AdamW and fused-pipeline tests on the cpu and
#      reference backends, run from outside the checkout.
# Usage, from anywhere:  tools/check_wheel.sh dist/fastopt-*.whl   (python3: CPython >= 3.10)
# Step 4 on another torch or Python (the README's support table):
#   CHECK_TORCH=torch==2.15.0 CHECK_PYTHON=python3.13 tools/check_wheel.sh dist/fastopt-*.whl
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 WHEEL" >&2; exit 2; }
wheel=$(realpath "$1")
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
name=$(basename "$wheel")
fail() { echo "check_wheel: $*" >&2; exit 1; }
step() { echo "== $* ($(date +%T))"; }
# pip, quiet but for errors (this machine's pip config lists index folders that may be absent).
pip_install() { "$1" -m pip install -q "${@:2}" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
# The README's and CI's pinned set; for another torch, less torch's own pins (torch, Triton and
# the CUDA libraries follow the torch under test).
pins=(-c "$root/requirements/constraints.txt")
grep -vE '^(torch|triton|nvidia-|cuda-)' "$root/requirements/constraints.txt" >"$work/other-torch.txt"

step "name and tags: $name"
[[ $name =~ ^fastopt-[0-9][^-]*-cp310-abi3-manylinux_[0-9]+_[0-9]+_x86_64\.whl$ ]] \
  || fail "$name is not a cp310-abi3 manylinux x86_64 wheel"
listing=$(python3 -m zipfile -l "$wheel")  # kept: `cmd | grep -q` fails by SIGPIPE on a match
cuda_build=0
if grep -q "fastopt/_C_cuda.abi3.so" <<<"$listing"; then cuda_build=1; fi
if [ $cuda_build = 1 ]; then
  [[ $name =~ ^fastopt-[^-]+\+cu[0-9]+- ]] || fail "$name has CUDA kernels but no +cu local version"
else
  [[ $name =~ ^fastopt-[^-+]+- ]] || fail "$name has no CUDA kernels but a local version"
fi
grep -qE "(libtorch|libc10|libcudart|libcuda)[^/]*\.so" <<<"$listing" \
  && fail "$name vendors torch's or CUDA's libraries"

step "venv with torch 2.14.1 (CUDA build)"
python3 -m venv "$work/cuda"
cuda_py="$work/cuda/bin/python"
pip_install "$cuda_py" "${pins[@]}" "torch==2.14.1" abi3audit auditwheel
pip_install "$cuda_py" "${pins[@]}" "$wheel"  # its dependencies too, as a user gets them
site=$("$cuda_py" -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")

step "abi3audit and auditwheel show"
"$cuda_py" -m abi3audit --strict --assume-minimum-abi3 3.10 "$wheel"
plat=$(sed -E 's/.*-(manylinux_[0-9]+_[0-9]+_x86_64)\.whl$/\1/' <<<"$name")
# The symbol versions allow the tag; what is needed from outside the system is torch's.
"$cuda_py" -m auditwheel show --json "$wheel" 2>/dev/null >"$work/show.json"
"$cuda_py" - "$work/show.json" "$plat" <<'PY'
import fnmatch, json, sys
report, plat = json.load(open(sys.argv[1])), sys.argv[2]
tag, outside = report["sym_tag"], sorted(report["external_libs"])
print(f"auditwheel: the symbol versions allow {tag}; libraries from outside: {outside}")
assert tag == plat, f"auditwheel show confirms {tag}, the wheel says {plat}"
theirs = ("libtorch*", "libc10*", "libcudart.so*", "libcuda.so*")
ours = [lib for lib in outside if not any(fnmatch.fnmatch(lib, p) for p in theirs)]
assert not ours, f"needs libraries that are neither torch's nor CUDA's: {ours}"
PY

cd "$work"  # from here on nothing may import the checkout's fastopt/
if [ $cuda_build = 1 ]; then
  step "CUDA architectures (cuobjdump from Triton's wheel)"
  cuobjdump="$site/triton/backends/nvidia/bin/cuobjdump"
  so="$site/fastopt/_C_cuda.abi3.so"
  elves=$("$cuobjdump" --list-elf "$so" | grep -oE 'sm_[0-9]+a?\.cubin' | sort -u | tr '\n' ' ')
  ptx=$("$cuobjdump" --list-ptx "$so" | grep -oE 'sm_[0-9]+a?\.ptx' | sort -u | tr '\n' ' ')
  echo "machine code: $elves; PTX: $ptx"
  for arch in sm_80 sm_90 sm_100 sm_120; do
    grep -qw "$arch.cubin" <<<"$elves" || fail "no $arch machine code in $so"
  done
  grep -qw "sm_120.ptx" <<<"$ptx" || fail "no compute_120 PTX in $so"

  step "the CUDA library resolves every symbol; without a GPU the cuda backend says why"
  "$cuda_py" - "$so" <<'PY'
import ctypes, os, sys, warnings
import torch
ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW)  # every undefined symbol bound now, or OSError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastopt
    ok, why = fastopt.availability("cuda", "cuda")
assert fastopt.__file__.startswith(sys.prefix), fastopt.__file__
if torch.cuda.is_available():
    assert ok, why
else:  # unavailable with its reason, and silently: nothing is wrong with the install
    assert not ok and "no CUDA GPU is visible" in why, why
assert not [w for w in caught if "fastopt" in str(w.message)], [str(w.message) for w in caught]
assert fastopt.select_backend("auto", "cpu") == "cpu"
print("cuda backend:", "available" if ok else why)
PY
fi

check_torch=${CHECK_TORCH:-torch==2.13.0}
step "venv with $check_torch (${CHECK_PYTHON:-python3})"
"${CHECK_PYTHON:-python3}" -m venv "$work/cpu"
cpu_py="$work/cpu/bin/python"
# The cluster install of the README: torch and the rest first, then fastopt from the release's
# index for the wheel's CUDA major (tools/release.py writes it beside the wheel), that index
# alone. pytest and hypothesis: what tests/conftest.py imports.
pip_install "$cpu_py" -c "$work/other-torch.txt" "$check_torch" numpy matplotlib pyyaml tqdm pytest \
  hypothesis
version=$(cut -d- -f2 <<<"$name")
variant=cpu
if [[ $version =~ \+cu([0-9]+)[0-9]$ ]]; then variant=cu${BASH_REMATCH[1]}; fi
index="$(dirname "$wheel")/$variant/simple"
if [ -d "$index" ]; then
  echo "from the index $index"
  PIP_CONFIG_FILE=/dev/null "$cpu_py" -m pip install -q --index-url "file://$index" "fastopt==$version"
else
  echo "no index at $index: the wheel itself"
  pip_install "$cpu_py" "$wheel"
fi
"$cpu_py" -c "import fastopt, sys; assert fastopt.__file__.startswith(sys.prefix), fastopt.__file__"
"$cpu_py" -m fastopt info | tee "$work/info.txt"
grep -q "^cpu  *cpu  *yes" "$work/info.txt" || fail "the cpu backend is not available"

step "lockstep AdamW and fused pipeline, cpu and reference backends, from the wheel"
cp -r "$root/tests" "$work/tests"
# The repository's pytest settings (its markers), without its pyproject.toml.
printf '[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n    slow: slow\n' >"$work/tests/pytest.ini"
# conftest asserts nothing about where fastopt comes from: this does, before any test runs.
cat >"$work/tests/test_zz_installed.py" <<PY
import sys, fastopt
def test_fastopt_is_the_installed_wheel():
    assert fastopt.__file__.startswith(sys.prefix), fastopt.__file__
PY
"$cpu_py" -m pytest -q -p no:cacheprovider --rootdir "$work/tests" "$work/tests/test_zz_installed.py" \
  "$work/tests/test_adamw.py" "$work/tests/test_fused_step.py" -k "installed or cpu-cpu or reference-cpu"
step "ok: $name"
