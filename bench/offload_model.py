"""A timeline model of optimizer offload: the step time of a model trained on one GPU with the
optimizer on the GPU (no offload), on the host after backward (synchronous offload), and on the
host overlapped with the next forward (fastopt's ``overlap``: gradients stream to the host
during backward, the host updates layers in the order the forward uses them, and each layer's
forward waits for its own params only).

Inputs, each printed with the table: the model (params, layers), tokens per step and the GPU's
effective bf16 throughput (forward 2 and backward 4 FLOPs per param and token), the PCIe
bandwidth each way, the host's cores and DRAM bandwidth per core, and per precision mode the
CPU step's bytes per param and its arithmetic in ns per param on one core. ``--measure`` times
that arithmetic here (fastopt's cpu backend, one thread, in cache); without it the defaults
are this repository's measurements (bench/RESULTS.md says which commit).

    python bench/offload_model.py            # the table for 1B, 7B and 13B on an 80 GB GPU
    python bench/offload_model.py --measure  # with this machine's arithmetic per mode
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

__all__ = ["MODES", "Hardware", "Mode", "Model", "step_times"]


@dataclasses.dataclass(frozen=True)
class Mode:
    """A precision mode of the host step: bytes per param it reads and writes in host memory
    (the update's, plus the gradient the GPU writes there and the param it reads back), bytes
    per param of optimizer state, and its arithmetic on one core."""

    name: str
    kernel_bytes: float  # the CPU update's reads and writes per param
    state_bytes: float  # optimizer state per param (moments, masters, codes, scales)
    ns_per_param: float  # arithmetic, one core, in cache
    fastopt_kwargs: dict = dataclasses.field(default_factory=dict)


# Kernel bytes: fp32 moments read and write 8 + 8, bf16 4 + 4, 8-bit codes and scales about
# 2.06 + 2.06; params (bf16: 2 + 2), the gradient read (bf16: 2), a master's remainder 2 + 2.
# The arithmetic: fastopt's cpu step per element, one thread, in cache, without the step's
# fixed cost (ns_per_element), medians of 7 interleaved rounds of --arithmetic on a 2-core
# Intel Xeon (bench/RESULTS.md, "Offload: the CPU step per precision mode").
MODES = [
    # The usual offload (DeepSpeed's, torchao's): an fp32 master and fp32 moments on the host
    # for bf16 params; its arithmetic is taken as fastopt's fp32 step's (timed on fp32 params).
    Mode("fp32 master + fp32 moments", 2 + 4 + 8 + 4 + 8 + 2, 12, 0.46,
         dict(param_dtype="float32")),
    Mode("bf16 + master + bf16 moments", 2 + 2 + 4 + 8 + 2 + 2, 6, 1.00,
         dict(param_dtype="bfloat16", master_weights=True, state_dtype="bfloat16")),
    Mode("bf16 + master + 8-bit moments", 2 + 2 + 4 + 4.12 + 2 + 2, 4.06, 2.45,
         dict(param_dtype="bfloat16", master_weights=True, state_dtype="int8")),
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    params: float
    layers: int
    activations_gb: float  # with activation checkpointing per layer, at the tokens per step


@dataclasses.dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 400.0  # effective bf16: an H100's 989 dense at 40% utilisation
    gpu_hbm_gbps: float = 3000.0  # the on-GPU optimizer step streams its state at this
    pcie_gbps: float = 25.0  # each way: a typical PCIe 4.0 x16 transfer rate (assumed)
    host_cores: int = 32
    host_gbps_per_core: float = 7.0  # a loaded server core's share of DRAM bandwidth
    tokens: int = 16 * 2048


def _gpu_step_s(model: Model, hw: Hardware, mode: Mode) -> float:
    """The optimizer step on the GPU: its bytes at HBM speed (param, grad, state, read and
    written), a lower bound."""
    return model.params * (mode.kernel_bytes + 2) / (hw.gpu_hbm_gbps * 1e9)


def _cpu_step_s(model: Model, hw: Hardware, mode: Mode) -> float:
    """The host step over all cores: the slower of its DRAM traffic (the update's bytes, the
    gradient the GPU wrote, the param read back for the GPU) and its arithmetic."""
    traffic = mode.kernel_bytes + 2 + 2
    memory = model.params * traffic / (hw.host_cores * hw.host_gbps_per_core * 1e9)
    compute = model.params * mode.ns_per_param * 1e-9 / hw.host_cores
    return max(memory, compute)


def step_times(model: Model, hw: Hardware, mode: Mode) -> dict[str, float | bool]:
    """Seconds per step: no offload, synchronous offload, overlapped offload; and whether the
    GPU holds the whole state without offload, and the params, gradients and activations with."""
    fwd = 2 * model.params * hw.tokens / (hw.gpu_tflops * 1e12)
    bwd = 2 * fwd
    grads_down = model.params * 2 / (hw.pcie_gbps * 1e9)  # bf16 gradients
    params_up = model.params * 2 / (hw.pcie_gbps * 1e9)  # bf16 params
    cpu = _cpu_step_s(model, hw, mode)
    no_offload = fwd + bwd + _gpu_step_s(model, hw, mode)
    synchronous = fwd + bwd + grads_down + cpu + params_up
    # Overlapped, layer by layer (L equal layers). Gradients stream during backward; what does
    # not fit under it is exposed. The host starts once backward ends (the clip factor needs
    # the whole norm) and updates layer 0 first; layer i's params go up after its update and
    # the previous layer's copy; layer i's forward starts when both its params have arrived
    # and layer i - 1's forward has ended.
    layers = model.layers
    start = max(0.0, grads_down - bwd)
    update_done = copied = forward_end = start
    for _ in range(layers):
        update_done += cpu / layers
        copied = max(copied, update_done) + params_up / layers
        forward_end = max(forward_end, copied) + fwd / layers
    overlapped = forward_end + bwd
    device_gb = model.params * (2 + 2) / 1e9 + model.activations_gb
    return {
        "no_offload": no_offload,
        "synchronous": synchronous,
        "overlapped": overlapped,
        "fits_without": device_gb + model.params * mode.state_bytes / 1e9 <= hw.gpu_memory_gb,
        "fits_with": device_gb <= hw.gpu_memory_gb,
        "host_gb": model.params * (mode.state_bytes + 2 + 2) / 1e9,
    }


MODELS = [
    Model("1B", 1.1e9, 22, 6.0),
    Model("7B", 6.7e9, 32, 16.0),
    Model("13B", 13e9, 40, 22.0),
]


# The per-mode arithmetic table (--arithmetic): the modes the targets name, and torch's fused
# fp32 step, each as (name, param dtype, optimizer keyword arguments).
ARITHMETIC = [
    ("torch fused AdamW, fp32", "float32", None),
    ("fastopt, fp32", "float32", {}),
    ("bf16 + master + bf16 moments", "bfloat16",
     dict(master_weights=True, state_dtype="bfloat16")),
    ("bf16 + stochastic rounding + bf16 moments", "bfloat16",
     dict(stochastic_rounding=True, state_dtype="bfloat16")),
    ("fp32 params + 8-bit moments", "float32", dict(state_dtype="int8")),
    ("bf16 + master + 8-bit moments", "bfloat16", dict(master_weights=True, state_dtype="int8")),
]  # fmt: skip


def _step_seconds(dtype_name: str, kwargs: dict | None, numel: int, calls: int) -> float:
    """The floor over 7 rounds of one step's time: one tensor of numel elements, one thread."""
    import torch

    import fastopt

    dtype = getattr(torch, dtype_name)
    kwargs = dict(kwargs or {}) if kwargs is not None else None
    if kwargs and kwargs.get("state_dtype") == "bfloat16":
        kwargs["state_dtype"] = torch.bfloat16
    param = torch.nn.Parameter(torch.randn(numel).to(dtype))
    param.grad = torch.randn(numel).to(dtype)
    if kwargs is None:
        opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
    else:
        opt = fastopt.AdamW([param], lr=1e-4, backend="cpu", min_8bit_size=0, **kwargs)
    opt.step()
    best = float("inf")
    for _ in range(7):
        begin = time.perf_counter()
        for _ in range(calls):
            opt.step()
        best = min(best, (time.perf_counter() - begin) / calls)
    return best


def ns_per_element(dtype_name: str, kwargs: dict | None, small: int = 1 << 12,
                   large: int = 1 << 16) -> float:  # fmt: skip
    """The step's arithmetic per element, in cache, one thread: the slope between a tensor of
    ``small`` and one of ``large`` elements (both in L2), so that the step's fixed cost (the
    Python of ``step()``, the op call: tens of microseconds, 0.5 ns per element at 64 Ki
    elements, as much as the fp32 arithmetic itself) is not counted."""
    import torch

    torch.set_num_threads(1)
    t_small = _step_seconds(dtype_name, kwargs, small, 200)
    t_large = _step_seconds(dtype_name, kwargs, large, 200)
    return (t_large - t_small) / (large - small) * 1e9


def measure_ns_per_param(mode: Mode) -> float:
    """fastopt's cpu step's arithmetic per element in ``mode`` (:func:`ns_per_element`)."""
    kwargs = dict(mode.fastopt_kwargs)
    return ns_per_element(kwargs.pop("param_dtype"), kwargs)


# The lean modes again on the CPU kernel's portable loops (FASTOPT_CPU_SIMD=0), beside the
# AVX-512 paths an AVX-512 CPU takes by default (csrc/cpu/adamw_avx512.h, adamw_avx512_16.h).
PORTABLE = ("bf16 + master + bf16 moments", "bf16 + stochastic rounding + bf16 moments",
            "fp32 params + 8-bit moments", "bf16 + master + 8-bit moments")  # fmt: skip


# The same modes on the AVX2 paths (csrc/cpu/adamw_avx2_16.h, adamw_avx2_8.h), which CPUs with
# AVX2 and no AVX-512 take by default and FASTOPT_CPU_SIMD=avx2 forces on the others.
AVX2 = PORTABLE


def _arithmetic_cases() -> list[tuple[str, str, dict | None, str | None]]:
    """(row name, param dtype, optimizer kwargs, FASTOPT_CPU_SIMD or None) per table row."""
    cases = [(name, dtype, kwargs, None) for name, dtype, kwargs in ARITHMETIC]
    cases += [(f"{name}, AVX2 path", dtype, kwargs, "avx2")
              for name, dtype, kwargs in ARITHMETIC if name in AVX2]  # fmt: skip
    cases += [(f"{name}, portable loops", dtype, kwargs, "0")
              for name, dtype, kwargs in ARITHMETIC if name in PORTABLE]  # fmt: skip
    return cases


def _timed_with_simd(simd: str | None, dtype_name: str, kwargs: dict | None) -> float:
    """ns_per_element with FASTOPT_CPU_SIMD set to ``simd`` (unset for None) for the call."""
    before = os.environ.pop("FASTOPT_CPU_SIMD", None)
    try:
        if simd is not None:
            os.environ["FASTOPT_CPU_SIMD"] = simd
        return ns_per_element(dtype_name, kwargs)
    finally:
        os.environ.pop("FASTOPT_CPU_SIMD", None)
        if before is not None:
            os.environ["FASTOPT_CPU_SIMD"] = before


def arithmetic_table(rounds: int = 7) -> str:
    """Every ARITHMETIC mode (and the PORTABLE ones on the portable loops) timed in each of
    ``rounds`` interleaved rounds: the median ns per element with its min-max, and the median
    over rounds of the ratio to fastopt fp32."""
    cases = _arithmetic_cases()
    runs: dict[str, list[float]] = {name: [] for name, _, _, _ in cases}
    for _ in range(rounds):
        for name, dtype_name, kwargs, simd in cases:
            runs[name].append(_timed_with_simd(simd, dtype_name, kwargs))
    base = runs["fastopt, fp32"]
    lines = ["| mode | ns per element (median, min-max) | vs fastopt fp32 (median) |",
             "| --- | ---: | ---: |"]  # fmt: skip
    for name, values in runs.items():
        ratios = [v / b for v, b in zip(values, base)]
        lines.append(f"| {name} | {statistics.median(values):.3f} ({min(values):.3f}-"
                     f"{max(values):.3f}) | {statistics.median(ratios):.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true",
                        help="time each mode's arithmetic on this machine first")  # fmt: skip
    parser.add_argument("--arithmetic", action="store_true",
                        help="print only the arithmetic per element of every mode, timed "
                        "in interleaved rounds")  # fmt: skip
    args = parser.parse_args(argv)
    if args.arithmetic:
        print(arithmetic_table())
        return
    hw = Hardware()
    modes = MODES
    if args.measure:
        modes = [dataclasses.replace(m, ns_per_param=measure_ns_per_param(m)) for m in MODES]
    print(f"assumptions: {hw}")
    print("| model | mode | host ns/param (1 core) | no offload | synchronous | overlapped |"
          " overlapped / no offload | host GB | GPU holds the rest |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for model in MODELS:
        for mode in modes:
            t = step_times(model, hw, mode)
            none = f"{t['no_offload']:.2f} s" if t["fits_without"] else "does not fit"
            ratio = f"{t['overlapped'] / t['no_offload']:.2f}x" if t["fits_without"] else "-"
            print(f"| {model.name} | {mode.name} | {mode.ns_per_param:.2f} | {none} | "
                  f"{t['synchronous']:.2f} s | {t['overlapped']:.2f} s | {ratio} | "
                  f"{t['host_gb']:.0f} | {'yes' if t['fits_with'] else 'no'} |")  # fmt: skip


if __name__ == "__main__":
    main()
