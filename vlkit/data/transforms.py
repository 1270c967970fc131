"""The one image path: a file, a PIL image or a numpy array -> a normalised tensor.

Every vision encoder owns an `ImageTransform`; the processor saves them with the model, and training,
the feature cache, evaluation, chat and serving all go through it, so an image is never preprocessed
with another size, mean or std than the encoder was trained with.

    input (path | PIL | array, any mode)  -> RGB, upright      (vlkit.data.images: EXIF, transparency on white)
                                          -> size x size       (resize policy, bicubic)
                                          -> uint8 (S, S, 3)   (what the pixel cache stores)
                                          -> float (3, S, S)   ((x / 255 - mean) / std)

Resize policies:
    squash  resize to S x S, ignoring the aspect ratio (vlkit's world ViT; SigLIP's processor)
    crop    resize the shorter side to S, then crop the centre S x S (CLIP's processor: shortest_edge + crop_size)
    pad     pad to a square with the mean colour, then resize to S x S (LLaVA-1.5 `expand2square`, SPHINX)
"""

from __future__ import annotations

import os
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from vlkit.config import Section
from vlkit.console import bar
from vlkit.data.images import array_to_image, load_image, to_rgb
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_path, cache_root, stable_hash

Resize = Literal["squash", "crop", "pad"]


class TransformConfig(Section):
    """How one encoder sees an image; saved in the processor config."""

    size: int = Field(..., gt=0, description="Side of the square the encoder takes, in pixels.")
    mean: list[float] = Field([0.5, 0.5, 0.5], description="Per-channel mean after scaling to [0, 1].")
    std: list[float] = Field([0.5, 0.5, 0.5], description="Per-channel std after scaling to [0, 1].")
    resize: Resize = Field("squash", description="squash | crop (shorter side, centre crop) | pad (mean colour).")

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) != 3:
            raise ValueError("needs one value per channel (3)")
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be positive")
        return v


