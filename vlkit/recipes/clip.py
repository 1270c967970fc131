"""Recipe `clip`: pretrain the world ViT CLIP-style against a small text tower.

Contrastive image-caption training (symmetric InfoNCE, learned temperature) on world captions,
every caption style of a scene serving as a positive view. The vision tower is saved as a stock
``CLIPVisionModel`` + ``CLIPImageProcessor`` directory (``<out>/vision``); the full dual encoder
goes to ``<out>/clip``. Reports held-out image->caption retrieval R@1 against chance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from transformers import CLIPVisionModel

from vlkit.config import Section
from vlkit.world.sources import RecordsConfig, load_splits
from vlkit.data.tokenizer import TokenizerConfig, load_tokenizer, train_bpe
from vlkit.data.transforms import unique_paths
from vlkit.errors import VlkitError
from vlkit.models.llm import count_parameters
from vlkit.models.vision.clip import TextTowerConfig, ViTConfig, build_clip, image_processor
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything
from vlkit.world.language import CAPTION_STYLES, caption
from vlkit.world.scene import Scene


class CLIPData(RecordsConfig):
    tasks: list[str] | None = Field(["caption"], description="Records whose first image and captions are used.")


class CLIPRecipe(Section):
    recipe: Literal["clip"] = "clip"
    output_dir: str = Field("runs/clip")
    data: CLIPData = Field(default_factory=CLIPData)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer of the text tower.")
    vision: ViTConfig = Field(default_factory=ViTConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    projection_dim: int = Field(128, gt=0)
    eval_size: int = Field(500, gt=1, description="Held-out images (and captions) in the retrieval gallery.")
    train: TrainConfig = Field(default_factory=TrainConfig)


def captions_of(record: dict) -> list[str]:
    """Every caption of a record's scene (world records), else its assistant reply."""
    scene = record.get("meta", {}).get("scene")
    if scene is not None:
        s = Scene.from_dict(scene)
        return [caption(s, style) for style in CAPTION_STYLES]
    return [" ".join(p["text"] for p in m["content"] if p["type"] == "text") if not isinstance(m["content"], str)
            else m["content"] for m in record["messages"] if m["role"] == "assistant"][:1]


class PairSet:
    """(image row, caption ids) pairs over a uint8 image array."""

    def __init__(self, pixels: np.ndarray, pairs: list[tuple[int, list[int]]]):
        self.pixels, self.pairs = torch.from_numpy(pixels), pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        row, ids = self.pairs[i]
        return self.pixels[row], ids


def encode_caption(tok, text: str, max_length: int) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"][: max_length - 2]
    return [tok.bos_token_id, *ids, tok.eos_token_id]


def make_collate(vit: ViTConfig, pad_id: int):
    def collate(items):
        pixels = vit.transform().normalize(torch.stack([p for p, _ in items]))
        width = max(len(ids) for _, ids in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (_, seq) in enumerate(items):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    return collate


def clip_loss(model, batch):
    out = model(**batch, return_loss=True)
    return out.loss, {"logit_scale": model_logit_scale(model)}


def model_logit_scale(model) -> float:
    m = model.module if hasattr(model, "module") else model
    return float(m.logit_scale.detach().exp())


@torch.no_grad()
def retrieval(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, texts: list[str],
              batch_size: int = 256) -> dict[str, float]:
    """Image->caption and caption->image R@1 over a gallery; a hit is a caption with the gold text
    (two scenes can share a caption). Chance is 1/N."""
    device = next(model.parameters()).device
    img, txt = [], []
    for i in range(0, len(pixels), batch_size):
        img.append(_tensor(model.get_image_features(pixel_values=pixels[i:i + batch_size].to(device))))
        txt.append(_tensor(model.get_text_features(input_ids=ids[i:i + batch_size].to(device),
                                                   attention_mask=mask[i:i + batch_size].to(device))))
    img_e = torch.nn.functional.normalize(torch.cat(img).float(), dim=-1)
    txt_e = torch.nn.functional.normalize(torch.cat(txt).float(), dim=-1)
    sim = img_e @ txt_e.T
    arr = np.array(texts)
    i2t = float(np.mean(arr[sim.argmax(1).cpu().numpy()] == arr))
    t2i = float(np.mean(arr[sim.argmax(0).cpu().numpy()] == arr))
    return {"i2t_r1": i2t, "t2i_r1": t2i, "chance": 1.0 / len(texts)}


def vision_tower_of(model) -> CLIPVisionModel:
    """The CLIPModel's vision tower as a standalone CLIPVisionModel (transformers 4.x and 5.x)."""
    if isinstance(model.vision_model, CLIPVisionModel):
        return model.vision_model
    vision = CLIPVisionModel(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    return vision


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def run(cfg: CLIPRecipe, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = load_splits(cfg.data, progress=progress)
    if not train_recs or not test_recs:
        raise VlkitError(f"{out}: the clip recipe needs caption records in both splits; check data.tasks")
    tok = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else \
        train_bpe([c for r in train_recs for c in captions_of(r)], cfg.tokenizer.vocab_size, cfg.tokenizer.style)
    res, transform = cfg.vision.image_size, cfg.vision.transform()
    train_paths, train_rows = unique_paths(train_recs)
    pixels = transform.cached_arrays(train_paths, progress)
    pairs = []
    for rec, row in zip(train_recs, train_rows):
        for text in captions_of(rec):
            pairs.append((row, encode_caption(tok, text, cfg.text.max_length)))
    # Held-out gallery: one detailed caption per distinct test image.
    test_paths, test_rows = unique_paths(test_recs)
    first = {}
    for rec, row in zip(test_recs, test_rows):
        first.setdefault(row, rec)
    rows = sorted(first)[: cfg.eval_size]
    gallery_px = transform.normalize(transform.cached_arrays([test_paths[r] for r in rows]))
    texts = [captions_of(first[r])[0] for r in rows]
    g = make_collate(cfg.vision, tok.pad_token_id)([(torch.zeros(res, res, 3, dtype=torch.uint8),
                                                     encode_caption(tok, t, cfg.text.max_length)) for t in texts])
    seed_everything(cfg.train.seed)
    model = build_clip(cfg.vision, cfg.text, cfg.projection_dim, tok)
    trainer = Trainer(model, cfg.train, PairSet(pixels, pairs), make_collate(cfg.vision, tok.pad_token_id),
                      clip_loss, out, run_config=cfg.model_dump(mode="json"), desc="clip",
                      evaluate=lambda m: retrieval(m, gallery_px, g["input_ids"], g["attention_mask"], texts),
                      on_start=record)
    metrics = trainer.fit(resume=resume, overwrite=overwrite)

    def write_vision(tmp):
        vision_tower_of(model).save_pretrained(tmp, safe_serialization=True)
        image_processor(cfg.vision).save_pretrained(tmp)

    def write_clip(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        image_processor(cfg.vision).save_pretrained(tmp)

    trainer.save_model(out / "vision", write_vision)
    trainer.save_model(out / "clip", write_clip)
    return finish(out, {"recipe": "clip", "vision_params": count_parameters(model.vision_model),
                        "gallery": len(texts), **{f"heldout_{k}": v for k, v in metrics.items()},
                        "steps": cfg.train.steps, "vision_dir": str(out / "vision")})
