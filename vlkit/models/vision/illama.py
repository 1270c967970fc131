"""iLLaMA: a LLaMA-style vision transformer (Wang et al. 2024, "Adapting LLaMA Decoder to Vision Transformer").

A ViT "LLaMAfied": pre-norm RMSNorm (eps 1e-6), SwiGLU MLP (hidden int(2/3 * 4D) rounded up to a multiple of
256, no biases), fused qkv with bias and an output projection with bias, a learnable absolute position
embedding plus 1-D RoPE over the flattened sequence (adjacent channel pairs rotated, as the released code's
complex form), stochastic depth, and causal self-attention with the class token **after** the patches
(section 3.2: with the class token first, a causal mask lets it see only itself and training collapses):

    patches (B, N, D) ++ class token (B, 1, D) + position embedding  ->  blocks  ->  RMSNorm  ->  last token -> head

Attention (section 3.3): `bidirectional`, `causal` (the standard mask, before the softmax) or `soft`, the
released code's post-softmax mask without renormalisation, O = (softmax(QK^T / sqrt(d)) * S) V with
S = alpha * 1 + (1 - alpha) * C (C lower-triangular ones): alpha = 1 is bidirectional attention, alpha = 0
the causal mask applied after the softmax; `alpha` moves from 1 to 0 early in training (`mask_alpha`).

As a vlkit vision encoder (`tower: {kind: illama, path: DIR}`) it gives every token of a layer, its grid,
where its class token sits (last, or first) and its transform. Sizes T/S/B/L with a 1000-class head:
5,701,096 / 22,018,024 / 86,502,376 / 310,445,032 parameters (the released logs; tested on meta).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlkit.config import Section, validate
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, on_device, register_encoder

Attention = Literal["bidirectional", "causal", "soft"]
SIZES = {"tiny": {"width": 192, "depth": 12, "heads": 3}, "small": {"width": 384, "depth": 12, "heads": 6},
         "base": {"width": 768, "depth": 12, "heads": 12}, "large": {"width": 1024, "depth": 24, "heads": 16}}
MODEL_TYPE = "vlkit_illama"


class ILlamaConfig(Section):
    image_size: int = Field(224, gt=0, description="Input side in pixels.")
    patch_size: int = Field(16, gt=0, description="Patch side: (image_size / patch_size)^2 patches.")
    width: int = Field(192, gt=0, description="D, the token width.")
    depth: int = Field(12, gt=0, description="Blocks.")
    heads: int = Field(3, gt=0, description="Attention heads.")
    mlp_ratio: float = Field(4.0, gt=0, description="SwiGLU hidden = int(2/3 * ratio * D), rounded up to multiple_of.")
    multiple_of: int = Field(256, gt=0)
    num_classes: int = Field(1000, ge=0, description="Classifier outputs (0: no head).")
    drop_path: float = Field(0.0, ge=0, lt=1, description="Stochastic depth at the last block (linear from 0).")
    attention: Attention = Field("soft", description="bidirectional | causal (mask before the softmax) | soft "
                                 "(S = alpha + (1 - alpha) * C after the softmax; alpha 0 = causal).")
    cls_position: Literal["first", "last"] = Field("last", description="The class token before or after the "
                                                   "patches (the paper: after; first collapses under a causal mask).")
    rope_theta: float = Field(10000.0, gt=0)
    image_mean: list[float] = Field([0.5, 0.5, 0.5])
    image_std: list[float] = Field([0.5, 0.5, 0.5])

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise VlkitError(f"illama: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self.image_size // self.patch_size

    @property
    def hidden(self) -> int:
        h = int(2 * int(self.width * self.mlp_ratio) / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)

    def transform(self) -> ImageTransform:
        return ImageTransform.of(self.image_size, self.image_mean, self.image_std, "squash")


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """1-D RoPE over positions 0..N-1 of x (B, H, N, d), channels rotated in adjacent pairs (2i, 2i+1)."""
    n, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(n, device=x.device, dtype=torch.float32), freqs)    # (N, d/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.float().reshape(*x.shape[:-1], d // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).type_as(x)


def soft_mask(n: int, alpha: float, device=None) -> torch.Tensor:
    """S (N, N) = alpha * 1 + (1 - alpha) * lower-triangular ones."""
    c = torch.tril(torch.ones(n, n, device=device))
    return alpha + (1 - alpha) * c


class DropPath(nn.Module):
    """Stochastic depth: in training, a sample's residual branch is dropped with probability p (kept ones / (1-p))."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(self, cfg: ILlamaConfig, drop_path: float):
        super().__init__()
        d = cfg.width
        self.heads, self.theta = cfg.heads, cfg.rope_theta
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.w1, self.w3 = nn.Linear(d, cfg.hidden, bias=False), nn.Linear(d, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, d, bias=False)
        self.drop = DropPath(drop_path)

    def attention_weights(self, x: torch.Tensor, mode: Attention, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D), normalised -> (attention (B, H, N, N) as it multiplies V, V (B, H, N, d))."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, self.theta), rope(k, self.theta)
        scores = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        if mode == "causal":
            scores = scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device)),
                                        float("-inf"))
        attn = scores.softmax(-1)
        if mode == "soft":
            attn = attn * soft_mask(n, alpha, x.device).to(attn.dtype)
        return attn, v

    def forward(self, x: torch.Tensor, mode: Attention, alpha: float) -> torch.Tensor:
        attn, v = self.attention_weights(self.norm1(x), mode, alpha)
        b, n, d = x.shape
        x = x + self.drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)))
        h = self.norm2(x)
        return x + self.drop(self.w2(F.silu(self.w1(h)) * self.w3(h)))


