"""The vision stack: one or more encoders whose features become the one sequence the VPG reads.

    pixels, one tensor per encoder (its own transform)
        -> encode(): features per encoder, [(n, N_i, C_i)]      (what the feature cache stores)
        -> combine(): (n, N, C)                                 (what the VPG and VPG-C read)

With one encoder `combine` is the identity. Several encoders of one width are joined as one token
sequence, in the order they are listed (N = sum of N_i). With `mix` (SPHINX, sec. 3.2) encoders of any
widths and grids are mixed:

    grid encoders   patches (n, h_i*w_i, C_i) -> resampled to one G x G grid (nearest: SPHINX's 2x repeat of
                    ConvNeXt's 8x8) -> [special tokens; grid] per encoder -> channels concatenated (sum C_i)
                    -> Linear + LayerNorm -> (n, s + G*G, D)
    query encoders  (BLIP-2 Q-Former tokens, `query_stream`) -> each its own Linear + LayerNorm -> (n, Q_j, D)
    one view        [start; queries...; mixed grid; end]      learned start/end-of-image embeddings

For a tiled model (`vlkit.data.tiling`) every row is one view of an image; `combine(..., views=ids)` adds the
learned embedding of each row's view index when the tiling asks for positions.

Inputs and features travel as a tensor for a one-encoder stack, and as a list (one entry per encoder)
for several (vlkit.data.features: `as_list`, `as_batch`, `count`, `select`, `repeat`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.features import as_list
from vlkit.data.tiling import TileConfig
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, build_encoder


class MixConfig(Section):
    """Mixing the visual embeddings of several encoders (SPHINX)."""

    width: int | None = Field(None, gt=0, description="Width D of the mixed sequence (default: the LLM's, so the "
                              "mix projects straight into it as SPHINX does; pair it with vpg.kind identity).")
    grid: int | None = Field(None, gt=0, description="Side G of the common grid (default: the largest encoder grid).")
    resample: Literal["nearest", "bilinear"] = Field("nearest", description="How grids are resized to G x G.")
    boundaries: bool = Field(True, description="Learned start/end-of-image embeddings around each view.")


def is_query(encoder: VisionEncoder) -> bool:
    """A query stream (learned queries, no patch grid: BLIP-2's Q-Former) rather than a grid encoder."""
    return bool(getattr(encoder, "query_stream", False))


class Mixer(nn.Module):
    """Grid encoders resampled, channel-concatenated and projected; query streams projected on their own."""

    def __init__(self, encoders: list[VisionEncoder], cfg: MixConfig, width: int):
        super().__init__()
        self.cfg, self.width = cfg, width
        self.grids = [i for i, e in enumerate(encoders) if not is_query(e)]
        self.queries = [i for i, e in enumerate(encoders) if is_query(e)]
        specials = {encoders[i].num_tokens - encoders[i].num_patches for i in self.grids}
        if len(specials) > 1:
            raise VlkitError(f"mix: the grid encoders keep {sorted(specials)} special tokens each; give them the "
                             "same count (tower[i].select: full keeps the class token, patch drops it)")
        self.num_special = specials.pop() if specials else 0
        sides = [max(encoders[i].grid) for i in self.grids]
        self.side = cfg.grid or (max(sides) if sides else 0)
        self.slices = [encoders[i].patch_slice() for i in self.grids]
        self.shapes = [encoders[i].grid for i in self.grids]
        in_width = sum(encoders[i].width for i in self.grids)
        self.grid_proj = nn.Sequential(nn.Linear(in_width, width), nn.LayerNorm(width)) if self.grids else None
        self.query_proj = nn.ModuleList(nn.Sequential(nn.Linear(encoders[i].width, width), nn.LayerNorm(width))
                                        for i in self.queries)
        self.num_queries = sum(encoders[i].num_tokens for i in self.queries)
        if cfg.boundaries:  # SPHINX initialises its image tags uniformly in [0, 1)
            self.start = nn.Parameter(torch.rand(width))
            self.end = nn.Parameter(torch.rand(width))

    @property
    def num_tokens(self) -> int:
        grid = self.num_special + self.side * self.side if self.grids else 0
        return self.num_queries + grid + (2 if self.cfg.boundaries else 0)

    def resample(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(n, h*w, C) row-major -> (n, G*G, C)."""
        n, _, c = patches.shape
        if grid == (self.side, self.side):
            return patches
        x = patches.transpose(1, 2).reshape(n, c, *grid)
        kw = {"align_corners": False} if self.cfg.resample == "bilinear" else {}
        x = F.interpolate(x.float(), size=(self.side, self.side), mode=self.cfg.resample, **kw).to(patches.dtype)
        return x.flatten(2).transpose(1, 2)

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Features per encoder [(n, N_i, C_i)] -> (n, N, D)."""
        seq = [proj(parts[i]) for proj, i in zip(self.query_proj, self.queries)]
        if self.grids:
            columns = []
            for i, sl, grid in zip(self.grids, self.slices, self.shapes):
                x = parts[i]
                keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
                keep[sl] = False
                columns.append(torch.cat([x[:, keep], self.resample(x[:, sl], grid)], dim=1))  # specials first
            seq.append(self.grid_proj(torch.cat(columns, dim=-1)))
        x = torch.cat(seq, dim=1)
        if self.cfg.boundaries:
            n = len(x)
            x = torch.cat([self.start.expand(n, 1, -1).to(x.dtype), x, self.end.expand(n, 1, -1).to(x.dtype)], 1)
        return x


class VisionStack(nn.Module):
    def __init__(self, encoders: list[VisionEncoder], mix: MixConfig | None = None, tiles: TileConfig | None = None,
                 mix_width: int | None = None):
        super().__init__()
        if not encoders:
            raise VlkitError("tower: a vision stack needs at least one encoder")
        widths = sorted({e.width for e in encoders})
        if mix is None and len(widths) > 1:
            raise VlkitError(f"tower: encoders of widths {widths} cannot be joined as one token sequence; give them "
                             "one width, or mix them (model.mix: {width: D}, as SPHINX does)")
        self.encoders = nn.ModuleList(encoders)
        self.mix_config, self.tiles = mix, tiles
        self.mixer = None
        if mix is not None:
            width = mix.width or mix_width
            if width is None:
                raise VlkitError("mix.width: give the width of the mixed sequence (or build the stack with a VLM, "
                                 "whose LLM width is the default)")
            self.mixer = Mixer(encoders, mix.model_copy(update={"width": width}), width)
        self.view_embed = None
        if tiles is not None and tiles.positions:
            self.view_embed = nn.Parameter(torch.zeros(tiles.num_views, self.width))

    @classmethod
    def build(cls, cfg: EncoderConfig | list[EncoderConfig], device=None, mix: MixConfig | None = None,
              tiles: TileConfig | None = None, mix_width: int | None = None) -> "VisionStack":
        encoders = [build_encoder(c, device=device) for c in (cfg if isinstance(cfg, list) else [cfg])]
        stack = cls(encoders, mix, tiles, mix_width)
        if device == "meta":
            stack.to("meta")
        return stack

    @property
    def width(self) -> int:
        return self.mixer.width if self.mixer is not None else self.encoders[0].width

    @property
    def num_tokens(self) -> int:
        """Tokens of one image (one view of a tiled image) in `combine`'s output."""
        return self.mixer.num_tokens if self.mixer is not None else sum(e.num_tokens for e in self.encoders)

    @property
    def transforms(self) -> list[ImageTransform]:
        return [e.transform for e in self.encoders]

    @property
    def encoders_frozen(self) -> bool:
        """No encoder trains (the mix projection and view embeddings may): their features can be cached."""
        return not any(p.requires_grad for p in self.encoders.parameters())

    def encode(self, pixel_values) -> list[torch.Tensor]:
        """Pixels (one tensor per encoder) -> features per encoder [(n, N_i, C_i)]; views (n, V, 3, S, S) ->
        (n, V, N_i, C_i)."""
        pixels = as_list(pixel_values)
        if len(pixels) != len(self.encoders):
            raise VlkitError(f"vision stack: {len(pixels)} pixel tensors for {len(self.encoders)} encoders; encode "
                             "images with the model's processor")
        out = []
        for e, p in zip(self.encoders, pixels):
            f = e(p.flatten(0, 1) if p.dim() == 5 else p)
            out.append(f.unflatten(0, p.shape[:2]) if p.dim() == 5 else f)
        return out

    def combine(self, features, views: torch.Tensor | None = None) -> torch.Tensor:
        """Features per encoder -> the one sequence (n, N, C); `views` (n,): each row's view index (tiling)."""
        parts = as_list(features)
        if len(parts) != len(self.encoders):
            raise VlkitError(f"vision stack: features of {len(parts)} encoders for a stack of {len(self.encoders)}")
        if self.mixer is not None:
            dtype = next(self.mixer.parameters()).dtype
            x = self.mixer([p.to(dtype) for p in parts])  # cached features arrive in float32
        else:
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.view_embed is not None and views is not None:
            x = x + self.view_embed[views.to(self.view_embed.device)].unsqueeze(1).to(x.dtype)
        return x

    def forward(self, pixel_values) -> torch.Tensor:
        """Pixels of whole images -> (n, N, C); views of tiled images go through the model
        (`VisionLanguageModel.image_features`), which knows which views each image keeps."""
        if any(p.dim() == 5 for p in as_list(pixel_values)):
            raise VlkitError("vision stack: pixels of views (n, V, 3, S, S) go through the model's image_features, "
                             "which applies the view mask and the view embeddings")
        return self.combine(self.encode(pixel_values))

    def saved_config(self) -> EncoderConfig | list[EncoderConfig]:
        cfgs = [e.saved_config() for e in self.encoders]
        return cfgs[0] if len(cfgs) == 1 else cfgs

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """`vision` (the whole stack), `vision.mix` / `vision.views` where present and, for several encoders,
        `vision.<i>` and its sub-groups."""
        groups = {"vision": list(self.parameters())}
        if self.mixer is not None:
            groups["vision.mix"] = list(self.mixer.parameters())
        if self.view_embed is not None:
            groups["vision.views"] = [self.view_embed]
        if len(self.encoders) > 1:
            for i, e in enumerate(self.encoders):
                groups.update({f"vision.{i}" + (f".{k}" if k else ""): v for k, v in e.param_groups().items()})
        else:
            groups.update({f"vision.{k}": v for k, v in self.encoders[0].param_groups().items() if k})
        return groups
