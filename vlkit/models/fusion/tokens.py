"""`tokens` fusion (LLaVA, BLIP-2): the VPG's visual tokens replace the image placeholder embeddings.

Each image takes the VPG's M token slots in the text; its M visual tokens are written there, in the
order the images appear (transformers' llava does the same with `masked_scatter`). Exports to stock
`llava` and `blip-2`.
"""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError
from vlkit.models.fusion.base import Fusion, FusionInputs, register_fusion


def scatter_image_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         visual: torch.Tensor) -> torch.Tensor:
    """embeds (B, L, D), visual (n_images, M, D) in the order the images appear -> fused (B, L, D)."""
    mask = input_ids == image_token_id
    n_slots, n_visual = int(mask.sum()), visual.shape[0] * visual.shape[1]
    if n_slots != n_visual:
        raise VlkitError(f"image features and image tokens do not match: {n_slots} image tokens in the text, "
                         f"{visual.shape[0]} visual rows (images, or views of tiled images) x {visual.shape[1]} tokens "
                         f"= {n_visual}; encode inputs with the model's processor (its image_inputs give the view "
                         "mask of tiled images)")
    if n_visual == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), visual.to(embeds.dtype))


@register_fusion("tokens")
class TokenFusion(Fusion):
    exports = frozenset({"llava", "blip-2"})
    takes_views = True  # visual tokens are written in order, whatever their rows are

    def image_slots(self, model) -> int:
        return model.vpg.num_tokens

    def embed(self, embeds: torch.Tensor, x: FusionInputs) -> torch.Tensor:
        visual = x.visual if x.visual is not None else embeds.new_zeros(0, 0, embeds.shape[-1])
        return scatter_image_tokens(embeds, x.input_ids, x.image_token_id, visual)
