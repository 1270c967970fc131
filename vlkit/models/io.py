"""Save and load VisionLanguageModels as Hugging Face-style directories; export to stock formats.

A vlkit model directory:
    config.json              {"model_type": "vlkit_vlm", "vlm": {tower, vpg, llm, max_length} with the
                             towers' and LLM's HF configs inlined as `arch`, "image_token_id", "trainable_groups"}
    model.safetensors        all weights, prefixed vision. / vpg. / llm.
    processor_config.json    image size, mean, std, image tokens, max_length (+ tokenizer files)

`export_llava` writes a stock `LlavaForConditionalGeneration` directory (MLP VPG, CLIP/SigLIP tower);
`export_blip2` a stock `Blip2ForConditionalGeneration` (Q-Former VPG, BLIP-2 vision tower).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

import vlkit
from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, read_json, write_json
from vlkit.models.vlm import VisionLanguageModel, VLMConfig

MODEL_TYPE = "vlkit_vlm"


def _arch(hf_config) -> dict:
    d = hf_config.to_dict()
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


def save_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None) -> Path:
    directory = Path(directory)
    cfg = model.config.model_copy(deep=True)
    sources = {"tower": cfg.tower.path, "llm": cfg.llm.path}
    cfg.tower.path, cfg.tower.arch = None, _arch(model.vision.hf_config)
    cfg.llm.path, cfg.llm.tokenizer, cfg.llm.arch = None, None, _arch(model.llm.config)
    with atomic_dir(directory) as tmp:
        write_json(tmp / "config.json", {"model_type": MODEL_TYPE, "vlkit_version": vlkit.__version__,
                                         "vlm": cfg.model_dump(mode="json"), "image_token_id": model.image_token_id,
                                         "trainable_groups": model.trainable_groups, "sources": sources})
        save_model(model, str(tmp / "model.safetensors"))
        if processor is not None:
            processor.save(tmp)
    return directory


def load_vlm(directory: str | Path, device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, VLProcessor]:
    """Load a vlkit model directory; trainable groups are restored, everything else stays frozen."""
    directory = Path(directory)
    meta = read_json(directory / "config.json")
    if meta.get("model_type") != MODEL_TYPE:
        raise VlkitError(f"{directory}: not a vlkit model (config.json model_type is {meta.get('model_type')!r})")
    cfg = VLMConfig.model_validate(meta["vlm"])
    processor = VLProcessor.load(directory)
    model = VisionLanguageModel.build(cfg, image_token_id=meta["image_token_id"])
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise VlkitError(f"{weights}: weights file not found; the model directory is incomplete")
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise VlkitError(f"{weights}: corrupt, truncated or mismatched weights ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None
    model.set_trainable(meta.get("trainable_groups", []))
    return model.to(device).eval(), processor


def _base(causal_lm):
    return getattr(causal_lm, causal_lm.base_model_prefix)


def export_llava(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `llava` checkpoint (transformers' LlavaForConditionalGeneration)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vlkit.models.vpg.mlp import MLPVPG

    if not isinstance(model.vpg, MLPVPG):
        raise VlkitError("export llava: needs an mlp VPG (LLaVA's projector); this model's VPG is "
                         f"{type(model.vpg).__name__}")
    tower_type = model.vision.hf_config.model_type
    if tower_type not in ("clip_vision_model", "siglip_vision_model"):
        raise VlkitError(f"export llava: needs a CLIP or SigLIP tower, not {tower_type}")
    # Untied in the export: llava's weight-tying map assumes LLaMA-style module names (not OPT's); the
    # head gets a copy of the embedding matrix, which computes the same logits.
    text_config = {**model.llm.config.to_dict(), "tie_word_embeddings": False}
    cfg = LlavaConfig(vision_config=model.vision.hf_config.to_dict(), text_config=text_config,
                      image_token_index=model.image_token_id, projector_hidden_act=model.vpg.act_name,
                      vision_feature_layer=model.vision.cfg.feature_layer,
                      vision_feature_select_strategy="default" if model.vision.cfg.select == "patch" else "full",
                      image_seq_length=model.num_image_tokens, multimodal_projector_bias=True,
                      tie_word_embeddings=False)
    llava = LlavaForConditionalGeneration(cfg).eval()
    inner = llava.model if hasattr(llava, "model") and hasattr(llava.model, "vision_tower") else llava
    inner.vision_tower.load_state_dict(model.vision.model.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(model.vpg.linear_1.state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(model.vpg.linear_2.state_dict())
    lm = inner.language_model
    if hasattr(lm, "lm_head"):  # older transformers: the full causal LM
        lm.load_state_dict(model.llm.state_dict())
    else:
        lm.load_state_dict(_base(model.llm).state_dict())
        llava.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    return _write_export(llava, processor, directory)


def export_blip2(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `blip-2` checkpoint (transformers' Blip2ForConditionalGeneration)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from vlkit.models.vpg.qformer import QFormerVPG

    if not isinstance(model.vpg, QFormerVPG):
        raise VlkitError(f"export blip-2: needs a qformer VPG, not {type(model.vpg).__name__}")
    if model.vision.hf_config.model_type != "blip_2_vision_model":
        raise VlkitError("export blip-2: needs a BLIP-2 vision tower (blip_2_vision_model), not "
                         f"{model.vision.hf_config.model_type}")
    if model.vision.cfg.feature_layer != -1 or model.vision.cfg.select != "full":
        raise VlkitError("export blip-2: BLIP-2 reads the tower's final output with every token; "
                         "set tower.feature_layer=-1 and tower.select=full")
    cfg = Blip2Config(vision_config=model.vision.hf_config.to_dict(), qformer_config=model.vpg.config.to_dict(),
                      text_config=model.llm.config.to_dict(), num_query_tokens=model.num_image_tokens,
                      image_token_index=model.image_token_id)
    blip = Blip2ForConditionalGeneration(cfg).eval()
    blip.vision_model.load_state_dict(model.vision.model.state_dict())
    with torch.no_grad():
        blip.query_tokens.copy_(model.vpg.query_tokens)
    blip.qformer.load_state_dict(model.vpg.qformer.state_dict())
    blip.language_projection.load_state_dict(model.vpg.projector.state_dict())
    blip.language_model.load_state_dict(model.llm.state_dict())
    return _write_export(blip, processor, directory)


def _write_export(hf_model, processor: VLProcessor, directory: str | Path) -> Path:
    """A stock transformers directory: weights, tokenizer and image processor, written atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        processor.tokenizer.save_pretrained(tmp)
        _image_processor(processor).save_pretrained(tmp)
    return directory


def _image_processor(processor: VLProcessor):
    from transformers import CLIPImageProcessor

    c = processor.config
    return CLIPImageProcessor(size={"height": c.image_size, "width": c.image_size}, do_center_crop=False,
                              resample=3, image_mean=c.image_mean, image_std=c.image_std, do_convert_rgb=True)
