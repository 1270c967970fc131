"""Visual prompt generators: features (B, N, C) -> visual prompt tokens (B, M, D) in the LLM's width."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlkit.config import Section
from vlkit.models.vpg.linear import IdentityVPG, LinearVPG
from vlkit.models.vpg.mlp import MLPVPG
from vlkit.models.vpg.qformer import QFormerVPG


class QFormerConfig(Section):
    hidden_size: int = Field(96, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    cross_attention_frequency: int = Field(1, gt=0, description="A cross-attention block every N layers.")


class VPGConfig(Section):
    kind: Literal["qformer", "mlp", "linear", "identity"] = Field(
        "qformer", description="BLIP-2 Q-Former, LLaVA MLP, linear, or identity (the features already are in the "
        "LLM's width: a SPHINX mix projects into it).")
    num_queries: int = Field(16, gt=0, description="Q-Former: learned queries = visual tokens per image.")
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    mlp_act: str = Field("gelu", description="MLP: activation between the two layers (LLaVA: gelu).")


def build_vpg(cfg: VPGConfig, vision_width: int, llm_width: int, num_features: int):
    if cfg.kind == "identity":
        return IdentityVPG(vision_width, llm_width, num_features)
    if cfg.kind == "linear":
        return LinearVPG(vision_width, llm_width, num_features)
    if cfg.kind == "mlp":
        return MLPVPG(vision_width, llm_width, num_features, cfg.mlp_act)
    q = cfg.qformer
    return QFormerVPG(vision_width, llm_width, cfg.num_queries, q.hidden_size, q.num_layers, q.num_heads,
                      q.intermediate_size, q.cross_attention_frequency)


__all__ = ["VPGConfig", "QFormerConfig", "build_vpg", "IdentityVPG", "LinearVPG", "MLPVPG", "QFormerVPG"]
