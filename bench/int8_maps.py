"""Which 8-bit map for AdamW's moments: measured on the moments of a real run, and by the
training each map gives.

Candidates, each block-wise (one scale per block of consecutive elements):

* ``fp8``: fastopt.quant: E4M3 codes for exp_avg, E4M4 codes of sqrt(exp_avg_sq), a
  power-of-two scale per block (one int8 exponent), at block sizes 32 and 256;
* other float formats under the same scaling: more mantissa, less range (E3M4 for exp_avg,
  E3M5 for the square root); and fastopt.quant's formats rounded stochastically;
* ``linear``: int8 codes of x / absmax * 127 (exp_avg) and uint8 of v / max * 255, fp32 scale;
* ``dynamic``: bitsandbytes' dynamic map (signed for exp_avg, unsigned for exp_avg_sq) with an
  fp32 absmax scale per block of 256, nearest code, as its and torchao's AdamW8bit store them
  (only where bitsandbytes is installed).

Part 1 trains the character transformer of bench/lean_accuracy.py with torch's fp32 AdamW and
reports, for its moments at the end, each map's error: RMS relative error of exp_avg and of
sqrt(exp_avg_sq) over non-zero elements, the relative error of the update direction
m / (sqrt(v) + eps), and the fraction of elements whose v restores to 0 while m does not.
Part 2 trains it with each map applied to the moments after every step (the stored state of
an 8-bit optimizer) and reports the final validation loss beside three fp32 seeds. Part 3
shows why rounding to nearest is not enough: exp_avg_sq's running average stalls.

    python bench/int8_maps.py [--steps 300] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lean_accuracy as la  # noqa: E402

from fastopt import quant  # noqa: E402

__all__ = ["MAPS", "main"]


def _fp8(block):
    def m(x):
        return quant.dequantize_m(*quant.quantize_m(x, block), block)

    def v(x):
        return quant.dequantize_v(*quant.quantize_v(x.sqrt(), block), block)

    return m, v


def _minifloat(exp_bits, mant_bits, block=32, stochastic=False):
    """A float format of ``exp_bits`` exponent (bias 2**(exp_bits - 1) - 1) and ``mant_bits``
    mantissa bits with subnormals, under a power-of-two scale per block that puts the block's
    largest magnitude in the top binade but one (as fastopt.quant does for E4M3 and E4M4):
    for comparing formats, by arithmetic rather than fastopt.quant's bit operations.
    ``stochastic``: rounded up with probability equal to the distance, not to nearest."""
    bias = 2 ** (exp_bits - 1) - 1
    top_exp = 2**exp_bits - 2 - bias  # the binade the block's largest lands in
    min_exp = 1 - bias

    def apply(x):
        rows, n = _blocks(x, block)
        top = rows.abs().amax(1, keepdim=True)
        scale = torch.exp2(torch.floor(torch.log2(top.clamp_min(2.0**-90))) - top_exp)
        y = rows / scale
        e = torch.floor(torch.log2(y.abs().clamp_min(2.0**-126))).clamp_min(min_exp)
        quantum = torch.exp2(e - mant_bits)
        steps = y / quantum
        if stochastic:
            steps = torch.floor(steps + torch.rand(steps.shape, generator=_NOISE))
        else:
            steps = torch.round(steps)
        return (steps * quantum * scale).reshape(-1)[:n].view(x.shape)

    return apply


_NOISE = torch.Generator().manual_seed(0)


def _formats(m_bits, root_bits, block=32, stochastic=False):
    m = _minifloat(*m_bits, block, stochastic)
    root = _minifloat(*root_bits, block, stochastic)
    return m, lambda v: root(v.sqrt()) ** 2


def _blocks(x, block):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, block), flat.numel()


def _linear(block=256):
    def m(x):
        rows, n = _blocks(x, block)
        scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-30)
        q = torch.round(rows / scale * 127).clamp(-127, 127)
        return (q * scale / 127).reshape(-1)[:n].view(x.shape)

    def v(x):
        rows, n = _blocks(x, block)
        scale = rows.amax(1, keepdim=True).clamp_min(1e-30)
        q = torch.round(rows / scale * 255).clamp(0, 255)
        return (q * scale / 255).reshape(-1)[:n].view(x.shape)

    return m, v


def _dynamic(block=256):
    import bitsandbytes.functional as F

    signed = F.create_dynamic_map(signed=True).float()
    unsigned = F.create_dynamic_map(signed=False).float()

    def nearest(rows, table):
        table, _ = table.sort()
        idx = torch.bucketize(rows, table).clamp(1, table.numel() - 1)
        lo, hi = table[idx - 1], table[idx]
        return torch.where((rows - lo).abs() <= (hi - rows).abs(), lo, hi)

    def codec(table):
        def apply(x):
            rows, n = _blocks(x, block)
            scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-30)
            return (nearest(rows / scale, table) * scale).reshape(-1)[:n].view(x.shape)

        return apply

    return codec(signed), codec(unsigned)


MAPS = {
    "fp8, block 32": lambda: _fp8(32),
    "fp8, block 256": lambda: _fp8(256),
    "E3M4 / root E3M5, block 32": lambda: _formats((3, 4), (3, 5)),
    "E4M3 / root E3M5, block 32": lambda: _formats((4, 3), (3, 5)),
    "fp8 stochastic, block 32": lambda: _formats((4, 3), (4, 4), stochastic=True),
    "linear, block 256": _linear,
    "dynamic (bitsandbytes), block 256": _dynamic,
}


def _available():
    out = {}
    for name, make in MAPS.items():
        try:
            out[name] = make()
        except ImportError:
            print(f"{name}: skipped (bitsandbytes is not installed)")
    return out


class QuantizedAdamW(torch.optim.AdamW):
    """torch's AdamW with its moments replaced by their 8-bit round trip after every step:
    what an 8-bit optimizer stores, its arithmetic otherwise fp32."""

    def __init__(self, params, lr, codec):
        super().__init__(params, lr=lr, foreach=False)
        self.codec = codec

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        m_codec, v_codec = self.codec
        for state in self.state.values():
            state["exp_avg"].copy_(m_codec(state["exp_avg"]))
            state["exp_avg_sq"].copy_(v_codec(state["exp_avg_sq"]))


def _train(seed, steps, make_opt):
    la.CONFIGS["_int8_maps"] = (torch.float32, make_opt)
    try:
        return la.run("_int8_maps", seed=seed, steps=steps, eval_every=steps)[-1][1]
    finally:
        del la.CONFIGS["_int8_maps"]


def moment_errors(steps: int, codecs) -> dict[str, dict[str, float]]:
    """Part 1: each map's errors on the moments of a torch fp32 run after ``steps``."""
    captured = {}

    def make(ps, lr):
        opt = torch.optim.AdamW(ps, lr=lr)
        captured["opt"] = opt
        return opt

    _train(0, steps, make)
    states = [s for s in captured["opt"].state.values() if s["exp_avg"].numel() >= 4096]
    m = torch.cat([s["exp_avg"].reshape(-1) for s in states])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
    out = {}
    for name, (m_codec, v_codec) in codecs.items():
        mq = torch.cat([m_codec(s["exp_avg"]).reshape(-1) for s in states])
        vq = torch.cat([v_codec(s["exp_avg_sq"]).reshape(-1) for s in states])
        nz_m, nz_v = m != 0, v != 0
        u, uq = m / (v.sqrt() + 1e-8), mq / (vq.sqrt() + 1e-8)
        out[name] = {
            "m_rms_rel": float(((mq - m)[nz_m] / m[nz_m]).pow(2).mean().sqrt()),
            "root_v_rms_rel": float(
                ((vq.sqrt() - v.sqrt())[nz_v] / v.sqrt()[nz_v]).pow(2).mean().sqrt()
            ),  # fmt: skip
            "update_rel": float((uq - u).norm() / u.norm()),
            "v_flushed": float(((vq == 0) & (mq != 0) & nz_v).float().mean()),
        }
    return out


