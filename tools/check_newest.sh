#!/usr/bin/env bash
# fastopt against the newest releases of its dependencies, beside the pinned set that the
# README's commands and CI install (requirements/constraints.txt). A new release of a test
# dependency once broke a green checkout within days; this shows such a break the day it
# happens, while the pinned set keeps CI and a newcomer's first run reproducible.
#
#   tools/check_newest.sh WHEEL [PYTEST ARGS...]
#
# A fresh virtual environment gets torch at its pinned version (the extension's build target;
# tools/check_wheel.sh tries other torches) and the newest release of everything else that
# `WHEEL[test]` needs, then runs, from outside the checkout so that the wheel is what imports,
# the tests that exercise those dependencies (or the PYTEST ARGS given, relative to the
# checkout). It prints which versions differ from the pinned ones. Exit status: pytest's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$(realpath "${1:?usage: tools/check_newest.sh WHEEL [PYTEST ARGS...]}")"
shift
constraints="$root/requirements/constraints.txt"
python=${CHECK_PYTHON:-python3}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

torch_pin=$(grep -E '^torch==' "$constraints" | sed 's/ *;.*//')
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
# Quiet but for errors (a pip configuration may list index folders that are absent).
pip_install() { "${pip[@]}" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
pip_install --upgrade pip
pip_install "$torch_pin"
pip_install "$wheel[test]"  # a fresh venv: the newest release of each

echo "== versions that differ from requirements/constraints.txt (pinned -> newest)"
# name=version lines, sorted by name alone, as join needs them.
by_name() { sed -n 's/ *;.*//; s/^\([A-Za-z0-9_.-]*\)==/\1=/p' | LC_ALL=C sort -t= -k1,1; }
"${pip[@]}" freeze --exclude-editable | by_name >"$work/newest.txt"
by_name <"$constraints" >"$work/pinned.txt"
LC_ALL=C join -t= -j1 "$work/pinned.txt" "$work/newest.txt" \
  | awk -F= '$2 != $3 { printf "  %s %s -> %s\n", $1, $2, $3; n++ } END { if (!n) print "  none" }'

if [ "$#" -eq 0 ]; then
  set -- tests/test_third_party.py tests/test_readme.py \
    tests/test_packaging.py::test_hugging_face_kernels_imports_from_checkout_root
fi
tests=()
for arg in "$@"; do
  case "$arg" in -*) tests+=("$arg") ;; *) tests+=("$root/$arg") ;; esac
done
echo "== tests with the newest dependencies"
cd "$work"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" \
  -c "$root/pyproject.toml" "${tests[@]}"
