"""Vision encoders behind one interface (encoder.py), the stack that holds them (stack.py), the world ViT and
iLLaMA (illama.py)."""

from vlkit.models.vision.encoder import ENCODERS, EncoderConfig, VisionEncoder, build_encoder, register_encoder
from vlkit.models.vision.hf import HFEncoder
from vlkit.models.vision.illama import ILlamaEncoder
from vlkit.models.vision.stack import VisionStack

__all__ = ["ENCODERS", "EncoderConfig", "HFEncoder", "ILlamaEncoder", "VisionEncoder", "VisionStack", "build_encoder",
           "register_encoder"]
