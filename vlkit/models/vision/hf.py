"""Vision encoders from transformers: CLIP, SigLIP, DINOv2, BLIP-2's EVA ViT and ConvNeXt (kind ``hf``; the
world ViT is a CLIP), and BLIP-2's Q-Former read as an encoder (kind ``blip2_qformer``).

Loaded from a local directory (with its preprocessor_config.json, which gives the transform) or built
from an architecture config (random weights; on the meta device for shape checks). Features are
``hidden_states[feature_layer]``, or the model's final output with ``feature_layer: output``. What differs
between model types (where special tokens sit, the grid and width of a layer, how a layer's output becomes
tokens, the input side) is one `Layout` per model type in LAYOUTS.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, Blip2Config, PretrainedConfig

from vlkit.data.transforms import ImageTransform, Resize
from vlkit.errors import VlkitError
from vlkit.fileio import read_json
from vlkit.models.llm import arch_of, check_weights
from vlkit.models.vision import convnext
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, on_device, register_encoder


def patch_geometry(config: PretrainedConfig, layer: int | str) -> tuple[int, tuple[int, int]]:
    """A ViT: every layer is hidden_size wide on the (image_size / patch_size)^2 patch grid."""
    side = config.image_size // config.patch_size
    return config.hidden_size, (side, side)


def config_input(pp: dict, config: PretrainedConfig) -> tuple[int, Resize | None]:
    """A ViT takes the side its position embeddings were trained for; the processor's flags say how it gets there."""
    return config.image_size, None


def same(x):
    return x


@dataclass(frozen=True)
class Layout:
    """How vlkit reads one transformers vision model type. The defaults describe a ViT."""

    special: Literal["first", "last", "none"]  # where its special tokens sit in tokens()
    count: int                                 # how many, besides the registers its config declares
    model_class: str = "AutoModel"             # the transformers class that loads and builds it
    geometry: Callable[[PretrainedConfig, int | str], tuple[int, tuple[int, int]]] = patch_geometry  # (C, grid)
    to_tokens: Callable[[torch.Tensor], torch.Tensor] = same    # a layer's output -> (B, N, C)
    input_of: Callable[[dict, PretrainedConfig], tuple[int, Resize | None]] = config_input  # side, resize policy
    arch_defaults: Callable[[dict], dict] = same                # what an arch may leave out
    # where its layer list may be (the ModuleList its encoder loops over; transformers 4 put CLIP's and SigLIP's
    # under vision_model.), so that only the layers up to the one read run
    layers: tuple[str, ...] = ()

    def num_special(self, config: PretrainedConfig) -> int:
        return self.count + getattr(config, "num_register_tokens", 0) if self.special != "none" else 0


LAYOUTS: dict[str, Layout] = {
    "clip_vision_model": Layout("first", 1, layers=("encoder.layers", "vision_model.encoder.layers")),
    "blip_2_vision_model": Layout("first", 1, model_class="Blip2VisionModel",  # not in AutoModel's mapping
                                  layers=("encoder.layers",)),
    "dinov2": Layout("first", 1, layers=("encoder.layer",)),
    "siglip_vision_model": Layout("none", 0, layers=("encoder.layers", "vision_model.encoder.layers")),
    "convnext": Layout("first", 1, geometry=convnext.geometry, to_tokens=convnext.map_tokens,
                       input_of=convnext.input_of, arch_defaults=convnext.arch_defaults),
}


def _layout(model_type: str, where: str) -> Layout:
    if model_type == "blip-2":
        raise VlkitError(f"{where}: a BLIP-2 model is not one vision tower; use tower.kind blip2_qformer for its "
                         "Q-Former's query tokens (or save its vision_model alone for kind hf)")
    if model_type not in LAYOUTS:
        raise VlkitError(f"{where}: model_type {model_type!r} is not a supported vision tower; choose one of "
                         f"{sorted(LAYOUTS)}")
    return LAYOUTS[model_type]


def vision_config_from(arch: dict) -> PretrainedConfig:
    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    return AutoConfig.for_model(model_type, **_layout(model_type, "tower arch").arch_defaults(arch))


def _config_json(path: Path, what: str) -> dict:
    if not (path / "config.json").is_file():
        raise VlkitError(f"{path}: no config.json; point tower.path at a Hugging Face {what} directory")
    return read_json(path / "config.json")


