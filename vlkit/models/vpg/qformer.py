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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, D)."""
        return self.projector(self.query(features, self.query_tokens.expand(features.shape[0], -1, -1)))

    def query(self, features: torch.Tensor, queries: torch.Tensor, output_attentions: bool = False):
        """Q-Former output (B, M, Dq) for `queries` (B, M, Dq) over `features` (B, N, C) (VPG-C re-queries with
        its own); with `output_attentions`, also the cross-attention maps, one (B, heads, M, N) per block."""
        mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        if not output_attentions:
            return self.qformer(query_embeds=queries, encoder_hidden_states=features,
                                encoder_attention_mask=mask).last_hidden_state
        cfg = self.qformer.config
        kept, cfg._attn_implementation = cfg._attn_implementation, "eager"  # fused kernels return no weights
        try:
            out = self.qformer(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask,
                               output_attentions=True)
        finally:
            cfg._attn_implementation = kept
        return out.last_hidden_state, out.cross_attentions

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"queries": [self.query_tokens], "qformer": list(self.qformer.parameters()),
                "projector": list(self.projector.parameters())}

    def out_projection(self) -> nn.Linear:
        """The layer that writes into the LLM's width (VPGTrans converts it)."""
        return self.projector
