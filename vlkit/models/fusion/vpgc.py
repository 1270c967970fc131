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


class VPGC(nn.Module):
    def __init__(self, llm_width: int, qformer_width: int, num_queries: int, layer: int | None = None):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_queries, qformer_width))
        nn.init.normal_(self.queries, std=0.02)
        self.to_query = nn.Linear(llm_width, qformer_width)
        self.to_llm = nn.Linear(qformer_width, llm_width)
        for linear in (self.to_query, self.to_llm):  # zero-init: the base model, exactly, until trained
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.layer = layer  # None until attach(): then L/2 of the LLM it is attached to
        self._prefill: _Prefill | None = None
        self._vpg: tuple = ()  # (the VPG whose Q-Former is re-run,): in a tuple so it is not registered as ours

    def attach(self, llm: nn.Module, vpg: nn.Module) -> None:
        """Hook into the input of decoder layer `self.layer` (default: L/2); `vpg` is a Q-Former VPG (its Q-Former
        is reused)."""
        if not hasattr(vpg, "query"):
            raise VlkitError(f"vpgc: needs a qformer VPG to re-query images, not {type(vpg).__name__}")
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft-wrapped LLMs too
        layers = decoder_layers(base)
        if self.layer is None:
            self.layer = len(layers) // 2
        if self.layer >= len(layers):
            raise VlkitError(f"vpgc.layer: {self.layer} is out of range for an LLM with {len(layers)} layers; "
                             f"choose 0..{len(layers) - 1}")
        self._vpg = (vpg,)
        layers[self.layer].register_forward_pre_hook(self._complete, with_kwargs=True)

    @contextmanager
    def prefill(self, input_ids: torch.Tensor, features: torch.Tensor | None, image_token_id: int,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Within this block, a forward pass over `input_ids` (B, L) is completed with `features` (n, N, C)."""
        if features is None or not len(features):
            yield
            return
        mask = input_ids == image_token_id
        m = self.queries.shape[1]
        rows = mask.nonzero()[:, 0]
        if len(rows) != len(features) * m:
            raise VlkitError(f"vpgc: {len(rows)} image tokens but {len(features)} images x {m} tokens")
        attn = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self._prefill = _Prefill(input_ids.shape[1], features, mask, rows[::m],
                                 instruction_positions(attn, labels))
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
        q = self.queries + self.to_query(h.to(self.queries.dtype))[p.owner][:, None, :]
        r = self._vpg[0].query(p.features.to(self.queries.dtype), q)             # (n, M, Dq)
        delta = self.to_llm(r).to(hidden.dtype)
        completed = hidden + torch.zeros_like(hidden).masked_scatter(p.image_mask.unsqueeze(-1), delta)
        if args:
            return (completed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": completed}
