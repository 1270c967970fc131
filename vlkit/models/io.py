"""Save and load VisionLanguageModels as Hugging Face-style directories; export to stock formats.

A vlkit model directory:
    config.json              {"model_type": "vlkit_vlm", "format": 2, "vlm": {tower, vpg, llm, max_length, fusions}
                             with the encoders' and LLM's configs inlined as `arch`, "image_token_id",
                             "trainable_groups"}
    model.safetensors        all weights, prefixed vision. / vpg. / fusions. / llm.
    processor_config.json    each encoder's transform, image token slots, max_length (+ tokenizer files)

Directories written before format 2 (one tower, VPG-C in a key of its own, feature_layer -1 meaning the
tower's final output) load as they always did.

`export_llava` writes a stock `LlavaForConditionalGeneration` directory with its `LlavaProcessor` (MLP VPG,
CLIP or SigLIP encoder); `export_blip2` a stock `Blip2ForConditionalGeneration` (Q-Former VPG, BLIP-2
encoder). Both refuse what the stock model cannot represent, rather than export something that computes
other logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

import vlkit
from vlkit.config import validate
from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, read_json, write_json
from vlkit.models.llm import arch_of
from vlkit.models.vlm import VisionLanguageModel, VLMConfig

MODEL_TYPE = "vlkit_vlm"
FORMAT = 2
# format 1 -> 2: the one tower became encoder 0 of the vision stack, VPG-C one of the fusions
RENAMED = (("vision.model.", "vision.encoders.0.model."), ("vpgc.", "fusions.vpgc."))


def write_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None) -> Path:
    """Write a model directory's files into `directory` (which exists); `save_vlm` does it atomically."""
    directory = Path(directory)
    if not model.takes_images:
        raise VlkitError("save: a text-only LM is saved as the HF model it is (model.llm.save_pretrained)")
    cfg = model.config.model_copy(deep=True)
    sources = {"tower": [c.path for c in (cfg.tower if isinstance(cfg.tower, list) else [cfg.tower])],
               "llm": cfg.llm.path}
    cfg.tower = model.vision.saved_config()
    cfg.llm.path, cfg.llm.tokenizer, cfg.llm.arch = None, None, arch_of(model.llm.config)
    write_json(directory / "config.json", {"model_type": MODEL_TYPE, "format": FORMAT,
                                           "vlkit_version": vlkit.__version__, "vlm": cfg.model_dump(mode="json"),
                                           "image_token_id": model.image_token_id,
                                           "trainable_groups": model.trainable_groups, "sources": sources})
    save_model(model, str(directory / "model.safetensors"))
    if processor is not None:
        processor.save(directory)
    return directory


def save_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None) -> Path:
    with atomic_dir(directory) as tmp:
        write_vlm(model, tmp, processor)
    return Path(directory)


def _upgrade(meta: dict, processor: VLProcessor) -> dict:
    """A format-1 config as format 2 says it: feature_layer -1 was the tower's final output, and the tower's
    normalisation was the processor's."""
    vlm = dict(meta["vlm"])
    if not isinstance(vlm.get("tower"), dict) or not processor.config.transforms:
        return vlm  # not what format 1 wrote: validation names what is wrong
    tower = dict(vlm["tower"])
    if tower.get("feature_layer") == -1:
        tower["feature_layer"] = "output"
    t = processor.config.transforms[0]
    tower["image_mean"] = tower.get("image_mean") or t.mean
    tower["image_std"] = tower.get("image_std") or t.std
    vlm["tower"] = tower
    return vlm


