"""`tokens` fusion: visual prompt tokens replace the image placeholder embeddings at the input."""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError


def scatter_image_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         visual: torch.Tensor) -> torch.Tensor:
    """embeds (B, L, D), visual (n_images, M, D) in the order the images appear -> fused (B, L, D)."""
    mask = input_ids == image_token_id
    n_slots, n_visual = int(mask.sum()), visual.shape[0] * visual.shape[1]
    if n_slots != n_visual:
        raise VlkitError(f"image features and image tokens do not match: {n_slots} image tokens in the text, "
                         f"{visual.shape[0]} images x {visual.shape[1]} tokens = {n_visual}; "
                         "encode inputs with the model's processor")
    if n_visual == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), visual.to(embeds.dtype))
