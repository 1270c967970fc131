"""Linear VPG: one projection per feature (N visual tokens per image); identity: the features as they are."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.errors import VlkitError


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


class IdentityVPG(nn.Module):
    """No parameters: the vision stack's features are the visual tokens (SPHINX, whose mix projects into the LLM)."""

    def __init__(self, vision_width: int, llm_width: int, num_features: int):
        super().__init__()
        if vision_width != llm_width:
            raise VlkitError(f"vpg.kind identity: the vision stack gives width {vision_width}, the LLM takes "
                             f"{llm_width}; mix into the LLM's width (model.mix.width unset) or use vpg.kind linear")
        self.num_tokens = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}
