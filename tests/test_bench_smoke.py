"""The benchmark command runs end to end (tiny sizes: a smoke test, not a measurement)."""

import subprocess
import sys


def test_bench_command_prints_both_tables():
    out = subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--device", "cpu", "--params", "2e5",
         "--repeats", "2"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "AdamW step (28 B/param)" in out
    for name in ("torch for-loop", "torch foreach", "torch fused", "fastopt cpu"):
        assert name in out
    assert "Mixed-precision step with clipping" in out


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastopt", "info"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "torch" in out
    for name in ("reference", "cpu", "cuda", "triton"):
        assert f"\n{name} " in out
