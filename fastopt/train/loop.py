"""The training loop: one function that reads top to bottom.

Per optimizer step: forward and backward over ``grad_accum_steps`` micro-batches, one fused
step (unscale, clip, skip on inf/NaN, update), the schedule, then evaluation, logging and
checkpointing when due. Everything a run depends on is in its checkpoint (model, optimizer,
scheduler, loss scaler, early stopping, every rank's RNG states, data position, step), so an
interrupted run resumes to the bit-identical result on the CPU.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from .components import (
    NO_CLIP,
    SignalGuard,
    autocast,
    build_optimizer,
    claim_run_dir,
    clip_norm,
    evaluate,
    is_fastopt,
    lr_of,
    model_signature,
    optimizer_step,
    resolve_device,
    to_device,
)
from .config import ConfigError, TrainConfig, build_early_stopping, build_schedule
from .data import BatchStream, sample_count
from .metrics import MetricsLogger
from .schedules import ScheduleLR

__all__ = ["FitResult", "ResumeWarning", "fit"]

CHECKPOINT_FORMAT = 1
MONITORABLE = ("val_loss", "train_loss")


class ResumeWarning(UserWarning):
    """What a resumed run worked around: a damaged checkpoint passed over, best.pt restored
    or lost, a run started over because it had no checkpoint yet."""


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
    Under torchrun (process group initialised) the model is wrapped in DDP.
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    out, device, rank, world = Path(cfg.out), resolve_device(cfg.device), D.rank(), D.world_size()
    is_main = rank == 0

    # -- set-up: model, optimizer, loss scaler, accumulation, schedule, early stopping -------
    import fastopt

    raw_model = (model.module if isinstance(model, DDP) else model).to(device)
    if D.is_distributed() and not isinstance(model, DDP):
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    elif not isinstance(model, DDP):
        model = raw_model
    params = [p for p in raw_model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = build_optimizer(cfg.optimizer, raw_model)
    fused = is_fastopt(optimizer)
    if fused and clip_norm(optimizer.max_grad_norm) != clip_norm(cfg.optimizer.max_grad_norm):
        raise ConfigError(
            f"the optimizer clips to max_grad_norm={optimizer.max_grad_norm} but "
            f"config.optimizer.max_grad_norm is {cfg.optimizer.max_grad_norm}"
        )
    if fused and optimizer.max_grad_norm is None:
        # Without clipping fastopt.AdamW would not look for inf/NaN gradients (see NO_CLIP).
        optimizer.max_grad_norm = NO_CLIP
    scaler = fastopt.LossScaler(enabled=cfg.precision == "fp16")
    n_micro = cfg.grad_accum_steps
    # fastopt accumulates micro-batch gradients in fp32 and folds 1/N into its step.
    accumulator = fastopt.GradAccumulator(optimizer) if fused and n_micro > 1 else None
    if schedule is None:
        schedule = build_schedule(cfg.schedule, cfg.max_steps)
    scheduler = schedule if isinstance(schedule, LRScheduler) else ScheduleLR(optimizer, schedule)
    es = cfg.early_stopping
    keep_best = es.enabled and es.restore_best
    if es.monitor not in MONITORABLE:
        raise ConfigError(
            f"config key 'early_stopping.monitor' must be one of {MONITORABLE}, got {es.monitor!r}"
        )
    if es.enabled and es.monitor == "val_loss" and val_loader is None:
        raise ConfigError("early_stopping.monitor is 'val_loss' but no validation loader was given")
    # Also tracks the best checkpoint when early stopping is off (its stops are then ignored).
    stopper = build_early_stopping(es)
    stream = BatchStream(train_loader)
    opt_type = type(optimizer)
    identity = {
        "model_signature": model_signature(raw_model),
        "optimizer_class": f"{opt_type.__module__}.{opt_type.__qualname__}",
        "world_size": world,
    }
    logger = MetricsLogger(out, enabled=is_main, tensorboard=cfg.tensorboard)
    fp = claim_run_dir(out, cfg, identity, resume)  # the last check before anything is written
    checkpoints = CheckpointManager(out / "checkpoints", keep_last=cfg.keep_last)

    step, skipped, train_loss, val_loss, best_weights, stop_reason = 0, 0, None, None, None, None
    interrupted_by = None
    found = None
    if resume:
        try:
            found = checkpoints.load_newest()
        except CheckpointError as e:
            raise ConfigError(f"cannot resume the run in {out}: {e}") from None
        if found is None:  # it failed or was stopped before its first checkpoint
            _note(f"{out} holds no checkpoint yet: starting its run from step 0")
            logger.truncate_after(0)
    if found is not None:
        latest, state, failures = found
        if failures:
            _note(
                f"resuming from {latest}, the newest checkpoint that loads: {'; '.join(failures)}"
            )
        if state.get("fingerprint") != fp:
            raise ConfigError(f"{latest} belongs to a different run than {out / 'run.json'}")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        step, skipped = state["step"], state["skipped_steps"]
        train_loss, val_loss = state["train_loss"], state["val_loss"]
        stop_reason = stopper.state["reason"] if es.enabled else None
        if stopper.best_step is not None:  # also repairs best.pt when early stopping is off
            best = _recover_best(checkpoints, state, stopper.best_step, repair=is_main)
            best_weights = best if keep_best else None
        stream.load_state_dict(state["data"], state["epoch_rng"][rank])
        restore_rng(state["rng"][rank])  # last: reopening the epoch drew from the RNGs
        logger.truncate_after(step)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs across ranks; data order does not
        np.random.seed((cfg.seed + rank) % 2**32)  # numpy takes only [0, 2**32)
        random.seed(cfg.seed + rank)

    def checkpoint_state() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fp,
            "step": step,
            "skipped_steps": skipped,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(),
            "data": stream.state_dict(),
            "rng": D.all_gather_objects(capture_rng()),
            "epoch_rng": D.all_gather_objects(stream.epoch_rng),
        }

    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = None
    if is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    interval_start, interval_steps, interval_samples = time.perf_counter(), 0, 0

    with SignalGuard() as guard:
        while step < cfg.max_steps and stop_reason is None:
            # -- forward and backward, micro-batch by micro-batch --------------------------
            model.train()
            lr = lr_of(optimizer)
            batches = [stream.next() for _ in range(n_micro)]
            counts = [sample_count(targets) for _, targets in batches]
            total = sum(counts)
            if D.is_distributed():
                total = int(D.all_reduce_sum(torch.tensor(float(total), device=device)).item())
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for i, (inputs, targets) in enumerate(batches):
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                # DDP reduces on the last micro-batch only; with fastopt accumulation on none
                # (its fp32 buffers are all-reduced once below).
                sync = i == n_micro - 1 and accumulator is None
                no_sync = (
                    model.no_sync()
                    if isinstance(model, DDP) and not sync
                    else contextlib.nullcontext()
                )
                with no_sync:
                    with autocast(device, cfg.precision):
                        loss = loss_fn(model(inputs), targets)
                    if accumulator is not None:
                        scaler.scale(loss).backward()
                        accumulator.accumulate(weight=counts[i])
                    else:  # plain .grad accumulation: weight each micro-batch's mean loss
                        scaler.scale(loss * (counts[i] * world / total)).backward()
                loss_sum += loss.detach().float() * counts[i]
            if accumulator is not None:
                if D.is_distributed():
                    buffers = accumulator.gradients()  # in params order: the same on every rank
                    D.all_reduce_sum_many([buffers[p] for p in params if p in buffers])
                accumulator.set_normalizer(total)

            # -- optimizer step (clip, unscale, skip on inf/NaN), then the schedule ----------
            applied, grad_norm = optimizer_step(
                optimizer, scaler, params, cfg.optimizer.max_grad_norm
            )
            if applied:
                if not isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step()
            else:
                skipped += 1
            step += 1
            interval_steps += 1
            interval_samples += total

            # -- evaluate, and decide on early stopping (all ranks agree) -------------------
            evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
            logging = step % cfg.log_every == 0 or evaluating
            if logging or (evaluating and es.monitor == "train_loss"):
                train_loss = float(D.all_reduce_sum(loss_sum) / total)
            improved = False
            if evaluating:
                if val_loader is not None:
                    val_loss = evaluate(raw_model, loss_fn, val_loader, device, cfg.precision)
                metric = val_loss if es.monitor == "val_loss" else train_loss
                if metric is not None:
                    if isinstance(scheduler, ScheduleLR):
                        scheduler.observe(metric)
                    elif isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(metric)
                    decision = stopper.update(metric, step)
                    improved = decision.improved
                    if keep_best and improved:
                        best_weights = {
                            k: v.detach().to("cpu", copy=True)
                            for k, v in raw_model.state_dict().items()
                        }
                    if es.enabled and D.any_rank(decision.stop, device):
                        stop_reason = decision.reason or "another rank decided to stop"

            # -- log ----------------------------------------------------------------------
            if logging:
                elapsed = time.perf_counter() - interval_start
                row = {
                    "step": step,
                    "epoch": stream.epoch,
                    "train_loss": train_loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "skipped_steps": skipped,
                    "samples_per_sec": interval_samples / elapsed,
                    "step_time": elapsed / interval_steps,
                    "val_loss": val_loss if evaluating else None,
                }
                logger.log(row)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{train_loss:.4f}",
                        **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}),
                    )
                interval_start, interval_steps, interval_samples = time.perf_counter(), 0, 0
            if bar is not None:
                bar.update(1)

            # -- checkpoint: on schedule, at the end, on a stop or signal, on a new best -----
            interrupted = D.any_rank(guard.received is not None, device)
            due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                step == cfg.max_steps or stop_reason is not None or interrupted
            )
            if due or improved:
                state = checkpoint_state()
                if is_main:
                    if due:
                        checkpoints.save(state, step, is_best=improved)
                    else:
                        checkpoints.save_best(state)
                del state
            if interrupted:
                interrupted_by = guard.received or "a signal to another rank"
                break

    # -- the end: plots, best weights --------------------------------------------------------
    if bar is not None:
        bar.close()
    logger.close()
    # An empty file: a resumed run truncated to step 0 and stopped before it logged a row.
    plots = []
    if is_main and cfg.plots and logger.path.is_file() and logger.path.stat().st_size > 0:
        from .plots import plot_run

        plots = plot_run(out)
    if keep_best and best_weights is not None:
        raw_model.load_state_dict(best_weights)
    return FitResult(
        out=out,
        step=step,
        train_loss=train_loss,
        val_loss=val_loss,
        best=stopper.best,
        best_step=stopper.best_step,
        skipped_steps=skipped,
        stop_reason=stop_reason,
        interrupted=interrupted_by,
        plots=plots,
    )


def _note(message: str, stacklevel: int = 3) -> None:
    """A :class:`ResumeWarning`, from rank 0 only. The default ``stacklevel`` points it at the
    caller of :func:`fit`."""
    if D.rank() == 0:
        warnings.warn(message, ResumeWarning, stacklevel=stacklevel)


def _recover_best(
    checkpoints: CheckpointManager, state: dict[str, Any], best_step: int, *, repair: bool
) -> dict[str, Any] | None:
    """The model weights of ``best_step`` when a resumed run can find them, else None.

    They are in ``best.pt``, unless a crash came between writing the checkpoint of a new best
    and linking ``best.pt`` to it, or ``best.pt`` is damaged: then they come from the step
    checkpoint of ``best_step`` when one is kept (the resumed ``state`` or another), and
    ``best.pt`` is made that checkpoint again when ``repair``. ``best.pt`` can also be ahead of
    the resumed checkpoint after a hard crash: the replayed steps find that best again.
    """
    try:
        best = load_checkpoint(checkpoints.best_path)
    except FileNotFoundError:
        problem = f"{checkpoints.best_path} is missing"
    except CheckpointError as e:
        problem = str(e)
    else:
        if best["step"] >= best_step:
            return best["model"] if best["step"] == best_step else None
        problem = f"{checkpoints.best_path} holds step {best['step']}"
    source, path = None, checkpoints.step_path(best_step)
    if state["step"] == best_step:
        source = state
    elif path.is_file():
        try:
            source = load_checkpoint(path)
        except CheckpointError as e:
            problem = f"{problem}; {e}"
    if source is None:
        _note(
            f"the weights of the best step so far ({best_step}) are lost: {problem}, and no "
            f"checkpoint of step {best_step} loads. best.pt, and the weights restored at the "
            "end, will be those of a later improvement, if any",
            stacklevel=4,
        )
        return None
    if repair:
        checkpoints.restore_best(best_step)
        _note(
            f"{problem}, but the best step is {best_step}: restored best.pt from {path}",
            stacklevel=4,
        )
    return source["model"]
