"""The processor: records -> tensors, exactly as the model was trained.

It applies the chat template, expands each ``<image>`` placeholder into the token slots the model's
fusions ask for (the VPG's M tokens for `tokens`; none for a fusion that acts inside the decoder only;
times the image's views for a high-resolution model, `vlkit.data.tiling`), masks labels outside assistant
turns, and turns images into normalised pixels with each encoder's `ImageTransform`. It is saved inside
every model directory (``processor_config.json`` + the tokenizer) and used by training, evaluation, chat and
serving alike.

Conversations longer than ``max_length`` are truncated at the end with a warning; an image whose
tokens would be cut is dropped whole, so image tokens and images always agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field, ValidationError

from vlkit.config import Section
from vlkit.data.features import as_batch
from vlkit.data.records import count_image_parts
from vlkit.data.tiling import TileConfig, Tiler
from vlkit.data.tokenizer import IGNORE_INDEX, encode_chat, image_token_id, load_tokenizer, render
from vlkit.data.transforms import ImageTransform, TransformConfig
from vlkit.errors import VlkitError
from vlkit.fileio import read_json, write_json

CONFIG_NAME = "processor_config.json"


class ProcessorConfig(Section):
    transforms: list[TransformConfig] = Field(default_factory=list, description="One per vision encoder, in order.")
    image_tokens: int = Field(..., ge=0, description="Token slots one image (one view of a tiled image) takes.")
    max_length: int = Field(512, gt=0, description="Longest token sequence (image tokens included).")
    tiles: TileConfig | None = Field(None, description="High-resolution views (global + k x k sub-images); "
                                     "its size resolved.")

    @classmethod
    def from_saved(cls, data: dict, where: str) -> "ProcessorConfig":
        """A saved processor config; those written before transforms were saved name one squash transform."""
        data = {k: v for k, v in data.items() if k != "processor_class"}
        if "image_size" in data:
            data = {"transforms": [{"size": data.pop("image_size"), "mean": data.pop("image_mean"),
                                    "std": data.pop("image_std"), "resize": "squash"}],
                    "image_tokens": data.pop("num_image_tokens"), **data}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise VlkitError(f"{where}: not a vlkit processor config ({e.errors()[0]['msg']}); re-save the model") \
                from None


class VLProcessor:
    def __init__(self, tokenizer, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = image_token_id(tokenizer)
        self.transforms = [ImageTransform(t) for t in config.transforms]
        t = config.tiles
        self.tiler = None if t is None or not self.transforms else \
            Tiler(t, t.size or self.transforms[0].size, self.transforms[0].fill)

    @classmethod
    def for_model(cls, tokenizer, model, max_length: int | None = None) -> "VLProcessor":
        """The processor of `model`: its encoders' transforms, its views and the token slots its fusions ask for."""
        transforms = [t.config for t in model.vision.transforms] if model.takes_images else []
        tiles = model.vision.tiles if model.takes_images else None
        if tiles is not None and tiles.size is None:  # saved resolved: the view side the model was trained with
            tiles = tiles.model_copy(update={"size": transforms[0].size})
        return cls(tokenizer, ProcessorConfig(transforms=transforms, image_tokens=model.image_slots,
                                              max_length=max_length or model.config.max_length, tiles=tiles))

    @property
    def num_views(self) -> int:
        """Views per image (1 without tiling)."""
        return 1 if self.tiler is None else self.tiler.num_views

    # -- images -----------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence):
        """Images (paths, PIL images or numpy arrays of any mode and size) -> (n, 3, S, S) normalised, or
        (n, V, 3, S, S) with views: one tensor for a one-encoder model, a list (one per encoder) for a vision
        stack of several."""
        return self.image_inputs(images)["pixel_values"]

    def image_inputs(self, images: Sequence) -> dict:
        """Model inputs of these images: {"pixel_values"}, and for a tiled model {"view_mask": (n, V) bool}."""
        if not self.transforms:
            raise VlkitError("this model is a text-only LM: it takes no images")
        if self.tiler is None and len(self.transforms) == 1:
            return {"pixel_values": self.transforms[0](images)}
        rgb = [self.transforms[0].rgb(im, f"image {i}") for i, im in enumerate(images)]  # decoded once
        if self.tiler is None:
            return {"pixel_values": as_batch([t(rgb) for t in self.transforms])}
        views = [[t.normalize(self.tiler.arrays(im, t)) for im in rgb] for t in self.transforms]
        pixels = [torch.stack(v) if v else torch.zeros(0, self.num_views, 3, t.size, t.size)
                  for v, t in zip(views, self.transforms)]
        mask = torch.from_numpy(self.tiler.masks([im.size for im in rgb]))
        return {"pixel_values": as_batch(pixels), "view_mask": mask}

    @property
    def views_vary(self) -> bool:
        """Whether an image's view count depends on the image (a tiled model skipping padded sub-images)."""
        return self.tiler is not None and self.tiler.config.skip_padding

    def view_counts(self, images: Sequence) -> list[int] | None:
        """Views kept per image, where that depends on the image (`views_vary`); None where every image takes
        every view."""
        if not self.views_vary:
            return None

        def size(im, where: str) -> tuple[int, int]:
            if isinstance(im, np.ndarray):
                return im.shape[1], im.shape[0]
            return self.transforms[0].rgb(im, where).size  # upright (EXIF applied), as the views are cut

        sizes = [size(im, f"image {i}") for i, im in enumerate(images)]
        return [int(m.sum()) for m in self.tiler.masks(sizes)]

    def blank_image(self) -> np.ndarray:
        """A black image (the blind baseline's input) at the first encoder's size."""
        if not self.transforms:
            raise VlkitError("this model is a text-only LM: it takes no images")
        return self.transforms[0].blank()

    # -- text -------------------------------------------------------------------------------------
    def slots(self, views: Sequence[int] | None, num_images: int, record_id: str = "conversation") -> list[int]:
        """Token slots of each image: `image_tokens` per view it keeps (every view when `views` is None)."""
        if views is not None and len(views) != num_images:
            raise VlkitError(f"{record_id}: {len(views)} view counts for {num_images} images; give one per image "
                             "(processor.view_counts)")
        return [self.config.image_tokens * (self.num_views if views is None else v) for v in
                (views if views is not None else [None] * num_images)]

    def expand(self, ids: list[int], labels: list[int], slots: Sequence[int] | None = None
               ) -> tuple[list[int], list[int], list[int]]:
        """Each placeholder -> its image's slots (`slots`, one per image; default `image_tokens` x views); also
        where each image's slots start."""
        n_images = ids.count(self.image_token_id)
        slots = list(slots) if slots is not None else self.slots(None, n_images)
        out_ids, out_labels, starts = [], [], []
        for t, lab in zip(ids, labels):
            if t == self.image_token_id:
                n = slots[len(starts)]
                starts.append(len(out_ids))
                out_ids.extend([t] * n)
                out_labels.extend([IGNORE_INDEX] * n)
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels, starts

    def encode(self, messages: list[dict], num_images: int, record_id: str = "conversation",
               add_generation_prompt: bool = False, truncate: bool = True, views: Sequence[int] | None = None) -> dict:
        """-> {"input_ids", "labels", "num_images"} with image placeholders expanded (cut to max_length with a
        warning, unless `truncate` is false).

        `num_images` is the number of images supplied; a mismatch with the placeholders is an error
        naming the record. `views`: the views each image keeps (`view_counts`; default: all of them)."""
        expected = count_image_parts({"messages": messages})
        if expected != num_images:
            raise VlkitError(f"{record_id}: {expected} image placeholders but {num_images} images; "
                             "give one image per {'type': 'image'} part")
        if add_generation_prompt:
            text = render(self.tokenizer, messages, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
        else:
            enc = encode_chat(self.tokenizer, messages)
            ids, labels = enc["input_ids"], enc["labels"]
        if ids.count(self.image_token_id) != expected:
            raise VlkitError(f"{record_id}: the text itself contains '<image>'; remove it from the message text")
        slots = self.slots(views, expected, record_id)
        ids, labels, starts = self.expand(ids, labels, slots)
        if not truncate:
            return {"input_ids": ids, "labels": labels, "num_images": expected}
        return self._truncate(ids, labels, starts, slots, record_id)

    def _truncate(self, ids, labels, starts, slots, record_id) -> dict:
        limit = self.config.max_length
        if len(ids) <= limit:
            return {"input_ids": ids, "labels": labels, "num_images": len(starts)}
        # never split an image's tokens: a partially included image is dropped whole
        cut = next((s for s, n in zip(starts, slots) if s < limit < s + n), limit)
        kept = sum(1 for s, n in zip(starts, slots) if s < cut and s + n <= cut)
        warnings.warn(f"{record_id}: {len(ids)} tokens exceed max_length {limit}; truncated to {cut} tokens "
                      f"and {kept} of {len(starts)} images", stacklevel=2)
        return {"input_ids": ids[:cut], "labels": labels[:cut], "num_images": kept}

    # -- batching ---------------------------------------------------------------------------------
    def pad(self, encodings: list[dict], side: str = "right") -> dict[str, torch.Tensor]:
        """A batch of encodings padded to the longest; with `images_per_row` (B,) when they say how many images
        each has (fusions that take no token slots place images by it)."""
        batch = pad_encodings(encodings, self.tokenizer.pad_token_id, side)
        if all("num_images" in e for e in encodings):
            batch["images_per_row"] = torch.tensor([e["num_images"] for e in encodings], dtype=torch.long)
        return batch

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        write_json(directory / CONFIG_NAME, {"processor_class": "VLProcessor", **self.config.model_dump(mode="json")})

    @classmethod
    def load(cls, directory: str | Path) -> "VLProcessor":
        directory = Path(directory)
        cfg = ProcessorConfig.from_saved(read_json(directory / CONFIG_NAME), str(directory / CONFIG_NAME))
        return cls(load_tokenizer(directory), cfg)


def pad_encodings(encodings: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """A batch of {"input_ids", "labels"} lists padded to the longest: input_ids, attention_mask, labels
    (labels -100 on padding), each (B, T)."""
    width = max(len(e["input_ids"]) for e in encodings)
    ids = torch.full((len(encodings), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encodings), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    for i, e in enumerate(encodings):
        n = len(e["input_ids"])
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(e["input_ids"])
        labels[i, sl] = torch.tensor(e["labels"])
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
