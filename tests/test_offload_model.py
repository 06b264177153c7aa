"""bench/offload_model.py's timeline: the orderings any such model must keep."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "offload_model", Path(__file__).resolve().parents[1] / "bench" / "offload_model.py"
)
model = importlib.util.module_from_spec(_SPEC)
sys.modules["offload_model"] = model  # dataclasses look their module up there
_SPEC.loader.exec_module(model)


def test_overlap_never_loses_to_the_synchronous_step_nor_beats_the_gpus_own_work():
    hw = model.Hardware()
    for m in model.MODELS:
        for mode in model.MODES:
            t = model.step_times(m, hw, mode)
            forward_backward = 6 * m.params * hw.tokens / (hw.gpu_tflops * 1e12)
            assert forward_backward <= t["overlapped"] <= t["synchronous"]


def test_a_host_step_longer_than_the_forward_shows_in_the_overlapped_step():
    """With the host 100x slower the update no longer hides behind the forward."""
    hw, m, mode = model.Hardware(), model.MODELS[0], model.MODES[0]
    fast = model.step_times(m, hw, mode)["overlapped"]
    slow_mode = dataclasses.replace(mode, ns_per_param=mode.ns_per_param * 100)
    slow = model.step_times(m, hw, slow_mode)["overlapped"]
    assert slow > 2 * fast


def test_the_table_prints_every_model_and_mode(capsys):
    model.main([])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + len(model.MODELS) * len(model.MODES)  # header, rule, rows


def test_arithmetic_per_element_leaves_the_steps_fixed_cost_out(monkeypatch):
    """The slope between two sizes: a fixed cost per step, however large, adds nothing."""
    monkeypatch.setattr(model, "_step_seconds",
                        lambda dtype, kwargs, numel, calls: 40e-6 + numel * 0.5e-9)  # fmt: skip
    assert abs(model.ns_per_element("float32", {}) - 0.5) < 1e-9
    table = model.arithmetic_table(rounds=2)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(model.ARITHMETIC) + len(model.AVX2) + len(model.PORTABLE)
    assert all(row.endswith("| 1.00x |") for row in rows[1:])


def test_each_kind_of_step_runs_when_timed():
    for dtype, kwargs in (("float32", None), ("bfloat16", {"state_dtype": "int8"})):
        assert 0 < model._step_seconds(dtype, kwargs, numel=64, calls=2) < 1
