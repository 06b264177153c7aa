"""fastopt.train: a small trainer around fastopt's fused AdamW.

One linear loop (:func:`fit`): forward, backward with accumulation in micro-batches that fit,
fused step, schedule, evaluate, log, checkpoint; the pieces it calls are small components
(``run``, ``microbatch``, ``telemetry``, ``metrics``). Schedules are pure functions of the step
wrapped as a torch LR scheduler; early stopping is a small object with a pure decision;
checkpoints are atomic and resume bit-exactly on the CPU; runs unchanged under torchrun (DDP,
or FSDP2 with ``parallel: fsdp2``, whose checkpoints resume on any number of ranks).
:func:`run_job` trains a job (``python -m fastopt train``): a model factory and a dataset
factory, the built-in ones or one's own by import path.

    from fastopt.train import TrainConfig, fit, make_loader
    result = fit(model, torch.nn.functional.cross_entropy,
                 make_loader(train_set, 64, train=True), make_loader(val_set, 256, train=False),
                 TrainConfig(out="runs/mine", max_steps=2000))
"""

from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_atomic
from .config import (
    EarlyStoppingConfig,
    OptimizerConfig,
    TelemetryConfig,
    TrainConfig,
    build_schedule,
)
from .data import BatchStream, ResumableDistributedSampler, make_loader
from .early_stopping import EarlyStopping
from .errors import ConfigError
from .jobs import JobData, config_from_dict, cross_entropy, load_config, run_job
from .loop import FitResult, ResumeWarning, fit
from .metrics import MetricsLogger, read_metrics
from .plots import plot_run
from .schedules import (
    ConstantWarmup,
    Cyclical,
    ExponentialDecay,
    ReduceOnPlateau,
    ScheduleLR,
    StepDecay,
    WarmupCosine,
    WarmupLinear,
)

__all__ = [
    "BatchStream",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "ConstantWarmup",
    "Cyclical",
    "EarlyStopping",
    "EarlyStoppingConfig",
    "ExponentialDecay",
    "FitResult",
    "JobData",
    "MetricsLogger",
    "OptimizerConfig",
    "ReduceOnPlateau",
    "ResumableDistributedSampler",
    "ResumeWarning",
    "ScheduleLR",
    "StepDecay",
    "TelemetryConfig",
    "TrainConfig",
    "WarmupCosine",
    "WarmupLinear",
    "build_schedule",
    "config_from_dict",
    "cross_entropy",
    "fit",
    "load_checkpoint",
    "load_config",
    "make_loader",
    "plot_run",
    "read_metrics",
    "run_job",
    "save_atomic",
]
