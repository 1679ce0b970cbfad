"""The demo's policy, a tiny character-level causal transformer, and its sampling and
log-probability helpers.

Shapes: ``B`` sequences, ``P`` prompt tokens (BOS included), ``L`` completion tokens, ``V`` the
vocabulary. Everything runs on the CPU in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class TinyPolicy(nn.Module):
    """Token + position embeddings → causal pre-norm transformer layers → linear head:
    ``forward(tokens[B, T]) -> logits[B, T, V]`` for ``T <= max_length``."""

    def __init__(self, vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                 max_length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward=4 * d_model,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of ``tokens`` (int64, ``[B, T]``)."""
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position(torch.arange(length))
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.norm(self.layers(hidden, mask=causal, is_causal=True)))

    def step(self, tokens: torch.Tensor, state: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens[B, T]`` to the sequence so far (``state``); the last position's logits
        and the whole sequence (recomputed each call: sequences here are under 32 tokens)."""
        state = tokens if state is None else torch.cat([state, tokens], dim=1)
        return self.forward(state)[:, -1], state


@dataclass(frozen=True, slots=True)
class Samples:
    """Sampled completions: ``tokens[B, L]`` (pad after the end-of-sequence token) and
    ``mask[B, L]`` (1.0 on every generated token up to and including the end-of-sequence token)."""

    tokens: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def sample_completions(policy: TinyPolicy, prompt_tokens: torch.Tensor, *, max_new_tokens: int,
                       temperature: float, eos_id: int, pad_id: int,
                       generator: torch.Generator) -> Samples:
    """Sample one completion per row of ``prompt_tokens[B, P]`` at ``temperature``, drawing from
    ``generator``; a row stops at its end-of-sequence token or after ``max_new_tokens``."""
    logits, state = policy.step(prompt_tokens, None)
    finished = torch.zeros(prompt_tokens.shape[0], dtype=torch.bool)
    tokens, mask = [], []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        mask.append((~finished).float())
        tokens.append(token)
        finished |= token == eos_id
        if bool(finished.all()):
            break
        logits, state = policy.step(token.unsqueeze(1), state)
    return Samples(tokens=torch.stack(tokens, dim=1), mask=torch.stack(mask, dim=1))


def completion_logits(policy: nn.Module, prompt_tokens: torch.Tensor,
                      completion_tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``[B, L, V]`` (divided by ``temperature``) that predict each completion token."""
    tokens = torch.cat([prompt_tokens, completion_tokens], dim=1)
    logits = policy(tokens[:, :-1])
    return logits[:, prompt_tokens.shape[1] - 1:] / temperature


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(tokens[b, t])`` under ``logits[b, t]``: ``[B, L]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's next-token distribution: ``[B, L]``."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def sequence_cross_entropy(policy: nn.Module, tokens: torch.Tensor,
                           loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions of ``tokens[B, T]`` where
    ``loss_mask[B, T-1]`` is 1 (used by the supervised warm-up)."""
    logits = policy(tokens[:, :-1])
    losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return (losses * loss_mask).sum() / loss_mask.sum()
