"""The registered ops: schemas, fake implementations and mutation annotations (opcheck)."""

from __future__ import annotations

import re

import pytest
import torch

import fastopt  # noqa: F401  (loads fastopt._C)
from fastopt import _ext


def test_extension_is_built_and_loaded():
    assert _ext.load(), _ext.extension_error()
    for op in ("adamw_", "multi_tensor_norm", "accumulate_", "update_scale_"):
        assert _ext.has_kernel(op, "CPU"), op


def _adamw_args(amsgrad, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4)]
    mk = lambda: [torch.randn(s, generator=gen).to(dtype) for s in shapes]  # noqa: E731
    return (mk(), mk(), mk(), [t.abs() for t in mk()], [t.abs() for t in mk()] if amsgrad else [],
            [torch.tensor(3.0) for _ in shapes], 1e-3, None, 0.9, 0.999, 0.01, 1e-8, amsgrad,
            False, torch.tensor(4.0), torch.tensor(0.0), torch.tensor(2.0), 1.0, 0.5,
            [], False, 0, [], [], [])  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adamw(amsgrad):
    torch.library.opcheck(torch.ops.fastopt.adamw_.default, _adamw_args(amsgrad))


def test_opcheck_adamw_lean():
    """bf16 params with int16 remainders, bf16 moments, stochastic rounding from a shard's
    first index."""
    args = list(_adamw_args(True, torch.bfloat16))
    args[19] = [torch.zeros(t.shape, dtype=torch.int16) for t in args[0]]  # masters
    args[20:] = [True, 12345, [0, 1], [2**32 - 3, 40], []]
    torch.library.opcheck(torch.ops.fastopt.adamw_.default, tuple(args))


def test_opcheck_adamw_int8():
    """8-bit moments: uint8 codes and one (3, blocks) int8 tensor of scales per param."""
    args = list(_adamw_args(True))
    for k in (2, 3, 4):
        args[k] = [torch.randint(0, 0x70, t.shape, dtype=torch.uint8) for t in args[0]]
    args[20:] = [False, 7, [0, 1], [0, 0],
                 [torch.randint(-9, 0, (3, -(-t.numel() // 32)), dtype=torch.int8)
                  for t in args[0]]]  # fmt: skip
    torch.library.opcheck(torch.ops.fastopt.adamw_.default, tuple(args))


def test_opcheck_multi_tensor_norm():
    ts = [torch.randn(7), torch.randn(2, 3).bfloat16()]
    torch.library.opcheck(torch.ops.fastopt.multi_tensor_norm.default, (ts, 2.0))


def test_opcheck_accumulate():
    args = ([torch.randn(4), torch.randn(3)], [torch.randn(4).half(), torch.randn(3).half()], 0.5,
            False)  # fmt: skip
    torch.library.opcheck(torch.ops.fastopt.accumulate_.default, args)


def test_opcheck_update_scale():
    args = (torch.tensor(8.0), torch.tensor(1, dtype=torch.int32), torch.tensor(0.0), 2.0, 0.5, 2)
    torch.library.opcheck(torch.ops.fastopt.update_scale_.default, args)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a[1].__setitem__(0, a[1][0][:3]), "differ in size"),
        (lambda a: a[2].pop(), "exp_avgs has 1 tensors, expected 2"),
        (lambda a: a.__setitem__(0, [t.double() for t in a[0]]), "params must be"),
        (lambda a: a.__setitem__(14, torch.ones(2)), "grad_scale must be a one-element"),
    ],
    ids=["size", "count", "dtype", "grad_scale"],
)
def test_bad_op_input_names_the_argument(mutate, match):
    args = list(_adamw_args(False))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastopt.adamw_(*args)


def _adamw_missing_exp_avg():
    args = list(_adamw_args(False))
    args[2].pop()
    torch.ops.fastopt.adamw_(*args)


# One bad call per op and the whole message the user gets: the op and the argument, and no
# function name, source path or line before it (what torch's STD_TORCH_CHECK would add).
WHOLE_MESSAGES = {
    "adamw_": (_adamw_missing_exp_avg, "fastopt.adamw_: exp_avgs has 1 tensors, expected 2"),
    "multi_tensor_norm": (
        lambda: torch.ops.fastopt.multi_tensor_norm([torch.ones(3), torch.ones(2).long()], 2.0),
        "fastopt.multi_tensor_norm: tensors[1] must be float32, bfloat16 or float16, got Long",
    ),
    "accumulate_": (
        lambda: torch.ops.fastopt.accumulate_([torch.ones(3)], [torch.ones(2)], 1.0, False),
        "fastopt.accumulate_: accs[0] has 3 elements and grads[0] 2",
    ),
    "update_scale_": (
        lambda: torch.ops.fastopt.update_scale_(
            torch.tensor(8.0), torch.tensor(1), torch.tensor(0.0), 2.0, 0.5, 2
        ),
        "fastopt.update_scale_: growth_tracker must be a one-element int32 tensor",
    ),
}


