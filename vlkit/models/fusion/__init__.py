"""How visual information enters the LLM: the fusion interface (base.py) and its implementations."""

from vlkit.models.fusion.base import FUSIONS, Fusion, FusionInputs, fusion_config, register_fusion
from vlkit.models.fusion.tokens import TokenFusion
from vlkit.models.fusion.vpgc import VPGC
from vlkit.models.fusion.adapter import Adapter

__all__ = ["FUSIONS", "Adapter", "Fusion", "FusionInputs", "TokenFusion", "VPGC", "fusion_config",
           "register_fusion"]
