"""The vision-encoder interface: pixels -> features (B, N, C), with the encoder's own image transform.

    class MyEncoder(VisionEncoder):          # register it, and `tower: {kind: mine, arch: {...}}` builds it
        @classmethod
        def build(cls, cfg, device=None): ...            # from cfg.path (weights) or cfg.arch (sizes)
        def tokens(self, pixel_values): ...              # every token of the chosen layer, (B, N_all, C)
        def arch(self) -> dict: ...                      # what rebuilds it without a path (saved in config.json)

An encoder declares its width C, its patch grid, where its special tokens sit in `tokens()` (``first``: a
class token and registers ahead of the patches, as CLIP and DINOv2; ``last``: after them, as iLLaMA;
``none``: SigLIP) and how many there are. `select="patch"` keeps the patches only, wherever the special
tokens sit; `select="full"` keeps every token (BLIP-2).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.transforms import ImageTransform, Resize
from vlkit.errors import VlkitError


class EncoderConfig(Section):
    """One vision encoder: a local directory, or an architecture to build from scratch."""

    kind: str = Field("hf", description="Which encoder class builds it (vlkit.models.vision.ENCODERS): hf = any "
                      "supported transformers vision model (CLIP, SigLIP, DINOv2, BLIP-2's EVA ViT).")
    path: str | None = Field(None, description="Local model directory (for hf: CLIPVisionModel, ...).")
    arch: dict | None = Field(None, description="Architecture (for hf: model_type + sizes) when not loading.")
    feature_layer: int | Literal["output"] = Field(
        -2, description="Features: hidden_states[i] (-1 last, -2 penultimate: what llava's vision_feature_layer "
        "means), or `output`: the encoder's final output (post-layernorm where it has one, as BLIP-2 reads it).")
    select: Literal["patch", "full"] = Field("patch", description="patch: drop CLS/register tokens (wherever they "
                                             "sit); full: keep every token.")
    image_mean: list[float] | None = Field(None, description="Override the encoder's normalisation mean.")
    image_std: list[float] | None = Field(None, description="Override the encoder's normalisation std.")
    resize: Resize | None = Field(None, description="Override the resize policy: squash | crop | pad (default: "
                                  "what the encoder's preprocessor config says; squash without one).")


def on_device(device) -> contextlib.AbstractContextManager:
    """Create modules on the meta device (no memory, no weights) when asked, else as usual."""
    return torch.device("meta") if device == "meta" else contextlib.nullcontext()


class VisionEncoder(nn.Module):
    kind: ClassVar[str] = ""
    special_position: ClassVar[Literal["first", "last", "none"]] = "first"

    def __init__(self, cfg: EncoderConfig, transform: ImageTransform, width: int, grid: tuple[int, int],
                 num_special: int):
        super().__init__()
        self.cfg = cfg
        self.transform = transform
        self.width = width
        self.grid = grid
        self.num_special = num_special if self.special_position != "none" else 0

    # -- what a subclass provides ---------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: EncoderConfig, device=None) -> "VisionEncoder":
        raise NotImplementedError

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> every token of the configured layer, (B, grid[0] * grid[1] + num_special, C)."""
        raise NotImplementedError

    def arch(self) -> dict:
        """The architecture that `build` rebuilds this encoder from without a path (its weights come after)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Tokens per image in `forward`'s output."""
        return self.num_patches + (self.num_special if self.cfg.select == "full" else 0)

    def patch_slice(self) -> slice:
        """Where the patches lie in `forward`'s output (row-major over `grid`)."""
        if self.cfg.select == "patch" or self.num_special == 0:
            return slice(0, self.num_patches)
        if self.special_position == "first":
            return slice(self.num_special, self.num_special + self.num_patches)
        return slice(0, self.num_patches)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> features (B, num_tokens, C)."""
        x = self.tokens(pixel_values.to(device=self.device, dtype=self.dtype))
        if self.cfg.select == "patch" and self.num_special:
            x = x[:, self.num_special:] if self.special_position == "first" else x[:, :-self.num_special]
        return x

    def saved_config(self) -> EncoderConfig:
        """This encoder's config as a saved model keeps it: no path, the architecture and transform inline."""
        t = self.transform
        return self.cfg.model_copy(update={"path": None, "arch": self.arch(), "image_mean": t.mean,
                                           "image_std": t.std, "resize": t.config.resize})

    def fingerprint(self) -> str:
        """Identity of this encoder's features: its tensors (one at a time, so memory stays flat), its feature
        settings and its transform. Hashing tensors rather than files makes the encoder of a saved VLM share
        cached features with the directory it was loaded from."""
        h = hashlib.sha256(f"{self.kind}/{self.cfg.feature_layer}/{self.cfg.select}/{self.transform!r}".encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(f"{name}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups below this encoder's own name (`""`: all of it)."""
        return {"": list(self.parameters())}


ENCODERS: dict[str, type[VisionEncoder]] = {}


def register_encoder(kind: str) -> Callable[[type[VisionEncoder]], type[VisionEncoder]]:
    """Class decorator: make `tower: {kind: <kind>}` build this encoder."""
    def add(cls: type[VisionEncoder]) -> type[VisionEncoder]:
        cls.kind = kind
        ENCODERS[kind] = cls
        return cls
    return add


def build_encoder(cfg: EncoderConfig, device=None) -> VisionEncoder:
    if cfg.kind not in ENCODERS:
        raise VlkitError(f"tower.kind: unknown vision encoder {cfg.kind!r}; choose one of {sorted(ENCODERS)} "
                         "(or register one with vlkit.models.vision.register_encoder)")
    return ENCODERS[cfg.kind].build(cfg, device=device)
