"""What ``python -m fastopt train`` trains: a model factory and a dataset factory.

A job names both by import path. ``gpt`` (the default) is a character-level GPT on the
standard library's ``.py`` sources; ``mlp`` an MLP on generated data, the fastest smoke test.
``model_factory`` and ``dataset_factory`` (``"package.module:function"``) replace either with
your own, so a model of yours trains under ``python -m fastopt train`` with every feature of
the trainer:

* the dataset factory is called with the ``data`` section's keys (less the loader's:
  ``batch_size``, ``val_batch_size``, ``num_workers``), and ``seed=`` the config's seed when
  it has a ``seed`` parameter. It returns a :class:`JobData` or a tuple
  ``(train, val[, test])`` of datasets yielding ``(inputs, targets)``.
* the model factory is called with the ``model`` section's keys and the data's
  ``model_args`` (the vocabulary size, say); it returns an ``nn.Module`` whose output the
  loss, cross-entropy over the last dimension, takes with the targets.

A factory's parameters are the section's keys: an unknown key is refused when the config is
read, and the defaults are written out, so ``--print-config`` and ``run.json`` show them all.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, _coerce

__all__ = [
    "JOBS",
    "LOADER_DEFAULTS",
    "Job",
    "JobData",
    "check_sections",
    "cross_entropy",
    "import_factory",
    "job_preset",
    "run_job",
]

# The data section's keys that the trainer's loaders take (the rest go to the factory).
LOADER_DEFAULTS = {"batch_size": 128, "val_batch_size": 1024, "num_workers": 0}


@dataclass
class JobData:
    """What a dataset factory returns. ``test``: evaluated once at the end. ``model_args``:
    keyword arguments for the model factory. ``decode`` (token ids to text) and ``prompt``
    (1-D token ids): with both, and a model with a ``generate(ids, n)`` method, the end of the
    run prints a sample. ``baseline``: a loss to compare with (default: ln of
    ``model_args["vocab_size"]``, a uniform guess)."""

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    decode: Callable[[Any], str] | None = None
    prompt: torch.Tensor | None = None
    baseline: float | None = None


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
    from .components import resolve_device

    job = given.get("job", "gpt")
    if job not in JOBS:
        raise ConfigError(f"config key 'job' must be one of {', '.join(JOBS)}, got {job!r}")
    preset = JOBS[job].preset(resolve_device(given.get("device", "auto")))
    if given.get("model_factory") is not None:
        preset.pop("model", None)
    if given.get("dataset_factory") is not None and "data" in preset:
        preset["data"] = {k: v for k, v in preset["data"].items() if k in LOADER_DEFAULTS}
    return preset


def import_factory(path: Any, key: str) -> Callable:
    """The callable at ``"package.module:name"``; a one-line ConfigError naming ``key``."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"config key {key!r} must be 'package.module:function', got {path!r}")
    module_name, name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise ConfigError(
            f"config key {key!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    factory = module
    for part in name.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"config key {key!r}: {module_name!r} has no attribute {name!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"config key {key!r}: {path!r} is not callable")
    return factory


def _check_keys(factory: Callable, path: str, section: dict, name: str, given: tuple = ()):
    """``section`` checked against ``factory``'s parameters (typed by its annotations where
    they are plain types), with the defaults of the ones it lacks filled in. ``given``:
    parameters the trainer passes itself."""
    signature = inspect.signature(factory)
    params = {
        n: p
        for n, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) and n not in given
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations that do not resolve: check names only
        hints = {}
    out = {}
    for key, value in section.items():
        if key not in params and not takes_any:
            valid = ", ".join(params) or "none"
            raise ConfigError(f"unknown config key '{name}.{key}' for {path}; valid keys: {valid}")
        if key in hints:
            try:
                value = _coerce(value, hints[key], f"{name}.{key}")
            except TypeError:  # an annotation the config cannot express: the factory checks
                pass
        out[key] = value
    for key, p in params.items():
        if key not in out and p.default is not p.empty:
            out[key] = p.default
    return out


def _factories(config) -> tuple[tuple[str, Callable], tuple[str, Callable]]:
    job = JOBS[config.job]
    model_path = config.model_factory or job.model_factory
    data_path = config.dataset_factory or job.dataset_factory
    return (
        (model_path, import_factory(model_path, "model_factory")),
        (data_path, import_factory(data_path, "dataset_factory")),
    )


def check_sections(config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``data`` and ``model`` sections checked against the factories, defaults filled."""
    (model_path, model_fn), (data_path, data_fn) = _factories(config)
    data = dict(config.data)
    loader = {k: data.pop(k, default) for k, default in LOADER_DEFAULTS.items()}
    for key, value in loader.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key 'data.{key}' must be int, got {value!r}")
        least = 0 if key == "num_workers" else 1
        if value < least:
            raise ConfigError(f"config key 'data.{key}' must be >= {least}, got {value}")
    data = _check_keys(data_fn, f"dataset factory {data_path}", data, "data", given=("seed",))
    model = _check_keys(model_fn, f"model factory {model_path}", dict(config.model), "model")
    return {**loader, **data}, model


def _call(factory: Callable, path: str, kwargs: dict[str, Any]):
    """Calls a factory; what it raises becomes one line naming it (its own ConfigErrors pass)."""
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path} raised {type(e).__name__}: {e}") from None


def _as_job_data(data: Any, path: str) -> JobData:
    if isinstance(data, JobData):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return JobData(*data)
    raise ConfigError(
        f"dataset factory {path} returned {type(data).__name__}: expected a JobData or a "
        "tuple (train, val) or (train, val, test)"
    )


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: (batch, classes) logits with (batch,) targets,
    or (batch, time, vocab) with (batch, time)."""
    return nn.functional.cross_entropy(output.flatten(0, -2).float(), target.flatten())


def build_job(config) -> tuple[nn.Module, JobData]:
    """The model and data the config's job (or factories) describe."""
    (model_path, model_fn), (data_path, data_fn) = _factories(config)
    kwargs = {k: v for k, v in config.data.items() if k not in LOADER_DEFAULTS}
    if "seed" in inspect.signature(data_fn).parameters:
        kwargs["seed"] = config.seed
    data = _as_job_data(_call(data_fn, f"dataset factory {data_path}", kwargs), data_path)
    if len(data.train) < config.data["batch_size"]:
        raise ConfigError(
            f"the training set has {len(data.train)} samples, fewer than "
            f"data.batch_size = {config.data['batch_size']}"
        )
    both = sorted(set(data.model_args) & set(config.model))
    if both:
        raise ConfigError(
            f"config key 'model.{both[0]}' is set by the data ({data.model_args[both[0]]!r}); "
            "leave it out of the model section"
        )
    torch.manual_seed(config.seed)  # the model's initial weights
    model = _call(model_fn, f"model factory {model_path}", {**data.model_args, **config.model})
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {model_path} returned {type(model).__name__}, not a torch nn.Module"
        )
    if data.baseline is None and "vocab_size" in data.model_args:
        data = dataclasses.replace(data, baseline=math.log(data.model_args["vocab_size"]))
    return model, data


def _rank_batch(config, resume: bool) -> int:
    """Each rank's training batch: ``data.batch_size``, or for a run whose checkpoints reshard
    (``parallel: fsdp2``) resumed on another number of ranks, the share of the global batch
    (``data.batch_size`` times the ranks it started on) that keeps it the same."""
    from . import distributed as D
    from .components import read_run_record

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
    set and draws a sample (set on the returned :class:`FitResult`)."""
    from . import distributed as D
    from .components import evaluate
    from .data import make_loader
    from .fsdp import is_sharded
    from .loop import fit

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
