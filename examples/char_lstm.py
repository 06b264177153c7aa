"""A model and a dataset of your own, trained by ``python -m fastopt train``.

    python -m fastopt train --config examples/char_lstm.yaml --out runs/lstm

``examples/char_lstm.yaml`` names the two factories below by import path; the trainer calls
``build_dataset`` with the config's ``data`` section (less the loader's keys) and ``build_model``
with its ``model`` section plus the data's ``model_args``. The loss is cross-entropy over the
last dimension, so a language model returns (batch, time, vocab) logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fastopt.train import JobData

__all__ = ["CharLSTM", "build_dataset", "build_model"]


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


class Windows(Dataset):
    """Non-overlapping windows of ``block_size + 1`` ids: (inputs, targets shifted by one)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int):
        window = self.ids[i * self.block_size : (i + 1) * self.block_size + 1]
        return window[:-1], window[1:]


def build_dataset(path: str, block_size: int = 32, val_fraction: float = 0.1) -> JobData:
    """The characters of the text file at ``path``: the first part to train on, the last
    ``val_fraction`` to validate on."""
    text = Path(path).read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    cut = int(len(ids) * (1 - val_fraction))
    return JobData(
        train=Windows(ids[:cut], block_size),
        val=Windows(ids[cut:], block_size),
        model_args={"vocab_size": len(vocab)},
    )


def build_model(vocab_size: int, hidden: int = 128, layers: int = 1) -> nn.Module:
    return CharLSTM(vocab_size, hidden, layers)
