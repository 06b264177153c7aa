"""Grid-size sweep of the CUDA multi-tensor kernels, on a machine with a CUDA GPU.

    python bench/sweep_grid.py [--params 1e9] [--repeats 20]

The CUDA kernels walk their chunks with a grid-stride loop, so any grid gives the same bits
(tests/test_gpu.py checks this) and the grid is free to tune. The default is a persistent grid
of as many blocks as are resident (blocks per SM = 0 below); larger values launch more blocks
than fit at once, leaving the hardware scheduler to balance the tail, and 1024 gives one block
per chunk. Every setting times the same optimizer, interleaved in one run, device time
(steps queued), medians; the copy bandwidth of the same run is the ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import fastopt
from fastopt import _C  # the tuning hook lives in the extension
from fastopt import benchmark as B

SETTINGS = [0, 1, 2, 3, 4, 8, 1024]


def _with_grid(blocks_per_sm: int, fn):
    def run():
        previous = _C._set_grid_blocks_per_sm(blocks_per_sm)
        try:
            fn()
        finally:
            _C._set_grid_blocks_per_sm(previous)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    params, grads = B.make_params(B.transformer_shapes(args.params), "cuda")
    for p, g in zip(params, grads):
        p.grad = g
    n = sum(p.numel() for p in params)
    copy_gbps = B.copy_bandwidth("cuda", 4 << 30, args.repeats)
    print(f"{n / 1e6:.1f}M fp32 params in {len(params)} tensors on {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}; copy {copy_gbps:.0f} GB/s; {args.repeats} repeats, "
          "medians of device time")  # fmt: skip

    opt = fastopt.AdamW(params, backend="cuda")
    adamw = B.time_interleaved(
        {s: _with_grid(s, opt.step) for s in SETTINGS}, "cuda", args.repeats, queued=True
    )
    norm = B.time_interleaved(
        {s: _with_grid(s, lambda: fastopt.global_norm(grads, backend="cuda")) for s in SETTINGS},
        "cuda", args.repeats, queued=True,
    )  # fmt: skip

    print(f"\n{'blocks/SM':<14}{'AdamW ms':>10}{'GB/s':>8}{'% copy':>8}"
          f"{'norm ms':>10}{'GB/s':>8}{'% copy':>8}")  # fmt: skip
    for s in SETTINGS:
        a, r = statistics.median(adamw[s]), statistics.median(norm[s])
        a_gbps, r_gbps = n * B.BYTES_PER_PARAM / a / 1e6, n * 4 / r / 1e6
        label = f"{s}" + (" (resident)" if s == 0 else "")
        print(f"{label:<14}{a:>10.2f}{a_gbps:>8.0f}{100 * a_gbps / copy_gbps:>7.0f}%"
              f"{r:>10.2f}{r_gbps:>8.0f}{100 * r_gbps / copy_gbps:>7.0f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
