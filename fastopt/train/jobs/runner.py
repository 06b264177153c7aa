"""Training a job: its model and data built by the factories, :func:`~fastopt.train.fit`,
then the test set and a generated sample."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from ..components import evaluate, read_run_record
from ..data import make_loader
from ..errors import ConfigError
from ..loop import fit
from ..strategy import is_sharded
from .factories import build_job, checked

__all__ = ["cross_entropy", "run_job"]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: (batch, classes) logits with (batch,) targets,
    or (batch, time, vocab) with (batch, time)."""
    return nn.functional.cross_entropy(output.flatten(0, -2).float(), target.flatten())


def _rank_batch(config, resume: bool) -> int:
    """Each rank's training batch: ``data.batch_size``, or for a run whose checkpoints reshard
    (``parallel: fsdp2``) resumed on another number of ranks, the share of the global batch
    (``data.batch_size`` times the ranks it started on) that keeps it the same."""
    batch = config.data["batch_size"]
    if not resume or config.parallel != "fsdp2":
        return batch
    started, world = read_run_record(config.out).get("world_size", D.world_size()), D.world_size()
    if (batch * started) % world:
        raise ConfigError(
            f"the run in {config.out} started on {started} ranks with data.batch_size {batch}: "
            f"its {batch * started} samples a batch do not split over {world} ranks"
        )
    return batch * started // world


SAMPLE_CHARS = 300
SAMPLE_TEMPERATURE = 0.8


def run_job(config, *, resume: bool = False):
    """Trains the config's job with :func:`fit`; then, unless interrupted, evaluates the test
    set and draws a sample (set on the returned :class:`FitResult`). The ``data`` and
    ``model`` sections are checked against the factories first (a config from
    :func:`load_config` or :func:`config_from_dict` already is)."""
    config = checked(config)
    model, data = build_job(config)
    loader = config.data
    train_loader = make_loader(
        data.train, _rank_batch(config, resume), train=True, seed=config.seed,
        num_workers=loader["num_workers"],
    )  # fmt: skip
    val_loader = None
    if data.val is not None:
        val_loader = make_loader(
            data.val, loader["val_batch_size"], train=False, num_workers=loader["num_workers"]
        )
    result = fit(model, cross_entropy, train_loader, val_loader, config, resume=resume)
    result.baseline = data.baseline
    if result.interrupted is not None:
        return result
    device = next(model.parameters()).device
    sharded = is_sharded(model)
    if data.test is not None:
        test_loader = make_loader(
            data.test, loader["val_batch_size"], train=False, num_workers=loader["num_workers"]
        )
        result.test_loss = evaluate(
            model, cross_entropy, test_loader, device, config.precision, lockstep=sharded
        )
    generate = getattr(model, "generate", None)
    # A sharded model's forward is a collective: every rank generates (the same text, from
    # the same seed), rank 0 keeps it.
    prompt = data.prompt if data.decode else None
    if (D.rank() == 0 or sharded) and callable(generate) and prompt is not None:
        g = torch.Generator(device=device).manual_seed(config.seed)
        ids = generate(data.prompt.to(device)[None], SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE,
                       generator=g)  # fmt: skip
        result.sample = data.decode(ids[0].tolist())
    return result
