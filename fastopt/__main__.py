"""Command line: ``python -m fastopt {info,bench,train,plot}`` (also the ``fastopt`` script)."""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """usage: python -m fastopt [--version] COMMAND [options]

commands:
  info    torch and CUDA versions, and which backends are available and why not
  bench   time fastopt's AdamW against torch's for-loop, foreach and fused AdamW
  train   run the trainer (the default job unless --config says otherwise)
  plot    redraw the loss and learning-rate plots of a run directory
"""


def info(argv: list[str]) -> int:
    import argparse
    import platform

    parser = argparse.ArgumentParser(
        prog="python -m fastopt info",
        description="torch and CUDA versions, and which backends are available and why not",
    )
    try:
        parser.parse_args(argv)  # no options: refuses any, as the other commands do
    except SystemExit as e:  # argparse already printed the usage error or the help
        return int(e.code or 0)

    import torch

    import fastopt
    from fastopt._build import build_info
    from fastopt.backends import BACKENDS, availability

    print(f"fastopt {fastopt.__version__}")
    info = build_info()
    if info is None:
        print("built: unknown (no fastopt/_build_info.json: not built, or an older build)")
    else:
        commit = (info["git_commit"] or "unknown")[:12]
        modified = " (with uncommitted changes)" if info["git_dirty"] else ""
        print(f"built: fastopt {info['version']} from commit {commit}{modified}")
        target, limited = info["stable_abi_target"], info["python_limited_api"]
        print(f"  against torch {info['torch']} (stable ABI: loads into torch >= {target}), "
              f"CPython limited API {limited}")  # fmt: skip
        if info["cuda"]:
            print(f"  CUDA {info['cuda']}, architectures {info['cuda_archs']}")
        else:
            print("  CUDA: none (CPU kernels only)")
        print(f"  compilers: {info['cxx']}" + (f"; {info['nvcc']}" if info["nvcc"] else ""))
    print(f"running: python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA build {torch.version.cuda or 'none'}")  # fmt: skip
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")  # fmt: skip
    else:
        print("GPU: none visible")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    gpu = torch.cuda.is_available()
    print("\nbackend     device  usable here  why")
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            ok, why = availability(name, device)
            if ok and device == "cuda" and not gpu:
                # availability() says what the software supports; here it has nothing to run on.
                ok, why = False, f"no CUDA GPU is visible (with one: {why})"
            print(f"{name:<11} {device:<7} {'yes' if ok else 'no':<12} {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "--version":
        import fastopt

        print(f"fastopt {fastopt.__version__}")
        return 0
    if command == "info":
        return info(rest)
    if command == "bench":
        from fastopt.bench_cli import main as bench_main

        return bench_main(rest)
    if command in ("train", "plot"):
        from fastopt.train.cli import main as train_main

        return train_main([command, *rest])
    print(f"fastopt: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
