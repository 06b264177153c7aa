"""8-bit moments (uint8 codes, int8 block scales) in the Triton AdamW kernel, bit for bit
against fastopt.reference.adamw_step.

The kernel follows csrc/adamw_math.h's arithmetic and the reference follows it operation for
operation, and the codes round stochastically from the same counter-based noise, so every
byte (params, masters, codes, scales) must agree: no tolerance. On a machine with a CUDA GPU
the kernel runs compiled on CUDA tensors; without one, under Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 before Triton loads). The reference always
steps CPU copies. The interpreter runs each program in Python (a few tenths of a second per
small tensor, about two seconds per full 16 Ki-element chunk), so sizes are small except where
a size is the point.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import kernels as tk
from fastopt import quant, reference
from fastopt.rounding import split_master

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On a machine with a GPU these run compiled there, and belong to the GPU suite (-m gpu).
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []
ADAMW = tk._table.launch_heuristics("adamw", 4)
BLOCK = quant.BLOCK
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)

# Every awkward size of a block: 0-dim, empty, 1, block - 1, block, block + 1, primes, 2-d.
SMALL = [(), (0,), (1,), (31,), (32,), (33,), (97,), (3, 11)]


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random data per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_state(shapes, gen, *, p_dtype=torch.float32, master=False, amsgrad=False) -> dict:
    """Mid-training 8-bit state on the CPU: random moments quantized (to nearest), a different
    step count per tensor, and the masters of bf16 (int16 remainder) or fp16 (fp32) params."""
    state = {k: [] for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")}
    state.update(masters=[], scales=[], state_steps=[])
    for i, shape in enumerate(shapes):
        # Magnitudes spread over decades within a block: the scales and the subnormal codes
        # both get exercised.
        spread = 10.0 ** torch.randint(-4, 2, shape, generator=gen)
        p32 = torch.randn(shape, generator=gen)
        m = torch.randn(shape, generator=gen) * 0.1 * spread
        v = (torch.randn(shape, generator=gen) * 0.1 * spread) ** 2
        codes = [quant.quantize_m(m), quant.quantize_v(v.sqrt())]
        if amsgrad:
            codes.append(quant.quantize_v((v * 1.5).sqrt()))
        if master and p_dtype == torch.bfloat16:
            param, remainder = split_master(p32)
            state["params"].append(param)
            state["masters"].append(remainder)
        else:
            state["params"].append(p32.to(p_dtype))
            if master:
                state["masters"].append(p32)
        state["exp_avgs"].append(codes[0][0])
        state["exp_avg_sqs"].append(codes[1][0])
        if amsgrad:
            state["max_exp_avg_sqs"].append(codes[2][0])
        state["scales"].append(torch.stack([s for _, s in codes]).contiguous())
        state["state_steps"].append(torch.tensor(float(i % 5)))
    return state


def to_device(state: dict, device) -> dict:
    return {k: [t.to(device, copy=True) for t in v] for k, v in state.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).cpu().view(torch.uint8)


def assert_same_bytes(mine: dict, ref: dict, what: str) -> None:
    for key in ("params", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "scales"):
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            differ = (_bytes(a) != _bytes(b)).nonzero().flatten()
            assert differ.numel() == 0, (
                f"{what}: {key}[{i}] ({a.dtype}, {tuple(a.shape)}) differs in "
                f"{differ.numel()} bytes, first at {differ[:5].tolist()}"
            )


def step(impl, state: dict, grads, **kw) -> None:
    impl.adamw_step(
        state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"],
        state["max_exp_avg_sqs"], state["state_steps"], masters=state["masters"],
        scales=state["scales"], **kw,
    )  # fmt: skip


def lockstep(shapes, gen, *, steps=3, p_dtype=torch.float32, grad_dtype=None, master=False,
             sr=False, amsgrad=False, maximize=False, weight_decay=0.0, grad_scale=None,
             grad_factor=1.0, max_grad_norm=None, tensor_lr=False, skip_every=None, seed=11,
             first_indices=(), grad_magnitude=1.0, hyper=HYPER):  # fmt: skip
    """``steps`` steps of the Triton kernel (on DEVICE) and the reference (on the CPU) on the
    same fresh gradients, every byte compared after each. Returns both states."""
    ref = make_state(shapes, gen, p_dtype=p_dtype, master=master, amsgrad=amsgrad)
    mine = to_device(ref, DEVICE)
    grad_dtype = grad_dtype or p_dtype
    for k in range(steps):
        scale = 1.0 if grad_scale is None else grad_scale
        grads = [(torch.randn(s, generator=gen) * grad_magnitude * scale).to(grad_dtype)
                 for s in shapes]  # fmt: skip
        kw = dict(hyper, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                  grad_factor=grad_factor, stochastic_rounding=sr, seed=seed,
                  positions=list(range(3, 3 + len(shapes))),
                  first_indices=list(first_indices))  # fmt: skip
        if tensor_lr:
            kw["lr"] = torch.tensor(hyper["lr"] * (1 - k / (2 * steps)))
        if grad_scale is not None:
            kw["grad_scale"] = torch.tensor(grad_scale)
        if max_grad_norm is not None:
            kw["grad_norm"] = reference.multi_tensor_norm(grads, 2.0)[0]
            kw["max_grad_norm"] = max_grad_norm
        skip = skip_every is not None and k % skip_every == skip_every - 1
        if skip_every is not None:
            kw["found_inf"] = torch.tensor(float(skip))
        for s in ref["state_steps"] + mine["state_steps"]:
            s.add_(0.0 if skip else 1.0)  # the caller advances by 1 - found_inf
        before = to_device(mine, "cpu") if skip else None
        on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        step(tk, mine, [g.to(DEVICE) for g in grads], **on_device)
        step(reference, ref, grads, **kw)
        if skip:  # the skipped step left every byte alone, codes and scales included
            assert_same_bytes(mine, before, f"skipped step {k}")
        assert_same_bytes(mine, ref, f"step {k}")
    return mine, ref


CONFIGS = {
    "fp32": dict(),
    "fp32-amsgrad-decay": dict(amsgrad=True, weight_decay=0.1),
    "fp32-maximize-tensor-lr": dict(maximize=True, tensor_lr=True, weight_decay=0.05),
    "fp32-scaled-clipped": dict(grad_scale=1024.0, grad_factor=0.25, max_grad_norm=0.5),
    "fp32-scaled-not-clipped": dict(grad_scale=1024.0, max_grad_norm=1e6, amsgrad=True),
    "found-inf-skips": dict(grad_scale=64.0, skip_every=2, amsgrad=True, steps=4),
    "fp32-tiny-grads": dict(grad_magnitude=1e-30, amsgrad=True),  # scales at their floor
    # g * g is inf, so is v: its codes become NaN codes. One step: the next would make the
    # params NaN, whose bits differ between devices (a GPU's NaN is 0x7FFFFFFF).
    "fp32-huge-grads": dict(grad_magnitude=1e30, weight_decay=0.1, steps=1),
    "bf16": dict(p_dtype=torch.bfloat16),
    "bf16-fp32grads-sr": dict(p_dtype=torch.bfloat16, grad_dtype=torch.float32, sr=True),
    "bf16-sr-amsgrad-maximize": dict(p_dtype=torch.bfloat16, sr=True, amsgrad=True, maximize=True),
    "bf16-master-remainder": dict(p_dtype=torch.bfloat16, master=True, weight_decay=0.1),
    "bf16-master-sr-amsgrad": dict(p_dtype=torch.bfloat16, master=True, sr=True, amsgrad=True),
    "fp16": dict(p_dtype=torch.float16, amsgrad=True),
    "fp16-fp32grads-master": dict(p_dtype=torch.float16, grad_dtype=torch.float32, master=True),
}


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_8bit_moments_match_the_reference_bit_for_bit(cfg, gen):
    mine, _ = lockstep(SMALL, gen, **cfg)
    codes = torch.cat([_bytes(c) for c in mine["exp_avgs"] + mine["exp_avg_sqs"]])
    assert codes.numel() and (codes != 0).any(), "no code was written: the check proves nothing"


def test_the_state_really_is_what_the_configurations_claim(gen):
    """The huge-gradient case does reach inf (NaN codes) and the tiny one the floor scale,
    so those configurations test what their names say."""
    huge, _ = lockstep([(33,)], gen, steps=1, grad_magnitude=1e30)
    assert (huge["exp_avg_sqs"][0].cpu() == 0xFF).all()  # v = inf: E4M4's NaN code
    tiny, _ = lockstep([(33,)], gen, steps=4, grad_magnitude=1e-30, hyper=dict(HYPER, beta1=0))
    assert (tiny["scales"][0][0].cpu() == quant.SCALE_MIN).all()


@pytest.mark.parametrize(
    "shapes,steps",
    [
        ([(4095,), (4096,), (4097,)], 2),
        ([(2 * ADAMW.chunk + 33,)], 1),  # three chunks, the last one block and a bit
        ([(1,)] * 40 + [(0,), ()] * 3 + [(33,)] * 4 + [(2 * ADAMW.block + 3,)], 2),
    ],
    ids=["4095-4096-4097", "three-chunks", "many-tensors-one-launch"],
)
def test_8bit_hostile_sizes_match_the_reference(shapes, steps, gen):
    lockstep(shapes, gen, steps=steps, amsgrad=True, weight_decay=0.1, sr=True,
             p_dtype=torch.bfloat16, grad_dtype=torch.float32)  # fmt: skip


# Shards that start just below a multiple of 2**32 elements, so that the noise's high index
# word changes inside a chunk and inside a block (at element 5, 20_003, 1), and one above it.
# 20_003 is not a multiple of 32: the change falls inside a scale block, inside a tile row.
_FIRSTS = [2**32 - 5, 2**32 - 20_003, 3 * 2**32 + 7, 2**32 - 1]
_SIZES = [(1_000,), (20_040,), (33,), (2,)]


def test_first_indices_across_two_to_the_32_match_the_reference():
    mine, _ = lockstep(_SIZES, torch.Generator().manual_seed(3), steps=1, first_indices=_FIRSTS)
    from_zero, _ = lockstep(_SIZES, torch.Generator().manual_seed(3), steps=1)
    for a, b in zip(mine["exp_avgs"], from_zero["exp_avgs"]):
        assert not torch.equal(a, b), "the first indices changed no code: the noise ignores them"


def test_codes_round_stochastically_without_stochastic_rounding():
    """The codes draw noise whatever stochastic_rounding says: another seed, other codes
    (each matching the reference); the fp32 params, rounded to nearest, stay the same."""
    runs = [lockstep([(257,)], torch.Generator().manual_seed(5), steps=1, seed=s) for s in (1, 2)]
    (a, _), (b, _) = runs
    assert torch.equal(a["params"][0], b["params"][0])
    assert not torch.equal(a["exp_avgs"][0], b["exp_avgs"][0])
    assert not torch.equal(a["exp_avg_sqs"][0], b["exp_avg_sqs"][0])


def test_adamw_int8_on_triton_matches_the_reference_backend():
    """Through the optimizer: fastopt.AdamW(state_dtype="int8") gives the same bytes on the
    Triton backend as on the reference one, small params (fp32 moments) included."""
    runs = []
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in (300, 33, 5)]
        opt = fastopt.AdamW(ps, lr=1e-2, amsgrad=True, backend=backend, state_dtype="int8",
                            min_8bit_size=32, seed=3)  # fmt: skip
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        state = [t for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        runs.append([_bytes(t) for t in ps + state])
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.uint8
    assert opt.state[ps[2]]["exp_avg"].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_8bit_moments_reject_bad_scales_naming_the_argument(gen):
    shapes = [(40,), (3,)]

    def call(**over):
        state = to_device(make_state(shapes, gen), DEVICE)
        state.update(over)
        grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        step(tk, state, grads, **HYPER, weight_decay=0.0, amsgrad=False, maximize=False)

    zeros = lambda *s, dtype=torch.int8: torch.zeros(s, dtype=dtype, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match=r"scales has 0 tensors, expected 2"):
        call(scales=[])
    with pytest.raises(ValueError, match=r"scales\[1\] must be a contiguous int8"):
        call(scales=[zeros(2, 2), zeros(2, 1, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"scales\[1\] must be a contiguous int8"):
        call(scales=[zeros(2, 2), zeros(4, 2)[::2, :1]])
    with pytest.raises(ValueError, match=r"scales\[0\] must hold 2 rows of 2 block scales"):
        call(scales=[zeros(2, 1), zeros(2, 1)])
    with pytest.raises(ValueError, match=r"exp_avg_sqs must be torch.uint8"):
        call(exp_avg_sqs=[torch.zeros(s, device=DEVICE) for s in shapes])
    with pytest.raises(ValueError, match=r"scales go with uint8"):
        fp32 = [torch.zeros(s, device=DEVICE) for s in shapes]
        call(exp_avgs=fp32, exp_avg_sqs=[t.clone() for t in fp32])


def test_chunks_and_blocks_hold_whole_scale_blocks():
    """A scale block never straddles two programs or two loop iterations."""
    for op in ("adamw", "accumulate", "norm"):
        launch = tk._table.launch_heuristics(op, 4)
        assert launch.block % BLOCK == 0 and launch.chunk % BLOCK == 0


# ---------------------------------------------------------------------- random lockstep

# 20 examples of at most three tensors of up to 5000 elements (one chunk) and three steps:
# 13 s in all under the interpreter on a 2-core machine (a failure's shrinking takes minutes).
_CONFIG = dict(
    p_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fp32_grads=st.booleans(),
    master=st.booleans(),
    sr=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.floats(0.0, 0.2),
    grad_magnitude=st.sampled_from([1e-20, 1e-6, 1e-2, 1.0, 1e3]),
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=3),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**63 - 1),
    first=st.sampled_from([0, 2**32 - 100, 2**40 + 12345]),
)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@settings(max_examples=20, deadline=None)
@given(**_CONFIG)
def test_random_8bit_configurations_match_the_reference(p_dtype, fp32_grads, master, sr, amsgrad,
                                                        maximize, beta1, beta2, weight_decay,
                                                        grad_magnitude, sizes, steps, seed,
                                                        first):  # fmt: skip
    # Stochastic rounding into fp16 is refused; it rounds bf16 stores only.
    sr = sr and not (p_dtype == torch.float16 and not master)
    gen = torch.Generator().manual_seed(seed % 2**32)
    lockstep([(n,) for n in sizes], gen, steps=steps, p_dtype=p_dtype,
             grad_dtype=torch.float32 if fp32_grads else p_dtype,
             master=master and p_dtype != torch.float32, sr=sr, amsgrad=amsgrad,
             maximize=maximize, weight_decay=weight_decay, grad_magnitude=grad_magnitude,
             seed=seed, first_indices=[first + 7 * i for i in range(len(sizes))],
             hyper=dict(HYPER, beta1=beta1, beta2=beta2))  # fmt: skip
