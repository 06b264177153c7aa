"""Early stopping: the decision for each rule, purity, and its state round trip."""

import math

import pytest

from fastopt.train import EarlyStopping


def _feed(es, values):
    """The step (1-based index) at which it decided to stop, or None."""
    for step, v in enumerate(values, start=1):
        d = es.update(v, step)
        if d.stop:
            return step
    return None


def test_patience_counts_evaluations_without_improvement():
    es = EarlyStopping(patience=3)
    assert _feed(es, [1.0, 0.9, 0.95, 0.91]) is None
    assert es.update(0.92, 5).stop  # the 3rd in a row not below 0.9
    assert es.best == 0.9 and es.best_step == 2
    assert "did not improve" in es.state["reason"] and es.state["stopped_step"] == 5


def test_an_improvement_resets_the_count():
    assert _feed(EarlyStopping(patience=2), [1.0, 1.1, 0.8, 0.9, 0.7, 0.75, 0.76]) == 7


def test_min_delta_ignores_small_improvements():
    es = EarlyStopping(patience=2, min_delta=0.05)
    assert _feed(es, [1.0, 0.97, 0.96]) == 3  # 0.97 and 0.96 are within 0.05 of 1.0
    es = EarlyStopping(patience=2, min_delta=0.05)
    assert _feed(es, [1.0, 0.94, 0.93, 0.8]) is None and es.best == 0.8


def test_mode_max():
    es = EarlyStopping(monitor="acc", mode="max", patience=2)
    assert _feed(es, [0.5, 0.6, 0.55, 0.7, 0.69, 0.68]) == 6 and es.best == 0.7


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_stops_at_once_on_a_non_finite_metric(bad):
    es = EarlyStopping(patience=100)
    assert _feed(es, [1.0, 0.9, bad]) == 3
    assert str(bad) in es.state["reason"]
    assert es.best == 0.9  # a NaN is never the best
    es = EarlyStopping(patience=100, stop_on_nonfinite=False)
    assert _feed(es, [1.0, bad, 0.5]) is None and es.best == 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_patience_runs_out_before_any_finite_value(bad):
    """With stop_on_nonfinite=False the first values may all be inf/NaN: there is no best yet
    when patience runs out, and the reason says so."""
    es = EarlyStopping(patience=2, stop_on_nonfinite=False)
    assert _feed(es, [bad, bad, 1.0]) == 2
    assert es.best is None and es.best_step is None
    assert "for 2 evaluations (no finite value yet)" in es.state["reason"]


def test_divergence_threshold():
    es = EarlyStopping(patience=100, divergence_threshold=5.0)
    assert _feed(es, [1.0, 4.9, 5.1]) == 3 and "divergence" in es.state["reason"]
    es = EarlyStopping(mode="max", patience=100, divergence_threshold=0.1)
    assert _feed(es, [0.5, 0.2, 0.05]) == 3


def test_decide_is_pure():
    es = EarlyStopping(patience=1)
    state = es.initial_state()
    new, d = es.decide(state, 1.0, 1)
    assert state == es.initial_state() and new["best"] == 1.0 and d.improved and not d.stop
    assert es.state == es.initial_state()  # decide() does not touch the object


def test_state_dict_round_trip_continues_identically():
    values = [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.8, 0.9, 1.0]
    whole = EarlyStopping(patience=3)
    expected = [whole.update(v, i) for i, v in enumerate(values)]
    first = EarlyStopping(patience=3)
    got = [first.update(v, i) for i, v in enumerate(values[:5])]
    second = EarlyStopping(patience=3)
    second.load_state_dict(first.state_dict())
    got += [second.update(v, i) for i, v in enumerate(values[5:], start=5)]
    assert got == expected and expected[-1].stop
    with pytest.raises(ValueError, match="monitors val_loss"):
        EarlyStopping(monitor="acc", mode="max").load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "lower"},
        {"patience": 0},
        {"patience": 2.5},
        {"min_delta": -1.0},
        {"divergence_threshold": math.inf},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)