def ema_stall(steps: int = 300, beta2: float = 0.999) -> dict[str, float]:
    """Part 3: exp_avg_sq's running average of g**2 = 1 from 0, through fastopt.quant's format
    after every step (in blocks whose largest element is 10**4): the mean of the small ones
    after ``steps``, rounded to nearest and stochastically, against the exact 1 - beta2**steps.
    Each step adds (1 - beta2) g**2, a fraction of v that soon falls under half a code's step:
    rounded to nearest, v stops growing."""
    out = {"exact": 1 - beta2**steps}
    for name, codec in (("nearest", _formats((4, 3), (4, 4))[1]),
                        ("stochastic", _formats((4, 3), (4, 4), stochastic=True)[1])):  # fmt: skip
        g2 = torch.ones(32 * 64)
        g2[::32] = 1e4
        v = torch.zeros_like(g2)
        for _ in range(steps):
            v = codec(beta2 * v + (1 - beta2) * g2)
        out[name] = float(v.view(-1, 32)[:, 1:].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="fp32 runs for the spread")
    parser.add_argument("--maps", nargs="*", help="only these maps (names as listed above)")
    args = parser.parse_args(argv)
    codecs = {k: v for k, v in _available().items() if not args.maps or k in args.maps}

    print(f"Part 1: errors on the moments after {args.steps} fp32 steps (tensors >= 4096)")
    print(f"{'map':<36}{'m RMS rel':>11}{'sqrt(v) RMS rel':>17}{'update rel':>12}"
          f"{'v flushed':>11}")  # fmt: skip
    for name, e in moment_errors(args.steps, codecs).items():
        print(f"{name:<36}{e['m_rms_rel']:>11.4f}{e['root_v_rms_rel']:>17.4f}"
              f"{e['update_rel']:>12.4f}{e['v_flushed']:>11.2e}")  # fmt: skip

    print(f"\nPart 2: final validation loss after {args.steps} steps at lr 1e-4")
    fp32 = [_train(s, args.steps, lambda ps, lr: torch.optim.AdamW(ps, lr=lr))
            for s in range(args.seeds)]  # fmt: skip
    if fp32:
        print(f"{'fp32, torch AdamW (seeds)':<36}" + " ".join(f"{x:.4f}" for x in fp32)
              + f"   spread {min(fp32):.4f}-{max(fp32):.4f}")  # fmt: skip
    for name, codec in codecs.items():
        loss = _train(0, args.steps, lambda ps, lr, c=codec: QuantizedAdamW(ps, lr, c))
        where = ""
        if not math.isfinite(loss):
            where = "   diverged"
        elif fp32:
            where = "below" if loss < min(fp32) else "inside" if loss <= max(fp32) else "above"
            where = f"   {where} the fp32 spread"
        print(f"{name:<36}{loss:.4f}{where}")
    print(f"\nPart 3: exp_avg_sq of g**2 = 1 after {args.steps} steps, beta2 0.999")
    for name, value in ema_stall(args.steps).items():
        print(f"{name:<36}{value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
