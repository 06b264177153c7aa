"""pytest-benchmark: fastopt against torch's for-loop, foreach and fused AdamW.

    pytest bench/ --benchmark-enable            # on the GPU when there is one, else the CPU
    FASTOPT_BENCH_PARAMS=1e8 pytest bench/ --benchmark-enable

pytest-benchmark times each implementation in its own test; for ratios measured interleaved
in one run (what bench/RESULTS.md reports) use `python -m fastopt bench`. On a GPU each timed
call ends with a synchronize, so the host clock covers the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastopt import benchmark as B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_PARAMS = float(os.environ.get("FASTOPT_BENCH_PARAMS", 1e9 if DEVICE == "cuda" else 30e6))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def case():
    params, grads = B.make_params(B.transformer_shapes(N_PARAMS), DEVICE)
    return params, grads, sum(p.numel() for p in params)


@pytest.mark.parametrize("name", list(B.adamw_cases(DEVICE)))
def test_adamw_step(benchmark, case, name):
    params, grads, n = case
    for p, g in zip(params, grads):
        p.grad = g
    opt = B.adamw_cases(DEVICE)[name](params)
    opt.step()  # allocates the state outside the timing

    def step():
        opt.step()
        _sync()

    benchmark.group = "adamw step"
    benchmark.extra_info.update(
        n_params=n,
        bytes_per_param=B.BYTES_PER_PARAM,
        device=DEVICE,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("name", list(B.pipeline_cases(DEVICE)))
def test_mixed_precision_step_with_clipping(benchmark, case, name):
    params, grads, n = case
    scaled = [g * 2.0**16 for g in grads]
    for p, g in zip(params, scaled):
        p.grad = g.clone()
    step_fn = B.pipeline_cases(DEVICE)[name](params)

    def setup():  # torch's pipeline unscales and clips the gradients in place: restore them
        for p, g in zip(params, scaled):
            p.grad.copy_(g)
        _sync()

    def step():
        step_fn()
        _sync()

    benchmark.group = "mixed-precision step with clipping"
    bpp = B.PIPELINE_BYTES["fastopt" if name.startswith("fastopt") else "torch"]
    benchmark.extra_info.update(
        n_params=n, bytes_per_param=bpp, device=DEVICE, threads=torch.get_num_threads()
    )
    benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=2)
