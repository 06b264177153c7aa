"""A small GPT-style language model (as nanoGPT's ``model.py``): token and position
embeddings, pre-norm blocks of causal self-attention and an MLP, a final norm and a linear
head. Its forward takes ``(batch, time)`` token ids and returns ``(batch, time, vocab)``
logits; :meth:`GPT.generate` samples a continuation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

__all__ = ["GPT", "build_model"]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        hidden = 4 * n_embd
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, hidden), nn.GELU(), nn.Linear(hidden, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # Not tied to wte: the vocabulary is ~100 characters, so tying would save little, and
        # it keeps "no weight decay on embeddings" and "decay on matrices" two separate sets.
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2's scaling of the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, new_tokens: int, *, temperature: float = 0.8, generator=None
    ) -> torch.Tensor:
        """``idx`` (batch, time) followed by ``new_tokens`` sampled ones."""
        was_training = self.training
        self.eval()
        for _ in range(new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :].float() / temperature
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        self.train(was_training)
        return idx


def build_model(
    vocab_size: int,
    block_size: int,
    n_layer: int = 3,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
) -> GPT:
    """The model factory of the ``gpt`` job (``vocab_size`` and ``block_size`` come from the
    data)."""
    if min(n_layer, n_head, n_embd, vocab_size, block_size) < 1 or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            "config keys 'model.n_layer', 'model.n_head' and 'model.n_embd' must be >= 1 and "
            f"'model.dropout' in [0, 1), got n_layer={n_layer}, n_head={n_head}, "
            f"n_embd={n_embd}, dropout={dropout}"
        )
    if n_embd % n_head:
        raise ConfigError(
            f"config key 'model.n_embd' ({n_embd}) must be a multiple of 'model.n_head' ({n_head})"
        )
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
