"""Benchmark cases and timing shared by ``python -m fastopt bench`` and bench/.

Speeds are compared side by side in one process: every repeat times each implementation once,
in turn, so drift in clocks or load hits all of them alike; we report medians and ratios of
medians. GPU times come from CUDA events, CPU times from perf_counter around a single step.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .backends import availability

__all__ = [
    "BYTES_PER_PARAM",
    "LEAN_CASES",
    "OVERHEAD_NUMEL",
    "OVERHEAD_TENSORS",
    "PIPELINE_BYTES",
    "WIDE_SPREAD",
    "OtherLoad",
    "adamw_cases",
    "copy_bandwidth",
    "lean_cases",
    "make_params",
    "overhead_steps",
    "pipeline_cases",
    "summarize",
    "sweep_caches",
    "time_interleaved",
    "transformer_shapes",
]

# AdamW on fp32 params moves 28 bytes per parameter: reads param, grad, exp_avg, exp_avg_sq
# (16 B) and writes param, exp_avg, exp_avg_sq (12 B).
BYTES_PER_PARAM = 28
# Mixed-precision step with clipping, fp32 gradients, bytes per parameter. torch: unscale_
# reads and writes the grads (8), clip_grad_norm_ reads them (4) then scales them in place (8),
# AdamW moves 28: 48. fastopt: one read for the norm and inf check (4) and the update (28): 32.
PIPELINE_BYTES = {"torch": 48, "fastopt": 32}


# A row whose per-repeat speed-ups have an interquartile range wider than this fraction of
# their median is flagged. The quartiles, not min-max (which the tables show): one repeat in
# fifteen hit by a page fault or a timer must not flag a run, a core taken by another
# process for a third of it must (it made torch's rows swing by 2-4x).
WIDE_SPREAD = 0.2


class OtherLoad:
    """How many cores other processes kept busy while a benchmark ran (Linux: /proc/stat's busy
    time minus this process's own CPU time, over the wall time).

    torch's CPU kernels run OpenMP regions that wait for every thread; one core taken by
    another process can make them several times slower, so a CPU timing is only worth
    reporting when this stays near 0. ``None`` where /proc/stat is not readable.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        ticks = [int(x) for x in fields[:8]]
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def __enter__(self) -> OtherLoad:
        self._start = (self._busy_seconds(), self._own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return
        self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def transformer_shapes(target_params: float) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style model near ``target_params``: a few large matrices and
    many small vectors (biases, layer norms), as real models have."""
    # GPT-like proportions: about d/64 layers of width d, d a multiple of 128.
    d = max(128, round((target_params * 64 / 12) ** (1 / 3) / 128) * 128)
    vocab = 8 * d
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((target_params - vocab * d) / per_layer))
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),  # attention + its norm
            (d,),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
        ]  # MLP + its norm
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes, device, dtype=torch.float32, seed=0) -> tuple[list[Tensor], list[Tensor]]:
    """Params and fixed gradients (random, never zeros) for the shapes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen))
              for s in shapes]  # fmt: skip
    grads = [torch.randn(s, device=device, dtype=dtype, generator=gen) * 1e-2 for s in shapes]
    return params, grads


def _fastopt_backends(device: str) -> list[str]:
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [n for n in names if availability(n, device)[0]]


def adamw_cases(device: str) -> dict[str, Callable]:
    """name -> factory(params) -> optimizer, for the AdamW step alone."""
    from . import AdamW

    cases: dict[str, Callable] = {
        "torch for-loop": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    }
    for name in _fastopt_backends(device):
        cases[f"fastopt {name}"] = lambda ps, name=name: AdamW(ps, backend=name)
    return cases


def pipeline_cases(device: str, max_norm: float = 1.0) -> dict[str, Callable]:
    """name -> factory(params) -> step function doing a whole mixed-precision step with
    clipping on gradients already scaled by the loss scale (2**16)."""
    from . import AdamW, LossScaler

    def torch_pipeline(ps, fused):
        opt = torch.optim.AdamW(ps, fused=fused, foreach=None if fused else True)
        scaler = torch.amp.GradScaler(device)
        scaler.scale(torch.ones((), device=device))  # initialises the scale on the device

        def step():
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
            scaler.step(opt)
            scaler.update()

        return step

    def fastopt_pipeline(ps, backend):
        opt = AdamW(ps, backend=backend, max_grad_norm=max_norm)
        scaler = LossScaler(backend=backend)
        scaler.scale(torch.ones((), device=device))

        def step():
            scaler.step(opt)
            scaler.update()

        return step

    cases: dict[str, Callable] = {
        "torch unfused (foreach)": lambda ps: torch_pipeline(ps, fused=False),
        "torch unfused (fused AdamW)": lambda ps: torch_pipeline(ps, fused=True),
    }
    for name in _fastopt_backends(device):
        cases[f"fastopt {name}"] = lambda ps, name=name: fastopt_pipeline(ps, name)
    return cases


