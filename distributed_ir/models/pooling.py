"""Pooling token states into one vector: ``cls``, ``mean`` or ``last`` (last real token)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) token of each row, for left *or* right padding.

    ``mask.sum(1) - 1`` is only right for right padding; taking the argmax of
    ``mask * position`` finds the last real token wherever the pads are.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``hidden``: [batch, seq, dim]; ``attention_mask``: [batch, seq] -> [batch, dim].

    ``mean`` sums and counts in float32 whatever ``hidden``'s dtype (a model with bfloat16 weights:
    precision ``bf16w``), as it does under autocast, where the hidden states are float32; a bf16
    sum over hundreds of tokens would round, and bf16 counts lengths above 256 only in steps of 2.
    ``cls`` / ``last`` select a row exactly, in ``hidden``'s dtype."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1)
        summed = (hidden * mask.to(hidden.dtype)).sum(dim=1, dtype=torch.float32)
        return summed / mask.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
    if mode == "last":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {mode!r}: expected cls, mean or last")


def prepare_backbone(backbone: nn.Module, tokenizer: Any) -> None:
    """Freeze an unused pooler head (BERT) so DDP does not wait for its gradients (the checkpoint
    stays complete for other loaders), and pad with EOS when the tokenizer has no pad token."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