class ILlama(nn.Module):
    def __init__(self, cfg: ILlamaConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.grid
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, cfg.width))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear from 0
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else None
        self.alpha = 1.0  # the soft mask's alpha (attention "soft"); set by the schedule each step
        if not any(p.is_meta for p in self.parameters()):
            self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def cls_index(self) -> int:
        return -1 if self.cfg.cls_position == "last" else 0

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> tokens (B, N + 1, D): the patches in raster order, the class token after (or before)."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(len(x), -1, -1)
        x = torch.cat((x, cls) if self.cfg.cls_position == "last" else (cls, x), 1)
        return x + self.pos_embed

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[embeddings, after block 1, ..., after block L] (each (B, N + 1, D)), as transformers' hidden_states."""
        x = self.embed(pixel_values)
        out = [x]
        for blk in self.blocks:
            x = blk(x, self.cfg.attention, self.alpha)
            out.append(x)
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> logits (B, num_classes) from the class token after the final norm."""
        return self.head(self.norm(self.hidden_states(pixel_values)[-1])[:, self.cls_index])

    @torch.no_grad()
    def attention_maps(self, pixel_values: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """The attention (B, H, N + 1, N + 1) of block `layer`, as it multiplies V (the soft mask included)."""
        x = self.hidden_states(pixel_values)[layer]
        return self.blocks[layer].attention_weights(self.blocks[layer].norm1(x), self.cfg.attention, self.alpha)[0]


def mask_alpha(step: int, steps_per_epoch: float, schedule: Literal["none", "constant", "linear"], alpha0: float,
               cutoff_epochs: float) -> float:
    """The soft mask's alpha at optimiser step `step` (section 3.3): constant = alpha0 until the cutoff, then 0;
    linear = from alpha0 down to 0 at the cutoff; none = 0 throughout (a plain post-softmax causal mask)."""
    cutoff = cutoff_epochs * steps_per_epoch
    if schedule == "none" or step >= cutoff:
        return 0.0
    return alpha0 if schedule == "constant" else alpha0 * (1 - step / cutoff)


# -- save / load ----------------------------------------------------------------------------------------
def write_illama(model: ILlama, directory: str | Path) -> Path:
    """Into an existing directory: config.json ({"model_type": "vlkit_illama", "illama": config}) and
    model.safetensors."""
    from safetensors.torch import save_file

    from vlkit.fileio import write_json

    directory = Path(directory)
    write_json(directory / "config.json", {"model_type": MODEL_TYPE, "illama": model.cfg.model_dump(mode="json")})
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    return directory


def save_illama(model: ILlama, directory: str | Path) -> Path:
    """`write_illama` into a fresh directory, atomically."""
    from vlkit.fileio import atomic_dir

    with atomic_dir(directory) as tmp:
        write_illama(model, tmp)
    return Path(directory)


def load_illama(directory: str | Path) -> ILlama:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlkit.fileio import read_json

    path = Path(directory)
    meta = read_json(path / "config.json")
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        raise VlkitError(f"{path}: not an iLLaMA directory (config.json model_type is not {MODEL_TYPE!r}); "
                         "train one with recipe illama")
    model = ILlama(validate(ILlamaConfig, meta.get("illama", {}), str(path / "config.json")))
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise VlkitError(f"{path / 'model.safetensors'}: missing, corrupt or mismatched weights "
                         f"({str(e).splitlines()[0][:160]})") from None
    return model.eval()


@register_encoder("illama")
class ILlamaEncoder(VisionEncoder):
    """iLLaMA as a VLM tower: every token of `feature_layer` (an index into hidden_states, or `output`: after
    the final norm); the class token sits where the model put it."""

    def __init__(self, model: ILlama, cfg: EncoderConfig):
        t = model.cfg.model_copy(update={k: v for k, v in (("image_mean", cfg.image_mean),
                                                           ("image_std", cfg.image_std)) if v is not None})
        super().__init__(cfg, t.transform(), model.cfg.width, (model.cfg.grid, model.cfg.grid), 1)
        self.special_position = model.cfg.cls_position
        self.model = model

    @classmethod
    def build(cls, cfg: EncoderConfig, device=None) -> "ILlamaEncoder":
        if cfg.path and device != "meta":
            return cls(load_illama(cfg.path), cfg)
        if not cfg.arch:
            raise VlkitError("tower (illama): set path (a directory written by recipe illama) or arch")
        with on_device(device):
            return cls(ILlama(validate(ILlamaConfig, cfg.arch, "tower.arch (illama)")), cfg)

    def arch(self) -> dict:
        return self.model.cfg.model_dump(mode="json")

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layer = self.cfg.feature_layer
        states = self.model.hidden_states(pixel_values)
        return self.model.norm(states[-1]) if layer == "output" else states[layer]