@pytest.mark.parametrize("op", list(WHOLE_MESSAGES))
def test_op_error_is_exactly_the_message(op):
    call, message = WHOLE_MESSAGES[op]
    with pytest.raises(RuntimeError) as info:
        call()
    assert type(info.value) is RuntimeError
    assert str(info.value) == message
    assert not re.search(r"/|\.(?:cpp|cu|h|cuh):", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "setup",
    [
        'sys.modules["fastopt._C"] = None  # makes `import fastopt._C` raise ImportError',
        # What Python imports when an older build's _C.cpython-3XX-*.so is beside _C.abi3.so.
        'sys.modules["fastopt._C"] = types.ModuleType("fastopt._C")',
    ],
    ids=["missing", "stale"],
)
def test_missing_extension_falls_back_with_one_warning(setup):
    """Without fastopt._C, import still works, warns once, and 'auto' means reference."""
    import subprocess
    import sys

    probe = f"""
import sys, types, warnings
{setup}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fastopt
    p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
    opt = fastopt.AdamW([p]); opt.step()
print(fastopt.select_backend("auto", "cpu"))
print(sum("fastopt._C could not be loaded" in str(w.message) for w in caught))
print(fastopt.availability("cpu", "cpu"))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "reference"
    assert lines[1] == "1"
    assert lines[2].startswith("(False,")


# Loads fastopt with torch's CUDA version, the build's and GPU visibility set as given, asks for
# the cuda backend three times and prints what it got, and every warning.
_CUDA_PROBE = """
import sys, warnings
import torch
torch.cuda.is_available = lambda: {gpu}
torch.version.cuda = {torch_cuda!r}
from fastopt import _C, _ext
_C._cuda_version = {built!r}
_info = dict(_ext.build_info(), cuda={built!r})  # the build's record says the same
_ext.build_info = lambda: _info
if {broken}:
    sys.modules["fastopt._C_cuda"] = None  # makes `import fastopt._C_cuda` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastopt
    for _ in range(3):
        ok, why = fastopt.availability("cuda", "cuda")
    backend = fastopt.select_backend("auto", "cuda")
caught = [w for w in caught if str(w.message).startswith("fastopt")]
print(ok)
print(why)
print(backend)
print(sys.modules.get("fastopt._C_cuda") is not None)
print(len(caught))
for w in caught:
    print(str(w.message).replace(chr(10), " "))
"""


@pytest.mark.parametrize(
    "gpu,torch_cuda,built,broken,why,warning",
    [
        (True, "13.0", "12.8", False, "built for CUDA 12.8, and torch", "install fastopt built "
         "for CUDA 13 (a release's wheel for it: `pip install --index-url <release "
         "folder>/cu13/simple fastopt`"),
        (True, "13.0", "13.0", True, "fastopt._C_cuda could not be loaded (", "uses "
         "CUDA 13.0; install fastopt built for CUDA 13"),
        (False, "13.0", "13.0", False, "no CUDA GPU is visible", None),
        (True, None, "13.0", False, "is a CPU-only build", None),
        (True, "13.0", None, False, "fastopt was built without CUDA kernels", None),
    ],
    ids=["major-mismatch", "load-failure", "no-gpu", "cpu-torch", "no-cuda-build"],
)  # fmt: skip
def test_cuda_library_loads_only_where_it_can_run(gpu, torch_cuda, built, broken, why, warning):
    """fastopt._C_cuda is loaded only into a CUDA torch of its CUDA major with a GPU; a
    mismatch or a failed load warns once, naming both sides and what to install, and the cuda
    backend says why it is unavailable. Import never fails."""
    import subprocess
    import sys

    probe = _CUDA_PROBE.format(gpu=gpu, torch_cuda=torch_cuda, built=built, broken=broken)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    ok, reason, backend, loaded, count, *warnings = out.stdout.splitlines()
    assert ok == "False"
    assert why in reason, reason
    assert backend in ("triton", "reference")
    assert loaded == "False"
    assert count == ("1" if warning else "0"), warnings
    if warning:
        assert warning in warnings[0], warnings[0]
        assert f"CUDA {built}" in warnings[0] and f"CUDA {torch_cuda}" in warnings[0]


def test_grid_tuning_hook_returns_previous_and_rejects_bad_values():
    from fastopt import _C

    assert _C._set_grid_blocks_per_sm(3) == 0  # 0, the default: as many as are resident
    try:
        assert _C._set_grid_blocks_per_sm(5) == 3
        for bad in (-1, 1025):
            with pytest.raises(ValueError, match="_set_grid_blocks_per_sm: n must be"):
                _C._set_grid_blocks_per_sm(bad)
        with pytest.raises(TypeError):
            _C._set_grid_blocks_per_sm("2")
        assert _C._set_grid_blocks_per_sm(5) == 5  # a refused value changed nothing
    finally:
        _C._set_grid_blocks_per_sm(0)
