"""Small models and data shared by the optimizer tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmrun.model import TransformerLM


def tiny_lm(seed: int = 0, **kwargs) -> TransformerLM:
    """A 2-layer, d_model 32 LM over 61 tokens (untied, RMSNorm, SwiGLU, RoPE unless overridden)."""
    torch.manual_seed(seed)
    args = {"vocab_size": 61, "context_length": 16, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 64}
    args.update(kwargs)
    return TransformerLM(**args)


def lm_batch(vocab_size: int = 61, batch: int = 8, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """A fixed, learnable batch: token t+1 = (3·token t + 1) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (batch, 1), generator=g)
    cols = [start]
    for _ in range(seq):
        cols.append((3 * cols[-1] + 1) % vocab_size)
    return torch.cat(cols, dim=1)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, tokens: torch.Tensor | None = None) -> list[float]:
    """``steps`` optimizer steps on one batch; returns the losses before each step."""
    tokens = lm_batch(model.vocab_size) if tokens is None else tokens
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class MLP(nn.Module):
    """A small regression MLP with biases (2-D weights and 1-D biases)."""

    def __init__(self, d_in: int = 12, d_hidden: int = 24, d_out: int = 5, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.fc2 = nn.Linear(d_hidden, d_hidden, dtype=dtype)
        self.out = nn.Linear(d_hidden, d_out, dtype=dtype)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def regression_data(n: int = 64, d_in: int = 12, d_out: int = 5, dtype=torch.float64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, d_out, generator=g, dtype=dtype)
    return x, torch.sin(x @ w)


def train_regression(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     steps: int = 60) -> list[float]:
    """``steps`` optimizer steps on the mean squared error of ``model(x)`` against ``y``;
    returns the losses before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
