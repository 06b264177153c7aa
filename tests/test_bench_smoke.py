"""The benchmark command runs end to end (tiny sizes: a smoke test, not a measurement)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastopt import benchmark as B


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
    assert f"{torch.get_num_threads()} threads" in out
    assert "min-max" in out  # each row's spread beside its median
    # No copy to compare with on the CPU: no column of n/a, a line saying why.
    assert "n/a" not in out and "% copy (GB/s against a copy's) is shown on a GPU only" in out
    assert "Lean precision" in out and "state B/param" in out
    for name, state in (("torch fused, fp32 params", "8.00"), ("bf16 + master + bf16 moments",
                                                                "6.00")):  # fmt: skip
        (line,) = [
            line
            for line in out.splitlines()
            if line.startswith(("torch", "fastopt")) and name in line
        ]
        # The memory column, from the state itself (before a loaded machine's flag).
        assert line.removesuffix("  (wide spread)").split()[-1] == state, line


@pytest.mark.parametrize("cold", [[], ["--cold"]], ids=["runs", "cold"])
def test_overhead_suite_reports_us_per_tensor_against_torch(cold):
    out = subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--device", "cpu", "--suite", "overhead",
         "--tensors", "10,30", "--repeats", "2", *cold],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "us/tensor" in out and "vs torch fused" in out
    assert ("cold: each step after 64 MiB" in out) == bool(cold)
    rows = [line.removesuffix("  (wide spread)").split() for line in out.splitlines()
            if line.strip()[:2] in ("10", "30")]  # fmt: skip
    names = {" ".join(r[1:-4]) for r in rows}
    assert {"torch fused", "torch foreach", "fastopt cpu", "fastopt cpu, lean"} <= names
    for r in rows:
        assert r[0] in ("10", "30") and float(r[-4]) > 0, r  # us per tensor, measured
    fused = [r for r in rows if " ".join(r[1:-4]) == "torch fused"]
    assert [r[-2] for r in fused] == ["1.00x", "1.00x"]  # the baseline against itself


def test_other_load_sees_a_busy_process():
    # A second process spinning for the whole measurement must show as about one core busy;
    # the benchmark warns on more than a quarter.
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\n"
                             "while time.time() - t < 1.5: pass"])  # fmt: skip
    try:
        time.sleep(0.2)
        with B.OtherLoad() as other:
            time.sleep(1.0)
    finally:
        busy.wait()
    assert other.cores is not None and other.cores > 0.5


def test_summarize_flags_a_wide_spread():
    base = [10.0] * 8
    times = {"base": base, "steady": [5.0, 5.1, 4.9, 5.0, 5.0, 5.1, 4.9, 5.0],
             "one-outlier": [5.0, 5.1, 4.9, 5.0, 5.0, 5.1, 4.9, 20.0],
             "noisy": [5.0, 2.0, 9.0, 4.0, 5.0, 2.5, 9.0, 3.0]}  # fmt: skip
    rows = {r["name"]: r for r in B.summarize(times, 1000, 28, "base")}
    assert not rows["steady"]["wide"] and not rows["one-outlier"]["wide"] and rows["noisy"]["wide"]
    assert rows["noisy"]["speedup"] == 2.25  # the median of the per-repeat ratios
    assert (rows["noisy"]["speedup_min"], rows["noisy"]["speedup_max"]) == (10 / 9, 5.0)
    assert rows["one-outlier"]["speedup_min"] == 0.5  # min-max still shows the outlier


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fastopt", "info"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "torch" in out
    for name in ("reference", "cpu", "cuda", "triton"):
        assert f"\n{name} " in out


def test_offload_train_runs_each_fastopt_mode_and_tabulates(tmp_path):
    """bench/offload_train.py at a tiny size on the CPU (offload is then a no-op, overlap runs
    the update beside the forward): each mode writes its numbers, --table lays them out."""
    script = str(Path(__file__).resolve().parents[1] / "bench" / "offload_train.py")
    paths = []
    for mode in ("device", "offload", "overlap"):
        path = tmp_path / f"{mode}.json"
        subprocess.run(
            [sys.executable, script, "--mode", mode, "--device", "cpu", "--width", "32",
             "--blocks", "3", "--tokens", "16", "--steps", "2", "--out", str(path)],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        paths.append(str(path))
    out = subprocess.run([sys.executable, script, "--table", *paths], capture_output=True,
                         text=True, check=True, timeout=60).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and "mode" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| device", "| offload", "| overlap"]
    assert rows[0].split(" | ")[2] == "1.00x"
    fsdp2 = subprocess.run([sys.executable, script, "--mode", "fsdp2", "--device", "cpu"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert fsdp2.returncode != 0 and "mode fsdp2 needs a CUDA GPU" in fsdp2.stderr


def test_interleaved_timing_varies_the_order_of_the_implementations():
    """No implementation always runs right after the same neighbour (one that sweeps the
    caches would make its first steps cold in every repeat)."""
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = B.time_interleaved(steps, "cpu", repeats=12, warmup=0)
    assert {name: len(ts) for name, ts in times.items()} == {"a": 12, "b": 12, "c": 12}
    repeats = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == list("abc") for r in repeats)  # each once per repeat
    before = {(r[i - 1], r[i]) for r in repeats for i in (1, 2)}
    assert len(before) == 6  # every implementation ran right after every other
