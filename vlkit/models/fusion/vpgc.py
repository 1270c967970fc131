"""VPG-C, the Visual Prompt Generator Complete (Li, Pan et al., "Fine-tuning Multimodal LLMs to Follow
Zero-shot Demonstrative Instructions", section 3).

A VPG trained on captions keeps only the primary content of an image. VPG-C lets the LLM ask for the
rest: half-way through the decoder it reads what the instruction wants, re-queries each image's stored
vision features with the VPG's own Q-Former, and adds the answer to that image's tokens.

    LLM layers 0 .. k-1  ->  hidden (B, L, D)
        h = hidden[b, last instruction token]                        (B, D)
        q = new queries (M, Dq) + to_query(h)        [zero-init]      (n_images, M, Dq)
        r = Q-Former(q, vision features of the image)                 (n_images, M, Dq)
        hidden[image tokens] += to_llm(r)            [zero-init]      (n_images * M, D)
    LLM layers k .. L-1 on the completed hidden states

k, the 0-based index of the decoder layer whose *input* is completed, defaults to L/2 (the paper's
layer L/2 + 1 counted from one). Both projections start at zero, so a freshly added VPG-C leaves the
model's logits exactly as they were. It runs during prefill only: the decoding steps read the keys and
values the completed prefix left in the cache.

Trainable parameters: M * Dq (queries) + (D * Dq + Dq) + (Dq * D + D) = 6,320,896 for Vicuna-7B
(D = 4096) with BLIP-2's Q-Former (M = 32, Dq = 768).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.tokenizer import IGNORE_INDEX
from vlkit.errors import VlkitError
from vlkit.models.fusion.base import Fusion, FusionInputs, register_fusion
from vlkit.models.llm import decoder_layers


class VPGCConfig(Section):
    layer: int | None = Field(None, ge=0, description="0-based index of the decoder layer whose input is completed "
                              "(default: L/2, the paper's layer L/2+1).")


@dataclass
class _Prefill:
    """What one forward pass needs to complete its hidden states."""

    length: int                 # sequence length of the prefill (decode steps have 1 and are skipped)
    features: torch.Tensor      # (n_images, N, C) vision features, images in token order
    image_mask: torch.Tensor    # (B, L) bool, True at image tokens
    owner: torch.Tensor         # (n_images,) batch row of each image
    instruction: torch.Tensor   # (B,) position of each row's last instruction token


def instruction_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B,) the last token of each row's instruction: the token before the first supervised one when training
    (so the answer never leaks into the query), else the last real token (generation prompts)."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)
    if labels is None:
        return last
    supervised = labels != IGNORE_INDEX
    first = supervised.long().argmax(1)
    return torch.where(supervised.any(1), (first - 1).clamp(min=0), last)


@register_fusion("vpgc")
class VPGC(Fusion):
    """Completes the image tokens that another fusion (`tokens`) placed in the text; takes no slots itself."""

    Config = VPGCConfig
    prefill_only = True  # completes the image tokens in the prompt's pass; decoding steps pass untouched

    def __init__(self, config: VPGCConfig, llm_width: int, qformer_width: int, num_queries: int):
        super().__init__(config)
        self.queries = nn.Parameter(torch.zeros(1, num_queries, qformer_width))
        nn.init.normal_(self.queries, std=0.02)
        self.to_query = nn.Linear(llm_width, qformer_width)
        self.to_llm = nn.Linear(qformer_width, llm_width)
        for linear in (self.to_query, self.to_llm):  # zero-init: the base model, exactly, until trained
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self._prefill: _Prefill | None = None
        self._vpg: tuple = ()  # (the VPG whose Q-Former is re-run,): in a tuple so it is not registered as ours

    @property
    def layer(self) -> int | None:
        return self.config.layer

    @classmethod
    def build(cls, config: VPGCConfig, model) -> "VPGC":
        """Sized for `model`; its VPG must be able to re-query images (a Q-Former VPG)."""
        if not hasattr(model.vpg, "query"):
            raise VlkitError(f"vpgc: needs a qformer VPG to re-query images, not {type(model.vpg).__name__}")
        layers = decoder_layers(model.base_llm)
        layer = len(layers) // 2 if config.layer is None else config.layer
        if layer >= len(layers):
            raise VlkitError(f"vpgc.layer: {layer} is out of range for an LLM with {len(layers)} layers; "
                             f"choose 0..{len(layers) - 1}")
        return cls(config.model_copy(update={"layer": layer}), model.llm_width, model.vpg.config.hidden_size,
                   model.vpg.num_tokens)

    def attach(self, model) -> None:
        """Hook into the input of decoder layer `self.layer`; the VPG's own Q-Former is reused."""
        if not any(f.image_slots(model) for f in model.fusions.values()):
            raise VlkitError("vpgc: completes image tokens, but no fusion of this model places them in the text; "
                             "add the `tokens` fusion before it")
        self._vpg = (model.vpg,)
        decoder_layers(model.base_llm)[self.layer].register_forward_pre_hook(self._complete, with_kwargs=True)

    @contextmanager
    def active(self, x: FusionInputs):
        """Within this block, a forward pass over `x.input_ids` (B, L) is completed with `x.features` (n, N, C)."""
        if x.features is None or not len(x.features):
            yield
            return
        m = self.queries.shape[1]
        mask = x.image_mask
        if int(mask.sum()) != len(x.features) * m:
            raise VlkitError(f"vpgc: {int(mask.sum())} image tokens but {len(x.features)} images x {m} tokens")
        self._prefill = _Prefill(x.input_ids.shape[1], x.features, mask, x.owner,
                                 instruction_positions(x.attention_mask, x.labels))
        try:
            yield
        finally:
            self._prefill = None

    def _complete(self, module, args, kwargs):
        p = self._prefill
        hidden = args[0] if args else kwargs.get("hidden_states")
        if p is None or hidden is None or hidden.shape[1] != p.length:
            return None  # no images, or a decoding step
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[batch, p.instruction.to(hidden.device)]                    # (B, D)
        q = self.queries + self.to_query(h.to(self.queries.dtype))[p.owner.to(hidden.device)][:, None, :]
        r = self._vpg[0].query(p.features.to(self.queries.dtype), q)             # (n, M, Dq)
        delta = self.to_llm(r).to(hidden.dtype)
        completed = hidden + torch.zeros_like(hidden).masked_scatter(p.image_mask.unsqueeze(-1), delta)
        if args:
            return (completed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": completed}
