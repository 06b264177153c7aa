"""``python -m fastopt bench``: fastopt against torch's AdamW implementations, one table."""

from __future__ import annotations

import argparse
import os
import platform

import torch

from . import benchmark as B

__all__ = ["main"]


def _table(title: str, rows: list[dict], baseline: str, copy_gbps: float | None) -> str:
    idle = "idle_ms" in rows[0]
    state = "state_bytes" in rows[0]
    peak = "peak_bytes" in rows[0]
    copy = copy_gbps is not None  # measured on a GPU only
    width = max(30, *(len(r["name"]) + 2 for r in rows))
    lines = [f"\n{title}", f"{'implementation':<{width}}{'ms/step':>9}{'min-max ms':>15}"
             f"{'B/param':>9}{'GB/s':>8}" + (f"{'% copy':>8}" if copy else "")
             + f"{'speed-up':>10}{'min-max':>13}"
             + (f"{'state B/param':>15}" if state else "")
             + (f"{'peak B/param':>14}" if peak else "")
             + (f"{'from idle':>11}" if idle else "")]  # fmt: skip
    for r in rows:
        spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
        ratios = f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}"
        lines.append(f"{r['name']:<{width}}{r['ms']:>9.2f}{spread:>15}{r['bytes_per_param']:>9}"
                     f"{r['gbps']:>8.1f}"
                     + (f"{100 * r['gbps'] / copy_gbps:>7.0f}%" if copy else "")
                     + f"{r['speedup']:>9.2f}x{ratios:>13}"
                     + (f"{r['state_bytes']:>15.2f}" if state else "")
                     + (f"{r['peak_bytes']:>14.2f}" if peak else "")
                     + (f"{r['idle_ms']:>11.2f}" if idle else "")
                     + ("  (wide spread)" if r["wide"] else ""))  # fmt: skip
    lines.append(f"speed-up: median over repeats of {baseline}'s ms / this row's ms, timed "
                 "side by side; min-max: their range")  # fmt: skip
    if copy:
        lines.append("% copy: GB/s against a device-to-device copy's, the memory's ceiling")
    else:  # torch's copy_ on the CPU is slower than AdamW, so no ceiling to compare with
        lines.append("% copy (GB/s against a copy's) is shown on a GPU only: on the CPU no "
                     "copy measures the memory's ceiling")  # fmt: skip
    if idle:
        lines.append("ms/step: device time, steps queued as a training loop queues them; "
                     "from idle: ms from a synchronize, host work included")  # fmt: skip
    return "\n".join(lines)


def _warnings(rows: list[dict], other: B.OtherLoad, device: str) -> list[str]:
    out = []
    wide = [r["name"] for r in rows if r["wide"]]
    if wide:
        out.append(f"warning: the middle half of the speed-ups spans more than "
                   f"{B.WIDE_SPREAD:.0%} of their median for {', '.join(wide)}: the machine "
                   "was not quiet; do not quote this run")  # fmt: skip
    if device == "cpu" and other.cores is not None and other.cores > 0.25:
        out.append(f"warning: other processes kept {other.cores:.1f} of {os.cpu_count()} cores "
                   "busy during this run; torch's OpenMP kernels slow down several-fold when a "
                   "core is taken, so these ratios are not the machine's (re-run when it is "
                   "quiet, or with OMP_NUM_THREADS=1 to compare single-threaded)")  # fmt: skip
    return out


