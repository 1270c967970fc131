"""Visual features cached by image content, for serving.

The chat API is stateless: every turn of a conversation sends all of its images again. `VisualCache` keeps the
vision stack's per-encoder features of the most recent images, keyed by a hash of the pixels the model would
see (after the processor's transform), so an image is encoded once per conversation, not once per turn; what
the model computes is unchanged (its fusions read cached features exactly as they read the encoders' output).
High-resolution (tiled) models are served without it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from vlkit.data.features import as_batch, as_list


class VisualCache:
    """The last `capacity` images' encoder features (LRU). Used by the engine's worker thread only."""

    def __init__(self, model, processor, capacity: int = 64):
        self.model, self.processor, self.capacity = model, processor, capacity
        self.entries: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.model.takes_images and not self.model.tiled

    def inputs(self, images: list) -> dict | None:
        """Model inputs ({"image_features"}) for these images, in order: cached ones reused, the others encoded in
        one batch and kept. None without images (or when the cache is off)."""
        if not images or not self.enabled:
            return None
        parts = as_list(self.processor.image_inputs(images)["pixel_values"])
        keys = [hashlib.sha256(b"".join(p[i].numpy().tobytes() for p in parts)).hexdigest()
                for i in range(len(images))]
        new = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.hits += len(keys) - len(new)
        if new:
            rows = [keys.index(k) for k in new]
            with torch.no_grad():
                feats = self.model.vision.encode([p[rows] for p in parts])
            for j, k in enumerate(new):
                self.entries[k] = [f[j:j + 1].clone() for f in feats]  # its own memory: eviction frees it
            self.misses += len(new)
        for k in keys:
            self.entries.move_to_end(k)
        features = [torch.cat([self.entries[k][e] for k in keys]) for e in range(len(parts))]
        while len(self.entries) > self.capacity:  # this request's images are the newest: never evicted here
            self.entries.popitem(last=False)
        return {"image_features": as_batch(features)}
