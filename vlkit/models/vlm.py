"""VisionLanguageModel: vision tower -> VPG -> any HF causal LM.

    images -> VisionTower (B, N, C) -> VPG (B, M, D) --+
    text   -> tokenizer -> LLM input embeddings -------+-> fused sequence -> LLM -> logits

Modules declare named parameter groups (``vision``, ``vpg.queries``, ``vpg.qformer``,
``vpg.projector``, ``llm``, ``llm.embeddings``, ``llm.head``, ``llm.norms``); recipes choose groups by
name and everything else is frozen.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.models.fusion.tokens import scatter_image_tokens
from vlkit.models.fusion.vpgc import VPGC, VPGCConfig
from vlkit.models.llm import load_llm
from vlkit.models.vision.tower import TowerConfig, VisionTower, on_device
from vlkit.models.vpg import VPGConfig, build_vpg


class LLMSource(Section):
    """The language model: a local HF directory, or an architecture (random weights / meta device)."""

    path: str | None = Field(None, description="Local HF causal-LM directory (LLaMA, Vicuna, OPT, Qwen2, ...).")
    arch: dict | None = Field(None, description="HF config (model_type + sizes) when not loading weights.")
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: the LLM's directory.")


class VLMConfig(Section):
    tower: TowerConfig = Field(default_factory=TowerConfig)
    vpg: VPGConfig = Field(default_factory=VPGConfig)
    llm: LLMSource = Field(default_factory=LLMSource)
    max_length: int = Field(256, gt=0, description="Longest token sequence (image tokens included).")
    vpgc: VPGCConfig | None = Field(None, description="Add a VPG-C module (Cheetor): images re-queried half-way "
                                    "through the LLM, guided by the instruction.")


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter weights of peft LoRA layers (found by module type, not by parameter name)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    out = []
    for m in module.modules():
        if isinstance(m, LoraLayer):
            for d in (m.lora_A, m.lora_B):
                out += [p for sub in d.values() for p in sub.parameters()]
    return out


class VisionLanguageModel(nn.Module):
    def __init__(self, vision: VisionTower, vpg: nn.Module, llm: PreTrainedModel, image_token_id: int,
                 config: VLMConfig):
        super().__init__()
        self.vision, self.vpg, self.llm = vision, vpg, llm
        self.image_token_id = image_token_id
        self.config = config
        self.trainable_groups: list[str] = []
        self.vpgc: VPGC | None = None
        if config.vpgc is not None:
            self.add_vpgc(config.vpgc)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: VLMConfig, image_token_id: int | None = None, vocab_size: int | None = None,
              device: str | None = None) -> "VisionLanguageModel":
        """Build from parts: load what has a path, create what has an arch (`device="meta"`: no weights)."""
        tower = VisionTower.build(cfg.tower, device=device)
        if cfg.llm.path and device != "meta":
            llm = load_llm(cfg.llm.path)
        elif cfg.llm.arch:
            arch = dict(cfg.llm.arch)
            hf = AutoConfig.for_model(arch.pop("model_type"), **arch)
            with on_device(device):
                llm = AutoModelForCausalLM.from_config(hf)
        else:
            raise VlkitError("llm: set path (a local directory) or arch (an HF config)")
        if vocab_size is not None and vocab_size > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(vocab_size)  # a tokenizer that gained <image>
        vpg = build_vpg(cfg.vpg, tower.hidden_size, llm.config.get_text_config().hidden_size, tower.num_features())
        if device == "meta":
            vpg = vpg.to("meta")
        if image_token_id is None:
            image_token_id = llm.get_input_embeddings().num_embeddings - 1
        return cls(tower, vpg, llm, image_token_id, cfg)

    @property
    def num_image_tokens(self) -> int:
        return self.vpg.num_tokens

    # -- trainable groups ----------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"vision": list(self.vision.parameters())}
        groups.update({f"vpg.{k}": v for k, v in self.vpg.param_groups().items()})
        groups["vpg"] = list(self.vpg.parameters())
        groups["llm"] = list(self.llm.parameters())
        groups["llm.embeddings"] = list(self.llm.get_input_embeddings().parameters())
        head = self.llm.get_output_embeddings()
        groups["llm.head"] = list(head.parameters()) if head is not None else []
        groups["llm.norms"] = [p for m in self.llm.modules() if "norm" in type(m).__name__.lower()
                               for p in m.parameters(recurse=False)]
        groups["lora"] = lora_parameters(self.llm)
        groups["vpgc"] = list(self.vpgc.parameters()) if self.vpgc is not None else []
        return groups

    # -- VPG-C (Cheetor) ---------------------------------------------------------------------------
    def add_vpgc(self, cfg: VPGCConfig | None = None) -> VPGC:
        """Attach a zero-initialised VPG-C (its parameters form the group `vpgc`); the logits are unchanged until
        it is trained. Its weights follow the VPG's device and dtype."""
        cfg = cfg or VPGCConfig()
        if self.vpgc is not None:
            raise VlkitError("vpgc: this model already has a VPG-C module")
        width = self.llm.config.get_text_config().hidden_size
        qformer_width = getattr(getattr(self.vpg, "config", None), "hidden_size", None)
        if qformer_width is None:
            raise VlkitError(f"vpgc: needs a qformer VPG to re-query images, not {type(self.vpg).__name__}")
        p = next(self.vpg.parameters())
        with on_device("meta" if p.is_meta else None):
            module = VPGC(width, qformer_width, self.num_image_tokens, cfg.layer)
        self.vpgc = module.to(dtype=p.dtype) if p.is_meta else module.to(device=p.device, dtype=p.dtype)
        self.vpgc.attach(self.llm, self.vpg)
        self.config = self.config.model_copy(update={"vpgc": cfg.model_copy(update={"layer": self.vpgc.layer})})
        return self.vpgc

    def completing(self, input_ids: torch.Tensor, image_features: torch.Tensor | None,
                   attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """A context in which an LLM forward pass over `input_ids` is completed by VPG-C (a no-op without one)."""
        if self.vpgc is None:
            return nullcontext()
        return self.vpgc.prefill(input_ids, image_features, self.image_token_id, attention_mask, labels)

    # -- LoRA (peft) -------------------------------------------------------------------------------
    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 target_modules: list[str] | None = None) -> None:
        """Wrap the LLM with LoRA adapters (peft); their parameters form the group `lora`."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise VlkitError("lora: needs peft; pip install 'vlkit[lora]'") from None

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                         task_type="CAUSAL_LM")
        try:
            self.llm = get_peft_model(self.llm, cfg)
        except ValueError as e:
            raise VlkitError(f"lora: {str(e).splitlines()[0][:200]}; set lora.target_modules") from None

    def merge_lora(self) -> None:
        """Fold the adapters into the LLM's weights and drop peft (a plain HF model again)."""
        if hasattr(self.llm, "merge_and_unload"):
            self.llm = self.llm.merge_and_unload()

    def set_trainable(self, groups: list[str]) -> None:
        """Freeze everything, then unfreeze the named groups."""
        available = self.param_groups()
        unknown = [g for g in groups if g not in available]
        if unknown:
            raise VlkitError(f"trainable: unknown group(s) {unknown}; choose from {sorted(available)}")
        self.requires_grad_(False)
        for g in groups:
            for p in available[g]:
                p.requires_grad_(True)
        self.trainable_groups = list(groups)

    # -- forward -----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, H, W) pixels or (n, N, C) cached tower features -> visual tokens (n, M, D)."""
        features = self.image_features(pixel_values, image_features)
        if features is None:
            raise VlkitError("encode_images needs pixel_values or image_features")
        return self.vpg(features.to(self.vpg_dtype))

    @property
    def vpg_dtype(self) -> torch.dtype:
        return next(self.vpg.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        has_images = (pixel_values is not None and len(pixel_values)) or \
            (image_features is not None and len(image_features))
        if has_images:
            visual = self.encode_images(pixel_values, image_features)
        else:
            visual = embeds.new_zeros(0, self.num_image_tokens, embeds.shape[-1])
        return scatter_image_tokens(embeds, input_ids, self.image_token_id, visual)

    def image_features(self, pixel_values: torch.Tensor | None = None,
                       image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """Tower features (n, N, C) of the images given as pixels or as cached features (None without images)."""
        if image_features is not None and len(image_features):
            return image_features
        if pixel_values is not None and len(pixel_values):
            return self.vision(pixel_values)
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, **kwargs):
        features = self.image_features(pixel_values, image_features)
        embeds = self.embed(input_ids, image_features=features)
        with self.completing(input_ids, features, attention_mask, labels):
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def save(self, directory: str | Path, processor=None) -> None:
        from vlkit.models.io import save_vlm

        save_vlm(self, directory, processor)
