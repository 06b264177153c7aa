"""The default job's data: the Python standard library's own ``.py`` sources, as characters.

Every machine with Python has them, so nothing is downloaded. The files (sorted by their path
under ``sysconfig.get_paths()["stdlib"]``, ``site-packages`` left out) are split by file into
train, validation and test by a hash of that path: the split does not depend on the order the
file system lists them in, and a file added by another Python version lands where its name
says without moving the others. The vocabulary is every character seen at least
``MIN_CHAR_COUNT`` times in the training split, plus id 0 for any other character.

Tokenizing takes a few seconds; the result (token ids of each split and the vocabulary) is
cached in one ``.npz`` file keyed by the format version, the Python version, the stdlib path
and the files' names and sizes, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .checkpoint import write_atomic
from .errors import ConfigError
from .jobs.job_data import JobData

__all__ = ["CharCorpus", "CharWindows", "build_dataset", "cache_folder", "load_corpus", "split_of"]

# Bump when what the cache file holds changes: an old file is then simply not found.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# Percent of the files in validation and in test (by the hash of their path).
VAL_PERCENT, TEST_PERCENT = 5, 5
UNKNOWN = "\0"  # id 0: a character outside the vocabulary (the sources hold no NUL)
# Python 3.11's stdlib has 434 distinct characters in its training files, most of them in a few
# test files about Unicode; those seen >= 100 times are 103 and cover all but 8e-5 of the
# text. The rest share id 0, so the vocabulary (and ln of its size, the loss of a uniform
# guess) stays that of source code, and the ids fit in a byte.
MIN_CHAR_COUNT = 100
CACHE_ENV = "FASTOPT_CACHE_DIR"


def cache_folder() -> Path:
    """``$FASTOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastopt``, else ``~/.cache/fastopt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastopt"


def split_of(relative_path: str) -> str:
    """ "train", "val" or "test" for a file, from a hash of its path (stable everywhere:
    Python's own ``hash`` of a str is salted per process)."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "val" if bucket < TEST_PERCENT + VAL_PERCENT else "train"


def _source_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in path.relative_to(root).parts or not path.is_file():
            continue
        files.append((relative, path))
    return sorted(files)


@dataclass
class CharCorpus:
    """Token ids per split (uint8 arrays) and the vocabulary (``vocab[i]`` is id ``i``)."""

    splits: dict[str, np.ndarray]
    vocab: str

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def encode(self, text: str) -> np.ndarray:
        return _encode(text, self.vocab)


def _encode(text: str, vocab: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.zeros(0x110000, dtype=np.uint8)  # every code point: unknown unless listed
    table[np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)] = np.arange(len(vocab))
    return table[codes]


def _read(path: Path) -> str:
    # A handful of test files are deliberately not UTF-8: keep their characters as Latin-1
    # would read them rather than drop the files.
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_corpus(root: str | os.PathLike | None = None, cache_dir: Path | None = None) -> CharCorpus:
    """The standard library's sources at ``root`` (default: this Python's), tokenized; from
    the cache when it holds them."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise ConfigError(f"config key 'data.root': no folder at {str(root)!r}")
    files = _source_files(root)
    if not files:
        raise ConfigError(f"config key 'data.root': no .py files under {str(root)!r}")
    listing = [(name, path.stat().st_size) for name, path in files]
    key = json.dumps([FORMAT_VERSION, sys.version, str(root), listing])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_folder() if cache_dir is None else Path(cache_dir)
    cache = folder / f"stdlib-chars-{digest}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as f:
                return CharCorpus({s: f[s] for s in SPLITS}, str(f["vocab"]))
        except Exception:  # damaged (BadZipFile, EOFError, a missing array): tokenize again
            pass
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, path in files:
        texts[split_of(name)].append(_read(path))
    joined = {s: "\n".join(texts[s]) for s in SPLITS}
    counts: dict[str, int] = {}
    for text in texts["train"]:
        for char in set(text):
            counts[char] = counts.get(char, 0) + text.count(char)
    common = {c for c, n in counts.items() if n >= MIN_CHAR_COUNT} - {UNKNOWN}
    vocab = UNKNOWN + "".join(sorted(common))
    corpus = CharCorpus({s: _encode(joined[s], vocab) for s in SPLITS}, vocab)
    buffer = io.BytesIO()
    np.savez(buffer, vocab=np.array(vocab), **corpus.splits)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(buffer.getvalue(), cache)  # two runs starting together both write it whole
    except OSError:
        pass  # a read-only cache folder costs the next run the tokenizing, nothing else
    return corpus


class CharWindows(Dataset):
    """Windows of ``block_size + 1`` tokens: ``(ids[:-1], ids[1:])``. ``count`` windows evenly
    spaced over ``ids`` (all non-overlapping ones when None)."""

    def __init__(self, ids: np.ndarray, block_size: int, count: int | None = None) -> None:
        if len(ids) < block_size + 1:
            raise ConfigError(
                f"a split of {len(ids)} tokens is shorter than one window of block_size "
                f"{block_size} + 1"
            )
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.block_size = block_size
        last = len(ids) - block_size - 1  # the last window's start
        if count is None:
            self.starts = torch.arange(0, last + 1, block_size)
        else:
            self.starts = torch.linspace(0, last, count).round().long()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int):
        start = int(self.starts[index])
        window = self.ids[start : start + self.block_size + 1]
        return window[:-1], window[1:]


def build_dataset(
    block_size: int = 64,
    val_windows: int = 128,
    test_windows: int = 512,
    root: str | None = None,
):
    """The dataset factory of the ``gpt`` job: every non-overlapping window of the training
    split, and ``val_windows`` and ``test_windows`` windows spread evenly over the other two
    (a fixed subset: evaluating all of a 1.7M-character split would take longer than the
    training does on a CPU). ``root``: another folder of ``.py`` files than the stdlib."""
    for name, value in (("block_size", block_size), ("val_windows", val_windows),
                        ("test_windows", test_windows)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"config key 'data.{name}' must be >= 1, got {value}")
    corpus = load_corpus(root)
    return JobData(
        CharWindows(corpus.splits["train"], block_size),
        CharWindows(corpus.splits["val"], block_size, val_windows),
        CharWindows(corpus.splits["test"], block_size, test_windows),
        model_args={"vocab_size": len(corpus.vocab), "block_size": block_size},
        decode=corpus.decode,
        prompt=torch.from_numpy(corpus.encode("def ").astype(np.int64)),
    )