class ImageTransform:
    def __init__(self, config: TransformConfig):
        self.config = config

    @classmethod
    def of(cls, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
           resize: Resize = "squash") -> "ImageTransform":
        return cls(TransformConfig(size=size, mean=list(mean), std=list(std), resize=resize))

    @classmethod
    def from_hf(cls, pp: dict, size: int, mean=None, std=None, resize: Resize | None = None) -> "ImageTransform":
        """From an HF image processor config (preprocessor_config.json): CLIP's `do_center_crop` becomes `crop`,
        LLaVA's `do_pad` `pad`, anything else `squash`; explicit arguments win."""
        policy = resize or ("pad" if pp.get("do_pad") else "crop" if pp.get("do_center_crop") else "squash")
        return cls.of(size, mean or pp.get("image_mean", [0.5] * 3), std or pp.get("image_std", [0.5] * 3), policy)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.config.size

    @property
    def mean(self) -> list[float]:
        return self.config.mean

    @property
    def std(self) -> list[float]:
        return self.config.std

    def to_dict(self) -> dict:
        return self.config.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTransform":
        return cls(TransformConfig.model_validate(data))

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageTransform) and self.config == other.config

    def __repr__(self) -> str:
        c = self.config
        return f"ImageTransform(size={c.size}, resize={c.resize!r}, mean={c.mean}, std={c.std})"

    @property
    def geometry(self) -> dict:
        """What decides the uint8 pixels (not mean/std, which only enter normalisation; except as pad colour)."""
        g = {"res": self.size}
        if self.config.resize != "squash":
            g["resize"] = self.config.resize
        if self.config.resize == "pad":
            g["fill"] = self.fill
        return g

    @property
    def fill(self) -> tuple[int, int, int]:
        """The pad colour: the mean as 8-bit RGB (as LLaVA-1.5 and transformers' LlavaImageProcessor compute it)."""
        return tuple(int(m * 255) for m in self.mean)

    # -- pixels -----------------------------------------------------------------------------------
    def rgb(self, image, where: str = "image") -> Image.Image:
        """Any supported input as an upright RGB PIL image (files are decoded with vlkit's safety limits)."""
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            return to_rgb(array_to_image(image, where))
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        raise VlkitError(f"{where}: {type(image).__name__} is not an image; pass a path, a PIL image or a numpy array")

    def resized(self, img: Image.Image) -> Image.Image:
        s, policy = self.size, self.config.resize
        if policy == "pad":
            img = pad_to_square(img, self.fill)
        elif policy == "crop":
            w, h = img.size
            if (w, h) != (s, s):
                short, long_ = (w, h) if w <= h else (h, w)
                new_long = int(s * long_ / short)  # transformers' shortest-edge rule (truncated)
                new = (s, new_long) if w <= h else (new_long, s)
                if new != (w, h):
                    img = img.resize(new, Image.Resampling.BICUBIC)
                w, h = img.size
                left, top = (w - s) // 2, (h - s) // 2
                img = img.crop((left, top, left + s, top + s))
        if img.size != (s, s):
            img = img.resize((s, s), Image.Resampling.BICUBIC)
        return img

    def array(self, image, where: str = "image") -> np.ndarray:
        """One image -> uint8 (S, S, 3)."""
        return np.asarray(self.resized(self.rgb(image, where)), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (..., S, S, 3) -> float (..., 3, S, S), scaled to [0, 1] then normalised per channel (leading
        dims: images, or images x views of a tiled image)."""
        if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
            pixels = pixels.copy()
        x = torch.as_tensor(pixels)
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - m) / s).reshape(*lead, *x.shape[1:])

    def __call__(self, images: Sequence) -> torch.Tensor:
        """Images (paths, PIL images, arrays; any mix) -> (n, 3, S, S)."""
        if not len(images):
            return torch.zeros(0, 3, self.size, self.size)
        return self.normalize(np.stack([self.array(im, f"image {i}") for i, im in enumerate(images)]))

    def blank(self) -> np.ndarray:
        """A black image at the encoder's size (the blind baseline's input)."""
        return np.zeros((self.size, self.size, 3), dtype=np.uint8)

    def cached_arrays(self, paths: list[str], progress: bool | None = None, tiler=None) -> np.ndarray:
        """Image files decoded once into uint8 (N, S, S, 3), or with a `vlkit.data.tiling.Tiler` their views
        (N, V, S, S, 3), and kept on disk, keyed by the files and geometry."""
        shape = (self.size, self.size, 3) if tiler is None else (tiler.num_views, self.size, self.size, 3)
        if not paths:
            return np.zeros((0, *shape), np.uint8)
        geometry = self.geometry if tiler is None else {**self.geometry, **tiler.geometry}
        key = stable_hash({"paths": paths, **geometry,
                           "stat": [(os.stat(p).st_size, int(os.stat(p).st_mtime)) for p in paths]}, 16)
        path = cache_root() / "pixels" / f"{key}.npy"
        if path.is_file():
            return np.load(path)
        out = np.empty((len(paths), *shape), dtype=np.uint8)
        for i, p in enumerate(bar(paths, desc="decode images", enabled=progress if len(paths) > 2000 else False)):
            out[i] = self.array(p, str(p)) if tiler is None else tiler.arrays(self.rgb(p, str(p)), self)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out)
        return out

    # -- interop ----------------------------------------------------------------------------------
    def hf_image_processor(self):
        """The transformers image processor that preprocesses as this transform does (for stock exports): its PIL
        implementation, which resizes exactly as PIL does here."""
        try:
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
            from transformers import LlavaImageProcessorPil as LlavaImageProcessor
        except ImportError:  # transformers < 5: these are the PIL implementations
            from transformers import CLIPImageProcessor, LlavaImageProcessor

        c = self.config
        common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": c.mean, "image_std": c.std, "do_convert_rgb": True}
        if c.resize == "crop":
            return CLIPImageProcessor(size={"shortest_edge": c.size}, do_center_crop=True,
                                      crop_size={"height": c.size, "width": c.size}, **common)
        if c.resize == "pad":
            return LlavaImageProcessor(size={"height": c.size, "width": c.size}, do_center_crop=False, do_pad=True,
                                       **common)
        return CLIPImageProcessor(size={"height": c.size, "width": c.size}, do_center_crop=False, **common)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """A non-square image centred on a square of its longer side in `fill` (LLaVA-1.5's expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(fill))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    return square


def unique_paths(records: list[dict], position: int = 0) -> tuple[list[str], list[int]]:
    """Distinct image paths (at `position` in each record) and each record's index among them."""
    index: dict[str, int] = {}
    rows = []
    for r in records:
        p = r["images"][position]
        rows.append(index.setdefault(p, len(index)))
    return list(index), rows
