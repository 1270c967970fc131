"""VisionLanguageModel: vision stack -> VPG -> fusions -> any HF causal LM.

    images -> VisionStack (n, N, C) -> VPG (n, M, D) ---------+
    text   -> tokenizer -> LLM input embeddings -> fusions ---+-> LLM (fusions active inside) -> logits

A high-resolution model (`tiles`) sees each image as views (global + k x k sub-images, `vlkit.data.tiling`):
the stack and the VPG run per view, so an image's visual tokens are its kept views' tokens in order, and the
rows of `FusionInputs.features` / `.visual` are views.

The model knows no particular encoder, VPG or fusion: it asks each part. Every part declares its named
parameter groups (the stack: ``vision``; the VPG: ``vpg``, ``vpg.queries``, ``vpg.qformer``,
``vpg.projector``; each fusion its own, e.g. ``vpgc``; the LLM: ``llm``, ``llm.embeddings``, ``llm.head``,
``llm.norms``, ``lora``); the model only collects them, and recipes choose groups by name.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.models.fusion import Fusion, FusionInputs, fusion_config
from vlkit.models.llm import LOSS_CHUNK, attention_kwargs, base_model, decoder_layers, llm_groups, load_llm, \
    position_limit, supervised_loss
from vlkit.data.tiling import TileConfig
from vlkit.models.vision import EncoderConfig, VisionStack
from vlkit.models.vision.encoder import on_device
from vlkit.models.vision.stack import MixConfig
from vlkit.data.features import as_list, count
from vlkit.models.vpg import VPGConfig, build_vpg


def _data_parallel() -> bool:
    """Whether this process is one of several (torchrun): then every trainable parameter must take part."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LLMSource(Section):
    """The language model: a local HF directory, or an architecture (random weights / meta device)."""

    path: str | None = Field(None, description="Local HF causal-LM directory (LLaMA, Vicuna, OPT, Qwen2, ...).")
    arch: dict | None = Field(None, description="HF config (model_type + sizes) when not loading weights.")
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: the LLM's directory.")
    attn_implementation: str | None = Field(None, description="The LLM's attention kernel for this run: sdpa "
                                            "(transformers' default), eager, flash_attention_2 (the flash-attn "
                                            "package on a CUDA GPU) or auto (flash_attention_2 where installed, "
                                            "else sdpa). Not saved with the model: a runtime choice.")


class VLMConfig(Section):
    tower: EncoderConfig | list[EncoderConfig] = Field(
        default_factory=EncoderConfig, description="The vision encoder, or a list of them (a vision stack).")
    mix: MixConfig | None = Field(None, description="Mix encoders of any widths and grids (SPHINX): grids resampled "
                                  "to one, channels concatenated and projected, query streams beside them.")
    tiles: TileConfig | None = Field(None, description="High resolution (SPHINX): each image as a global view plus "
                                     "k x k sub-images; tokens per image = views x VPG tokens.")
    vpg: VPGConfig = Field(default_factory=VPGConfig)
    llm: LLMSource = Field(default_factory=LLMSource)
    max_length: int = Field(256, gt=0, description="Longest token sequence (image tokens included).")
    fusions: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"kind": "tokens"}],
        description="How visual information enters the LLM, applied in order: [{kind: tokens}] (visual tokens in "
                    "the text), + {kind: vpgc, layer: k} (VPG-C), ... (vlkit.models.fusion.FUSIONS).")

    @model_validator(mode="before")
    @classmethod
    def _vpgc_key(cls, data):
        """Configs written before fusions were a list name VPG-C in a key of its own."""
        if isinstance(data, dict) and "vpgc" in data:
            data = dict(data)
            old = data.pop("vpgc")
            if old is not None:
                data["fusions"] = list(data.get("fusions") or [{"kind": "tokens"}]) + [{"kind": "vpgc", **old}]
        return data


