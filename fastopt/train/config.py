"""The trainer's configuration: dataclasses with typed fields, and their parsing from a mapping
or a YAML or TOML file.

Every key is checked: an unknown key is named with the valid ones listed, a value of the wrong
type is named with the type it should have, and nothing falls back silently. Errors are
:class:`~fastopt.train.errors.ConfigError`, a ``ValueError`` (the CLI turns them into exit
code 2).

This module is the schema alone. ``job``, ``model_factory``, ``dataset_factory`` and the
``data`` and ``model`` sections say what ``python -m fastopt train`` trains; they are checked
against the factories, and the job's preset applied, by :mod:`fastopt.train.jobs`
(``fastopt.train.config_from_dict`` and ``load_config``), so that a :class:`TrainConfig` for
:func:`fastopt.train.fit` with your own model imports no job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .early_stopping import EarlyStopping
from .errors import ConfigError
from .schedules import SCHEDULES

__all__ = [
    "NOT_FINGERPRINTED",
    "NOT_FINGERPRINTED_OPTIMIZER",
    "EarlyStoppingConfig",
    "OptimizerConfig",
    "TelemetryConfig",
    "TrainConfig",
    "build_early_stopping",
    "build_schedule",
    "coerce",
    "config_to_dict",
    "fingerprint",
    "flatten",
    "merge_config",
    "parse_config",
    "pinned_config",
    "read_config_file",
]


@dataclass
class OptimizerConfig:
    name: Literal["fastopt.AdamW", "torch.optim.AdamW", "torch.optim.SGD"] = "fastopt.AdamW"
    lr: float = 3e-3  # the peak: schedules multiply it
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
    max_grad_norm: float | None = 1.0  # global-norm clipping; None: no clipping
    # The common recipe (nanoGPT, minGPT): decay the weight matrices only, none on biases,
    # norms and embeddings. false: every param in one group with weight_decay.
    decay_matrices_only: bool = True
    # fastopt.AdamW's memory-lean settings: an exact fp32 master of bf16/fp16 params (fp32
    # params, the trainer's, need none), the moments' storage (null: the params' dtype), the
    # size under which "int8" keeps fp32 moments, and stochastic rounding of bf16 stores. Under
    # fsdp2 every one updates and resumes as in one process (README, "8-bit moments").
    master_weights: bool = False
    state_dtype: Literal["float32", "bfloat16", "int8"] | None = None
    min_8bit_size: int = 4096
    stochastic_rounding: bool = False
    # The state in host memory and the update on the CPU kernel, for params on a GPU, and
    # that update overlapped with the next forward (the result is the same either way;
    # README "Fitting a bigger model").
    offload: bool = False
    overlap: bool = False


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 5  # evaluations
    min_delta: float = 0.0
    restore_best: bool = True
    stop_on_nonfinite: bool = True
    divergence_threshold: float | None = None


@dataclass
class TelemetryConfig:
    enabled: bool = True  # per-group norms, update ratios, rates, memory (fastopt.train.telemetry)
    per: Literal["group", "layer"] = "group"  # gradient norms and update ratios per ...


DEFAULT_WARMUP_STEPS = 50


@dataclass
class TrainConfig:
    out: str = "runs/default"
    max_steps: int = 3000  # optimizer steps (attempted; a skipped step counts)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu; or any torch device string
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast; fp16: + loss scaling
    grad_accum_steps: int = 2  # loader batches per optimizer step
    # Split each loader batch into micro-batches of at most this many samples (the update is
    # the same; see fastopt.train.microbatch). None: whole batches, halved on out-of-memory;
    # "auto": the largest that fits, found before the first step.
    micro_batch_size: int | Literal["auto"] | None = None
    min_micro_batch_size: int = 1  # out-of-memory below it is an error
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 500  # 0: only at the end, on a signal and on a new best
    keep_last: int = 2
    # true: a tqdm bar; null: a bar when stderr is a terminal, else a line per logged step;
    # false: neither.
    progress: bool | None = None
    tensorboard: bool = False  # also write TensorBoard events to out/tensorboard
    plots: bool = True  # loss, lr and gradient-norm PNGs at the end of the run
    tracking: Literal["none", "mlflow"] = "none"  # mlflow: a local file store in out/mlruns
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # {"name": ..., fields of that schedule}; null: warmup_cosine with a floor of 0.05 and
    # min(50, max_steps // 10) warm-up steps. total_steps defaults to max_steps.
    schedule: dict[str, Any] | None = None
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # How the model is spread over torchrun's processes (fastopt.train.strategy): "auto" is
    # "ddp" under torchrun and "single" otherwise; "fsdp2" shards it (on any number of ranks,
    # and its checkpoints resume on any number).
    parallel: Literal["auto", "single", "ddp", "fsdp2"] = "auto"
    job: Literal["gpt", "mlp"] = "gpt"  # the built-in model and data (fastopt.train.jobs)
    model_factory: str | None = None  # "package.module:function"; None: the job's
    dataset_factory: str | None = None  # "package.module:function"; None: the job's
    # The factories' keyword arguments (and in data, the loaders' batch_size, val_batch_size
    # and num_workers); the factories' defaults are filled in.
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "grad_accum_steps",
            "eval_every",
            "log_every",
            "keep_last",
            "min_micro_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.micro_batch_size, int) and self.micro_batch_size < 1:
            raise ConfigError(
                f"config key 'micro_batch_size' must be >= 1, 'auto' or null, got "
                f"{self.micro_batch_size}"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"config key 'checkpoint_every' must be >= 0, got {self.checkpoint_every}"
            )
        # np.random.seed takes [0, 2**32) (the trainer seeds it with seed + rank, mod 2**32).
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"config key 'seed' must be in [0, 2**32), got {self.seed}")
        opt = self.optimizer
        if not (math.isfinite(opt.lr) and opt.lr >= 0):
            raise ConfigError(
                f"config key 'optimizer.lr' must be a finite number >= 0, got {opt.lr}"
            )
        for i, beta in enumerate(opt.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(
                    f"config key 'optimizer.betas' must be in [0, 1), got {beta} at index {i}"
                )
        for name in ("eps", "weight_decay", "momentum"):
            if not getattr(opt, name) >= 0:
                raise ConfigError(
                    f"config key 'optimizer.{name}' must be >= 0, got {getattr(opt, name)}"
                )
        if opt.max_grad_norm is not None and not opt.max_grad_norm > 0:
            raise ConfigError("config key 'optimizer.max_grad_norm' must be > 0 or null")
        if opt.min_8bit_size < 0:
            raise ConfigError(
                f"config key 'optimizer.min_8bit_size' must be >= 0, got {opt.min_8bit_size}"
            )
        lean = [key for key in ("master_weights", "state_dtype", "stochastic_rounding", "offload",
                                "overlap") if getattr(opt, key) not in (False, None)]  # fmt: skip
        if lean and opt.name != "fastopt.AdamW":
            raise ConfigError(
                f"config key 'optimizer.{lean[0]}' is a setting of fastopt.AdamW, not of {opt.name}"
            )
        if opt.overlap and not opt.offload:
            raise ConfigError("config key 'optimizer.overlap' needs 'optimizer.offload: true'")
        if opt.overlap and self.parallel == "fsdp2":
            raise ConfigError("config key 'optimizer.overlap' does not take parallel 'fsdp2' "
                              "(sharded params) yet; use offload without overlap")  # fmt: skip
        if self.schedule is None:
            warmup = min(DEFAULT_WARMUP_STEPS, self.max_steps // 10)
            self.schedule = {"name": "warmup_cosine", "warmup_steps": warmup, "min_ratio": 0.05}
        build_schedule(self.schedule, self.max_steps)  # fails here, not mid-run
        try:
            build_early_stopping(self.early_stopping)
        except ValueError as e:
            raise ConfigError(f"config section 'early_stopping': {e}") from None


# -- checking values against annotations ---------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _type_name(a) for a in typing.get_args(tp)
        )
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__}")
        return parse_config(value, tp, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    hint = ""
    if isinstance(value, str) and "float" in _type_name(tp):
        try:
            float(value)
            hint = " (YAML 1.1 reads 3e-3 as a string: write 3.0e-3)"
        except ValueError:
            pass
    raise ConfigError(
        f"config key {key!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}"
    )


def parse_config(data: dict[str, Any], cls: type = None, *, prefix: str = ""):
    """Builds ``cls`` (default :class:`TrainConfig`) from a mapping, checking every key
    against the schema (the ``data`` and ``model`` sections are the jobs' to check)."""
    cls = TrainConfig if cls is None else cls
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config key {prefix + missing[0]!r} is required")
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            where = f" in section {prefix[:-1]!r}" if prefix else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}{where}; valid keys: {', '.join(valid)}"
            )
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def config_to_dict(config) -> dict[str, Any]:
    """A plain, JSON-ready mapping (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def _yaml_problem(e) -> str:
    """A YAML error on one line: where and what (PyYAML's own message spans several lines,
    quoting the source)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        where += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return where


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file, UTF-8 encoded."""
    path = Path(path)
    name = repr(str(path))
    if not path.exists():
        raise ConfigError(f"config file {name} does not exist")
    mode = path.stat().st_mode
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise ConfigError(f"config file {name} is {kind}, not a regular file")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {name}: expected .yaml, .yml or .toml")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")  # what TOML requires; not the locale's encoding
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from None
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {name} is not valid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {name} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping at the top level")
    return data


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s keys, section by section (``schedule`` is replaced whole:
    which keys it has depends on its name)."""
    merged = dict(base)
    for key, value in update.items():
        if key != "schedule" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def build_early_stopping(es: EarlyStoppingConfig) -> EarlyStopping:
    """The early-stopping object the ``early_stopping`` section describes (``enabled`` aside:
    the loop also tracks the best step with it when stopping is off)."""
    return EarlyStopping(
        es.monitor,
        es.mode,
        es.patience,
        es.min_delta,
        es.restore_best,
        es.stop_on_nonfinite,
        es.divergence_threshold,
    )


