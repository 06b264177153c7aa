"""A few training steps of a bf16 model of about 1B params, one optimizer setup per process:
step time, peak GPU memory and host memory, for the offload table of bench/RESULTS.md.

    python bench/offload_train.py --mode MODE [--out FILE.json] [--device cuda|cpu] [sizes]

Modes (fastopt.AdamW with masters, 8-bit moments and clipping, as a model too big for its
GPU would use them):
    device    the optimizer and its state on the GPU
    offload   offload=True: the state in pinned host memory, the update on the CPU kernel
    overlap   offload=True and opt.overlap(model): the update hidden behind the next forward
    fsdp2     the anchor available everywhere torch is: FSDP2 on one rank with
              CPUOffloadPolicy (fp32 params and torch.optim.AdamW on the host, bf16 compute)
The model is a stack of residual MLP blocks (LayerNorm, d -> 4d, GELU, 4d -> d): d = 2048
and 30 blocks are 1.01B params. Iteration time is the wall time of forward, backward and
step, steady state (the mean over the measured iterations, after warm-up ones, ending when
the last update has reached the params); step time is the optimizer call's alone.
--device cpu runs the fastopt modes on the host (offload then changes nothing, overlap runs
the update beside the forward): a smoke test of this script, and the overlap measured there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn

MODES = ("device", "offload", "overlap", "fsdp2")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def build(width: int, blocks: int, device, dtype) -> nn.Sequential:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(*(Block(width) for _ in range(blocks))).to(dtype)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(mode: str, model: nn.Module, device):
    """(optimizer, a handle to remove or None, the model to call)."""
    if mode == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if device.type != "cuda":
            raise SystemExit("offload_train: mode fsdp2 needs a CUDA GPU (CPUOffloadPolicy)")
        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0,
                                    world_size=1)  # fmt: skip
        policy = dict(offload_policy=CPUOffloadPolicy(),
                      mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))  # fmt: skip
        for block in model:
            fully_shard(block, **policy)
        fully_shard(model, **policy)
        return torch.optim.AdamW(model.parameters(), lr=1e-4), None, model
    import fastopt

    opt = fastopt.AdamW(model.parameters(), lr=1e-4, max_grad_norm=1.0, master_weights=True,
                        state_dtype="int8", offload=mode != "device")  # fmt: skip
    handle = opt.overlap(model) if mode == "overlap" else None
    return opt, handle, model


def run(args) -> dict:
    device = torch.device(args.device)
    # fsdp2 keeps fp32 params (on the host) and computes in bf16; the others train bf16 params.
    dtype = torch.float32 if args.mode == "fsdp2" else getattr(torch, args.dtype)
    model = build(args.width, args.blocks, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt, handle, model = make_optimizer(args.mode, model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(args.tokens, args.width, generator=gen, device=device,
                    dtype=torch.bfloat16 if args.mode == "fsdp2" else dtype)  # fmt: skip
    iterations, steps = [], []
    for _ in range(args.warmup + args.steps):
        loss = model(x).float().pow(2).mean()
        loss.backward()
        if args.mode == "fsdp2":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        _sync(device)
        stepped = time.perf_counter()
        opt.step()
        opt.zero_grad()
        _sync(device)
        steps.append(time.perf_counter() - stepped)
        iterations.append(time.perf_counter())
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    _sync(device)
    end = time.perf_counter()
    per_iteration = (end - iterations[args.warmup - 1]) / args.steps
    if handle is not None:
        handle.remove()
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": args.mode, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": n_params, "tokens": args.tokens,
        "iteration_s": per_iteration, "step_s_median": statistics.median(steps[args.warmup:]),
        "step_s_min": min(steps[args.warmup:]), "step_s_max": max(steps[args.warmup:]),
        "peak_gpu_gb": peak_gpu / 1e9, "peak_host_rss_gb": rss_kb * 1024 / 1e9,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """A markdown table of runs, each against the 'device' run where there is one."""
    base = next((r for r in rows if r["mode"] == "device"), None)
    out = ["| mode | iteration s | vs device | step s (median, min-max) | peak GPU GB | "
           "peak host RSS GB |", "|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for r in rows:
        ratio = f"{r['iteration_s'] / base['iteration_s']:.2f}x" if base else "-"
        out.append(
            f"| {r['mode']} | {r['iteration_s']:.3f} | {ratio} | {r['step_s_median']:.3f} "
            f"({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | {r['peak_gpu_gb']:.2f} | "
            f"{r['peak_host_rss_gb']:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the params' (fastopt modes; float32 suits a CPU, whose bf16 "
                        "matrix products are slow)")  # fmt: skip
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16384, help="rows of the input batch")
    parser.add_argument("--steps", type=int, default=4, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", help="write the run's numbers to this JSON file")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of runs")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.load(open(path)) for path in args.table]))
        return 0
    if args.mode is None:
        parser.error("--mode is required (or --table)")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    result = run(args)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