class VisionLanguageModel(nn.Module):
    def __init__(self, vision: VisionStack | None, vpg: nn.Module | None, llm: PreTrainedModel,
                 image_token_id: int, config: VLMConfig):
        super().__init__()
        limit = position_limit(llm)
        if vision is not None and limit is not None and config.max_length > limit:
            raise VlkitError(f"max_length: {config.max_length} tokens exceed the LLM's {limit} positions "
                             f"(max_position_embeddings of {config.llm.path or type(llm).__name__}); set max_length "
                             f"to at most {limit}")
        self.vision, self.vpg, self.llm = vision, vpg, llm
        self.image_token_id = image_token_id
        self.config = config.model_copy(update={"fusions": []})
        self.trainable_groups: list[str] = []
        self.fusions = nn.ModuleDict()
        for i, spec in enumerate(config.fusions if vision is not None else []):
            cls, cfg = fusion_config(spec, f"model.fusions[{i}]")
            self.add_fusion(cls, cfg)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: VLMConfig, image_token_id: int | None = None, vocab_size: int | None = None,
              device: str | None = None) -> "VisionLanguageModel":
        """Build from parts: load what has a path, create what has an arch (`device="meta"`: no weights)."""
        attn = attention_kwargs(cfg.llm.attn_implementation)
        if cfg.llm.path and device != "meta":
            llm = load_llm(cfg.llm.path, **attn)
        elif cfg.llm.arch:
            arch = dict(cfg.llm.arch)
            hf = AutoConfig.for_model(arch.pop("model_type"), **arch)
            with on_device(device):
                llm = AutoModelForCausalLM.from_config(hf, **attn)
        else:
            raise VlkitError("llm: set path (a local directory) or arch (an HF config)")
        if vocab_size is not None and vocab_size > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(vocab_size)  # a tokenizer that gained <image>
        llm_width = llm.config.get_text_config().hidden_size
        vision = VisionStack.build(cfg.tower, device=device, mix=cfg.mix, tiles=cfg.tiles, mix_width=llm_width)
        vpg = build_vpg(cfg.vpg, vision.width, llm_width, vision.num_tokens)
        if device == "meta":
            vpg = vpg.to("meta")
        if image_token_id is None:
            image_token_id = llm.get_input_embeddings().num_embeddings - 1
        return cls(vision, vpg, llm, image_token_id, cfg)

    @classmethod
    def text_only(cls, llm: PreTrainedModel) -> "VisionLanguageModel":
        """A plain causal LM behind the same interface: no vision stack, no VPG, no fusions; it takes no images."""
        return cls(None, None, llm, -1, VLMConfig(fusions=[]))

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    @property
    def base_llm(self) -> PreTrainedModel:
        return base_model(self.llm)

    @property
    def llm_width(self) -> int:
        return self.llm.config.get_text_config().hidden_size

    @property
    def image_slots(self) -> int:
        """Token slots one image takes in the text: what the fusions ask for (0 when none places tokens)."""
        return sum(f.image_slots(self) for f in self.fusions.values())

    num_image_tokens = image_slots  # the name the processor and reports have always used

    # -- high resolution ---------------------------------------------------------------------------
    def set_tiles(self, tiles: TileConfig | None) -> None:
        """See each image as views from now on (global + k x k sub-images; None: the image alone). The encoders,
        VPG and fusions are unchanged (they run per view); new view embeddings start at zero. Rebuild the processor
        afterwards (`VLProcessor.for_model`): it expands placeholders by the views."""
        if self.vision is None:
            raise VlkitError("tiles: a text-only LM takes no images")
        if tiles is not None:
            refused = [kind for kind, f in self.fusions.items() if not f.takes_views]
            if refused:
                raise VlkitError(f"tiles: the {refused[0]} fusion does not work on views of an image; drop it first")
        kept = self.vision.view_embed if tiles is not None and tiles.positions and self.vision.view_embed is not None \
            and len(self.vision.view_embed) == tiles.num_views else None  # the same views: trained embeddings stay
        self.vision.tiles = tiles
        self.vision.view_embed = kept
        if tiles is not None and tiles.positions and kept is None:
            p = self._anchor
            self.vision.view_embed = nn.Parameter(torch.zeros(tiles.num_views, self.vision.width, device=p.device,
                                                              dtype=p.dtype), requires_grad=False)  # set_trainable
        self.config = self.config.model_copy(update={"tiles": tiles})

    # -- fusions -------------------------------------------------------------------------------------
    def add_fusion(self, kind: str | type[Fusion], config: Section | None = None, **options) -> Fusion:
        """Attach a fusion (by registered kind or class); its weights follow the VPG's device and dtype. A model
        holds one fusion of each kind; the fusion's resolved settings join the model's config."""
        if isinstance(kind, str):
            cls, parsed = fusion_config({"kind": kind, **options})
            config = parsed if config is None else config
        else:
            cls, config = kind, kind.Config(**options) if config is None else config
        if cls.kind in self.fusions:
            raise VlkitError(f"fusions: this model already has a {cls.kind} fusion")
        if self.tiled and not cls.takes_views:
            raise VlkitError(f"fusions: the {cls.kind} fusion does not work on views of an image; drop model.tiles "
                             "or this fusion")
        if self.vpg is None:
            raise VlkitError(f"fusions: a text-only LM takes no images, so no {cls.kind} fusion")
        p = self._anchor
        with on_device("meta" if p.is_meta else None):
            fusion = cls.build(config, self)
        fusion = fusion.to(dtype=p.dtype) if p.is_meta else fusion.to(device=p.device, dtype=p.dtype)
        self.fusions[cls.kind] = fusion
        fusion.attach(self)
        self.config = self.config.model_copy(update={"fusions": [*self.config.fusions, fusion.settings()]})
        return fusion

    def fusion(self, kind: str) -> Fusion:
        if kind not in self.fusions:
            raise VlkitError(f"this model has no {kind} fusion (it has {list(self.fusions) or 'none'})")
        return self.fusions[kind]

    # -- LoRA (peft) -------------------------------------------------------------------------------
    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 target_modules: list[str] | None = None) -> None:
        """Wrap the LLM with LoRA adapters (peft); their parameters form the group `lora`."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise VlkitError("lora: needs peft; pip install 'vlkit[lora]'") from None

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                         task_type="CAUSAL_LM")
        try:
            self.llm = get_peft_model(self.llm, cfg)
        except ValueError as e:
            raise VlkitError(f"lora: {str(e).splitlines()[0][:200]}; set lora.target_modules") from None

    def merge_lora(self) -> None:
        """Fold the adapters into the LLM's weights and drop peft (a plain HF model again)."""
        if hasattr(self.llm, "merge_and_unload"):
            self.llm = self.llm.merge_and_unload()

    def shard_units(self) -> list[nn.Module]:
        """What FSDP shards one by one (each gathered only while it runs): the LLM's decoder layers and each
        vision encoder; embeddings, head, VPG and fusions stay in the root unit."""
        encoders = list(self.vision.encoders) if self.vision is not None else []
        return [*encoders, *decoder_layers(base_model(self.llm))]

    # -- trainable groups ----------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every part's declared groups, collected."""
        groups: dict[str, list[nn.Parameter]] = {}
        if self.vision is not None:
            groups.update(self.vision.param_groups())
        if self.vpg is not None:
            groups["vpg"] = list(self.vpg.parameters())
            groups.update({f"vpg.{k}": v for k, v in self.vpg.param_groups().items()})
        for fusion in self.fusions.values():
            groups.update(fusion.param_groups())
        groups.update(llm_groups(self.llm))
        return groups

    def set_trainable(self, groups: list[str]) -> None:
        """Freeze everything, then unfreeze the named groups."""
        available = self.param_groups()
        unknown = [g for g in groups if g not in available]
        if unknown:
            raise VlkitError(f"trainable: unknown group(s) {unknown}; choose from {sorted(available)}")
        self.requires_grad_(False)
        for g in groups:
            for p in available[g]:
                p.requires_grad_(True)
        self.trainable_groups = list(groups)

    # -- forward -----------------------------------------------------------------------------------
    @property
    def _anchor(self) -> torch.Tensor:
        """A tensor on the device and in the dtype of the visual path (the VPG's; the LLM's for a VPG without
        parameters)."""
        return next(iter([*self.vpg.parameters(), *self.llm.parameters()]))

    @property
    def vpg_dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def tiled(self) -> bool:
        return self.vision is not None and self.vision.tiles is not None

    def image_features(self, pixel_values=None, image_features=None, view_mask: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
        """The stack's features (n, N, C) of images given as pixels or as cached per-encoder features (None
        without images). A tiled model's inputs are views, (n, V, ...): the result has one row per kept view
        (`view_mask` (n, V); default every view), images in order, views in order within each."""
        given = image_features if count(image_features) else pixel_values if count(pixel_values) else None
        if given is None:
            return None
        if self.vision is None:
            raise VlkitError("this model is a text-only LM: it takes no images")
        parts = as_list(given)
        if count(image_features):  # cached features come from the CPU
            parts = [f.to(self._anchor.device) for f in parts]
        views = None
        if self.tiled:
            n, v = parts[0].shape[:2]
            if v != self.vision.tiles.num_views or parts[0].dim() < 4:
                raise VlkitError(f"image inputs of shape {tuple(parts[0].shape)} are not views of this model's "
                                 f"{self.vision.tiles.num_views}-view tiling; encode images with its processor")
            keep = torch.ones(n * v, dtype=torch.bool) if view_mask is None else view_mask.reshape(-1).bool().cpu()
            views = torch.arange(v).repeat(n)[keep]
            parts = [p.flatten(0, 1)[keep.to(p.device)] for p in parts]
        feats = self.vision.encode(parts) if given is pixel_values else parts
        return self.vision.combine(feats, views=views)

    def encode_images(self, pixel_values=None, image_features=None, view_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Pixels or cached features of n images -> visual tokens (n, M, D) (a tiled model: one row per view)."""
        features = self.image_features(pixel_values, image_features, view_mask)
        if features is None:
            raise VlkitError("encode_images needs pixel_values or image_features")
        return self.vpg(features.to(self.vpg_dtype))

    def fusion_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, pixel_values=None, image_features=None,
                      images_per_row: torch.Tensor | None = None, view_mask: torch.Tensor | None = None
                      ) -> FusionInputs:
        """What this batch hands every fusion: the stack's features and the VPG's tokens computed once."""
        features = self.image_features(pixel_values, image_features, view_mask)
        visual = self.vpg(features.to(self.vpg_dtype)) if features is not None else None
        n = count(image_features) or count(pixel_values)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return FusionInputs(input_ids, mask, labels, self.image_token_id, features, visual,
                            self._owners(input_ids, n, images_per_row, view_mask))

    def _owners(self, input_ids: torch.Tensor, n: int, images_per_row: torch.Tensor | None,
                view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) the batch row of each image, in text order."""
        if images_per_row is not None:
            per_row = images_per_row.to(input_ids.device)
            if int(per_row.sum()) != n:
                raise VlkitError(f"image features and image tokens do not match: the text holds {int(per_row.sum())} "
                                 f"images (images_per_row), {n} were given; encode inputs with the model's processor")
            return torch.repeat_interleave(torch.arange(len(per_row), device=input_ids.device), per_row)
        slots = self.image_slots
        if slots:
            views = view_mask.sum(1).long().cpu() if view_mask is not None else \
                torch.full((n,), self.vision.tiles.num_views if self.tiled else 1, dtype=torch.long)
            starts = (views.cumsum(0) - views) * slots  # each image's first slot among all the batch's slots
            rows = (input_ids == self.image_token_id).nonzero()[:, 0]
            return rows[starts[starts < len(rows)].to(rows.device)]
        if n and len(input_ids) > 1:
            raise VlkitError("images_per_row is needed to place images in a batch whose fusions take no token slots; "
                             "encode batches with the model's processor")
        return torch.zeros(n, dtype=torch.long, device=input_ids.device)

    def _visual_path_zero(self) -> torch.Tensor | float:
        """0 x every trainable parameter of the visual path (VPG, mixer, view embeddings, fusions): a batch without
        images leaves them out of the graph, and DDP's reducer waits for every trainable parameter's gradient (LLaVA
        feeds a zero-size image for the same reason). The encoders are left out: under FSDP they are units of
        their own, sharded outside their forward."""
        parts = [self.vpg, *self.fusions.values()]
        params = [p for m in parts if m is not None for p in m.parameters() if p.requires_grad]
        if self.vision is not None:
            params += [p for n, p in self.vision.named_parameters()
                       if p.requires_grad and not n.startswith("encoders.")]
        return sum((p.sum() * 0 for p in params), 0.0)

    def embed_inputs(self, x: FusionInputs) -> torch.Tensor:
        """Fused input embeddings (B, L, D)."""
        embeds = self.llm.get_input_embeddings()(x.input_ids)
        for fusion in self.fusions.values():
            embeds = fusion.embed(embeds, x)
        return embeds

    @contextlib.contextmanager
    def fused(self, x: FusionInputs):
        """The context in which an LLM pass over `x` is acted on by every fusion (entered when used)."""
        with contextlib.ExitStack() as stack:
            for fusion in self.fusions.values():
                stack.enter_context(fusion.active(x))
            yield

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values=None, image_features=None,
                images_per_row: torch.Tensor | None = None, view_mask: torch.Tensor | None = None,
                loss_only: bool = False, loss_chunk: int | None = LOSS_CHUNK, **kwargs):
        """The LLM's output over the fused inputs. `loss_only` (training, with labels): only the loss, its head
        computed at the supervised positions alone, `loss_chunk` of them at a time (`llm.supervised_loss`; the
        usual full computation for a family it does not cover); `logits` is then None."""
        x = self.fusion_inputs(input_ids, attention_mask, labels, pixel_values, image_features, images_per_row,
                               view_mask)
        embeds = self.embed_inputs(x)
        if x.visual is None and torch.is_grad_enabled() and _data_parallel():
            embeds = embeds + self._visual_path_zero()
        with self.fused(x):
            if loss_only and labels is not None:
                loss = supervised_loss(self.llm, embeds, attention_mask, labels, chunk=loss_chunk, **kwargs)
                if loss is not None:
                    return CausalLMOutputWithPast(loss=loss)
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)