# Bytes moved per parameter by the lean-precision AdamW steps (bf16 params, bf16 grads), and
# bytes of optimizer state held per parameter. master_weights + bf16 moments: reads param,
# remainder, grad, exp_avg, exp_avg_sq (2 each: 10) and writes param, remainder and the moments
# (8): 18, against 28 for fp32 params; state 6 (moments 4, remainder 2) against 8. 8-bit
# moments: a code byte per moment element read and written, plus an int8 scale per 32 (1/32 B
# each way per moment): fp32 params 8 + 4 + 2 * (2 + 2/32) = 16.125; bf16 params with master
# 6 + 4 + 4.125 = 14.125. State: 2.0625 (fp32 params) and 4.0625 B (with the remainder).
LEAN_CASES = {
    # name: (param dtype, bytes moved, optimizer kwargs or None for torch's fused AdamW); the
    # fastopt rows run on each of the device's fastopt backends.
    "torch fused, fp32 params": (torch.float32, 28, None),
    "torch fused, bf16 params": (torch.bfloat16, 14, None),
    "bf16 + master + bf16 moments": (
        torch.bfloat16, 18, dict(master_weights=True, state_dtype=torch.bfloat16)),
    "bf16 + stochastic rounding + bf16 moments": (
        torch.bfloat16, 14, dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=0)),
    "fp32 params": (torch.float32, 28, {}),
    "fp32 params + int8 moments": (torch.float32, 16.125, dict(state_dtype="int8", seed=0)),
    "bf16 + master + int8 moments": (
        torch.bfloat16, 14.125, dict(master_weights=True, state_dtype="int8", seed=0)),
}  # fmt: skip


def _third_party_8bit() -> list[tuple[str, Callable]]:
    """(name, optimizer factory) of bitsandbytes' and torchao's AdamW8bit where installed: fp32
    params, 8-bit moments with an fp32 scale per block of 256 (16.06 bytes moved per param)."""
    found = []
    try:
        import bitsandbytes as bnb

        found.append(("bitsandbytes AdamW8bit, fp32 params", bnb.optim.AdamW8bit))
    except Exception:  # noqa: BLE001 - a missing or broken install only drops the row
        pass
    try:
        from torchao.optim import AdamW8bit

        found.append(("torchao AdamW8bit, fp32 params", AdamW8bit))
    except Exception:  # noqa: BLE001
        pass
    return found


def lean_cases(
    device: str, shapes, seed: int = 0
) -> dict[str, tuple[Callable, int, float, float | None]]:
    """name -> (step function, bytes moved per parameter, state bytes per parameter, peak
    bytes per parameter): each case with its own params and gradients of its dtype (the same
    values, rounded). The peak, on a GPU only (None elsewhere): params, grads and state held,
    plus the most a step allocates on top of them (torch.cuda.max_memory_allocated)."""
    from . import AdamW

    backends = _fastopt_backends(device) or ["reference"]
    runs = []
    for name, (dtype, moved, kwargs) in LEAN_CASES.items():
        if kwargs is None:
            runs.append((name, dtype, moved, lambda ps: torch.optim.AdamW(ps, fused=True)))
        else:
            for b in backends:
                runs.append((f"fastopt {b}, {name}", dtype, moved,
                             lambda ps, b=b, kw=kwargs: AdamW(ps, backend=b, **kw)))  # fmt: skip
    runs += [(name, torch.float32, 16.06, make) for name, make in _third_party_8bit()]
    out = {}
    for name, dtype, moved, make_opt in runs:
        params, grads = make_params(shapes, device, seed=seed)
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt = make_opt(params)
        opt.step()  # creates the state, so its size can be read before timing
        n = sum(p.numel() for p in params)
        nbytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                     for t in st.values() if isinstance(t, Tensor))  # fmt: skip
        peak = None
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            held_before = torch.cuda.memory_allocated(device)
            opt.step()
            torch.cuda.synchronize(device)
            transient = torch.cuda.max_memory_allocated(device) - held_before
            tensors = sum(t.numel() * t.element_size() for p in params for t in (p, p.grad))
            peak = (tensors + nbytes + transient) / n
        out[name] = (opt.step, moved, nbytes / n, peak)
    return out


# The overhead suite: tensors of OVERHEAD_NUMEL elements, so few that a step costs what the
# host does per tensor (collecting, checking, calling the kernel), not what memory moves.
OVERHEAD_TENSORS = (10, 100, 1000, 10000)
OVERHEAD_NUMEL = 16


