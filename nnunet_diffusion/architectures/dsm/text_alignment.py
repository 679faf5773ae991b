"""Class prompt alignment (DSM sec. 4.2.3, eq. 20): a query's class distribution from the cosine similarity of its
projected embedding with the class prompts' text embeddings, at temperature 0.01:

    p_k(q) = exp(cos(t_k, W q) / tau) / sum_k' exp(cos(t_k', W q) / tau)

Classes are named by text, so prompts added at prediction time (classes never seen in training) get a
probability too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.01


class TextAlignedClassifier(nn.Module):
    """(queries (B, Q, D), text (K, D_t)) -> (B, Q, K) logits cos / tau (softmax over K gives eq. 20)."""

    def __init__(self, dim: int, text_dim: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.project = nn.Linear(dim, text_dim)
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(self.project(queries).float(), dim=-1)
        return projected @ F.normalize(text.float(), dim=-1).T / self.temperature
