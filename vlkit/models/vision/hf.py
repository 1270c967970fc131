"""Vision encoders from transformers: CLIP, SigLIP, DINOv2 and BLIP-2's EVA ViT (the world ViT is a CLIP).

Loaded from a local directory (with its preprocessor_config.json, which gives the transform) or built
from an architecture config (random weights; on the meta device for shape checks). Features are
``hidden_states[feature_layer]``, or the model's final output with ``feature_layer: output``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig

from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.fileio import read_json
from vlkit.models.llm import arch_of, check_weights
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, on_device, register_encoder

# model_type -> (where its special tokens sit, how many besides registers)
LAYOUTS = {"clip_vision_model": ("first", 1), "blip_2_vision_model": ("first", 1), "dinov2": ("first", 1),
           "siglip_vision_model": ("none", 0)}


def _model_class(model_type: str):
    """AutoModel covers CLIP/SigLIP/DINOv2 vision configs; BLIP-2's vision tower is not in its mapping."""
    if model_type == "blip_2_vision_model":
        from transformers import Blip2VisionModel

        return Blip2VisionModel
    return AutoModel


def vision_config_from(arch: dict) -> PretrainedConfig:
    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if model_type not in LAYOUTS:
        raise VlkitError(f"tower arch: model_type {model_type!r} is not a supported vision tower; "
                         f"choose one of {sorted(LAYOUTS)}")
    return AutoConfig.for_model(model_type, **arch)


@register_encoder("hf")
class HFEncoder(VisionEncoder):
    def __init__(self, model: torch.nn.Module, cfg: EncoderConfig, transform: ImageTransform):
        mt = model.config.model_type
        where, n = LAYOUTS[mt]
        side = model.config.image_size // model.config.patch_size
        super().__init__(cfg, transform, model.config.hidden_size, (side, side),
                         n + getattr(model.config, "num_register_tokens", 0) if where != "none" else 0)
        self.special_position = where  # per instance: one class serves every HF layout
        self.model = model

    @classmethod
    def build(cls, cfg: EncoderConfig, device=None) -> "HFEncoder":
        pp: dict = {}
        if cfg.path and device != "meta":
            path = Path(cfg.path)
            if not (path / "config.json").is_file():
                raise VlkitError(f"{path}: no config.json; point tower.path at a Hugging Face vision model directory")
            check_weights(path)
            try:
                model_type = read_json(path / "config.json").get("model_type", "")
                model = _model_class(model_type).from_pretrained(str(path), local_files_only=True,
                                                                 use_safetensors=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise VlkitError(f"{path}: cannot load the vision tower ({str(e).splitlines()[0]})") from None
            if model.config.model_type not in LAYOUTS:
                raise VlkitError(f"{path}: {model.config.model_type} is not a supported vision tower; choose one of "
                                 f"{sorted(LAYOUTS)}")
            if (path / "preprocessor_config.json").is_file():
                pp = read_json(path / "preprocessor_config.json")
        elif cfg.arch:
            hf = vision_config_from(cfg.arch)
            model_cls = _model_class(hf.model_type)
            with on_device(device):
                model = model_cls.from_config(hf) if model_cls is AutoModel else model_cls._from_config(hf)
        else:
            raise VlkitError("tower: set path (a local directory) or arch (an HF vision config)")
        transform = ImageTransform.from_hf(pp, model.config.image_size, cfg.image_mean, cfg.image_std, cfg.resize)
        return cls(model, cfg, transform)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    def arch(self) -> dict:
        return arch_of(self.model.config)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layer = self.cfg.feature_layer
        if layer == "output":
            return self.model(pixel_values=pixel_values).last_hidden_state
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