def overhead_steps(device: str, n_tensors: int, numel: int = OVERHEAD_NUMEL,
                   per_call: int | None = None,
                   ) -> tuple[dict[str, Callable[[], None]], int]:  # fmt: skip
    """(name -> step function, steps per call): torch's fused and foreach AdamW and fastopt's
    backends, plain (fp32) and lean (bf16 params with masters, bf16 moments and stochastic
    rounding), each on its own ``n_tensors`` params with gradients. A call runs ``per_call``
    steps, by default enough (about 10,000 tensor updates) for the host clock to resolve a
    small model's step."""
    from . import AdamW

    lean = dict(master_weights=True, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=0)
    makers: dict[str, tuple[torch.dtype, Callable]] = {
        "torch fused": (torch.float32, lambda ps: torch.optim.AdamW(ps, fused=True)),
        "torch foreach": (torch.float32, lambda ps: torch.optim.AdamW(ps, foreach=True)),
    }
    for name in _fastopt_backends(device):
        makers[f"fastopt {name}"] = (torch.float32, lambda ps, b=name: AdamW(ps, backend=b))
        makers[f"fastopt {name}, lean"] = (
            torch.bfloat16,
            lambda ps, b=name: AdamW(ps, backend=b, **lean),
        )
    per_call = per_call or max(1, 10_000 // n_tensors)
    steps = {}
    for name, (dtype, make) in makers.items():
        params, grads = make_params([(numel,)] * n_tensors, device, dtype=dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params)
        opt.step()  # allocates the state (and builds fastopt's plan) outside the timing

        def run(step=opt.step):
            for _ in range(per_call):
                step()

        steps[name] = run
    return steps, per_call


_SWEEP_BYTES = 64 << 20  # twice this machine's L3; memory a backward touches is far more
_sweep: list[bytearray] = []


def sweep_caches() -> None:
    """Copies 64 MiB on the host, in this thread, so that what a step reads next comes from
    DRAM, as for the step after a backward (whose activations and allocations have swept the
    caches). A plain copy: no thread pool is woken, none is left spinning."""
    if not _sweep:
        _sweep.extend((bytearray(_SWEEP_BYTES), bytearray(b"\1" * _SWEEP_BYTES)))
    _sweep[0][:] = _sweep[1]


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: str,
    repeats: int,
    warmup: int = 2,
    before_each: Callable[[], None] | None = None,
    queued: bool = False,
) -> dict[str, list[float]]:
    """Milliseconds of each step function, repeat by repeat, interleaved.

    ``before_each`` (untimed) restores inputs a step consumes, e.g. gradients unscaled in place.

    On a GPU, ``queued=False`` times a step from an idle device: a synchronize, then the
    host's work and the kernels, as a step after a host sync costs. ``queued=True`` times the
    device alone, as in a training loop whose host runs ahead: an untimed step is queued first
    so the GPU is busy while the host prepares the timed one, and the events bracket only what
    the device runs (plus any time it still waits for the host, if the host is the slower).
    """
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(warmup + repeats):
        # Each repeat runs the implementations in another order (the same from run to run),
        # so none always follows the same one: in a fixed order, a neighbour that sweeps the
        # caches (torch foreach's allocations for 1,000 small tensors) made the next row's
        # first steps cold in every repeat.
        for name in random.Random(rep).sample(names, len(names)):
            step = steps[name]
            if not cuda:
                if before_each is not None:
                    before_each()
                t0 = time.perf_counter()
                step()
                elapsed = (time.perf_counter() - t0) * 1e3
            else:
                if queued:  # (the previous timing ended with a synchronize)
                    if before_each is not None:
                        before_each()
                    step()  # keeps the device busy while the host prepares the timed step
                if before_each is not None:
                    before_each()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                if not queued:
                    torch.cuda.synchronize()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def copy_bandwidth(device: str, n_bytes: int, repeats: int) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written: the
    ceiling a memory-bound step is measured against."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats, queued=True)
    times = times["copy"]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e6


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return q3 - q1


def summarize(times: dict[str, list[float]], n_params: int, bytes_per_param: dict[str, int] | int,
              baseline: str, idle_times: dict[str, list[float]] | None = None,
              ) -> list[dict]:  # fmt: skip
    """Rows of name, median ms with its min and max, GB/s at the given bytes per parameter,
    and the speed-up over ``baseline``: the median of the per-repeat ratios (each repeat timed
    every implementation once, in turn, so a ratio compares neighbours in time) with their
    min and max; with ``idle_times`` (the same steps from an idle device), their median too."""
    base = times[baseline]
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        if isinstance(bytes_per_param, int):
            bpp = bytes_per_param
        elif name in bytes_per_param:
            bpp = bytes_per_param[name]
        else:
            bpp = bytes_per_param["fastopt" if name.startswith("fastopt") else "torch"]
        ratios = [b / t for b, t in zip(base, ts)]
        speedup = statistics.median(ratios)
        row = {"name": name, "ms": med, "min_ms": min(ts), "max_ms": max(ts),
               "bytes_per_param": bpp, "gbps": n_params * bpp / med / 1e6,
               "speedup": speedup, "speedup_min": min(ratios), "speedup_max": max(ratios),
               "wide": _iqr(ratios) > WIDE_SPREAD * speedup}  # fmt: skip
        if idle_times is not None:
            row["idle_ms"] = statistics.median(idle_times[name])
        rows.append(row)
    return rows
