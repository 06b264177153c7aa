"""Helpers shared by the test modules: which (backend, device) pairs to run, random data."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every backend on every device it runs on. Nothing here is skipped for being unavailable on
# the CPU: CI builds the extension and has Triton, so a missing backend there is a failure.
_PAIRS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
          ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]  # fmt: skip


def backend_params(pairs=_PAIRS) -> list:
    out = []
    for name, device in pairs:
        marks = []
        if (name, device) == ("triton", "cpu") and HAS_CUDA:
            marks = [
                pytest.mark.skip(
                    reason="Triton runs compiled on this machine's GPU; the "
                    "interpreter-on-CPU cases run where there is none"
                )
            ]
        if device == "cuda":
            marks = [pytest.mark.gpu]
            if not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
        out.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return out


BACKENDS = backend_params()
FAST_BACKENDS = backend_params([p for p in _PAIRS if p != ("reference", "cpu")])
# Where the Triton kernels run: compiled on a CUDA GPU where there is one, else interpreted.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def backend_cases(backend: str, device: str, cases: dict) -> list:
    """pytest params (backend, device, case) for each named case, marked as backend_params
    marks the pair; ids "backend-device-name"."""
    marks = backend_params([(backend, device)])[0].marks
    return [pytest.param(backend, device, case, id=f"{backend}-{device}-{name}", marks=marks)
            for name, case in cases.items()]  # fmt: skip


def randn(shape, *, dtype=torch.float32, device="cpu", gen: torch.Generator) -> torch.Tensor:
    """Random normal data (never zeros: zeros hide unwritten outputs)."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def replay_in_cuda_graph(scaler, opt, load, steps: int = 8, warmup: int = 2) -> None:
    """``scaler.step(opt); scaler.update()`` run eagerly on a side stream for ``warmup`` steps
    (state, kernel compilation, tables), then captured in a CUDA graph and replayed for the
    rest of ``steps``; ``load(step)`` fills the static gradients before each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(warmup):
            load(step)
            scaler.step(opt)
            scaler.update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaler.step(opt)
        scaler.update()
    for step in range(warmup, steps):
        load(step)
        graph.replay()
    torch.cuda.synchronize()


# The precision settings the offload and overlap tests step with, and those that train bf16
# params (the others fp32).
OFFLOAD_SETTINGS = {
    "plain": dict(),
    "clip": dict(max_grad_norm=0.05),
    "amsgrad": dict(amsgrad=True, weight_decay=0.1),
    "bf16-master": dict(master_weights=True, state_dtype=torch.bfloat16),
    "bf16-sr": dict(stochastic_rounding=True, state_dtype=torch.bfloat16),
    "int8": dict(state_dtype="int8", min_8bit_size=0),
    "int8-master": dict(master_weights=True, state_dtype="int8", min_8bit_size=0),
}
OFFLOAD_BF16 = {"bf16-master", "bf16-sr", "int8-master"}
