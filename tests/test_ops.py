"""The registered ops: schemas, fake implementations and mutation annotations (opcheck)."""

from __future__ import annotations

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
            False, torch.tensor(4.0), torch.tensor(0.0), torch.tensor(2.0), 1.0, 0.5)  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adamw(amsgrad):
    torch.library.opcheck(torch.ops.fastopt.adamw_.default, _adamw_args(amsgrad))


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


def test_missing_extension_falls_back_with_one_warning():
    """Without fastopt._C, import still works, warns once, and 'auto' means reference."""
    import subprocess
    import sys

    probe = """
import sys, warnings
sys.modules["fastopt._C"] = None  # makes `import fastopt._C` raise ImportError
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