def load_vlm(directory: str | Path, device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, VLProcessor]:
    """Load a vlkit model directory; trainable groups are restored, everything else stays frozen."""
    directory = Path(directory)
    meta = read_json(directory / "config.json")
    where = directory / "config.json"
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        kind = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
        raise VlkitError(f"{directory}: not a vlkit model (config.json model_type is {kind!r})")
    for key, kind in (("vlm", dict), ("image_token_id", int), ("trainable_groups", list), ("format", int)):
        if key in meta and not isinstance(meta[key], kind) or key in ("vlm", "image_token_id") and key not in meta:
            raise VlkitError(f"{where}: key {key!r} is missing or not a {kind.__name__}; re-save the model")
    old = meta.get("format", 1) < FORMAT
    if not old:
        cfg = validate(VLMConfig, meta["vlm"], f"{where} (vlm)")
    processor = VLProcessor.load(directory)
    if old:
        cfg = validate(VLMConfig, _upgrade(meta, processor), f"{where} (vlm)")
    try:
        model = VisionLanguageModel.build(cfg, image_token_id=meta["image_token_id"])
    except (ValueError, TypeError, KeyError) as e:
        raise VlkitError(f"{where}: cannot build the model it describes ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise VlkitError(f"{weights}: weights file not found; the model directory is incomplete")
    try:
        state = load_file(str(weights))
        if old:
            state = {_renamed(k): v for k, v in state.items()}
        _load_state(model, state)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise VlkitError(f"{weights}: corrupt, truncated or mismatched weights ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None
    model.set_trainable(meta.get("trainable_groups", []))
    return model.to(device).eval(), processor


def _load_state(model: VisionLanguageModel, state: dict) -> None:
    """Load every tensor strictly; a name left out of the file is fine only where it shares its tensor with one in
    it (tied embeddings: safetensors stores a shared tensor once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected weights {unexpected[:3]}")
    params = model.state_dict(keep_vars=True)
    stored = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if params[k].data_ptr() not in stored]
    if untied:
        raise RuntimeError(f"missing weights {untied[:3]}")


def _renamed(key: str) -> str:
    for old, new in RENAMED:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# -- stock exports ----------------------------------------------------------------------------------------
def _check_fusions(model: VisionLanguageModel, fmt: str) -> None:
    for kind, fusion in model.fusions.items():
        if fmt not in fusion.exports:
            raise VlkitError(f"export {fmt}: the {kind} fusion has no counterpart in a stock {fmt} checkpoint; "
                             "export a model without it")


def _single_encoder(model: VisionLanguageModel, fmt: str):
    if model.vision.mixer is not None or model.tiled:
        raise VlkitError(f"export {fmt}: a stock {fmt} checkpoint has no encoder mixing or sub-images; export a model "
                         "without model.mix and model.tiles")
    if len(model.vision.encoders) != 1 or not hasattr(model.vision.encoders[0], "hf_config"):
        raise VlkitError(f"export {fmt}: needs one transformers vision encoder; this model's stack has "
                         f"{[e.kind for e in model.vision.encoders]}")
    return model.vision.encoders[0]


def _base(causal_lm):
    return getattr(causal_lm, causal_lm.base_model_prefix)


def export_llava(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `llava` checkpoint (transformers' LlavaForConditionalGeneration) and its LlavaProcessor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlkit.models.vpg.mlp import MLPVPG

    if not isinstance(model.vpg, MLPVPG):
        raise VlkitError("export llava: needs an mlp VPG (LLaVA's projector); this model's VPG is "
                         f"{type(model.vpg).__name__}")
    _check_fusions(model, "llava")
    enc = _single_encoder(model, "llava")
    tower_type = enc.hf_config.model_type
    if tower_type not in ("clip_vision_model", "siglip_vision_model"):
        raise VlkitError(f"export llava: needs a CLIP or SigLIP encoder, not {tower_type}")
    layer = enc.cfg.feature_layer
    if layer == "output":  # llava reads hidden_states[i]; CLIP's final output is hidden_states[-1]
        if tower_type != "clip_vision_model":
            raise VlkitError("export llava: llava reads hidden_states[i], not SigLIP's post-layernorm output; set "
                             "tower.feature_layer to an index (-1 for the last layer) and retrain")
        layer = -1
    # llava's "default" strategy drops exactly one leading token (CLIP's class token); "full" keeps all
    strategy = "default" if enc.num_special == 1 and enc.cfg.select == "patch" else "full"
    if enc.cfg.select == "patch" and enc.num_special not in (0, 1):
        raise VlkitError(f"export llava: the encoder has {enc.num_special} special tokens, llava drops one")
    text = model.llm.config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        raise VlkitError(f"export llava: the LLM ({text.model_type}) caps its logits (final_logit_softcapping={cap}), "
                         "which LlavaForConditionalGeneration's head does not do; the export would change every logit")
    # Untied in the export: llava's weight-tying map assumes LLaMA-style module names (not OPT's); the
    # head gets a copy of the embedding matrix, which computes the same logits.
    text_config = {**text.to_dict(), "tie_word_embeddings": False}
    cfg = LlavaConfig(vision_config=enc.hf_config.to_dict(), text_config=text_config,
                      image_token_index=model.image_token_id, projector_hidden_act=model.vpg.act_name,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      image_seq_length=model.image_slots, multimodal_projector_bias=True, tie_word_embeddings=False)
    llava = LlavaForConditionalGeneration(cfg).eval()
    inner = llava.model if hasattr(llava, "model") and hasattr(llava.model, "vision_tower") else llava
    inner.vision_tower.load_state_dict(enc.model.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(model.vpg.linear_1.state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(model.vpg.linear_2.state_dict())
    lm = inner.language_model
    if hasattr(lm, "lm_head"):  # older transformers: the full causal LM
        lm.load_state_dict(model.llm.state_dict())
    else:
        lm.load_state_dict(_base(model.llm).state_dict())
        llava.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    stock = LlavaProcessor(image_processor=enc.transform.hf_image_processor(), tokenizer=processor.tokenizer,
                           patch_size=enc.hf_config.patch_size, vision_feature_select_strategy=strategy,
                           num_additional_image_tokens=enc.num_special, image_token="<image>",
                           chat_template=processor.tokenizer.chat_template)
    return _write_export(llava, stock, directory)


def export_blip2(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `blip-2` checkpoint (transformers' Blip2ForConditionalGeneration)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from vlkit.models.vpg.qformer import QFormerVPG

    if not isinstance(model.vpg, QFormerVPG):
        raise VlkitError(f"export blip-2: needs a qformer VPG, not {type(model.vpg).__name__}")
    _check_fusions(model, "blip-2")
    enc = _single_encoder(model, "blip-2")
    if enc.hf_config.model_type != "blip_2_vision_model":
        raise VlkitError("export blip-2: needs a BLIP-2 vision tower (blip_2_vision_model), not "
                         f"{enc.hf_config.model_type}")
    if enc.cfg.feature_layer != "output" or enc.cfg.select != "full":
        raise VlkitError("export blip-2: BLIP-2 reads the tower's final output with every token; "
                         "set tower.feature_layer=output and tower.select=full")
    cfg = Blip2Config(vision_config=enc.hf_config.to_dict(), qformer_config=model.vpg.config.to_dict(),
                      text_config=model.llm.config.to_dict(), num_query_tokens=model.image_slots,
                      image_token_index=model.image_token_id)
    blip = Blip2ForConditionalGeneration(cfg).eval()
    blip.vision_model.load_state_dict(enc.model.state_dict())
    with torch.no_grad():
        blip.query_tokens.copy_(model.vpg.query_tokens)
    blip.qformer.load_state_dict(model.vpg.qformer.state_dict())
    blip.language_projection.load_state_dict(model.vpg.projector.state_dict())
    blip.language_model.load_state_dict(model.llm.state_dict())
    return _write_export(blip, None, directory, processor, enc.transform)


def _write_export(hf_model, stock_processor, directory: str | Path, processor: VLProcessor | None = None,
                  transform=None) -> Path:
    """A stock transformers directory: weights plus the processor (or tokenizer and image processor), atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if stock_processor is not None:
            stock_processor.save_pretrained(tmp)
        else:
            processor.tokenizer.save_pretrained(tmp)
            transform.hf_image_processor().save_pretrained(tmp)
    return directory
