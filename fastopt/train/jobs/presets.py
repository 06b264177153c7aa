"""The built-in jobs (``gpt``, ``mlp``): their factories by import path and their config
presets per device, the defaults :func:`~fastopt.train.jobs.load_config` starts from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..components import resolve_device
from ..errors import ConfigError

__all__ = ["JOBS", "LOADER_DEFAULTS", "Job", "job_preset"]

# The data section's keys that the trainer's loaders take (the rest go to the factory).
LOADER_DEFAULTS = {"batch_size": 128, "val_batch_size": 1024, "num_workers": 0}


@dataclass(frozen=True)
class Job:
    model_factory: str
    dataset_factory: str
    preset: Callable[[torch.device], dict[str, Any]]  # config defaults, per device


def _gpt_preset(device: torch.device) -> dict[str, Any]:
    """The ``gpt`` job's settings: about a minute of training on a 2-core CPU, a
    nanoGPT-shakespeare-char-sized model on a GPU (the schedule: TrainConfig's default,
    warm-up then cosine decay)."""
    common = {
        "eval_every": 100,
        "log_every": 10,
        "grad_accum_steps": 1,
        "optimizer": {"weight_decay": 0.1, "betas": [0.9, 0.99]},
    }
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return {
            **common,
            "max_steps": 5000,
            "eval_every": 250,
            "checkpoint_every": 1000,
            "precision": "bf16" if bf16 else "fp32",
            "optimizer": {**common["optimizer"], "lr": 1e-3},
            "data": {"batch_size": 64, "val_batch_size": 256, "block_size": 256,
                     "val_windows": 1024, "test_windows": 4096},
            "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2},
        }  # fmt: skip
    # On this project's 2-core Xeon (AVX-512 BF16 and AMX), bf16 autocast made this model's
    # training step 17-34% slower than fp32 (torch 2.14, torch.optim.AdamW, 2-4 layers, block
    # 64-128, width 128-192; 43 against 52 ms a step at this job's size but 2 layers): the
    # casts cost more than the small matmuls gain. So the CPU trains in fp32.
    return {
        **common,
        "max_steps": 600,
        "checkpoint_every": 300,
        "precision": "fp32",
        "optimizer": {**common["optimizer"], "lr": 3e-3},
        "data": {"batch_size": 32, "val_batch_size": 128, "block_size": 64},
        "model": {"n_layer": 3, "n_head": 4, "n_embd": 128},
    }


JOBS = {
    "gpt": Job("fastopt.train.gpt:build_model", "fastopt.train.text_data:build_dataset",
               _gpt_preset),
    "mlp": Job("fastopt.train.mlp:build_model", "fastopt.train.mlp:build_dataset",
               lambda device: {}),  # TrainConfig's own defaults are the mlp job's
}  # fmt: skip


def job_preset(given: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the job a config mapping names, on its device, as config keys. The
    preset's keys for a factory the config replaces are left out: they are that job's."""
    job = given.get("job", "gpt")
    if job not in JOBS:
        raise ConfigError(f"config key 'job' must be one of {', '.join(JOBS)}, got {job!r}")
    preset = JOBS[job].preset(resolve_device(given.get("device", "auto")))
    if given.get("model_factory") is not None:
        preset.pop("model", None)
    if given.get("dataset_factory") is not None and "data" in preset:
        preset["data"] = {k: v for k, v in preset["data"].items() if k in LOADER_DEFAULTS}
    return preset
