"""Stock transformers checkpoints as vlkit models: the inverse of `export_llava` and `export_blip2`.

`load_vlm` (and so every recipe's `init:`) reads a directory whose config.json says

    llava   LlavaForConditionalGeneration + LlavaProcessor (or a tokenizer and an image processor):
              vision_tower            -> encoder: feature_layer = vision_feature_layer, select = patch for the
                                         "default" strategy (drops CLIP's class token), full for "full"
              multi_modal_projector   -> mlp VPG (projector_hidden_act)
              language_model, lm_head -> the LLM
    blip-2  Blip2ForConditionalGeneration + a tokenizer and an image processor:
              vision_model            -> encoder: its final output, every token
              query_tokens, qformer, language_projection -> qformer VPG
              language_model          -> the LLM
    both    the image processor's mean, std, size, resample, crop or pad -> the encoder's ImageTransform

transformers reads the checkpoint (one file or sharded, whichever key layout its version wrote, in the dtype and
on the device asked, without random init); the vlkit model is built on the meta device from the mapped config and
takes the stock tensors over as they are (no copy; ties stay ties; on the CPU, as in any from_pretrained model, they
are views of the mapped safetensors files). What vlkit cannot represent (a list of feature layers, an unknown select
strategy, a resampling filter vlkit's transforms do not use, ...) is refused in one line, before any weight is read
where the config shows it, rather than imported computing other logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import image_token_id, load_tokenizer
from vlkit.errors import VlkitError
from vlkit.models.llm import arch_of, check_weights
from vlkit.models.vision import EncoderConfig
from vlkit.models.vision.hf import LAYOUTS
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vpg import QFormerConfig, VPGConfig, build_vpg

TRANSFORM_FLAGS = {"do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_center_crop", "do_pad"}
UNUSED_QFORMER_KEYS = {"initializer_range"}  # read by initialisation only; dropout: vlkit trains without


def _refuse(directory: Path, kind: str, why: str) -> VlkitError:
    return VlkitError(f"{directory}: this {kind} checkpoint cannot be imported: {why}")


# -- the image processor ----------------------------------------------------------------------------------
def transform_settings(directory: Path, kind: str, side: int) -> dict:
    """The directory's image processor as an encoder's transform overrides {image_mean, image_std, resize}, for an
    encoder that takes `side` x `side` pixels; refused where vlkit's transforms would compute other pixels."""
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(str(directory), local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError) as e:
        raise _refuse(directory, kind, f"no image processor vlkit can read ({str(e).splitlines()[0][:120]})") \
            from None
    on = {k for k, v in ip.items() if k.startswith("do_") and v}
    llava_pad = str(ip.get("image_processor_type", "")).startswith("LlavaImageProcessor")  # do_pad: expand2square
    extra = sorted(on - TRANSFORM_FLAGS) + (["do_pad"] if "do_pad" in on and not llava_pad else [])
    if extra:
        raise _refuse(directory, kind, f"its image processor sets {extra[0]}, which vlkit's image transforms do not do")
    if "do_resize" not in on or int(ip.get("resample", 3)) != 3:
        raise _refuse(directory, kind, f"its image processor resizes with resample={ip.get('resample')} (resize: "
                      f"{'do_resize' in on}); vlkit's transforms resize bicubic (resample=3)")
    if "do_rescale" not in on or abs(float(ip.get("rescale_factor", 0)) - 1 / 255) > 1e-12:
        raise _refuse(directory, kind, "its image processor does not scale pixels by 1/255 as vlkit's transforms do")
    size, crop = ip.get("size") or {}, ip.get("crop_size") or {}
    square, edge = (size.get("height"), size.get("width")) == (side, side), size.get("shortest_edge") == side
    cropped = "do_center_crop" not in on or (crop.get("height"), crop.get("width")) == (side, side)
    normalize = "do_normalize" in on
    if "do_pad" in on:  # LLaVA's expand2square: a square in the mean colour, so either size key ends at the side
        resize, fits = "pad", (square or edge) and cropped and normalize  # (it pads with image_mean regardless)
    elif "do_center_crop" in on:
        resize, fits = "crop", edge and cropped
    else:
        resize, fits = "squash", square
    if not fits:
        raise _refuse(directory, kind, f"its image processor's {resize} (size={size}, crop_size={crop}, normalize="
                      f"{normalize}) does not end at the {side} x {side} pixels the vision tower takes as vlkit's do")
    return {"image_mean": list(ip["image_mean"]) if normalize else [0.0] * 3,
            "image_std": list(ip["image_std"]) if normalize else [1.0] * 3, "resize": resize}


# -- the formats -------------------------------------------------------------------------------------------
def _image_token(config: PretrainedConfig, directory: Path, kind: str) -> int:
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if token is None:
        raise _refuse(directory, kind, "config.json names no image token (image_token_index); vlkit places visual "
                      "tokens where the text has them")
    return token


