"""The training loop: one function that reads top to bottom.

Per optimizer step: forward and backward over ``grad_accum_steps`` loader batches in
micro-batches that fit (:mod:`~fastopt.train.microbatch`), one fused step (unscale, clip, skip
on inf/NaN, update) timed and measured by :mod:`~fastopt.train.telemetry`, the schedule, then
evaluation, logging and checkpointing when due. What the loop works with, set up, restored
from a checkpoint and saved to one, is a :class:`~fastopt.train.run.Run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from . import distributed as D
from .components import SignalGuard, lr_of, optimizer_step
from .config import TrainConfig
from .run import ResumeWarning, Run

__all__ = ["FitResult", "ResumeWarning", "fit"]


@dataclass
class FitResult:
    """How a run ended. ``interrupted`` names the signal that stopped it (then resume it);
    ``plots`` lists the plot files written (none when ``config.plots`` is false)."""

    out: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    best: float | None
    best_step: int | None
    skipped_steps: int
    stop_reason: str | None
    interrupted: str | None
    plots: list[Path] = field(default_factory=list)
    # Set by fastopt.train.run_job: the test loss, a generated sample, the loss to compare with.
    test_loss: float | None = None
    sample: str | None = None
    baseline: float | None = None


def fit(
    model: nn.Module,
    loss_fn,
    train_loader,
    val_loader=None,
    config: TrainConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    schedule=None,
    resume: bool = False,
) -> FitResult:
    """Trains ``model`` on ``(inputs, targets)`` batches: ``loss_fn(model(inputs), targets)``
    must return the mean loss over the batch.

    ``optimizer``: default ``config.optimizer`` (fastopt.AdamW); any torch optimizer works.
    With a fastopt optimizer clipping happens in its step with its own ``max_grad_norm``
    (which must equal ``config.optimizer.max_grad_norm``; when both are None, ``fit`` sets the
    optimizer's to inf so that its step skips inf/NaN gradients: it still never clips);
    others are clipped with ``torch.nn.utils`` to ``config.optimizer.max_grad_norm``.
    ``schedule``: default ``config.schedule``; a schedule (step -> lr multiplier) or a torch
    LR scheduler on ``optimizer``. ``resume``: continue the run in ``config.out`` from its
    newest checkpoint that loads (from step 0 when it has none yet), with a warning for each
    damaged file passed over. ``config`` must be the run's but for the keys that do not change
    the result (``NOT_FINGERPRINTED``); a larger ``max_steps`` extends the run, with the same
    schedule (a ``total_steps`` that defaulted to the old ``max_steps`` is then given as
    ``run.json`` records it; past it the schedule holds its last value).
    Under torchrun (process group initialised) the model is wrapped in DDP, or sharded with
    FSDP2 when ``config.parallel`` is "fsdp2" (see :mod:`~fastopt.train.strategy`).
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    run = Run(model, loss_fn, train_loader, val_loader, cfg, optimizer=optimizer,
              schedule=schedule, resume=resume)  # fmt: skip
    monitor = cfg.early_stopping.monitor

    with SignalGuard() as guard:
        while run.step < cfg.max_steps and run.stop_reason is None:
            step = run.step + 1
            evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
            logging = step % cfg.log_every == 0 or evaluating

            # -- forward and backward over the step's batches, in micro-batches that fit ---
            run.model.train()
            lr = lr_of(run.optimizer)
            passed = run.micro.run([run.stream.next() for _ in range(cfg.grad_accum_steps)])

            # -- optimizer step (clip, unscale, skip on inf/NaN), then the schedule ----------
            with run.telemetry.step(measure=logging):
                applied, grad_norm = optimizer_step(
                    run.optimizer, run.scaler, run.params, cfg.optimizer.max_grad_norm
                )
            if applied and not isinstance(run.scheduler, ReduceLROnPlateau):
                run.scheduler.step()
            run.skipped += not applied
            run.step = step
            run.telemetry.count(passed.samples, passed.tokens)

            # -- evaluate, and decide on early stopping (all ranks agree) -------------------
            if logging or (evaluating and monitor == "train_loss"):
                run.train_loss = float(D.all_reduce_sum(passed.loss_sum) / passed.samples)
            improved = run.evaluate() if evaluating else False

            # -- log, then checkpoint: on schedule, at the end, on a stop or signal, a best --
            run.report(logging, lr, grad_norm, applied, evaluating)
            interrupted = D.any_rank(guard.received is not None, run.device)
            run.checkpoint(improved, interrupted)
            if interrupted:
                run.interrupted = guard.received or "a signal to another rank"
                break

    plots = run.finish()
    return FitResult(
        out=run.out,
        step=run.step,
        train_loss=run.train_loss,
        val_loss=run.val_loss,
        best=run.stopper.best,
        best_step=run.stopper.best_step,
        skipped_steps=run.skipped,
        stop_reason=run.stop_reason,
        interrupted=run.interrupted,
        plots=plots,
    )
