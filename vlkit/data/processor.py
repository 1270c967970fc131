"""The processor: records -> tensors, exactly as the model was trained.

It applies the chat template, expands each ``<image>`` placeholder into the model's N image tokens,
masks labels outside assistant turns, and turns images into normalised pixels with the tower's
size, mean and std. It is saved inside every model directory (``processor_config.json`` + the
tokenizer) and used by training, evaluation, chat and serving alike.

Conversations longer than ``max_length`` are truncated at the end with a warning; an image whose
tokens would be cut is dropped whole, so image tokens and images always agree.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlkit.data.images import load_image, to_rgb
from vlkit.data.records import count_image_parts
from vlkit.data.tokenizer import IGNORE_INDEX, encode_chat, image_token_id, load_tokenizer, render
from vlkit.data.transforms import normalize
from vlkit.errors import VlkitError
from vlkit.fileio import read_json, write_json

CONFIG_NAME = "processor_config.json"


@dataclass
class ProcessorConfig:
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    num_image_tokens: int
    max_length: int = 512


class VLProcessor:
    def __init__(self, tokenizer, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = image_token_id(tokenizer)

    # -- images -----------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[str | Path | Image.Image | np.ndarray]) -> torch.Tensor:
        """Images (paths, PIL images or uint8 HxWx3 arrays) -> (n, 3, S, S) normalised."""
        s = self.config.image_size
        arrays = []
        for im in images:
            if isinstance(im, np.ndarray):
                arr = im
            else:
                img = im if isinstance(im, Image.Image) else load_image(im)
                img = to_rgb(img)
                arr = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC) if img.size != (s, s) else img)
            arrays.append(arr)
        if not arrays:
            return torch.zeros(0, 3, s, s)
        return normalize(np.stack(arrays), self.config.image_mean, self.config.image_std)

    def blank_image(self) -> np.ndarray:
        s = self.config.image_size
        return np.zeros((s, s, 3), dtype=np.uint8)

    # -- text -------------------------------------------------------------------------------------
    def expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        n = self.config.num_image_tokens
        out_ids, out_labels = [], []
        for t, lab in zip(ids, labels):
            if t == self.image_token_id:
                out_ids.extend([t] * n)
                out_labels.extend([IGNORE_INDEX] * n)
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def encode(self, messages: list[dict], num_images: int, record_id: str = "conversation",
               add_generation_prompt: bool = False, truncate: bool = True) -> dict:
        """-> {"input_ids", "labels", "num_images"} with image placeholders expanded (cut to max_length with a
        warning, unless `truncate` is false).

        `num_images` is the number of images supplied; a mismatch with the placeholders is an error
        naming the record."""
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
        ids, labels = self.expand(ids, labels)
        if not truncate:
            return {"input_ids": ids, "labels": labels, "num_images": expected}
        return self._truncate(ids, labels, expected, record_id)

    def _truncate(self, ids, labels, n_images, record_id) -> dict:
        limit = self.config.max_length
        if len(ids) <= limit:
            return {"input_ids": ids, "labels": labels, "num_images": n_images}
        # never split an image's tokens: a partially included image is dropped whole
        cut = limit - ids[:limit].count(self.image_token_id) % self.config.num_image_tokens
        kept = ids[:cut].count(self.image_token_id) // self.config.num_image_tokens
        warnings.warn(f"{record_id}: {len(ids)} tokens exceed max_length {limit}; truncated to {cut} tokens "
                      f"and {kept} of {n_images} images", stacklevel=2)
        return {"input_ids": ids[:cut], "labels": labels[:cut], "num_images": kept}

    # -- batching ---------------------------------------------------------------------------------
    def pad(self, encodings: list[dict], side: str = "right") -> dict[str, torch.Tensor]:
        return pad_encodings(encodings, self.tokenizer.pad_token_id, side)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        write_json(directory / CONFIG_NAME, {"processor_class": "VLProcessor", **asdict(self.config)})

    @classmethod
    def load(cls, directory: str | Path) -> "VLProcessor":
        directory = Path(directory)
        data = read_json(directory / CONFIG_NAME)
        data.pop("processor_class", None)
        try:
            cfg = ProcessorConfig(**data)
        except TypeError as e:
            raise VlkitError(f"{directory / CONFIG_NAME}: unexpected keys ({e}); re-save the model") from None
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
