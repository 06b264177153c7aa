"""The pieces :func:`fastopt.train.fit` is assembled from, each small enough to read alone:
optimizer construction, the optimizer step for fastopt and for other optimizers, evaluation,
the signal guard and the run folder's identity check."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastopt.sharded import is_dtensor

from . import distributed as D
from .checkpoint import write_atomic
from .config import (
    NOT_FINGERPRINTED,
    NOT_FINGERPRINTED_OPTIMIZER,
    OptimizerConfig,
    TrainConfig,
    fingerprint,
    flatten,
    pinned_config,
)
from .data import sample_count
from .errors import ConfigError

__all__ = [
    "NO_CLIP",
    "SignalGuard",
    "autocast",
    "build_optimizer",
    "claim_run_dir",
    "clip_norm",
    "evaluate",
    "is_fastopt",
    "optimizer_step",
    "param_groups",
    "read_run_record",
    "resolve_device",
    "to_device",
]

RUN_FILE = "run.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"config key 'device': {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {name!r} but no CUDA GPU is available")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast for the forward pass and loss; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


# The max_grad_norm the trainer gives fastopt.AdamW when nothing is clipped. fastopt.AdamW
# looks for inf/NaN gradients only in the read pass that computes their global norm, and runs
# that pass only to clip (or to unscale fp16): with no clipping a NaN step would be applied.
# With an infinite max_grad_norm the pass runs, a non-finite step is skipped on the device and
# the norm is there to log, yet nothing is ever clipped: the clip factor
# max_grad_norm / (norm + 1e-6) is then inf (or NaN when the norm is inf), never < 1
# (fastopt.reference.grad_coefficient). The cost is that one read of the gradients.
NO_CLIP = math.inf


def clip_norm(max_grad_norm: float | None) -> float | None:
    """The clipping threshold, None when nothing is clipped (None and inf both mean that)."""
    return None if max_grad_norm is None or max_grad_norm == NO_CLIP else max_grad_norm


def is_fastopt(optimizer: torch.optim.Optimizer) -> bool:
    """A fastopt optimizer clips, unscales and skips inside its step and takes a
    GradAccumulator."""
    return hasattr(optimizer, "_accumulator") and hasattr(optimizer, "last_grad_norm")


def param_groups(model: nn.Module, weight_decay: float, matrices_only: bool) -> list[dict]:
    """The trainable params as optimizer groups named "decay" and "no_decay": with
    ``matrices_only``, params of two or more dimensions outside ``nn.Embedding`` modules are
    decayed and biases, norm weights and embeddings are not (empty groups are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not matrices_only:
        return [{"params": params, "weight_decay": weight_decay, "name": "all"}]
    embeddings = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    chosen = {id(p) for p in decay}
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0,
         "name": "no_decay"},
    ]  # fmt: skip
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, seed: int = 0) -> torch.optim.Optimizer:
    """The configured optimizer on ``model``'s params. ``seed`` keys fastopt's rounding noise
    (the run's seed: the same on every rank, so a sharded run rounds as one process does)."""
    params = param_groups(model, cfg.weight_decay, cfg.decay_matrices_only)
    if cfg.name == "fastopt.AdamW":
        import fastopt

        state_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            cfg.state_dtype, cfg.state_dtype
        )
        return fastopt.AdamW(
            params,
            lr=cfg.lr,
            betas=tuple(float(b) for b in cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            master_weights=cfg.master_weights,
            state_dtype=state_dtype,
            min_8bit_size=cfg.min_8bit_size,
            stochastic_rounding=cfg.stochastic_rounding,
            seed=seed if cfg.stochastic_rounding or cfg.state_dtype == "int8" else None,
            offload=cfg.offload,
        )
    if cfg.name == "torch.optim.AdamW":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "torch.optim.SGD":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ConfigError(f"config key 'optimizer.name': unknown optimizer {cfg.name!r}")


def optimizer_step(
    optimizer, scaler, params: list[torch.Tensor], max_grad_norm: float | None
) -> tuple[bool, torch.Tensor | None]:
    """One optimizer step in nanoGPT's order (unscale, clip, step, update, zero_grad).

    Returns (applied, grad_norm): ``applied`` is False when the step was skipped for inf/NaN
    gradients; ``grad_norm`` is the pre-clip, unscaled global norm when it was computed.
    """
    if is_fastopt(optimizer):
        # Unscale, non-finite check, clip and skip all happen inside the fused step.
        scaler.step(optimizer)
        found_inf = scaler.last_found_inf if scaler.is_enabled() else optimizer.last_found_inf
        grad_norm = optimizer.last_grad_norm
    else:
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if max_grad_norm is not None and grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
        if is_dtensor(grad_norm):  # of FSDP2's shards: the whole model's, once reduced
            grad_norm = grad_norm.full_tensor()
        if scaler.is_enabled():
            scaler.step(optimizer)  # skips by itself when unscale_ found inf/NaN
            found_inf = scaler.last_found_inf
        else:
            found_inf = None if grad_norm is None else (~torch.isfinite(grad_norm)).float()
            if found_inf is None or not found_inf.item():
                optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    applied = found_inf is None or not bool(found_inf.item())
    return applied, grad_norm


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn, loader, device: torch.device, precision: str, *, lockstep=False
) -> float:
    """The sample-weighted mean loss over ``loader``, summed over all ranks. ``lockstep``:
    every rank runs as many forward passes as the rank with the most batches (a sharded
    model's forward is a collective; a rank out of batches repeats its last one, unweighted)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    batches, last = iter(loader), None
    while True:
        batch = next(batches, None)
        if lockstep and D.any_rank(batch is not None, device):
            if batch is None and last is None:
                raise ValueError(f"the validation loader yields no batch on rank {D.rank()}")
            weight, batch = (1, batch) if batch is not None else (0, last)
        elif batch is None:
            break
        else:
            weight = 1
        last = inputs, targets = batch
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        with autocast(device, precision):
            loss = loss_fn(model(inputs), targets)
        if weight:
            n = sample_count(targets)
            sums[0] += loss.double() * n
            sums[1] += n
    D.all_reduce_sum(sums)
    model.train(was_training)
    if sums[1].item() == 0:
        raise ValueError("the validation loader yields no samples")
    return float(sums[0] / sums[1])


class SignalGuard:
    """Turns SIGTERM and SIGINT into a flag the loop reads between steps (a second signal gets
    the previous handler: a second Ctrl-C interrupts at once). Only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


