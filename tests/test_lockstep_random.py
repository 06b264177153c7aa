"""Random configurations, bit for bit against fastopt.reference (tests/lockstep.py):
hypothesis draws the state format (8-bit codes, fp32 or bf16 moments, masters), the settings,
the sizes and the seeds, per backend.

Budgets on a 2-core CPU: the 8-bit op on the CPU kernel 40 examples of at most ~10k elements
(15-25 s); on the Triton interpreter 20 examples of up to three tensors of one chunk and
three steps (13 s; a failure's shrinking takes minutes); fastopt.AdamW's lean settings on the
CPU kernel the profile's examples (tests/conftest.py), on the interpreter 40 (about a second
each).
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lockstep import INT8_VARIANTS, op_lockstep, optimizer_lockstep

# ---------------------------------------------------------------------- 8-bit moments, op level


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=6),
    cfg=st.sampled_from(list(INT8_VARIANTS.values())),
    maximize=st.booleans(),
    clip=st.booleans(),
    scaled=st.booleans(),
    beta1=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend,device", backend_params([("cpu", "cpu")]))
def test_int8_random_configurations_match_the_reference(backend, device, sizes, cfg, maximize,
                                                        clip, scaled, beta1, seed):  # fmt: skip
    op_lockstep(backend, device, [(n,) for n in sizes], torch.Generator().manual_seed(seed),
                maximize=maximize, max_grad_norm=1.0 if clip else None,
                grad_scale=1024.0 if scaled else None, found_inf=scaled, beta1=beta1,
                seed=987654321 + seed, steps=2, decades=True, weight_decay=1e-2,
                **cfg)  # fmt: skip


_TRITON_INT8 = dict(
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


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, under the interpreter
@settings(max_examples=20, deadline=None)
@given(**_TRITON_INT8)
@pytest.mark.parametrize("backend,device", backend_params([("triton", "cpu"), ("triton", "cuda")]))
def test_int8_random_configurations_on_triton_match_the_reference(
    backend, device, p_dtype, fp32_grads, master, sr, amsgrad, maximize, beta1, beta2,
    weight_decay, grad_magnitude, sizes, steps, seed, first,
):  # fmt: skip
    # Stochastic rounding into fp16 is refused; it rounds bf16 stores only.
    sr = sr and not (p_dtype == torch.float16 and not master)
    op_lockstep(backend, device, [(n,) for n in sizes], torch.Generator().manual_seed(seed % 2**32),
                steps=steps, p_dtype=p_dtype,
                grad_dtype=torch.float32 if fp32_grads else p_dtype,
                master=master and p_dtype != torch.float32, sr=sr, amsgrad=amsgrad,
                maximize=maximize, weight_decay=weight_decay, grad_magnitude=grad_magnitude,
                seed=seed, first_indices=[first + 7 * i for i in range(len(sizes))], beta1=beta1,
                beta2=beta2)  # fmt: skip


# ---------------------------------------------------------------------- lean settings, AdamW

_LEAN = dict(
    p_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    state_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
    master=st.booleans(),
    sr=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    fp32_grads=st.booleans(),
    lr=st.floats(1e-5, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.floats(0.0, 0.2),
    sizes=st.lists(st.integers(0, 1100), min_size=1, max_size=3),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**63 - 1),
)


def lean_lockstep(backend, device, p_dtype, state_dtype, master, sr, amsgrad, maximize,
                  fp32_grads, lr, beta1, beta2, weight_decay, sizes, steps, seed):  # fmt: skip
    """fastopt.AdamW with the drawn lean settings on ``backend`` beside the reference: the
    same bits in the params, moments and masters after every step (the reference's fp32
    arithmetic is the kernels', operation for operation, so the stochastic rounding decides
    alike too)."""
    # Stochastic rounding into fp16 is refused (test_lean_settings_refuse_params_they_...).
    assume(not (sr and (state_dtype or p_dtype) == torch.float16))
    assume(not (sr and p_dtype == torch.float16 and not master))
    gen = torch.Generator().manual_seed(len(sizes))
    init = [torch.randn(n, generator=gen) for n in sizes]
    optimizer_lockstep(
        backend, device, init, lambda step: [torch.randn(n, generator=gen) * 0.1 for n in sizes],
        steps=steps, dtype=p_dtype, fp32_grads=fp32_grads, lr=lr, betas=(beta1, beta2),
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, master_weights=master,
        state_dtype=state_dtype, stochastic_rounding=sr, seed=seed,
    )  # fmt: skip


@given(**_LEAN)
@pytest.mark.parametrize("backend,device", backend_params([("cpu", "cpu")]))
def test_lean_random_configurations_match_the_reference(backend, device, **config):
    """Every lean configuration on the C++ kernel. Sizes cross the kernel's 512-element blocks
    and include empty tensors."""
    lean_lockstep(backend, device, **config)


@settings(max_examples=40)  # the interpreter takes about a second per example here
@given(**{**_LEAN, "sizes": st.lists(st.integers(0, 17000), min_size=1, max_size=2)})
@pytest.mark.parametrize("backend,device", backend_params([("triton", "cpu")]))
def test_lean_random_configurations_on_the_triton_interpreter_match_the_reference(
    backend, device, **config
):
    """The Triton kernel under TRITON_INTERPRET=1: sizes cross its 16 Ki-element chunks, whose
    noise counters start at the chunk's first index."""
    lean_lockstep(backend, device, **config)


@settings(max_examples=200, deadline=None)
@given(**{**_LEAN, "sizes": st.lists(st.integers(0, 140_000), min_size=1, max_size=3)})
@pytest.mark.parametrize("backend,device", backend_params([("cuda", "cuda")]))
def test_lean_random_configurations_on_cuda_match_the_reference(backend, device, **config):
    """The CUDA kernel on the GPU: sizes cross its 64 Ki-element chunks and its 16-byte
    vectors' tails."""
    lean_lockstep(backend, device, **config)


@settings(max_examples=30, deadline=None)  # a Triton compile per new variant
@given(**{**_LEAN, "sizes": st.lists(st.integers(0, 40_000), min_size=1, max_size=2)})
@pytest.mark.parametrize("backend,device", backend_params([("triton", "cuda")]))
def test_lean_random_configurations_on_triton_gpu_match_the_reference(backend, device, **config):
    lean_lockstep(backend, device, **config)
