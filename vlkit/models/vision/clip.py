"""The world ViT: an HF CLIP vision tower (and the small text tower it is trained against).

Saved in stock HF format (``CLIPVisionModel`` + ``CLIPImageProcessor``), so transformers loads it
as it loads openai/clip-vit-*: the same code path serves real CLIP checkpoints.
"""

from __future__ import annotations

from pydantic import Field
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerBase

from vlkit.config import Section
from vlkit.data.transforms import ImageTransform


class ViTConfig(Section):
    image_size: int = Field(64, gt=0, description="Input side in pixels.")
    patch_size: int = Field(8, gt=0, description="Patch side; (image_size / patch_size)^2 feature tokens.")
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(3, gt=0)
    intermediate_size: int = Field(768, gt=0)
    image_mean: list[float] = Field([0.5, 0.5, 0.5], description="Per-channel mean after scaling to [0, 1].")
    image_std: list[float] = Field([0.5, 0.5, 0.5], description="Per-channel std after scaling to [0, 1].")

    def transform(self) -> ImageTransform:
        """The world ViT sees images squashed to its square input."""
        return ImageTransform.of(self.image_size, self.image_mean, self.image_std, "squash")


class TextTowerConfig(Section):
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_length: int = Field(64, gt=0, description="Caption tokens (longer captions are truncated).")


def build_clip(vit: ViTConfig, text: TextTowerConfig, projection_dim: int,
               tok: PreTrainedTokenizerBase) -> CLIPModel:
    vision_cfg = CLIPVisionConfig(image_size=vit.image_size, patch_size=vit.patch_size, hidden_size=vit.hidden_size,
                                  num_hidden_layers=vit.num_layers, num_attention_heads=vit.num_heads,
                                  intermediate_size=vit.intermediate_size, projection_dim=projection_dim,
                                  hidden_act="gelu")
    text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=text.hidden_size, num_hidden_layers=text.num_layers,
                              num_attention_heads=text.num_heads, intermediate_size=text.intermediate_size,
                              max_position_embeddings=text.max_length, projection_dim=projection_dim,
                              hidden_act="gelu", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    cfg = CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(),
                     projection_dim=projection_dim)
    return CLIPModel(cfg)


def image_processor(vit: ViTConfig):
    """The HF image processor saved beside the world ViT: it preprocesses as vlkit's transform does."""
    return vit.transform().hf_image_processor()
