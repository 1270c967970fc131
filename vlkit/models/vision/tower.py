"""A vision tower: any HF vision encoder returning a feature grid (B, N, C).

CLIP, SigLIP, DINOv2 and BLIP-2's EVA ViT are loaded from a local directory or built from an
architecture config (on the meta device for shape checks). Features are the hidden states of
``feature_layer``; ``select="patch"`` drops the prefix tokens (CLS, registers) as LLaVA's
"default" strategy does, ``"full"`` keeps them (BLIP-2).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.fileio import read_json

VISION_TYPES = {"clip_vision_model", "siglip_vision_model", "dinov2", "blip_2_vision_model"}


class TowerConfig(Section):
    """One vision tower: a local HF directory, or an architecture to build from scratch."""

    path: str | None = Field(None, description="Local HF vision model directory (CLIPVisionModel, ...).")
    arch: dict | None = Field(None, description="HF config of the tower (model_type + sizes) when not loading.")
    feature_layer: int = Field(-2, description="Hidden-state index of the features (-1 last, -2 penultimate).")
    select: Literal["patch", "full"] = Field("patch", description="patch: drop CLS/register tokens; full: keep.")
    image_mean: list[float] | None = Field(None, description="Override the tower's normalisation mean.")
    image_std: list[float] | None = Field(None, description="Override the tower's normalisation std.")


def on_device(device) -> contextlib.AbstractContextManager:
    """Create modules on the meta device (no memory, no weights) when asked, else as usual."""
    return torch.device("meta") if device == "meta" else contextlib.nullcontext()


def _model_class(model_type: str):
    """AutoModel covers CLIP/SigLIP/DINOv2 vision configs; BLIP-2's vision tower is not in its mapping."""
    if model_type == "blip_2_vision_model":
        from transformers import Blip2VisionModel

        return Blip2VisionModel
    return AutoModel


def vision_config_from(arch: dict) -> PretrainedConfig:
    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if model_type not in VISION_TYPES:
        raise VlkitError(f"tower arch: model_type {model_type!r} is not a supported vision tower; "
                         f"choose one of {sorted(VISION_TYPES)}")
    return AutoConfig.for_model(model_type, **arch)


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, cfg: TowerConfig, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.image_size = image_size
        self.image_mean = cfg.image_mean or mean
        self.image_std = cfg.image_std or std
        c = model.config
        self.hidden_size = c.hidden_size
        self.num_patches = (image_size // c.patch_size) ** 2

    @classmethod
    def build(cls, cfg: TowerConfig, device: torch.device | str | None = None) -> "VisionTower":
        """Load from `cfg.path`, or build from `cfg.arch` (random weights; `device="meta"` for none)."""
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        if cfg.path and device != "meta":
            path = Path(cfg.path)
            if not (path / "config.json").is_file():
                raise VlkitError(f"{path}: no config.json; point tower.path at a Hugging Face vision model directory")
            try:
                model_type = read_json(path / "config.json").get("model_type", "")
                model = _model_class(model_type).from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise VlkitError(f"{path}: cannot load the vision tower ({str(e).splitlines()[0]})") from None
            if (path / "preprocessor_config.json").is_file():
                pp = read_json(path / "preprocessor_config.json")
                mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
        elif cfg.arch:
            hf = vision_config_from(cfg.arch)
            cls_ = _model_class(hf.model_type)
            with on_device(device):
                model = cls_.from_config(hf) if cls_ is AutoModel else cls_._from_config(hf)
        else:
            raise VlkitError("tower: set path (a local directory) or arch (an HF vision config)")
        if model.config.model_type not in VISION_TYPES:
            raise VlkitError(f"{cfg.path}: {model.config.model_type} is not a supported vision tower")
        return cls(model, cfg, model.config.image_size, mean, std)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> features (B, N, C)."""
        # -1 is the model's own final output (post-LayerNorm for BLIP-2/SigLIP towers, as they use it)
        want_hidden = self.cfg.feature_layer != -1
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=want_hidden)
        feats = out.hidden_states[self.cfg.feature_layer] if want_hidden else out.last_hidden_state
        if self.cfg.select == "patch":
            feats = feats[:, feats.shape[1] - self.num_patches:]
        return feats

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_features(self) -> int:
        extra = 0 if self.cfg.select == "patch" else self._prefix_tokens()
        return self.num_patches + extra

    def _prefix_tokens(self) -> int:
        mt = self.hf_config.model_type
        if mt == "siglip_vision_model":
            return 0
        return 1 + getattr(self.hf_config, "num_register_tokens", 0)
