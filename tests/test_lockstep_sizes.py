"""Hostile sizes and indices, bit for bit against fastopt.reference (tests/lockstep.py): a
kernel's tiles, vectors, chunks and launches in every relation to a tensor's end, unaligned
params, a skipped step, shards whose element indices cross 2**32 (the noise's high index
word), and the 8-bit ops' argument checks.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import BACKENDS, TRITON_DEVICE, backend_cases, backend_params
from lockstep import (
    CUDA_SIZES,
    adamw_step,
    assert_same_state,
    bits_differ,
    fresh_state,
    int8_optimizer_lockstep,
    make_state,
    op_lockstep,
    op_snapshot,
    to_device,  # fmt: skip
)

from fastopt import kernels as tk
from fastopt import quant

ADAMW = tk._table.launch_heuristics("adamw", 4)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
# More tensors than one CUDA launch's table holds (353 to 427 of them with 8-bit moments).
MANY = [1 + (7 * k) % 97 for k in range(600)]
CUDA = backend_params([("cuda", "cuda")])


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random data per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


_TRITON_SIZES = {
    "4095-4096-4097": ([(4095,), (4096,), (4097,)], 2),
    "three-chunks": ([(2 * ADAMW.chunk + 33,)], 1),  # the last chunk one block and a bit
    "many-tensors-one-launch": (
        [(1,)] * 40 + [(0,), ()] * 3 + [(33,)] * 4 + [(2 * ADAMW.block + 3,)],
        2,
    ),  # fmt: skip
}


@pytest.mark.parametrize("backend,device,case", backend_cases("triton", TRITON_DEVICE,
                                                              _TRITON_SIZES))  # fmt: skip
def test_int8_hostile_sizes_match_the_reference(backend, device, case, gen):
    shapes, steps = case
    op_lockstep(backend, device, shapes, gen, steps=steps, amsgrad=True, weight_decay=0.1,
                sr=True, p_dtype=torch.bfloat16, grad_dtype=torch.float32)  # fmt: skip


@pytest.mark.parametrize("backend,device", CUDA)
@pytest.mark.parametrize("offset", [1, 3], ids=["offset1", "offset3"])
def test_int8_unaligned_params_match_the_reference(backend, device, offset):
    """Params 4 or 12 bytes into their buffer: the kernel's element-by-element path, the same
    element-to-lane map and so the same block maxima."""
    int8_optimizer_lockstep(backend, device, CUDA_SIZES, torch.float32, False, False, False, True,
                            maximize=False, offset=offset)  # fmt: skip
    int8_optimizer_lockstep(backend, device, CUDA_SIZES, torch.bfloat16, False, True, False,
                            False, maximize=False, offset=offset)  # fmt: skip


@pytest.mark.parametrize("backend,device", CUDA)
def test_int8_more_tensors_than_one_launch_holds(backend, device):
    int8_optimizer_lockstep(backend, device, MANY, torch.bfloat16, True, False, True, True,
                            maximize=False, steps=2)  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("backend,device", CUDA)
def test_int8_skipped_step_moves_no_code_and_no_scale(backend, device, amsgrad):
    """An inf in the last element of the last tensor: found_inf (from the clipping norm) skips
    the step on the device, and codes, scales, params and masters keep every bit."""
    int8_optimizer_lockstep(backend, device, CUDA_SIZES, torch.bfloat16, True, False, False,
                            amsgrad, maximize=False, clip=1.0, bad_step=2)  # fmt: skip


# Shards that start just below a multiple of 2**32 elements, so that the noise's high index
# word changes inside a chunk, inside a vector and inside a block, and one above it. Triton's
# 20_003 is not a multiple of 32: the change falls inside a scale block, inside a tile row.
_FIRSTS = [2**32 - 5, 2**32 - 20_003, 3 * 2**32 + 7, 2**32 - 1]
_INT8_FIRSTS = {
    "cpu": dict(shapes=[(200,), (64,)], first_indices=[2**32 - 50, 2**33 + 7], sr=True,
                p_dtype=torch.bfloat16, decades=True, weight_decay=1e-2, seed=987654321),
    "triton": dict(shapes=[(1_000,), (20_040,), (33,), (2,)], first_indices=_FIRSTS, steps=1,
                   each_differs=True),
    "cuda": dict(shapes=[(1_000,), (140_001,), (33,), (2,)], steps=2, beta2=0.99,
                 first_indices=[2**32 - 5, 2**32 - 70_000, 3 * 2**32 + 7, 2**32 - 1]),
}  # fmt: skip
_INT8_FIRSTS_CASES = (
    backend_cases("cpu", "cpu", {"sr-bf16": _INT8_FIRSTS["cpu"]})
    + backend_cases("triton", TRITON_DEVICE, {"fp32": _INT8_FIRSTS["triton"]})
    + backend_cases("cuda", "cuda", {"adamw": dict(_INT8_FIRSTS["cuda"], amsgrad=False),
                                     "amsgrad": dict(_INT8_FIRSTS["cuda"], amsgrad=True)})
)  # fmt: skip


@pytest.mark.parametrize("backend,device,case", _INT8_FIRSTS_CASES)
def test_int8_first_indices_across_two_to_the_32_match_the_reference(backend, device, case):
    """The noise, and so the codes, follow the element's index in the whole param: the kernel
    (which splits a chunk where the index's high word changes) as the reference. The codes
    round stochastically even without stochastic_rounding, so the noise is drawn anyway, and
    counting from 0 instead gives other codes."""
    case = dict(case)
    each, shapes = case.pop("each_differs", False), case.pop("shapes")
    mine, _ = op_lockstep(backend, device, shapes, torch.Generator().manual_seed(3), **case)
    case.pop("first_indices")
    zero, _ = op_lockstep(backend, device, shapes, torch.Generator().manual_seed(3), **case)
    same = [torch.equal(a, b) for a, b in zip(mine["exp_avgs"], zero["exp_avgs"])]
    assert not all(same), "the first indices changed no code: the noise ignores them"
    # Each tensor's codes move (exp_avg's or exp_avg_sq's: a 2-element tensor's two exp_avg
    # codes may both round alike under the other noise).
    same = [s and torch.equal(a, b) for s, a, b in zip(same, mine["exp_avg_sqs"],
                                                       zero["exp_avg_sqs"])]  # fmt: skip
    assert not (each and any(same)), f"some tensors' codes ignore their first index: {same}"


def test_8bit_moments_reject_bad_scales_naming_the_argument(gen):
    shapes = [(40,), (3,)]

    def call(**over):
        state = to_device(make_state(shapes, gen), TRITON_DEVICE)
        state.update(over)
        grads = [torch.randn(s, generator=gen).to(TRITON_DEVICE) for s in shapes]
        adamw_step("triton", state, grads, **HYPER, weight_decay=0.0, amsgrad=False,
                   maximize=False)  # fmt: skip

    zeros = lambda *s, dtype=torch.int8: torch.zeros(s, dtype=dtype, device=TRITON_DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match=r"scales has 0 tensors, expected 2"):
        call(scales=[])
    with pytest.raises(ValueError, match=r"scales\[1\] must be a contiguous int8"):
        call(scales=[zeros(2, 2), zeros(2, 1, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"scales\[1\] must be a contiguous int8"):
        call(scales=[zeros(2, 2), zeros(4, 2)[::2, :1]])
    with pytest.raises(ValueError, match=r"scales\[0\] must hold 2 rows of 2 block scales"):
        call(scales=[zeros(2, 1), zeros(2, 1)])
    with pytest.raises(ValueError, match=r"exp_avg_sqs must be torch.uint8"):
        call(exp_avg_sqs=[torch.zeros(s, device=TRITON_DEVICE) for s in shapes])
    with pytest.raises(ValueError, match=r"scales go with uint8"):
        fp32 = [torch.zeros(s, device=TRITON_DEVICE) for s in shapes]
        call(exp_avgs=fp32, exp_avg_sqs=[t.clone() for t in fp32])


def test_chunks_and_blocks_hold_whole_scale_blocks():
    """A scale block never straddles two programs or two loop iterations."""
    for op in ("adamw", "accumulate", "norm"):
        launch = tk._table.launch_heuristics(op, 4)
        assert launch.block % quant.BLOCK == 0 and launch.chunk % quant.BLOCK == 0


# ---------------------------------------------------------------------- bf16 stochastic rounding


def _sr_data(sizes, steps=2):
    """bf16 params of ``sizes`` and their gradients at each of ``steps`` steps (CPU)."""
    gen = torch.Generator().manual_seed(sum(sizes))
    params = [torch.randn(n, generator=gen).bfloat16() for n in sizes]
    grads = [[torch.randn(n, generator=gen).bfloat16() for n in sizes] for _ in range(steps)]
    return params, grads


def _sr_op_step(backend, device, params, grads, firsts, seed=21):
    """Stochastically rounded steps of bf16 params with bf16 moments straight through a
    backend's op, the tensors' elements counted from ``firsts``: a snapshot of every tensor."""
    state = fresh_state([p.to(device, copy=True) for p in params], torch.bfloat16)
    for step_grads in grads:
        adamw_step(backend, state, [g.to(device) for g in step_grads], lr=1e-2, beta1=0.9,
                   beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
                   stochastic_rounding=True, seed=seed, positions=[7] * len(params),
                   first_indices=list(firsts))  # fmt: skip
    return [(name, t.cpu()) for name, t in op_snapshot(state)]


def _bits16(snapshot, k):
    return snapshot[k][1].view(torch.int16)


def test_a_shard_rounds_as_the_whole_tensor_does_there():
    """The noise counts elements from the whole param's first: a tensor stepped as two pieces
    (the same position), the second told where it starts, gets the whole tensor's bits."""
    (whole_p,), grads = _sr_data([70_000])
    cut = 30_001
    whole = _sr_op_step("reference", "cpu", [whole_p], [[g] for (g,) in grads], [0])
    pieces = _sr_op_step("reference", "cpu", [whole_p[:cut], whole_p[cut:]],
                         [[g[:cut], g[cut:]] for (g,) in grads], [0, cut])  # fmt: skip
    for k in range(3):  # param, exp_avg, exp_avg_sq
        halves = [_bits16(pieces, 2 * k), _bits16(pieces, 2 * k + 1)]
        assert torch.equal(torch.cat(halves), _bits16(whole, k))
    counted_from_zero = _sr_op_step("reference", "cpu", [whole_p[cut:]],
                                    [[g[cut:]] for (g,) in grads], [0])  # fmt: skip
    assert not torch.equal(_bits16(counted_from_zero, 0), _bits16(whole, 0)[cut:])


_SR_SIZES = [1_000, 140_001, 33, 2]
_SR_FIRSTS = [2**32 - 5, 2**32 - 70_000, 3 * 2**32 + 7, 2**32 - 1]


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
def test_sr_first_indices_across_two_to_the_32_match_the_reference(backend, device):
    params, grads = _sr_data(_SR_SIZES)
    got = _sr_op_step(backend, device, params, grads, _SR_FIRSTS)
    assert_same_state(got, _sr_op_step("reference", "cpu", params, grads, _SR_FIRSTS), backend)
    assert bits_differ(got, _sr_op_step(backend, device, params, grads, [0] * len(_SR_SIZES)))
