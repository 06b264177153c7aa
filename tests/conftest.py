"""Shared test set-up.

Triton's interpreter must be chosen before Triton is first imported: on a machine without a
CUDA GPU every Triton kernel test runs interpreted, on CPU tensors, in this same process.
"""

import os
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The gpt job's tokenized standard library goes to a folder of this session (inherited by the
# runs tests start as processes), not the user's cache, and is deleted when the session ends
# (about 30 MB a run): set FASTOPT_CACHE_DIR to keep one.
_SESSION_CACHE = None
if "FASTOPT_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="fastopt-cache-")
    os.environ["FASTOPT_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# Profiles for the property suite (tests/test_properties.py). "ci", the default, is
# derandomized so that every CI run tests the same examples within the file's time budget;
# "nightly" (pytest --hypothesis-profile=nightly) draws 20x as many, fresh on each run.
settings.register_profile(
    "ci",
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_NIGHTLY = dict(max_examples=6000, derandomize=False)
settings.register_profile("nightly", settings.get_profile("ci"), **_NIGHTLY)
settings.load_profile("ci")
