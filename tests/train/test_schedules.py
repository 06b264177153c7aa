"""Schedules: values at known steps against closed forms and torch's own schedulers, and the
scheduler's state saved and restored mid-run."""

import functools
import math

import pytest
import torch

from fastopt.train import (
    ConfigError,
    ConstantWarmup,
    Cyclical,
    ExponentialDecay,
    ReduceOnPlateau,
    ScheduleLR,
    StepDecay,
    WarmupCosine,
    WarmupLinear,
    build_schedule,
)

BASE_LR = 0.1


def _optimizer(lr=BASE_LR):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _run(scheduler, steps):
    """The lr in force at steps 0 .. steps-1 (stepping after each)."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1 / 4),
        (1, 2 / 4),
        (3, 1.0),  # warm-up: (step + 1) / warmup
        (4, 1.0),
        (7, 1 - 0.9 * 3 / 6),
        (10, 0.1),
        (25, 0.1),  # linear to final_ratio, then flat
    ],
)
def test_warmup_linear_closed_form(step, expected):
    s = WarmupLinear(total_steps=10, warmup_steps=4, final_ratio=0.1)
    assert s(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [0, 2, 5, 6, 13, 20, 30, 31, 100])
def test_warmup_cosine_closed_form(step):
    s = WarmupCosine(total_steps=31, warmup_steps=6, min_ratio=0.2)
    if step < 6:
        expected = (step + 1) / 6
    else:
        progress = min(1.0, (step - 6) / 25)
        expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress))
    assert s(step) == pytest.approx(expected, rel=1e-12)
    assert s(6) == 1.0 and s(31) == pytest.approx(0.2) and s(1000) == pytest.approx(0.2)


def test_warmup_cosine_matches_torch_cosine_annealing():
    ours = ScheduleLR(_optimizer(), WarmupCosine(total_steps=40, min_ratio=0.1))
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=40, eta_min=0.1 * BASE_LR)
    assert _run(ours, 40) == pytest.approx(_run(ref, 40), rel=1e-9)


@pytest.mark.parametrize(
    "step, expected", [(0, 1.0), (4, 1.0), (5, 0.5), (9, 0.5), (10, 0.25), (23, 0.0625)]
)
def test_step_decay_closed_form(step, expected):
    assert StepDecay(step_size=5, gamma=0.5)(step) == expected


def test_step_and_exponential_match_torch():
    ours = ScheduleLR(_optimizer(), StepDecay(step_size=3, gamma=0.3))
    ref = torch.optim.lr_scheduler.StepLR(_optimizer(), step_size=3, gamma=0.3)
    assert _run(ours, 20) == pytest.approx(_run(ref, 20), rel=1e-9)
    ours = ScheduleLR(_optimizer(), ExponentialDecay(gamma=0.9))
    ref = torch.optim.lr_scheduler.ExponentialLR(_optimizer(), gamma=0.9)
    assert _run(ours, 20) == pytest.approx(_run(ref, 20), rel=1e-9)
    assert ExponentialDecay(0.9)(7) == pytest.approx(0.9**7, rel=1e-15)


def test_cyclical_triangular_closed_form():
    s = Cyclical(step_size=4, low=0.2, high=1.0)
    # up 0.2 -> 1.0 over 4 steps, down over 4, repeat
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2, 0.4]
    assert [s(i) for i in range(10)] == pytest.approx(expected, abs=1e-12)
    s2 = Cyclical(step_size=4, low=0.2, high=1.0, mode="triangular2")
    assert (
        s2(4) == pytest.approx(1.0)
        and s2(12) == pytest.approx(0.6)
        and s2(20) == pytest.approx(0.4)
    )
    s3 = Cyclical(step_size=4, low=0.0, high=1.0, mode="exp_range", gamma=0.9)
    assert s3(4) == pytest.approx(0.9**4) and s3(12) == pytest.approx(0.9**12)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclical_matches_torch_cyclic_lr(mode):
    ours = ScheduleLR(_optimizer(), Cyclical(step_size=5, low=0.1, high=1.0, mode=mode, gamma=0.97))
    ref = torch.optim.lr_scheduler.CyclicLR(
        _optimizer(),
        base_lr=0.1 * BASE_LR,
        max_lr=BASE_LR,
        step_size_up=5,
        mode=mode,
        gamma=0.97,
        cycle_momentum=False,
    )
    assert _run(ours, 37) == pytest.approx(_run(ref, 37), rel=1e-9)


def test_constant_warmup():
    s = ConstantWarmup(warmup_steps=5)
    assert [s(i) for i in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert ConstantWarmup(0)(0) == 1.0


def test_plateau_matches_torch_reduce_on_plateau():
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.5, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65, 0.66]
    ours = ScheduleLR(
        _optimizer(), ReduceOnPlateau(factor=0.5, patience=2, threshold=1e-4, cooldown=1)
    )
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, factor=0.5, patience=2, threshold=1e-4, cooldown=1
    )
    ours_lr, ref_lr = [], []
    for m in metrics:
        ours.observe(m)
        ref.step(m)
        ours_lr.append(ours.optimizer.param_groups[0]["lr"])
        ref_lr.append(ref_opt.param_groups[0]["lr"])
    assert ours_lr == pytest.approx(ref_lr, rel=1e-12)
    assert min(ours_lr) < BASE_LR  # it did reduce


def test_plateau_decide_is_pure():
    p = ReduceOnPlateau(patience=0)
    state = p.initial_state()
    after = p.decide(state, 1.0)
    assert state == p.initial_state() and after["best"] == 1.0


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupCosine(total_steps=30, warmup_steps=5, min_ratio=0.1),
        Cyclical(step_size=3, mode="triangular2"),
        ReduceOnPlateau(patience=1, warmup_steps=4),
    ],
    ids=["cosine", "cyclical", "plateau"],
)
def test_save_and_restore_mid_run(schedule):
    metrics = iter([1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9] * 4)
    full = ScheduleLR(_optimizer(), schedule)
    lrs = []
    for i in range(24):
        lrs.append(full.get_last_lr()[0])
        full.optimizer.step()
        full.step()
        if i % 3 == 2:
            full.observe(next(metrics))
    # the same 12 first steps, then save, restore into fresh objects and continue
    metrics = iter([1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9] * 4)
    first = ScheduleLR(_optimizer(), schedule)
    for i in range(12):
        first.optimizer.step()
        first.step()
        if i % 3 == 2:
            first.observe(next(metrics))
    saved_opt, saved = first.optimizer.state_dict(), first.state_dict()
    opt = _optimizer(lr=123.0)  # a different lr: everything must come from the state
    second = ScheduleLR(opt, schedule)
    opt.load_state_dict(saved_opt)
    second.load_state_dict(saved)
    rest = []
    for i in range(12, 24):
        rest.append(second.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == rest[-1]
        opt.step()
        second.step()
        if i % 3 == 2:
            second.observe(next(metrics))
    assert rest == lrs[12:]


def test_restore_refuses_another_schedule():
    saved = ScheduleLR(_optimizer(), StepDecay(step_size=3)).state_dict()
    with pytest.raises(ValueError, match="StepDecay"):
        ScheduleLR(_optimizer(), StepDecay(step_size=4)).load_state_dict(saved)


def _decay(step, rate):
    return rate**step


def _lambda_schedule():
    # A new function object at each call: another address, as in a resumed process.
    return lambda step: 0.9**step


class _Halving:
    def __call__(self, step):
        return 0.5 ** (step // 10)


@pytest.mark.parametrize(
    "make",
    [
        _lambda_schedule,
        lambda: functools.partial(lambda step, rate: rate**step, rate=0.9),
        lambda: _Halving().__call__,
        _Halving,
    ],
    ids=["lambda", "partial", "bound-method", "callable-object"],
)
def test_a_function_schedule_restores_in_another_process(make):
    """Plain callables are compared by module and qualified name: their repr holds a memory
    address, which a resumed process does not share."""
    first = ScheduleLR(_optimizer(), make())
    for _ in range(5):
        first.optimizer.step()
        first.step()
    second = ScheduleLR(_optimizer(), make())
    second.load_state_dict(first.state_dict())
    assert second.last_epoch == 5 and second.get_last_lr() == first.get_last_lr()


def test_restore_refuses_another_function_schedule():
    saved = ScheduleLR(_optimizer(), _lambda_schedule()).state_dict()
    with pytest.raises(ValueError, match=r"_lambda_schedule\.<locals>\.<lambda>, not for .*_decay"):
        ScheduleLR(_optimizer(), functools.partial(_decay, rate=0.9)).load_state_dict(saved)


def test_build_schedule_from_config():
    s = build_schedule({"name": "warmup_linear", "warmup_steps": 3}, max_steps=50)
    assert s == WarmupLinear(total_steps=50, warmup_steps=3)
    with pytest.raises(ConfigError, match="unknown config key 'schedule.warmup'.*warmup_steps"):
        build_schedule({"name": "warmup_cosine", "warmup": 3}, max_steps=50)
    with pytest.raises(ConfigError, match="schedule.name.*must be one of"):
        build_schedule({"name": "cosine"}, max_steps=50)
    with pytest.raises(ConfigError, match="gamma"):
        build_schedule({"name": "exponential", "gamma": 1.5}, max_steps=50)
    with pytest.raises(ConfigError, match="'schedule.step_size' must be int"):
        build_schedule({"name": "step", "step_size": 2.5}, max_steps=50)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WarmupCosine(total_steps=5, warmup_steps=5),
        lambda: WarmupLinear(total_steps=10, final_ratio=2.0),
        lambda: Cyclical(step_size=2, low=1.0, high=0.5),
        lambda: Cyclical(step_size=2, mode="sine"),
        lambda: ReduceOnPlateau(factor=1.0),
    ],
)
def test_invalid_schedules_are_refused(make):
    with pytest.raises(ValueError):
        make()