def _llm(text: PretrainedConfig, directory: Path, kind: str) -> LLMSource:
    cap = getattr(text, "final_logit_softcapping", None)
    if kind == "llava" and cap is not None:
        raise _refuse(directory, kind, f"llava's head does not cap logits, vlkit's {text.model_type} would "
                      f"(final_logit_softcapping={cap})")
    return LLMSource(arch=arch_of(text))  # whether it ties its embeddings: as the loaded stock model does


def _llava(c: PretrainedConfig, directory: Path) -> tuple[VLMConfig, int]:
    kind = "llava"
    vision = c.vision_config
    if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise _refuse(directory, kind, f"its vision tower is {vision.model_type}; vlkit imports llava with CLIP or "
                      "SigLIP")
    layer, strategy = c.vision_feature_layer, c.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise _refuse(directory, kind, f"vision_feature_layer {layer} concatenates several layers; a vlkit encoder "
                      "reads one")
    special = LAYOUTS[vision.model_type].num_special(vision)
    if strategy not in ("default", "full") or strategy == "default" and special != 1:
        raise _refuse(directory, kind, f"vision_feature_select_strategy {strategy!r} with {vision.model_type} "
                      f"({special} class tokens): vlkit keeps every token (full) or drops the class token (default)")
    if not getattr(c, "multimodal_projector_bias", True):
        raise _refuse(directory, kind, "its projector has no biases; vlkit's mlp VPG has them")
    tower = EncoderConfig(arch=arch_of(vision), feature_layer=layer, select="patch" if strategy == "default" else
                          "full", **transform_settings(directory, kind, vision.image_size))
    cfg = VLMConfig(tower=tower, vpg=VPGConfig(kind="mlp", mlp_act=c.projector_hidden_act),
                    llm=_llm(c.text_config, directory, kind))
    return cfg, _image_token(c, directory, kind)


def _llava_names(stock: PreTrainedModel, model: VisionLanguageModel) -> dict[str, str]:
    inner = stock.model if hasattr(stock, "model") and hasattr(stock.model, "vision_tower") else stock
    theirs = {id(m): n for n, m in stock.named_modules()}
    lm = inner.language_model
    lm_base = lm.base_model if hasattr(lm, "lm_head") else lm  # older transformers: a causal LM
    head_name = theirs[id(stock.get_output_embeddings())]
    ours = {id(m): n for n, m in model.named_modules()}
    return {"vision.encoders.0.model.": theirs[id(inner.vision_tower)] + ".",
            "vpg.": theirs[id(inner.multi_modal_projector)] + ".",
            ours[id(model.llm.base_model)] + ".": theirs[id(lm_base)] + ".",
            ours[id(model.llm.get_output_embeddings())] + ".": head_name + "."}


def _blip2(c: PretrainedConfig, directory: Path) -> tuple[VLMConfig, int]:
    kind = "blip-2"
    if not c.use_decoder_only_language_model:
        raise _refuse(directory, kind, f"its language model ({c.text_config.model_type}) is an encoder-decoder; vlkit "
                      "composes causal LMs")
    q = c.qformer_config
    qformer = QFormerConfig(hidden_size=q.hidden_size, num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
                            intermediate_size=q.intermediate_size,
                            cross_attention_frequency=q.cross_attention_frequency)
    tower = EncoderConfig(arch=arch_of(c.vision_config), feature_layer="output", select="full",
                          **transform_settings(directory, kind, c.vision_config.image_size))
    vpg = VPGConfig(kind="qformer", num_queries=c.num_query_tokens, qformer=qformer)
    with torch.device("meta"):  # the Q-Former vlkit builds from these settings, beside the checkpoint's
        ours = arch_of(build_vpg(vpg, c.vision_config.hidden_size, c.text_config.hidden_size, 0).config)
    theirs = arch_of(q)
    differ = sorted(k for k in ours.keys() | theirs.keys()
                    if "dropout" not in k and k not in UNUSED_QFORMER_KEYS and ours.get(k) != theirs.get(k))
    if differ:
        raise _refuse(directory, kind, f"qformer_config.{differ[0]} is {theirs.get(differ[0])!r}, vlkit's Q-Former "
                      f"VPG has {ours.get(differ[0])!r}")
    cfg = VLMConfig(tower=tower, vpg=vpg, llm=_llm(c.text_config, directory, kind))
    return cfg, _image_token(c, directory, kind)


def _blip2_names(stock: PreTrainedModel, model: VisionLanguageModel) -> dict[str, str]:
    return {"vision.encoders.0.model.": "vision_model.", "vpg.query_tokens": "query_tokens", "vpg.qformer.": "qformer.",
            "vpg.projector.": "language_projection.", "llm.": "language_model."}


