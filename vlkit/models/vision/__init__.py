"""Vision encoders behind one interface (encoder.py), the stack that holds them (stack.py), the world ViT and
iLLaMA (illama.py), transformers' towers and BLIP-2's Q-Former (hf.py, ConvNeXt's token layout in convnext.py)."""

from vlkit.models.vision.encoder import ENCODERS, EncoderConfig, VisionEncoder, build_encoder, register_encoder
from vlkit.models.vision.hf import Blip2QFormerEncoder, HFEncoder
from vlkit.models.vision.illama import ILlamaEncoder
from vlkit.models.vision.stack import VisionStack

__all__ = ["ENCODERS", "Blip2QFormerEncoder", "EncoderConfig", "HFEncoder", "ILlamaEncoder", "VisionEncoder",
           "VisionStack", "build_encoder", "register_encoder"]
