"""Q-Former VPG (BLIP-2, Li et al. 2023, section 3.1): M learned queries cross-attend to the frozen
image features through a Q-Former (``transformers.Blip2QFormerModel``, which LayerNorms the query
embeddings), and a linear projector maps them to the LLM's width. Exports to stock `blip-2`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


class QFormerVPG(nn.Module):
    def __init__(self, vision_width: int, llm_width: int, num_queries: int, hidden_size: int, num_layers: int,
                 num_heads: int, intermediate_size: int, cross_attention_frequency: int = 1):
        super().__init__()
        self.config = Blip2QFormerConfig(hidden_size=hidden_size, num_hidden_layers=num_layers,
                                         num_attention_heads=num_heads, intermediate_size=intermediate_size,
                                         encoder_hidden_size=vision_width,
                                         cross_attention_frequency=cross_attention_frequency,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)
        self.qformer = Blip2QFormerModel(self.config)
        self.projector = nn.Linear(hidden_size, llm_width)
        self.num_tokens = num_queries

    def forward(self, features: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) -> (B, M, D). `queries` (B, M, Dq) replaces the learned ones (VPG-C re-querying)."""
        q = self.query_tokens.expand(features.shape[0], -1, -1) if queries is None else queries
        mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        out = self.qformer(query_embeds=q, encoder_hidden_states=features, encoder_attention_mask=mask)
        return self.projector(out.last_hidden_state)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"queries": [self.query_tokens], "qformer": list(self.qformer.parameters()),
                "projector": list(self.projector.parameters())}
