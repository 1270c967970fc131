"""The fusion interface: how visual information enters the LLM.

A model holds a list of fusions (`VisionLanguageModel.fusions`, applied in order) and runs every forward
pass, in training, generation, evaluation, chat and serving alike, through the same three calls:

    x = FusionInputs(...)                        what this pass carries: ids, masks, features, visual tokens
    embeds = fusion.embed(embeds, x)             change the input embeddings (tokens: visual tokens in place)
    with fusion.active(x): llm(inputs_embeds=..) act inside the decoder (VPG-C: hooks on a layer's input)

A fusion also says how many token slots an image takes in the text (`image_slots`: the VPG's M for
`tokens`, 0 for a fusion that acts inside the decoder only), declares its parameter groups, and names the
stock formats (`exports`) that can represent it. Register a new one with `register_fusion`; the core
never names a particular fusion.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from vlkit.config import Section
from vlkit.errors import VlkitError


@dataclass
class FusionInputs:
    """What one forward pass over a batch hands every fusion."""

    input_ids: torch.Tensor                 # (B, L)
    attention_mask: torch.Tensor            # (B, L) 1 on real tokens
    labels: torch.Tensor | None             # (B, L) -100 outside supervised tokens (training only)
    image_token_id: int
    features: torch.Tensor | None           # (n, N, C) the vision stack's features, images in text order
    visual: torch.Tensor | None             # (n, M, D) the VPG's visual tokens
    owner: torch.Tensor                     # (n,) the batch row of each image

    @property
    def image_mask(self) -> torch.Tensor:
        """(B, L) True at image token slots."""
        return self.input_ids == self.image_token_id

    @property
    def num_images(self) -> int:
        return len(self.owner)


class Fusion(nn.Module):
    """Base of every fusion: a no-op in each role; a subclass overrides the roles it plays."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type[Section]] = Section
    exports: ClassVar[frozenset[str]] = frozenset()  # stock formats (llava, blip-2) that can represent it
    takes_views: ClassVar[bool] = False  # works on a tiled model, whose visual rows are views, not images
    prefill_only: ClassVar[bool] = False  # its `active` acts on the prompt's pass alone, never on a decoding step

    def __init__(self, config: Section):
        super().__init__()
        self.config = config

    @classmethod
    def build(cls, config: Section, model: nn.Module) -> "Fusion":
        """A fusion sized for `model` (its parameters are created here, then moved to the VPG's device)."""
        return cls(config)

    def attach(self, model: nn.Module) -> None:
        """Called once the fusion belongs to `model` (register hooks on decoder layers here)."""

    def image_slots(self, model: nn.Module) -> int:
        """Token slots an image takes in the text for this fusion."""
        return 0

    def embed(self, embeds: torch.Tensor, x: FusionInputs) -> torch.Tensor:
        """Input embeddings (B, L, D) -> fused input embeddings (B, L, D)."""
        return embeds

    def active(self, x: FusionInputs) -> contextlib.AbstractContextManager:
        """A context within which an LLM forward pass over `x` is acted on by this fusion."""
        return contextlib.nullcontext()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        params = list(self.parameters())
        return {self.kind: params} if params else {}

    def settings(self) -> dict:
        """What rebuilds this fusion, saved in the model's config (`kind` + its config, resolved)."""
        return {"kind": self.kind, **self.config.model_dump(mode="json")}


FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(kind: str) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator: make `fusions: [{kind: <kind>, ...}]` build this fusion."""
    def add(cls: type[Fusion]) -> type[Fusion]:
        cls.kind = kind
        FUSIONS[kind] = cls
        return cls
    return add


def fusion_config(spec: dict, where: str = "fusions") -> tuple[type[Fusion], Section]:
    """A fusion spec ({"kind": ..., options}) -> (its class, its validated config)."""
    from vlkit.config import validate

    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in FUSIONS:
        raise VlkitError(f"{where}: unknown fusion kind {kind!r}; choose one of {sorted(FUSIONS)} (or register one "
                         "with vlkit.models.fusion.register_fusion)")
    cls = FUSIONS[kind]
    return cls, validate(cls.Config, spec, f"{where} ({kind})")
