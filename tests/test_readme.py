"""Every Python example in README.md runs as written, each in a fresh interpreter.

The README's shell commands are run by the tests of what they do (the trainer's in
tests/train/, the install commands by CI itself); the Python blocks are whole programs a user
pastes, so a name they use and do not define is a bug of the README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[tuple[str, str]]:
    """(the section heading above it, the code) for each ```python block of README.md."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append((headings[-1] if headings else "top", match.group(1)))
    return blocks


BLOCKS = _python_blocks()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4, [heading for heading, _ in BLOCKS]


@pytest.mark.parametrize(
    "code", [code for _, code in BLOCKS], ids=[f"{i}-{h}" for i, (h, _) in enumerate(BLOCKS)]
)
def test_readme_python_example_runs(code, tmp_path):
    # A fresh interpreter in an empty folder: only what the example itself imports and defines.
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{code}\n{done.stderr}"
