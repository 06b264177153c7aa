"""Accuracy of lean precision on a real task: a small character-level transformer trained on
the Python standard library's own source files at lr 1e-4.

Runs fp32 params with torch's AdamW (3 seeds: their spread is the tolerance), bf16 params
with torch's AdamW (pure bf16: updates under half an ulp round away), and bf16 params with
fastopt's ``master_weights=True`` and with ``stochastic_rounding=True`` (bf16 moments both),
and reports each run's final validation loss; ``--plot`` draws the curves.

    python bench/lean_accuracy.py [--steps 300] [--plot runs/lean_accuracy.png]

tests/test_lean_accuracy.py runs a short version of it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sysconfig
from pathlib import Path

import torch
from torch import nn

import fastopt

__all__ = ["CONFIGS", "corpus", "main", "run"]

# name: (param dtype, optimizer factory)
CONFIGS = {
    "fp32, torch AdamW": (torch.float32, lambda ps, lr: torch.optim.AdamW(ps, lr=lr)),
    "bf16, torch AdamW": (torch.bfloat16, lambda ps, lr: torch.optim.AdamW(ps, lr=lr)),
    "bf16, fastopt master_weights": (
        torch.bfloat16,
        lambda ps, lr: fastopt.AdamW(ps, lr=lr, master_weights=True, state_dtype=torch.bfloat16),
    ),
    "bf16, fastopt stochastic_rounding": (
        torch.bfloat16,
        lambda ps, lr: fastopt.AdamW(
            ps, lr=lr, stochastic_rounding=True, state_dtype=torch.bfloat16, seed=0
        ),
    ),
    "fp32, fastopt int8 states": (
        torch.float32,
        lambda ps, lr: fastopt.AdamW(ps, lr=lr, state_dtype="int8", seed=0),
    ),
    "bf16, fastopt master_weights + int8 states": (
        torch.bfloat16,
        lambda ps, lr: fastopt.AdamW(ps, lr=lr, master_weights=True, state_dtype="int8", seed=0),
    ),
}


def _third_party_8bit() -> dict:
    """bitsandbytes' and torchao's AdamW8bit, where they are installed (no test needs them)."""
    found = {}
    try:
        import bitsandbytes as bnb

        found["fp32, bitsandbytes AdamW8bit"] = (
            torch.float32, lambda ps, lr: bnb.optim.AdamW8bit(ps, lr=lr, weight_decay=1e-2),
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - a missing or broken install only drops the row
        pass
    try:
        from torchao.optim import AdamW8bit

        found["fp32, torchao AdamW8bit"] = (torch.float32, lambda ps, lr: AdamW8bit(ps, lr=lr))
    except Exception:  # noqa: BLE001
        pass
    return found


CONFIGS.update(_third_party_8bit())


def corpus(n_bytes: int) -> bytes:
    """The first n_bytes of the standard library's top-level .py files, in name order: text
    every machine with Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= n_bytes:
            break
    return bytes(out[:n_bytes])


class CharTransformer(nn.Module):
    """A small causal transformer over bytes."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]].to(h.dtype), is_causal=True)
        return self.head(self.norm(h))


def _batches(data: torch.Tensor, context: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        yield x.long(), y.long()


def run(name: str, seed: int, steps: int, lr: float = 1e-4, context: int = 64, batch: int = 16,
        eval_every: int = 50, text: bytes | None = None) -> list[tuple[int, float]]:  # fmt: skip
    """Trains one configuration; returns (step, validation loss) at every eval_every steps."""
    dtype, make_opt = CONFIGS[name]
    text = text if text is not None else corpus(400_000)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    torch.manual_seed(seed)
    model = CharTransformer(context=context).to(dtype)
    opt = make_opt(list(model.parameters()), lr)
    val_batches = list(zip(range(8), _batches(val, context, 32, seed=12345)))
    curve = []
    loader = _batches(train, context, batch, seed=seed)
    for step in range(1, steps + 1):
        x, y = next(loader)
        loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                losses = [nn.functional.cross_entropy(model(vx).float().flatten(0, 1),
                                                      vy.flatten()).item()
                          for _, (vx, vy) in val_batches]  # fmt: skip
            curve.append((step, statistics.fmean(losses)))
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    args = parser.parse_args(argv)
    text = corpus(400_000)
    curves = {}
    for seed in (0, 1, 2):
        curves[f"fp32, torch AdamW (seed {seed})"] = run("fp32, torch AdamW", seed, args.steps,
                                                         args.lr, text=text)  # fmt: skip
    for name in list(CONFIGS)[1:]:
        curves[name] = run(name, 0, args.steps, args.lr, text=text)
    finals = {name: curve[-1][1] for name, curve in curves.items()}
    fp32 = [v for k, v in finals.items() if k.startswith("fp32")]
    print(f"{args.steps} steps at lr {args.lr:g}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'run':<40}{'final val loss':>16}")
    for name, value in finals.items():
        print(f"{name:<40}{value:>16.4f}")
    print(f"fp32 spread over 3 seeds: {min(fp32):.4f}-{max(fp32):.4f}")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, curve in curves.items():
            steps, losses = zip(*curve)
            ax.plot(steps, losses, label=name, linestyle="--" if "fp32" in name else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats per byte)")
        ax.set_title(f"char transformer on the stdlib, lr {args.lr:g}")
        ax.legend(fontsize=7)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"plot: {args.plot}")
    return 0 if all(math.isfinite(v) for v in finals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
