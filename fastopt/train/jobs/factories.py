"""The factories a config names, checked and called, and the configs read with them.

A factory's parameters are its section's keys (``model`` for the model factory, ``data``
for the dataset factory): an unknown key is refused when the config is read, and the defaults
are written out, so ``--print-config`` and ``run.json`` show them all. See
:mod:`fastopt.train.jobs` for what a factory is called with and returns.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, coerce, merge_config, parse_config, read_config_file
from ..errors import ConfigError
from .job_data import JobData
from .presets import JOBS, LOADER_DEFAULTS, job_preset

__all__ = [
    "build_job",
    "check_sections",
    "checked",
    "config_from_dict",
    "import_factory",
    "load_config",
]


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
                value = coerce(value, hints[key], f"{name}.{key}")
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


def checked(config: TrainConfig) -> TrainConfig:
    """``config`` with its ``data`` and ``model`` sections checked against the job's
    factories and their defaults filled in (this imports the factories: a bad path fails
    here)."""
    data, model = check_sections(config)
    return dataclasses.replace(config, data=data, model=model)


def config_from_dict(data: dict[str, Any], cls: type | None = None, *, prefix: str = ""):
    """Builds ``cls`` (default :class:`~fastopt.train.TrainConfig`) from a mapping, checking
    every key; a ``TrainConfig``'s ``data`` and ``model`` sections against its job's
    factories, with their defaults filled in."""
    config = parse_config(data, cls, prefix=prefix)
    return checked(config) if isinstance(config, TrainConfig) else config


def load_config(
    path: str | os.PathLike | None = None, *, base: dict[str, Any] | None = None, **overrides
) -> TrainConfig:
    """Reads a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; ``overrides`` (top-level
    keys such as ``out`` or ``max_steps``) win over the file. ``base``: a config mapping
    (a run's recorded one, to resume it) that the file's keys update section by section;
    without one, the job's preset for the device is the base."""
    data = {}
    if path is not None:
        data = read_config_file(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base is None:
        base = job_preset({**data, **overrides})
    data = merge_config(dict(base), data)
    data.update(overrides)
    return config_from_dict(data)