def _load_pretrained(path: Path, what: str, load: Callable[[], nn.Module]) -> nn.Module:
    check_weights(path)
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise VlkitError(f"{path}: cannot load the {what} ({str(e).splitlines()[0][:200]})") from None


def _preprocessor(path: Path) -> dict:
    pp = path / "preprocessor_config.json"
    return read_json(pp) if pp.is_file() else {}


@register_encoder("hf")
class HFEncoder(VisionEncoder):
    """A transformers vision model's tokens, read as its model type's `Layout` says."""

    query_stream: ClassVar[bool] = False  # a patch grid (ConvNeXt's included), not a set of learned queries

    def __init__(self, model: torch.nn.Module, cfg: EncoderConfig, transform: ImageTransform):
        layout = LAYOUTS[model.config.model_type]
        width, grid = layout.geometry(model.config, cfg.feature_layer)
        super().__init__(cfg, transform, width, grid, layout.num_special(model.config))
        self.special_position = layout.special  # per instance: one class serves every HF layout
        self.layout = layout
        self.model = model

    @classmethod
    def build(cls, cfg: EncoderConfig, device=None) -> "HFEncoder":
        pp: dict = {}
        if cfg.path and device != "meta":
            path = Path(cfg.path)
            model_type = _config_json(path, "vision model").get("model_type")
            model_cls = getattr(transformers, _layout(model_type, str(path)).model_class)
            model = _load_pretrained(path, "vision model", lambda: model_cls.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True))
            pp = _preprocessor(path)
        elif cfg.arch:
            hf = vision_config_from(cfg.arch)
            model_cls = getattr(transformers, LAYOUTS[hf.model_type].model_class)
            with on_device(device):
                model = model_cls.from_config(hf) if model_cls is AutoModel else model_cls._from_config(hf)
        else:
            raise VlkitError("tower: set path (a local directory) or arch (an HF vision config)")
        size, resize = LAYOUTS[model.config.model_type].input_of(pp, model.config)
        model.config.image_size = size  # a model of any input side (ConvNeXt) keeps the one it is fed, for arch()
        transform = ImageTransform.from_hf(pp, size, cfg.image_mean, cfg.image_std, cfg.resize or resize)
        return cls(model, cfg, transform)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    def arch(self) -> dict:
        return arch_of(self.model.config)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layer = self.cfg.feature_layer
        with self._only_layers_read() as read:
            out = self.model(pixel_values=pixel_values, output_hidden_states=layer != "output")
        if layer == "output":
            return self.layout.to_tokens(out.last_hidden_state)
        return self.layout.to_tokens(out.hidden_states[-1] if read else out.hidden_states[layer])

    def layers(self) -> nn.ModuleList | None:
        """The model's layer list (None for a model type whose layout names none)."""
        path = self._layers_path
        return None if path is None else self.model.get_submodule(path)

    @functools.cached_property
    def _layers_path(self) -> str | None:
        """Where the layer list sits (found once: the structure is fixed, the cut below swaps a list for a list)."""
        names = dict(self.model.named_modules())
        return next((p for p in self.layout.layers if isinstance(names.get(p), nn.ModuleList)), None)

    @contextlib.contextmanager
    def _only_layers_read(self):
        """While in here the model runs only the layers up to the one read (llava's -2 of 24: the last layer is
        never computed); yields whether it was cut. hidden_states[k] of the full run is the cut run's last."""
        layer, full = self.cfg.feature_layer, self.layers()
        if layer == "output" or full is None:
            yield False
            return
        owner_path, name = self._layers_path.rsplit(".", 1)
        owner = self.model.get_submodule(owner_path)
        keep = layer % (len(full) + 1)  # hidden_states[0] is the embeddings, [i] the output of layer i
        if keep == 0 or keep == len(full):
            yield False
            return
        setattr(owner, name, nn.ModuleList(list(full)[:keep]))
        try:
            yield True
        finally:
            setattr(owner, name, full)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Into an existing directory: the model as transformers saves it and the image processor that
        preprocesses as this encoder's transform does, so `tower: {kind: hf, path: directory}` loads it."""
        self.model.save_pretrained(str(directory))
        self.transform.hf_image_processor().save_pretrained(str(directory))
        return Path(directory)


