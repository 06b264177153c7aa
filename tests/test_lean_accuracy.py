"""The short version of bench/lean_accuracy.py: a small character transformer trained on the
standard library's sources at lr 1e-4 for 120 steps. bf16 params with fastopt's
master_weights or stochastic rounding, and 8-bit moments (fp32 params, and bf16 params with
master_weights), end where fp32 params do (within the spread of three
fp32 seeds, widened by that spread once on each side); pure bf16 with torch's AdamW, whose
updates under half an ulp round away, ends clearly worse. About 45 s on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "lean_accuracy", Path(__file__).resolve().parents[1] / "bench" / "lean_accuracy.py"
)
lean_accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lean_accuracy)


def test_lean_bf16_trains_like_fp32_where_pure_bf16_stalls():
    text = lean_accuracy.corpus(200_000)

    def final(name, seed):
        return lean_accuracy.run(name, seed, steps=120, eval_every=1000, text=text)[-1][1]

    fp32 = [final("fp32, torch AdamW", seed) for seed in (0, 1, 2)]
    spread = max(fp32) - min(fp32)
    low, high = min(fp32) - spread, max(fp32) + spread
    lean = ("bf16, fastopt master_weights", "bf16, fastopt stochastic_rounding",
            "fp32, fastopt int8 states", "bf16, fastopt master_weights + int8 states")  # fmt: skip
    for name in lean:
        loss = final(name, 0)
        assert low <= loss <= high, (name, loss, fp32)
    pure = final("bf16, torch AdamW", 0)
    assert pure > max(fp32) + 3 * spread, (pure, fp32)
