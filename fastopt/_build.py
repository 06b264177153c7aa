"""What this copy of fastopt was built with: fastopt/_build_info.json, which setup.py writes
beside the compiled libraries at build time (fastopt version and git commit, the torch it was
built against, the stable-ABI target, CUDA version and architectures, compilers).

A source checkout that was never built has none; the libraries are then missing too.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

__all__ = ["build_info", "version_tuple"]

_PATH = Path(__file__).with_name("_build_info.json")


@cache
def build_info() -> dict | None:
    """The build's record, or None when there is none (never built, or built before it existed)."""
    try:
        return json.loads(_PATH.read_text())
    except FileNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, int]:
    """(2, 10) for "2.10", "2.10.0+cu128" or "2.10.0a0": major and minor only."""
    major, minor = (re.match(r"\d+", part).group() for part in version.split(".")[:2])
    return int(major), int(minor)