# -- schedules from the config -------------------------------------------------------------
def build_schedule(spec: dict[str, Any], max_steps: int):
    """The schedule named by ``spec["name"]`` with the other keys as its fields, checked.
    ``total_steps`` defaults to ``max_steps`` for the schedules that have one."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in SCHEDULES:
        raise ConfigError(
            f"config key 'schedule.name' must be one of {', '.join(SCHEDULES)}, got {name!r}"
        )
    cls = SCHEDULES[name]
    if "total_steps" in {f.name for f in dataclasses.fields(cls)}:
        spec.setdefault("total_steps", max_steps)
    try:
        return parse_config(spec, cls, prefix="schedule.")
    except ConfigError as e:
        if "valid keys" in str(e):
            raise ConfigError(f"{e} (and name) for schedule {name!r}") from None
        if "is required" in str(e):
            raise ConfigError(f"{e} by schedule {name!r}") from None
        raise
    except ValueError as e:  # the schedule's own range checks
        raise ConfigError(f"config key 'schedule' ({name}): {e}") from None


# -- run identity -------------------------------------------------------------------------
# Keys that change how a run is shown, where it goes or how often it is saved, not what it
# computes: a resumed run may change them. (Logging and checkpointing draw no random numbers
# and change no weights; eval_every does change the result, through early stopping and the
# plateau schedule.) max_steps only says where the run ends, once its schedule's horizon is
# written out (pinned_config): a resumed run may extend it, never shorten it.
NOT_FINGERPRINTED = (
    "out",
    "max_steps",
    "progress",
    "tensorboard",
    "plots",
    "log_every",
    "checkpoint_every",
    "keep_last",
    "tracking",
    "telemetry",  # it reads gradients and weights, and changes neither
)
# Optimizer keys that say where and when the update runs, never what it computes: a resumed
# run may switch them too.
NOT_FINGERPRINTED_OPTIMIZER = ("offload", "overlap")


def flatten(d: dict[str, Any], prefix: str = "", *, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (``optimizer.lr``); the sections named in
    ``keep`` stay whole values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in keep:
            out.update(flatten(v, f"{prefix}{k}.", keep=keep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pinned_config(config: TrainConfig) -> dict[str, Any]:
    """:func:`config_to_dict` with the schedule's ``total_steps`` written out where it
    defaults to ``max_steps``: the form a run folder records, so that resuming with a larger
    ``max_steps`` keeps the schedule the run had (past its horizon a schedule holds its last
    value)."""
    data = config_to_dict(config)
    spec = data["schedule"]
    fields = {f.name for f in dataclasses.fields(SCHEDULES[spec["name"]])}
    if "total_steps" in fields and "total_steps" not in spec:
        data["schedule"] = {**spec, "total_steps": config.max_steps}
    return data


# Optimizer keys added after runs were first recorded, left out of the fingerprint at their
# defaults so that those runs resume (NOT_FINGERPRINTED_OPTIMIZER never are).
_LATER_OPTIMIZER_DEFAULTS = dict(master_weights=False, state_dtype=None, min_8bit_size=4096,
                                 stochastic_rounding=False)  # fmt: skip


def fingerprint(config: TrainConfig, extra: dict[str, Any] | None = None) -> str:
    """A hash of everything that determines the run's result (config, model and optimizer
    signatures in ``extra``), to refuse resuming a different run."""
    data = {k: v for k, v in pinned_config(config).items() if k not in NOT_FINGERPRINTED}
    if data.get("parallel") == "auto":  # the default, so that runs from before the key resume
        del data["parallel"]
    optimizer = {k: v for k, v in data.get("optimizer", {}).items()
                 if k not in NOT_FINGERPRINTED_OPTIMIZER and not (k in _LATER_OPTIMIZER_DEFAULTS
                                            and v == _LATER_OPTIMIZER_DEFAULTS[k])}  # fmt: skip
    if "optimizer" in data:
        data["optimizer"] = optimizer
    blob = json.dumps({"config": data, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
