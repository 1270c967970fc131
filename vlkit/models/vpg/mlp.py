"""MLP VPG (LLaVA-1.5): Linear -> GELU -> Linear per feature; exports to stock `llava`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class MLPVPG(nn.Module):
    def __init__(self, vision_width: int, llm_width: int, num_features: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, llm_width)
        self.act = ACT2FN[act]
        self.act_name = act
        self.linear_2 = nn.Linear(llm_width, llm_width)
        self.num_tokens = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, D)."""
        return self.linear_2(self.act(self.linear_1(features)))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"projector": [*self.linear_1.parameters(), *self.linear_2.parameters()]}

    def out_projection(self) -> nn.Linear:
        """The layer that writes into the LLM's width (VPGTrans converts it)."""
        return self.linear_2
