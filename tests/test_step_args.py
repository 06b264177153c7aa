"""Every backend's adamw_step and the C++ schema of fastopt::adamw_ take the same arguments in
the same order: the six tensor lists, then fastopt.step_args' Hyper and Lean fields."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fastopt import _ext, _ops, backends, reference
from fastopt.step_args import PLAIN, TENSOR_LISTS, Hyper, Lean

_SIGNATURE = [*TENSOR_LISTS, "hyper", "lean"]
_FLAT = [
    *TENSOR_LISTS,
    *(name for f in dataclasses.fields(Hyper)
      for name in ((f.name, "lr_tensor") if f.name == "lr" else (f.name,))),
    *(f.name for f in dataclasses.fields(Lean)),
]  # fmt: skip
# The arguments an op writes (Tensor(x!)[] in the schema).
_WRITTEN = {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masters",
            "scales"}  # fmt: skip


def _entry_points():
    points = {"reference": reference.adamw_step, "cpu": _ops.adamw_step}
    # The 'cuda' backend is the same Python function as 'cpu' (the op dispatches by device).
    points["cuda"] = backends.backend_ops("cuda").adamw_step
    try:
        from fastopt import kernels
    except ImportError as exc:  # no Triton: the others still agree
        pytest.skip(f"Triton kernels do not import: {exc}")
    points["triton"] = kernels.adamw_step
    return points


def test_every_backend_takes_the_lists_then_hyper_and_lean():
    for name, fn in _entry_points().items():
        params = inspect.signature(fn).parameters
        assert list(params) == _SIGNATURE, name
        assert params["lean"].default is PLAIN, name
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values()), name


def test_the_cuda_entry_point_is_the_cpu_one():
    assert backends.backend_ops("cuda").adamw_step is _ops.adamw_step


def test_the_schema_takes_the_same_arguments_in_the_same_order():
    if not _ext.load():
        pytest.skip(f"fastopt._C is not loaded: {_ext.extension_error()}")
    arguments = torch.ops.fastopt.adamw_.default._schema.arguments
    assert [a.name for a in arguments] == _FLAT
    written = {a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == _WRITTEN


def test_the_fake_implementation_takes_the_schema():
    """torch.compile traces through the fake: it must accept the op's arguments as called."""
    if not _ext.load():
        pytest.skip(f"fastopt._C is not loaded: {_ext.extension_error()}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = [torch.empty(3)]
        torch.ops.fastopt.adamw_(p, p, [torch.empty(3)], [torch.empty(3)], [], [torch.empty(())],
                                 1e-3, None, 0.9, 0.999, 0.0, 1e-8, False, False, None, None,
                                 None, 0.0, 1.0, [], False, 0, [], [0], [])  # fmt: skip


def test_the_bundles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PLAIN.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        Hyper(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8).lr = 1.0
