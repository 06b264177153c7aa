"""Everything :func:`fastopt.train.fit`'s loop works with, set up, restored and saved: the
model (spread over processes by a :mod:`~fastopt.train.strategy` strategy), optimizer,
schedule, loss scaler, micro-batches, early stopping, data stream, telemetry, metrics and
checkpoints, and the run's tally (step, skipped steps, losses). The loop calls
:meth:`Run.evaluate`, :meth:`Run.report`, :meth:`Run.checkpoint` and :meth:`Run.finish`; each
is a few lines that read alone.

Everything a run depends on is in its checkpoint (model, optimizer, scheduler, loss scaler,
early stopping, micro-batch size, every rank's RNG states, data position, step), so an
interrupted run resumes to the bit-identical result on the CPU. A strategy whose checkpoints
reshard (FSDP2) also resumes on another number of ranks, with the same global batch: to the
same result within fp32 rounding (without dropout, whose random numbers are per rank).
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import distributed as D
from .checkpoint import (
    AtomicWriteError,
    CheckpointError,
    CheckpointManager,
    capture_rng,
    restore_rng,
    share_outcome,
)
from .components import (
    NO_CLIP,
    build_optimizer,
    claim_run_dir,
    clip_norm,
    evaluate,
    is_fastopt,
    model_signature,
    resolve_device,
)
from .config import TrainConfig, build_early_stopping, build_schedule, config_to_dict, flatten
from .data import BatchStream
from .errors import ConfigError
from .metrics import MetricsLogger
from .microbatch import MicroBatches
from .schedules import ScheduleLR
from .strategy import choose_strategy
from .telemetry import Telemetry

__all__ = ["CHECKPOINT_FORMAT", "ResumeWarning", "Run"]

CHECKPOINT_FORMAT = 1
MONITORABLE = ("val_loss", "train_loss")


class ResumeWarning(UserWarning):
    """What a resumed run worked around: a damaged checkpoint passed over, best.pt restored
    or lost, a run started over because it had no checkpoint yet."""


class Run:
    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        train_loader,
        val_loader,
        cfg: TrainConfig,
        *,
        optimizer: torch.optim.Optimizer | None,
        schedule,
        resume: bool,
    ) -> None:
        self.cfg, self.loss_fn, self.val_loader = cfg, loss_fn, val_loader
        self.out, self.device = Path(cfg.out), resolve_device(cfg.device)
        self.rank, self.is_main = D.rank(), D.rank() == 0
        self._model(model)
        self._optimizer(optimizer, schedule)
        es = cfg.early_stopping
        self.keep_best = es.enabled and es.restore_best
        if es.monitor not in MONITORABLE:
            raise ConfigError(
                f"config key 'early_stopping.monitor' must be one of {MONITORABLE}, "
                f"got {es.monitor!r}"
            )
        if es.enabled and es.monitor == "val_loss" and val_loader is None:
            raise ConfigError(
                "early_stopping.monitor is 'val_loss' but no validation loader was given"
            )
        # Also tracks the best checkpoint when early stopping is off (its stops are then ignored).
        self.stopper = build_early_stopping(es)
        self.stream = BatchStream(train_loader)
        size = None if cfg.micro_batch_size == "auto" else cfg.micro_batch_size
        self.micro = MicroBatches(
            self.model, self.raw_model, loss_fn, self.optimizer, self.scaler, self.strategy,
            device=self.device, precision=cfg.precision, size=size,
            floor=cfg.min_micro_batch_size, fused=self.fused,
        )  # fmt: skip
        self.telemetry = Telemetry(
            self.raw_model, self.optimizer, self.scaler, self.device,
            per=cfg.telemetry.per, enabled=cfg.telemetry.enabled,
        )  # fmt: skip
        opt_type = type(self.optimizer)
        identity = {
            "model_signature": model_signature(self.raw_model),
            "optimizer_class": f"{opt_type.__module__}.{opt_type.__qualname__}",
        }
        # The world size is the run's unless its checkpoints reshard; then run.json records
        # the one it started on, of which data.batch_size is the per-rank batch (jobs/runner.py).
        started = {"world_size": D.world_size()}
        if not self.strategy.reshardable:
            identity, started = {**identity, **started}, {}
        self.logger = MetricsLogger(
            self.out, enabled=self.is_main, tensorboard=cfg.tensorboard, tracking=cfg.tracking,
            params=flatten(config_to_dict(cfg)),
        )  # fmt: skip
        # The last check before anything is written.
        self.fingerprint = claim_run_dir(self.out, cfg, identity, resume, started=started)
        self.checkpoints = self.strategy.checkpoints(
            self.out / "checkpoints", cfg.keep_last, self.raw_model, self.optimizer
        )
        self.step, self.skipped, self.train_loss, self.val_loss = 0, 0, None, None
        self.best_weights = self.stop_reason = self.interrupted = None
        if not (resume and self._resume()):
            self._start(train_loader)
        self.bar = None
        terminal = sys.stderr.isatty()
        progress = cfg.progress if cfg.progress is not None else terminal
        if self.is_main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                            dynamic_ncols=True)  # fmt: skip
        # Off a terminal (a log file, a cluster job, CI) a bar draws nothing useful: a plain
        # line per logged step instead, as Lightning and the Hugging Face Trainer print.
        self.lines = self.is_main and cfg.progress is None and not terminal
        self.started = time.monotonic()
        self.telemetry.restart()  # the first interval's rates leave the set-up out

    # -- set-up ------------------------------------------------------------------------------
    def _model(self, model: nn.Module) -> None:
        self.strategy = choose_strategy(self.cfg.parallel)
        self.model, self.raw_model = self.strategy.wrap(model, self.device)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]

    def _optimizer(self, optimizer, schedule) -> None:
        import fastopt

        cfg = self.cfg
        if optimizer is None:
            optimizer = build_optimizer(cfg.optimizer, self.raw_model, cfg.seed)
        elif self.strategy.reshardable:
            mine = {id(p) for p in self.raw_model.parameters()}
            if any(id(p) not in mine for g in optimizer.param_groups for p in g["params"]):
                raise ConfigError(
                    "parallel 'fsdp2' replaces the model's parameters with shards: build the "
                    "optimizer on the model after fully_shard, or pass none (config.optimizer)"
                )
        self.fused = is_fastopt(optimizer)
        # The overlapped update's hooks, on fit's model only; finish() removes them.
        self.overlap = optimizer.overlap(self.raw_model) if self.fused and cfg.optimizer.overlap \
            else None  # fmt: skip
        max_norm = cfg.optimizer.max_grad_norm
        if self.fused and clip_norm(optimizer.max_grad_norm) != clip_norm(max_norm):
            raise ConfigError(
                f"the optimizer clips to max_grad_norm={optimizer.max_grad_norm} but "
                f"config.optimizer.max_grad_norm is {max_norm}"
            )
        if self.fused and optimizer.max_grad_norm is None:
            # Without clipping fastopt.AdamW would not look for inf/NaN gradients (see NO_CLIP).
            optimizer.max_grad_norm = NO_CLIP
        self.optimizer = optimizer
        self.scaler = fastopt.LossScaler(enabled=cfg.precision == "fp16")
        if schedule is None:
            schedule = build_schedule(cfg.schedule, cfg.max_steps)
        is_scheduler = isinstance(schedule, LRScheduler)
        self.scheduler = schedule if is_scheduler else ScheduleLR(optimizer, schedule)

    def _start(self, train_loader) -> None:
        """A fresh run: seeds, and the micro-batch size probed when it is "auto"."""
        _seed(self.cfg.seed + self.rank)  # dropout differs across ranks; data order does not
        if self.cfg.micro_batch_size == "auto":
            rng = capture_rng()  # opening the loader draws from them: the run starts as if not
            batch = next(iter(train_loader))
            restore_rng(rng)
            size = self.micro.probe(batch)
            if self.is_main:
                print(f"python -m fastopt train: micro_batch_size auto: {size}", file=sys.stderr)

    def _check_world(self, state: dict[str, Any]) -> None:
        """A checkpoint resumed on another world size must see the same global batch."""
        saved_world, world = state.get("world_size", D.world_size()), D.world_size()
        saved_batch = state.get("loader_batch_size")
        batch = getattr(self.stream.loader, "batch_size", None)
        if saved_world == world or saved_batch is None or batch is None:
            return
        if batch * world != saved_batch * saved_world:
            total = saved_batch * saved_world
            raise ConfigError(
                f"the run in {self.out} was saved on {saved_world} ranks with batches of "
                f"{saved_batch} ({total} samples a loader batch in all): on {world} ranks it "
                f"needs a loader batch_size of {total / world:g}"
            )

    def _resume(self) -> bool:
        """Restores the newest checkpoint that loads; False when there is none yet."""
        out = self.out
        try:
            found = self.checkpoints.load_newest()
        except CheckpointError as e:
            raise ConfigError(f"cannot resume the run in {out}: {e}") from None
        if found is None:  # it failed or was stopped before its first checkpoint
            _note(f"{out} holds no checkpoint yet: starting its run from step 0")
            self.logger.truncate_after(0)
            return False
        latest, state, failures = found
        if failures:
            _note(
                f"resuming from {latest}, the newest checkpoint that loads: {'; '.join(failures)}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{latest} belongs to a different run than {out / 'run.json'}")
        self._check_world(state)
        self.strategy.load_state_dict(self.raw_model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.micro.load_state_dict(state["micro_batch"])
        self.step, self.skipped = state["step"], state["skipped_steps"]
        self.train_loss, self.val_loss = state["train_loss"], state["val_loss"]
        self.stop_reason = self.stopper.state["reason"] if self.cfg.early_stopping.enabled else None
        best_step = self.stopper.best_step
        if best_step is not None:  # also repairs best.pt when early stopping is off
            repair = self.is_main or self.checkpoints.every_rank
            best = _recover_best(self.checkpoints, state, best_step, repair=repair)
            self.best_weights = best if self.keep_best else None
        saved = len(state["rng"])
        # A rank the saved run did not have (resumed on more ranks) opens the epoch as rank 0
        # did (the sampler's order depends on the seed and epoch only) and draws fresh random
        # numbers, as a new rank of a fresh run would.
        self.stream.load_state_dict(state["data"], state["epoch_rng"][self.rank % saved])
        if self.rank < saved:
            restore_rng(state["rng"][self.rank])  # last: reopening the epoch drew from them
        else:
            _seed(self.cfg.seed + self.rank + self.step)
        self.logger.truncate_after(self.step)
        if self.is_main:
            print(f"python -m fastopt train: resuming from step {self.step} ({latest})",
                  file=sys.stderr)  # fmt: skip
        return True

    # -- what the loop calls ----------------------------------------------------------------
    def evaluate(self) -> bool:
        """Validation loss, the schedule's and early stopping's look at it (all ranks agree
        on a stop). Returns whether it improved on the best so far."""
        es = self.cfg.early_stopping
        if self.val_loader is not None:
            self.val_loss = evaluate(
                self.raw_model, self.loss_fn, self.val_loader, self.device, self.cfg.precision,
                lockstep=self.strategy.lockstep,
            )  # fmt: skip
        metric = self.val_loss if es.monitor == "val_loss" else self.train_loss
        if metric is None:
            return False
        if isinstance(self.scheduler, ScheduleLR):
            self.scheduler.observe(metric)
        elif isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(metric)
        decision = self.stopper.update(metric, self.step)
        if self.keep_best and decision.improved:
            self._synchronize()
            self.best_weights = {k: _copy(v) for k, v in self.raw_model.state_dict().items()}
        if es.enabled and D.any_rank(decision.stop, self.device):
            self.stop_reason = decision.reason or "another rank decided to stop"
        return decision.improved

    def report(self, logging: bool, lr: float, grad_norm, applied: bool, evaluating: bool):
        """The step's row in metrics.jsonl (on logging steps) and the progress bar."""
        if logging:
            row = {
                "step": self.step,
                "epoch": self.stream.epoch,
                "train_loss": self.train_loss,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "skipped_steps": self.skipped,
                "micro_batch_size": self.micro.size,
                **self.telemetry.metrics(applied),
                "val_loss": self.val_loss if evaluating else None,
            }
            self.logger.log(row)
            if self.lines:
                print(self._line(lr, evaluating), file=sys.stderr, flush=True)
            if self.bar is not None:
                shown = {"val": f"{self.val_loss:.4f}"} if self.val_loss is not None else {}
                self.bar.set_postfix(loss=f"{self.train_loss:.4f}", **shown)
        if self.bar is not None:
            self.bar.update(1)

    def _line(self, lr: float, evaluating: bool) -> str:
        """A logged step as one line: ``step 20/600: train loss 2.8140, val loss 2.9012,
        lr 0.003, 4.2 s``."""
        parts = [f"train loss {self.train_loss:.4f}"]
        if evaluating and self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f}")
        parts += [f"lr {lr:.3g}", f"{time.monotonic() - self.started:.1f} s"]
        return f"step {self.step}/{self.cfg.max_steps}: {', '.join(parts)}"

    def checkpoint(self, improved: bool, interrupted: bool) -> None:
        """On schedule, at the end, on a stop or a signal, on a new best."""
        every = self.cfg.checkpoint_every
        due = (every and self.step % every == 0) or (
            self.step == self.cfg.max_steps or self.stop_reason is not None or interrupted
        )
        if not (due or improved):
            return
        state = self.state()
        if self.checkpoints.every_rank:  # each writes its shards; the manager shares failures
            self._save(state, due, improved)
            return
        error = None
        if self.is_main:
            try:
                self._save(state, due, improved)
            except AtomicWriteError as e:
                error = e
        share_outcome(error)  # rank 0's failure stops every rank, not only rank 0

    def _save(self, state: dict[str, Any], due: bool, improved: bool) -> None:
        if due:
            self.checkpoints.save(state, self.step, is_best=improved)
        else:
            self.checkpoints.save_best(state)

    def _synchronize(self) -> None:
        """An overlapped update has reached the params (before reading them outside the
        model's forward)."""
        if self.fused:
            self.optimizer.synchronize()

    def state(self) -> dict[str, Any]:
        self._synchronize()
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "skipped_steps": self.skipped,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            **self.strategy.state_dict(self.raw_model, self.optimizer),
            "world_size": D.world_size(),
            "loader_batch_size": getattr(self.stream.loader, "batch_size", None),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "micro_batch": self.micro.state_dict(),
            "data": self.stream.state_dict(),
            "rng": D.all_gather_objects(capture_rng()),
            "epoch_rng": D.all_gather_objects(self.stream.epoch_rng),
        }

    def finish(self) -> list[Path]:
        """Closes the bar and the logs, draws the plots, puts the best weights back; returns
        the plots written."""
        if self.overlap is not None:
            self.overlap.remove()  # waits for the last update
        if self.bar is not None:
            self.bar.close()
        plots = []
        path = self.logger.path
        # An empty file: a resumed run truncated to step 0 and stopped before it logged a row.
        if self.is_main and self.cfg.plots and path.is_file() and path.stat().st_size > 0:
            from .plots import plot_run

            plots = plot_run(self.out)
            self.logger.artifacts(plots)
        self.logger.close()
        if self.keep_best and self.best_weights is not None:
            self.raw_model.load_state_dict(self.best_weights)
        return plots


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes only [0, 2**32)
    random.seed(seed)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a weight that loading later states cannot change: on the CPU, or for a
    DTensor shard where it lives (its mesh is on that device)."""
    from fastopt.sharded import is_dtensor

    return t.detach().clone() if is_dtensor(t) else t.detach().to("cpu", copy=True)


def _note(message: str, stacklevel: int = 5) -> None:
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
        best = checkpoints.load(checkpoints.best_path)
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
    elif path.exists():
        try:
            source = checkpoints.load(path)
        except CheckpointError as e:
            problem = f"{problem}; {e}"
    if source is None:
        _note(
            f"the weights of the best step so far ({best_step}) are lost: {problem}, and no "
            f"checkpoint of step {best_step} loads. best.pt, and the weights restored at the "
            "end, will be those of a later improvement, if any",
            stacklevel=6,
        )
        return None
    if repair:
        checkpoints.restore_best(best_step)
        _note(
            f"{problem}, but the best step is {best_step}: restored best.pt from {path}",
            stacklevel=6,
        )
    return source["model"]
