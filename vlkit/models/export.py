"""Stock exports: a vlkit model as a transformers `llava` or `blip-2` directory (the inverse of
`vlkit.models.stock`), and `vlkit export FORMAT MODEL OUT`.

`export_llava` writes a stock `LlavaForConditionalGeneration` directory with its `LlavaProcessor` (MLP VPG,
CLIP or SigLIP encoder); `export_blip2` a stock `Blip2ForConditionalGeneration` (Q-Former VPG, BLIP-2
encoder). Both refuse what the stock model cannot represent, rather than export something that computes
other logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir
from vlkit.models.io import load_vlm
from vlkit.models.vlm import VisionLanguageModel


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


EXPORTS = {"llava": export_llava, "blip-2": export_blip2}


def export_model(fmt: str, model_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`vlkit export FORMAT MODEL OUT`: the vlkit model in `model_dir` as a stock `fmt` directory, atomically."""
    if fmt not in EXPORTS:
        raise VlkitError(f"export: unknown format {fmt!r}; choose {' or '.join(EXPORTS)}")
    out = Path(out)
    if out.resolve() == Path(model_dir).resolve():
        raise VlkitError(f"export: {out} is the model itself; write the export elsewhere")
    if out.exists() and not overwrite:
        raise VlkitError(f"export: {out} exists; pass --overwrite to replace it")
    model, processor = load_vlm(model_dir)
    return EXPORTS[fmt](model, processor, out)
