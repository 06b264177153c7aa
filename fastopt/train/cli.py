"""``python -m fastopt train`` and ``python -m fastopt plot``.

``--resume`` continues the run in ``--out`` as its ``run.json`` records it: no option needs
repeating. An option or config file given with it may change only what does not change the
result (``log_every``, ``checkpoint_every``, ``keep_last``, ...), or raise ``--max-steps`` to
extend the run (its schedule unchanged: past its horizon it holds its last value).

Exit codes: 0 done; 1 a file could not be written or read (disk full, file-size limit, no
permission: earlier checkpoints are left intact); 2 bad input (unknown config key, wrong
type, missing file, an ``--out`` holding another run); 128 + the signal number when SIGTERM
or SIGINT stopped training after a checkpoint was written (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path

from .errors import ConfigError

__all__ = ["main"]

DEFAULT_OUT = "runs/default"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastopt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,plot}")

    train = sub.add_parser(
        "train", help="train (the default job: a character-level GPT on the stdlib's sources)"
    )
    train.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML file with any TrainConfig keys (see fastopt.train.config)",
    )
    train.add_argument(
        "--out",
        metavar="DIR",
        help=f"run folder: metrics.jsonl, plots, checkpoints/ (default {DEFAULT_OUT})",
    )
    train.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out as it was configured (--max-steps N extends it)",
    )
    train.add_argument(
        "--job",
        choices=["gpt", "mlp"],
        help="what to train: 'gpt' (default; a character-level GPT on the Python standard "
        "library's sources) or 'mlp' (an MLP on generated data: the fastest smoke test)",
    )
    train.add_argument("--device", help="'auto' (default), 'cpu', 'cuda', 'cuda:1', ...")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    train.add_argument(
        "--offload",
        action="store_true",
        help="keep fastopt.AdamW's state in host memory and update on the CPU "
        "(optimizer.offload: true); the result is the same",
    )
    train.add_argument(
        "--overlap",
        action="store_true",
        help="with --offload: run the host's update while the next forward starts "
        "(optimizer.overlap: true); the result is the same",
    )
    train.add_argument(
        "--micro-batch-size",
        type=_micro_batch_size,
        metavar="N|auto",
        help="split each batch into micro-batches of at most N samples (the update is the "
        "same); 'auto': the largest that fits. Default: whole batches, halved on out-of-memory",
    )
    train.add_argument(
        "--tracking",
        choices=["none", "mlflow"],
        help="also log to MLflow's local file store in --out/mlruns (pip install "
        "'fastopt[mlflow]')",
    )
    train.add_argument(
        "--parallel",
        choices=["auto", "single", "ddp", "fsdp2"],
        help="under torchrun: 'ddp' (what 'auto', the default, picks) or 'fsdp2' (shards the "
        "model; its checkpoints resume on any number of processes)",
    )
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (off a terminal: no line per logged step either)",
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the full config as YAML and exit"
    )

    plot = sub.add_parser("plot", help="redraw loss.png, lr.png and grad_norm.png of a run folder")
    plot.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"run folder holding metrics.jsonl (default {DEFAULT_OUT})",
    )
    return parser


def _micro_batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    from . import distributed as D
    from .components import read_run_record
    from .jobs import load_config, run_job

    base = None
    if args.resume:  # the run as it was configured; the options given now update it
        args.out = args.out or DEFAULT_OUT
        base = read_run_record(args.out)["config"]
        base.pop("progress", None)  # whether to draw a bar is the terminal's matter, not the run's
    config = load_config(
        args.config,
        base=base,
        out=args.out,
        max_steps=args.max_steps,
        job=args.job,
        device=args.device,
        precision=args.precision,
        micro_batch_size=args.micro_batch_size,
        tracking=args.tracking,
        parallel=args.parallel,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    if args.offload or args.overlap:
        import dataclasses

        switches = {"offload": True, **({"overlap": True} if args.overlap else {})}
        optimizer = dataclasses.replace(config.optimizer, **switches)
        config = dataclasses.replace(config, optimizer=optimizer)
    if args.print_config:
        import yaml

        from .config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    started = not D.is_distributed() and D.init_from_env()  # a torchrun worker
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(warnings.showwarning)
            result = run_job(config, resume=args.resume)
        code = _report(result, D.rank())
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if started:
        # DDP's reducer keeps the gloo process group alive past destroy_process_group, and its
        # worker threads may still release tensors owned by Python while the interpreter shuts
        # down, which aborts the process (std::terminate; ~1 two-rank run in 10 on a loaded
        # 2-core machine). Everything is written and closed by now: leave without the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _show_warning(show):
    """``warnings.showwarning`` that prints the trainer's notes on resuming as one line each
    (they are for the user, not about a line of code) and passes others to ``show``."""
    from .loop import ResumeWarning

    def _show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ResumeWarning):
            print(f"python -m fastopt train: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return _show


def _report(result, rank: int) -> int:
    """Prints the outcome (rank 0) and returns the exit code."""
    import signal

    if rank != 0:
        return 0 if result.interrupted is None else 128 + _signum(result.interrupted, signal)
    if result.interrupted is not None:
        print(
            f"interrupted by {result.interrupted} at step {result.step}; checkpoint written. "
            f"Continue with: {_resume_command(result.out)}",
            file=sys.stderr,
        )
        return 128 + _signum(result.interrupted, signal)
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    best = "" if result.best is None else f", best {result.best:.4f} at step {result.best_step}"
    print(f"step {result.step}: train loss {result.train_loss:.4f}, val loss {val}{best}")
    if result.stop_reason:
        print(f"stopped early: {result.stop_reason}")
    if result.skipped_steps:
        print(f"{result.skipped_steps} steps skipped for inf/NaN gradients")
    if result.test_loss is not None:
        baseline = "" if result.baseline is None else f" (a uniform guess: {result.baseline:.4f})"
        print(f"test loss {result.test_loss:.4f}{baseline}")
    if result.sample is not None:
        print(f"sample:\n{result.sample}\n")
    written = ["metrics.jsonl", *(p.name for p in result.plots)]
    print(f"wrote {result.out}/{', '.join(written)} and checkpoints/")
    return 0


def _resume_command(out) -> str:
    from . import distributed as D

    launcher = "python -m fastopt"
    if D.world_size() > 1:  # world_size is part of the run's identity
        launcher = f"torchrun --nproc-per-node {D.world_size()} -m fastopt"
    return f"{launcher} train --out {shlex.quote(str(out))} --resume"


def _signum(name: str, signal) -> int:
    try:
        return int(signal.Signals[name])
    except KeyError:  # the signal reached another rank
        return int(signal.SIGTERM)


def _plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    try:
        paths = plot_run(args.out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``train`` or ``plot``; returns the exit code (a torchrun worker exits with it
    instead of returning)."""
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse already printed the usage error or the help
        return int(e.code or 0)
    try:
        return _train(args) if args.command == "train" else _plot(args)
    except ConfigError as e:
        print(f"python -m fastopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, file-size limit, no permission: the run stops here
        from .checkpoint import AtomicWriteError

        hint = ""
        written = Path(str(e.filename))
        if isinstance(e, AtomicWriteError) and written.parent.name == "checkpoints":
            out = written.parent.parent  # out/checkpoints/step_XXXXXXXX(.pt)
            hint = f"; the checkpoints before it are intact: fix that, then {_resume_command(out)}"
        print(f"python -m fastopt {args.command}: error: {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