# -- BLIP-2's Q-Former as an encoder ---------------------------------------------------------------------
class QFormerTower(nn.Module):
    """BLIP-2's image side (Li et al. 2023, section 3.1): the ViT's final output (B, P, D_v), read by learned
    queries (1, Q, H) through the Q-Former's cross-attention -> (B, Q, H); `Blip2Model.get_qformer_features`.
    Its module names are a Blip2Model checkpoint's (vision_model.*, query_tokens, qformer.*), so those tensors
    load as saved, and the language model is never built."""

    def __init__(self, config: Blip2Config):
        from transformers import Blip2QFormerModel, Blip2VisionModel

        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        if not self.query_tokens.is_meta:  # LAVIS's init; transformers' zeros make every query the same
            nn.init.normal_(self.query_tokens, std=config.qformer_config.initializer_range)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(len(image), -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image,
                            encoder_attention_mask=mask).last_hidden_state

    def load_from(self, path: Path) -> None:
        """This tower's tensors out of a Blip2Model / Blip2ForConditionalGeneration directory (one file or sharded);
        the language model's tensors are never read."""
        from vlkit.models.weights import Weights

        weights = Weights(path)
        want = self.state_dict()
        missing = sorted(k for k in want if k not in weights.where)
        if missing:
            raise VlkitError(f"{path}: not a BLIP-2 checkpoint of this config; {len(missing)} tensors missing "
                             f"(e.g. {missing[0]})")
        bad = [k for k in want if tuple(weights.spec(k)[0]) != tuple(want[k].shape)]
        if bad:
            raise VlkitError(f"{path}: {bad[0]} is {weights.spec(bad[0])[0]}, its config says "
                             f"{list(want[bad[0]].shape)}; the weights do not match config.json")
        self.load_state_dict({k: weights.get(k) for k in want})


def qformer_config_from(arch: dict) -> Blip2Config:
    arch = dict(arch)
    if arch.pop("model_type", "blip-2") != "blip-2":
        raise VlkitError("tower arch (blip2_qformer): model_type must be blip-2 (a Blip2Config: vision_config, "
                         "qformer_config, num_query_tokens)")
    return Blip2Config(**arch)


@register_encoder("blip2_qformer")
class Blip2QFormerEncoder(VisionEncoder):
    """BLIP-2's query tokens as a tower's features, (B, num_query_tokens, qformer hidden), as SPHINX mixes them.
    A query stream, not a patch grid: grid (1, Q), no special tokens. Built from a stock BLIP-2 directory (only
    the ViT, the queries and the Q-Former are loaded) or an arch (a Blip2Config's vision_config, qformer_config,
    num_query_tokens). Its own kind rather than an `hf` layout: the model is part of a checkpoint, not one
    transformers class, and `query_stream` is a fact about the class."""

    query_stream: ClassVar[bool] = True
    special_position = "none"

    def __init__(self, tower: QFormerTower, cfg: EncoderConfig, transform: ImageTransform):
        c = tower.config
        super().__init__(cfg, transform, c.qformer_config.hidden_size, (1, c.num_query_tokens), 0)
        self.model = tower

    @classmethod
    def build(cls, cfg: EncoderConfig, device=None) -> "Blip2QFormerEncoder":
        if cfg.feature_layer not in ("output", -1):
            raise VlkitError(f"tower (blip2_qformer): feature_layer {cfg.feature_layer}: the Q-Former gives its "
                             "last layer's query states only; set tower.feature_layer: output")
        pp: dict = {}
        if cfg.path and device != "meta":
            path = Path(cfg.path)
            model_type = _config_json(path, "BLIP-2 model").get("model_type")
            if model_type != "blip-2":
                raise VlkitError(f"{path}: model_type {model_type!r} is not a BLIP-2 model; point tower.path at a "
                                 "Blip2Model or Blip2ForConditionalGeneration directory")

            def load() -> QFormerTower:
                tower = QFormerTower(AutoConfig.from_pretrained(str(path), local_files_only=True))
                tower.load_from(path)
                return tower
            tower = _load_pretrained(path, "BLIP-2 model", load)
            pp = _preprocessor(path)
        elif cfg.arch:
            with on_device(device):
                tower = QFormerTower(qformer_config_from(cfg.arch))
        else:
            raise VlkitError("tower (blip2_qformer): set path (a BLIP-2 directory) or arch (a Blip2Config)")
        transform = ImageTransform.from_hf(pp, tower.config.vision_config.image_size, cfg.image_mean, cfg.image_std,
                                           cfg.resize)
        return cls(tower, cfg, transform)

    def arch(self) -> dict:
        d = arch_of(self.model.config)
        d.pop("text_config", None)  # the language model is not part of this encoder
        return d

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)
