"""Vision encoders behind one interface (encoder.py), the stack that holds them (stack.py), and the world ViT."""

from vlkit.models.vision.encoder import ENCODERS, EncoderConfig, VisionEncoder, build_encoder, register_encoder
from vlkit.models.vision.hf import HFEncoder
from vlkit.models.vision.stack import VisionStack

__all__ = ["ENCODERS", "EncoderConfig", "HFEncoder", "VisionEncoder", "VisionStack", "build_encoder",
           "register_encoder"]