# model type -> (transformers class, config mapping, vlkit name prefix -> stock name prefix)
FORMATS: dict[str, tuple[str, Callable, Callable]] = {
    "llava": ("LlavaForConditionalGeneration", _llava, _llava_names),
    "blip-2": ("Blip2ForConditionalGeneration", _blip2, _blip2_names),
}


# -- import ------------------------------------------------------------------------------------------------
def import_stock(directory: Path, device: torch.device, dtype: torch.dtype | None,
                 kind: str) -> tuple[VisionLanguageModel, VLProcessor]:
    """A stock `kind` directory as a vlkit model on `device` in `dtype` (None: as stored) and its processor. The
    config, image processor and tokenizer are checked before any weight is read."""
    import transformers

    class_name, config_of, names_of = FORMATS[kind]
    directory = Path(directory)
    check_weights(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers validates configs with errors of its own kinds
        raise VlkitError(f"{directory}: cannot read its {kind} config.json ({' '.join(str(e).split())[:240]})") \
            from None
    cfg, token = config_of(config, directory)
    cfg.max_length = getattr(config.get_text_config(), "max_position_embeddings", None) or cfg.max_length
    tokenizer = load_tokenizer(directory)
    if image_token_id(tokenizer) != token:
        raise _refuse(directory, kind, f"its tokenizer's <image> is id {image_token_id(tokenizer)}, config.json's "
                      f"image token is {token}")
    placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    try:
        stock, info = getattr(transformers, class_name).from_pretrained(
            str(directory), config=config, local_files_only=True, use_safetensors=True, dtype=dtype or "auto",
            output_loading_info=True, **placement)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise VlkitError(f"{directory}: cannot load the {kind} checkpoint ({str(e).splitlines()[0][:160]}); check "
                         "that its weights are complete") from None
    wrong = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(wrong.values()):
        k = next(k for k, v in wrong.items() if v)
        raise VlkitError(f"{directory}: the weights do not match config.json ({k.replace('_', ' ')}: "
                         f"{wrong[k][:3]}); re-save or re-download the checkpoint")
    cfg.llm.arch["tie_word_embeddings"] = stock.get_output_embeddings().weight is stock.get_input_embeddings().weight
    model = VisionLanguageModel.build(cfg, image_token_id=token, device="meta")
    seq = getattr(config, "image_seq_length", None)
    if kind == "llava" and seq is not None and seq != model.image_slots:
        raise _refuse(directory, kind, f"image_seq_length is {seq}, but its tower gives {model.image_slots} tokens "
                      "per image")
    adopt(model, stock, names_of(stock, model), dtype, directory)
    model.set_trainable([])
    return model.to(device).eval(), VLProcessor.for_model(tokenizer, model)


def adopt(model: nn.Module, stock: nn.Module, names: dict[str, str], dtype: torch.dtype | None,
          directory: Path) -> None:
    """Give each tensor of `model` (built on the meta device) the stock tensor it corresponds to: its name with the
    vlkit prefix replaced by the stock one (`names`). The same tensor objects, so no copy and ties stay ties; cast to
    `dtype` where asked (transformers keeps BLIP-2's Q-Former in fp32 under fp16; a vlkit model has one dtype)."""
    theirs = dict(stock.named_parameters(remove_duplicate=False)) | dict(stock.named_buffers(remove_duplicate=False))
    ours = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    source = {}
    for name, _ in ours:
        prefix = next((p for p in names if name.startswith(p)), "")
        source[name] = names.get(prefix, "") + name[len(prefix):]
    bad = [n for n, t in ours if source[n] not in theirs or theirs[source[n]].shape != t.shape]
    shared: dict[int, set[int]] = {}  # a tensor vlkit shares between names (tied embeddings) is one stock tensor
    for name, t in ours if not bad else []:
        shared.setdefault(id(t), set()).add(id(theirs[source[name]]))
    bad += [n for n, t in ours if not bad and len(shared[id(t)]) > 1]
    if bad:
        raise VlkitError(f"{directory}: the stock model has no tensor like vlkit's {bad[0]} (looked for "
                         f"{source[bad[0]]}); vlkit cannot represent this checkpoint")
    unused = sorted(set(theirs) - set(source.values()))
    if unused:
        raise VlkitError(f"{directory}: vlkit's model has no place for the stock tensor {unused[0]} "
                         f"({len(unused)} such); vlkit cannot represent this checkpoint")
    cast: dict[int, torch.Tensor] = {}
    for name, _ in ours:
        value = theirs[source[name]]
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            if id(value) not in cast:
                cast[id(value)] = nn.Parameter(value.to(dtype), requires_grad=False) \
                    if isinstance(value, nn.Parameter) else value.to(dtype)
            value = cast[id(value)]
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, value)


def _importer(kind: str):
    return lambda directory, device, dtype: import_stock(directory, device, dtype, kind)


IMPORTERS = {kind: _importer(kind) for kind in FORMATS}
