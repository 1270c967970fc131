"""Linear VPG: one projection per feature (N visual tokens per image)."""

from __future__ import annotations

import torch
from torch import nn


class LinearVPG(nn.Module):
    def __init__(self, vision_width: int, llm_width: int, num_features: int):
        super().__init__()
        self.projector = nn.Linear(vision_width, llm_width)
        self.num_tokens = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, D)."""
        return self.projector(features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"projector": list(self.projector.parameters())}

    def out_projection(self) -> nn.Linear:
        """The layer that writes into the LLM's width (VPGTrans converts it)."""
        return self.projector