def _check_folder(out: Path) -> None:
    """``out`` is a folder or can be made one (else mkdir would fail later with a
    FileExistsError or NotADirectoryError traceback)."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                kind = "a file, not a folder" if path.is_file() else "not a folder"
                where = "" if path == out else f"{out} cannot be a run folder: "
                raise ConfigError(f"{where}{path} is {kind}; choose another --out")
            return


def read_run_record(out: Path) -> dict[str, Any]:
    """``out/run.json``: the run's fingerprint, config and identity. ConfigError when the
    folder holds no run or its run.json does not read."""
    out = Path(out)
    _check_folder(out)
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise ConfigError(f"nothing to resume: {out} holds no run ({RUN_FILE} is missing)")
    text = run_file.read_bytes()
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        if not isinstance(record.get("config"), dict) or "fingerprint" not in record:
            raise ValueError("no 'fingerprint' and 'config'")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        what = "empty" if not text.strip() else f"damaged ({type(e).__name__}: {e})"
        raise ConfigError(
            f"{run_file} is {what}, so nothing says which run {out} holds: delete the folder "
            "to start the run again, or choose another --out"
        ) from None
    return record


def claim_run_dir(
    out: Path,
    config: TrainConfig,
    identity: dict[str, Any],
    resume: bool,
    *,
    started: dict[str, Any] | None = None,
) -> str:
    """Checks that ``out`` is free (fresh run) or holds this same run (``resume``, perhaps with
    a larger ``max_steps``), and records the run's identity in ``out/run.json``, atomically.
    ``started``: facts about how the run started that are not its identity (recorded by the
    fresh run, kept as recorded by a resumed one). Returns the fingerprint."""
    _check_folder(out)
    fp = fingerprint(config, identity)
    record = {"fingerprint": fp, "config": pinned_config(config), **identity, **(started or {})}
    run_file = out / RUN_FILE
    saved = None
    if resume:
        saved = read_run_record(out)
        record.update({k: saved[k] for k in started or {} if k in saved})
        if saved["fingerprint"] != fp:
            # A schedule is one value: which keys it has depends on its name.
            old = flatten({**saved["config"], **{k: saved.get(k) for k in identity}},
                          keep=("schedule",))  # fmt: skip
            new = flatten({**record["config"], **identity}, keep=("schedule",))
            diff = [
                f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                for k in sorted(set(old) | set(new))
                if k not in NOT_FINGERPRINTED
                and k not in [f"optimizer.{key}" for key in NOT_FINGERPRINTED_OPTIMIZER]
                and old.get(k) != new.get(k)
            ]
            listed = "; ".join(diff) or "none in the config (another fastopt version?)"
            raise ConfigError(
                f"{out} holds a different run (fingerprint {saved['fingerprint']} there, {fp} "
                f"now); differences: {listed}"
            )
        before = saved["config"].get("max_steps")
        if isinstance(before, int) and config.max_steps < before:
            raise ConfigError(
                f"{out} holds a run of max_steps {before}: a resumed run may extend it, "
                f"not shorten it to {config.max_steps}"
            )
    else:
        if run_file.exists():
            read_run_record(out)  # a damaged run.json says so, rather than "resume it"
        taken = [n for n in (RUN_FILE, "metrics.jsonl", "checkpoints") if (out / n).exists()]
        if taken:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(taken)}); resume it "
                "(--resume) or choose another --out"
            )
    D.barrier()  # every rank has checked before rank 0 writes
    # A resumed run with a new max_steps (or log_every, ...) records the run as it goes on.
    if D.rank() == 0 and record != saved:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic((json.dumps(record, indent=2) + "\n").encode(), run_file)
    return fp


def model_signature(model: nn.Module) -> list[str]:
    return [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()]


def lr_of(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