def _timed(steps, device: str, repeats: int, before_each=None):
    """Device-time medians (queued) and, on a GPU, from-idle medians of the same steps."""
    times = B.time_interleaved(steps, device, repeats, before_each=before_each, queued=True)
    idle = None
    if device == "cuda":
        idle = B.time_interleaved(steps, device, repeats, before_each=before_each)
    return times, idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=None,
                        help="parameter count (default 30e6 on CPU, 1e9 on GPU)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per implementation")  # fmt: skip
    parser.add_argument("--suite", choices=["adamw", "pipeline", "lean", "overhead", "all"],
                        default="all",
                        help="all: adamw, pipeline and lean; overhead: the host's cost per "
                        "tensor, on --tensors small tensors")  # fmt: skip
    parser.add_argument("--tensors", default=",".join(map(str, B.OVERHEAD_TENSORS)),
                        help="overhead suite: tensor counts, comma-separated")  # fmt: skip
    parser.add_argument("--cold", action="store_true",
                        help="overhead suite: time single steps, each after 64 MiB of host "
                        "memory traffic (as a step after backward finds its tensors), "
                        "instead of runs of steps")  # fmt: skip
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    n_target = args.params or (1e9 if device == "cuda" else 30e6)
    repeats = args.repeats or (20 if device == "cuda" else 15)
    if args.suite == "overhead":
        return _overhead(device, [int(t) for t in args.tensors.split(",")], repeats, args.cold)

    shapes = B.transformer_shapes(n_target)
    params, grads = B.make_params(shapes, device)
    n = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    threads = f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={omp})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n / 1e6:.1f}M fp32 params in {len(shapes)} tensors on {device} ({where}); "
          f"torch {torch.__version__}, {threads}, {repeats} repeats, medians; "
          f"load average {load:.2f} on {os.cpu_count()} cores at start")  # fmt: skip

    copy_gbps = None  # on the CPU torch's copy_ is no bandwidth ceiling (AdamW beats it)
    if device == "cuda":
        copy_gbps = B.copy_bandwidth(device, 4 << 30, repeats)
        print(f"device-to-device copy of 4 GiB: {copy_gbps:.0f} GB/s (bytes read + written)")

    if args.suite in ("adamw", "all"):
        for p, g in zip(params, grads):
            p.grad = g
        steps = {name: make(params).step for name, make in B.adamw_cases(device).items()}
        with B.OtherLoad() as other:
            times, idle = _timed(steps, device, repeats)
        rows = B.summarize(times, n, B.BYTES_PER_PARAM, "torch fused", idle)
        print(_table("AdamW step (28 B/param)", rows, "torch fused", copy_gbps))
        print(*_warnings(rows, other, device), sep="\n")
        del steps

    if args.suite in ("pipeline", "all"):
        scale = 2.0**16
        scaled = [g * scale for g in grads]

        def restore():  # the torch pipeline unscales and clips the gradients in place
            for p, g in zip(params, scaled):
                p.grad.copy_(g)

        for p, g in zip(params, scaled):
            p.grad = g.clone()
        steps = {name: make(params) for name, make in B.pipeline_cases(device).items()}
        with B.OtherLoad() as other:
            times, idle = _timed(steps, device, repeats, before_each=restore)
        rows = B.summarize(times, n, B.PIPELINE_BYTES, "torch unfused (fused AdamW)", idle)
        print(_table("Mixed-precision step with clipping: unscale, norm, clip, AdamW",
                     rows, "torch unfused (fused AdamW)", copy_gbps))  # fmt: skip
        print(*_warnings(rows, other, device), sep="\n")
        del steps

    if args.suite in ("lean", "all"):
        del params, grads
        cases = B.lean_cases(device, shapes)
        steps = {name: step for name, (step, *_) in cases.items()}
        with B.OtherLoad() as other:
            times, idle = _timed(steps, device, repeats)
        moved = {name: bpp for name, (_, bpp, *_) in cases.items()}
        baseline = "torch fused, fp32 params"
        rows = B.summarize(times, n, moved, baseline, idle)
        for row in rows:
            row["state_bytes"] = cases[row["name"]][2]
            if cases[row["name"]][3] is not None:
                row["peak_bytes"] = cases[row["name"]][3]
        print(_table("Lean precision: exact masters, stochastic rounding, 8-bit moments",
                     rows, baseline, copy_gbps))  # fmt: skip
        print(*_warnings(rows, other, device), sep="\n")
    return 0


def _overhead(device: str, counts: list[int], repeats: int, cold: bool = False) -> int:
    """The host's cost per tensor: microseconds per param tensor per step on small tensors;
    ``cold``: of single steps, each after the host's caches were swept."""
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"AdamW step on {B.OVERHEAD_NUMEL}-element tensors on {device} ({where}); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS={omp}), "
          f"{repeats} repeats, medians; load average {load:.2f} on {os.cpu_count()} cores at "
          "start" + ("; cold: each step after 64 MiB of host memory traffic" if cold else ""),
          )  # fmt: skip
    width = 24
    print(f"\n{'tensors':>8}  {'implementation':<{width}}{'us/tensor':>10}{'min-max':>14}"
          f"{'vs torch fused':>16}{'min-max':>13}")  # fmt: skip
    all_rows = []
    with B.OtherLoad() as other:
        for n in counts:
            steps, per_call = B.overhead_steps(device, n, per_call=1 if cold else None)
            # From an idle device on a GPU: the host's work is what is measured.
            sweep = B.sweep_caches if cold else None
            times = B.time_interleaved(steps, device, repeats, before_each=sweep)
            rows = B.summarize(times, n, B.BYTES_PER_PARAM, "torch fused")
            scale = 1e3 / (n * per_call)  # ms per call -> us per tensor per step
            for r in rows:
                spread = f"{r['min_ms'] * scale:.2f}-{r['max_ms'] * scale:.2f}"
                ratios = f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}"
                print(f"{n:>8}  {r['name']:<{width}}{r['ms'] * scale:>10.2f}{spread:>14}"
                      f"{r['speedup']:>15.2f}x{ratios:>13}"
                      + ("  (wide spread)" if r["wide"] else ""))  # fmt: skip
            all_rows += [dict(r, name=f"{r['name']} ({n} tensors)") for r in rows]
            del steps
    print("us/tensor: a step's time over its param tensors; vs torch fused: median over "
          "repeats of torch fused's time / this row's, timed side by side; lean: bf16 params "
          "with masters, bf16 moments and stochastic rounding")  # fmt: skip
    print(*_warnings(all_rows, other, device), sep="\n")
    return 0
