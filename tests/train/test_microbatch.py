"""Memory-adaptive micro-batches, with out-of-memory faults injected (FASTOPT_INJECT_OOM_ABOVE):
a run that splits its batches ends with the weights of a run configured with the small
micro-batches from the start, bit for bit; the split survives a resume; ``auto`` finds the
largest micro-batch that fits; splitting keeps the update of the whole batch."""

import pytest
import torch
import toy
from torch import nn

from fastopt.train import ConfigError, fit, load_checkpoint, read_metrics
from fastopt.train.cli import main
from fastopt.train.microbatch import INJECT_OOM_ENV, split_batch

BATCH = 32
OPTIMIZERS = ["fastopt.AdamW", "torch.optim.AdamW"]


def _model(seed=0, dropout=0.1, norm=True):
    """Dropout and batch norm: a retried forward pass must leave the RNG and the running
    statistics as a single pass would."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.BatchNorm1d(32) if norm else nn.Identity(),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(32, 4),
    )


def _cfg(tmp_path, name, optimizer, **overrides):
    return toy.config(tmp_path, name, optimizer={"name": optimizer, "lr": 1e-2}, **overrides)


def _assert_equal_weights(a: nn.Module, b: nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _small_from_the_start(tmp_path, optimizer, size=8):
    model = _model()
    cfg = _cfg(tmp_path, "small", optimizer, micro_batch_size=size)
    fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg)
    return model, toy.metric_rows(cfg.out)


def _without_size(rows):
    return [{k: v for k, v in r.items() if k != "micro_batch_size"} for r in rows]


def test_split_batch():
    x, y = torch.arange(10).view(5, 2), torch.arange(5)
    pieces = split_batch((x, y), 2)
    assert [p[1].tolist() for p in pieces] == [[0, 1], [2, 3], [4]]
    assert torch.equal(pieces[2][0], x[4:])
    d = split_batch({"ids": y, "mask": y > 1}, 3)
    assert [p["ids"].tolist() for p in d] == [[0, 1, 2], [3, 4]]
    assert d[1]["mask"].tolist() == [True, True]
    with pytest.raises(TypeError, match="cannot split a batch of str"):
        split_batch("abc", 2)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_injected_oom_run_equals_the_small_micro_batch_run(
    tmp_path, monkeypatch, capsys, optimizer
):
    """Micro-batches above 8 samples "run out of memory" after their forward pass: the step is
    started over at 16, then 8; the run ends with the weights (and losses) of a run configured
    with micro_batch_size 8 from the start."""
    reference, ref_rows = _small_from_the_start(tmp_path, optimizer)
    monkeypatch.setenv(INJECT_OOM_ENV, "8")
    model = _model()
    cfg = _cfg(tmp_path, "oom", optimizer)  # micro_batch_size null: whole batches of 32
    fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg)
    _assert_equal_weights(model, reference)
    rows = toy.metric_rows(cfg.out)
    assert rows == ref_rows and {r["micro_batch_size"] for r in rows} == {8}
    err = capsys.readouterr().err
    assert "a micro-batch of 32 samples ran out of memory; going on with micro-batches of 16" in err
    assert "a micro-batch of 16 samples ran out of memory; going on with micro-batches of 8" in err
    state = load_checkpoint(tmp_path / "oom" / "checkpoints" / "step_00000040.pt")
    assert state["micro_batch"] == {"size": 8}


def test_the_split_is_kept_on_resume(tmp_path, monkeypatch):
    """Split by injected OOMs, stopped by SIGTERM, resumed without the injection: the resumed
    run goes on with micro-batches of 8 (whole batches of 32 would give other weights) and
    ends as the small-micro-batch run does."""
    reference, ref_rows = _small_from_the_start(tmp_path, "fastopt.AdamW")
    cfg = _cfg(tmp_path, "cut", "fastopt.AdamW", checkpoint_every=7)
    monkeypatch.setenv(INJECT_OOM_ENV, "8")
    # each step calls the loss 2 x 4 times at micro-batches of 8 (the first 2 more, for the two
    # OOMs), the evaluation at step 10 twice: 10 + 9 x 8 + 2 + 8 = 92 by the end of step 11,
    # so the 100th call is in step 12
    cut = fit(_model(), toy.SignalAt(100), *toy.loaders(), cfg)
    assert cut.interrupted == "SIGTERM" and cut.step == 12
    monkeypatch.delenv(INJECT_OOM_ENV)
    model = _model(seed=1)
    fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg, resume=True)
    _assert_equal_weights(model, reference)
    assert toy.metric_rows(cfg.out) == ref_rows


def test_whole_batches_would_differ(tmp_path):
    """The test above can fail: without the kept split the weights are not the same."""
    reference, _ = _small_from_the_start(tmp_path, "fastopt.AdamW")
    model = _model()
    fit(
        model, nn.functional.cross_entropy, *toy.loaders(), _cfg(tmp_path, "whole", "fastopt.AdamW")
    )
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_auto_finds_the_largest_micro_batch_that_fits(tmp_path, monkeypatch, capsys):
    reference, ref_rows = _small_from_the_start(tmp_path, "fastopt.AdamW")
    monkeypatch.setenv(INJECT_OOM_ENV, "12")  # 32 and 16 do not fit, 8 does
    model = _model()
    cfg = _cfg(tmp_path, "auto", "fastopt.AdamW", micro_batch_size="auto")
    fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg)
    assert "micro_batch_size auto: 8" in capsys.readouterr().err
    assert "ran out of memory" not in capsys.readouterr().err
    _assert_equal_weights(model, reference)  # the probe left the RNG and the statistics alone
    assert _without_size(toy.metric_rows(cfg.out)) == _without_size(ref_rows)
    monkeypatch.delenv(INJECT_OOM_ENV)
    cfg = _cfg(tmp_path, "auto-all", "fastopt.AdamW", micro_batch_size="auto", max_steps=6)
    fit(_model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    assert {r["micro_batch_size"] for r in toy.metric_rows(cfg.out)} == {BATCH}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_splitting_keeps_the_update_of_the_whole_batch(tmp_path, optimizer):
    """Without dropout and batch norm a step's gradient does not depend on the split: the
    weights agree with whole batches to rounding (the sums go in another order)."""
    whole, split = _model(dropout=0.0, norm=False), _model(dropout=0.0, norm=False)
    fit(whole, nn.functional.cross_entropy, *toy.loaders(), _cfg(tmp_path, "whole", optimizer))
    cfg = _cfg(tmp_path, "split", optimizer, micro_batch_size=5)  # 7 pieces: 6 x 5 and 2
    fit(split, nn.functional.cross_entropy, *toy.loaders(), cfg)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), split.parameters()))


def test_out_of_memory_at_the_floor_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_OOM_ENV, "8")
    cfg = _cfg(tmp_path, "floor", "fastopt.AdamW", min_micro_batch_size=16)
    with pytest.raises(RuntimeError, match="16 samples ran out of memory, and min_micro_batch"):
        fit(_model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    monkeypatch.setenv(INJECT_OOM_ENV, "many")
    with pytest.raises(ConfigError, match=f"{INJECT_OOM_ENV} must be an integer >= 1, got 'many'"):
        fit(
            _model(),
            nn.functional.cross_entropy,
            *toy.loaders(),
            _cfg(tmp_path, "b", "fastopt.AdamW"),
        )
    with pytest.raises(ConfigError, match="'micro_batch_size' must be >= 1, 'auto' or null"):
        _cfg(tmp_path, "c", "fastopt.AdamW", micro_batch_size=0)


def test_the_command_line(tmp_path, monkeypatch, capsys):
    """The README's example, shrunk: the split is printed and in every row; --micro-batch-size
    takes a number or auto."""
    monkeypatch.setenv(INJECT_OOM_ENV, "16")
    out = tmp_path / "oom"
    cfg = toy.small(tmp_path, steps=12)  # the mlp job, batches of 64
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "a micro-batch of 64 samples ran out of memory; going on with micro-batches of 32" in err
    assert {r["micro_batch_size"] for r in read_metrics(out)} == {16}
    args = ["train", "--config", cfg, "--out", str(tmp_path / "auto"), "--micro-batch-size"]
    assert main([*args, "auto"]) == 0
    assert "micro_batch_size auto: 16" in capsys.readouterr().err
    assert main([*args, "many"]) == 2
    assert "expected an integer or 'auto', got 'many'" in capsys.readouterr().err
