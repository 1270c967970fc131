"""`vlkit eval DIR`: a model directory evaluated as what it is, on held-out world data: LM perplexity, CLIP
retrieval, VLM tasks beside the blind baseline (it reuses the recipes' data preparation, so it sits above them)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.world.sources import RecordsConfig, load_split
from vlkit.data.tokenizer import load_tokenizer
from vlkit.errors import VlkitError
from vlkit.fileio import read_json
from vlkit.world.dataset import WorldData


def evaluate_dir(model_dir: str | Path, seed: int = 0, test_scenes: int = 500, max_per_task: int = 200,
                 device: str = "cpu", dtype: str | None = None) -> dict:
    """Held-out world scores of a model directory, run on `device` in `dtype` (None / "auto": as stored)."""
    from vlkit.devices import resolve_device, resolve_dtype

    dev, dt = resolve_device(device, what="--device"), resolve_dtype(dtype, "--dtype")
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    arch = (config.get("architectures") or [""])[0]
    data = RecordsConfig(world=WorldData(seed=seed, train_scenes=0, test_scenes=test_scenes))
    test = load_split(data, "test")
    from vlkit.models.io import is_vlm_directory, load_vlm

    if is_vlm_directory(model_dir):
        from vlkit.eval.world import EvalConfig, evaluate_vlm

        model, processor = load_vlm(model_dir, device=dev, dtype=dt)
        result = evaluate_vlm(model, processor, test, EvalConfig(max_per_task=max_per_task))
        return {"model": str(model_dir), "image": result["image"], "blind": result["blind"],
                "counts": result["counts"]}
    tok = load_tokenizer(model_dir)
    if arch == "CLIPModel":
        from transformers import CLIPModel

        from vlkit.data.transforms import unique_paths
        from vlkit.recipes.clip import captions_of, encode_caption, make_collate, retrieval
        from vlkit.models.vision.clip import ViTConfig

        model = CLIPModel.from_pretrained(str(model_dir), **({"dtype": dt} if dt else {})).to(dev).eval()
        pp = read_json(model_dir / "preprocessor_config.json")
        vit = ViTConfig(image_size=model.config.vision_config.image_size, image_mean=pp["image_mean"],
                        image_std=pp["image_std"])
        test = [r for r in test if r["task"] == "caption"]
        paths, _ = unique_paths(test)
        transform = vit.transform()
        px = transform.normalize(transform.cached_arrays(paths))
        texts = [captions_of(r)[0] for r in test]
        max_len = model.config.text_config.max_position_embeddings
        g = make_collate(vit, tok.pad_token_id)([(torch.zeros(1, 1, 3, dtype=torch.uint8),
                                                  encode_caption(tok, t, max_len)) for t in texts])
        with torch.no_grad():
            return {"model": str(model_dir), **retrieval(model, px, g["input_ids"], g["attention_mask"], texts)}
    if arch.endswith("ForCausalLM"):
        from vlkit.models.llm import load_llm
        from vlkit.recipes.lm import LMData, context_vqa, pack, perplexity

        model = load_llm(model_dir, dt, device=dev).eval()
        blocks = pack(tok, test, 128, LMData().describe_images)
        with torch.no_grad():
            cvqa = context_vqa(model, tok, test, limit=max_per_task)
            return {"model": str(model_dir), "heldout_ppl": perplexity(model, blocks),
                    "tokens": int(blocks["input_ids"].numel()),
                    "context_vqa_acc": cvqa["acc"] if cvqa else None, "context_vqa": cvqa}
    raise VlkitError(f"{model_dir}: don't know how to evaluate a {arch or 'model without architectures'}; "
                     "pass an LM directory or a CLIP directory (<run>/clip)")
