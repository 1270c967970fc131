"""The vision stack: one or more encoders whose features become the one sequence the VPG reads.

    pixels, one tensor per encoder (its own transform)
        -> encode(): features per encoder, [(n, N_i, C_i)]      (what the feature cache stores)
        -> combine(): (n, N, C)                                 (what the VPG and VPG-C read)

With one encoder `combine` is the identity. Several encoders of one width are joined as one token
sequence, in the order they are listed (N = sum of N_i). Mixing the channels of encoders of different
widths (SPHINX) is not built yet; such a stack is refused when it is built.

Inputs and features travel as a tensor for a one-encoder stack, and as a list (one entry per encoder)
for several (vlkit.data.features: `as_list`, `as_batch`, `count`, `select`, `repeat`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.data.features import as_list
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, build_encoder


class VisionStack(nn.Module):
    def __init__(self, encoders: list[VisionEncoder]):
        super().__init__()
        if not encoders:
            raise VlkitError("tower: a vision stack needs at least one encoder")
        widths = sorted({e.width for e in encoders})
        if len(widths) > 1:
            raise VlkitError(f"tower: encoders of widths {widths} cannot be joined as one token sequence; give them "
                             "one width (mixing channels of different encoders, as SPHINX does, is not built yet)")
        self.encoders = nn.ModuleList(encoders)

    @classmethod
    def build(cls, cfg: EncoderConfig | list[EncoderConfig], device=None) -> "VisionStack":
        return cls([build_encoder(c, device=device) for c in (cfg if isinstance(cfg, list) else [cfg])])

    @property
    def width(self) -> int:
        return self.encoders[0].width

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.encoders)

    @property
    def transforms(self) -> list[ImageTransform]:
        return [e.transform for e in self.encoders]

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def encode(self, pixel_values) -> list[torch.Tensor]:
        """Pixels (one tensor per encoder) -> features per encoder [(n, N_i, C)]."""
        pixels = as_list(pixel_values)
        if len(pixels) != len(self.encoders):
            raise VlkitError(f"vision stack: {len(pixels)} pixel tensors for {len(self.encoders)} encoders; encode "
                             "images with the model's processor")
        return [e(p) for e, p in zip(self.encoders, pixels)]

    def combine(self, features) -> torch.Tensor:
        """Features per encoder -> the one sequence (n, N, C)."""
        parts = as_list(features)
        if len(parts) != len(self.encoders):
            raise VlkitError(f"vision stack: features of {len(parts)} encoders for a stack of {len(self.encoders)}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, pixel_values) -> torch.Tensor:
        return self.combine(self.encode(pixel_values))

    def saved_config(self) -> EncoderConfig | list[EncoderConfig]:
        cfgs = [e.saved_config() for e in self.encoders]
        return cfgs[0] if len(cfgs) == 1 else cfgs

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """`vision` (the whole stack) and, for several encoders, `vision.<i>` and its sub-groups."""
        groups = {"vision": list(self.parameters())}
        if len(self.encoders) > 1:
            for i, e in enumerate(self.encoders):
                groups.update({f"vision.{i}" + (f".{k}" if k else ""): v for k, v in e.param_groups().items()})
        else:
            groups.update({f"vision.{k}": v for k, v in self.encoders[0].param_groups().items() if k})
        return groups
