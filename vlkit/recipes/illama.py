"""Recipe `illama`: train iLLaMA (or, with its switches, a plain ViT) as an image classifier on the shapes world.

The label is how many objects a scene holds (1 to 6, `labels.count` of the world's `class` records): a global
question, answered only by a class token that sees every patch, and not saturated by a tiny model. The
recipe follows the paper's (section 4.1): AdamW, warm-up + cosine, label smoothing, mixup / CutMix with a
switch between them per batch, stochastic depth, and the soft mask's alpha set once per optimiser step by
its schedule. Reports held-out top-1 beside chance (the most frequent class) and the curve of both during
training; saves the model (``<out>/model``: `tower: {kind: illama, path: <out>/model}` uses it as a VLM tower).

The loop, Mixup / CutMix and the data are recipe `classify`'s (vlkit/recipes/classify.py), which trains a tower of
any kind with its own head; this recipe adds iLLaMA's model, its count head and the soft mask's schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.models.llm import count_parameters
from vlkit.models.vision.illama import ILlama, ILlamaConfig, mask_alpha, write_illama
from vlkit.recipes.classify import Augment, ClassData, fit_classifier, image_arrays, mix, smooth_one_hot
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything
from vlkit.world.sources import load_splits

__all__ = ["Augment", "ClassData", "ILlamaRecipe", "MaskSchedule", "accuracy", "count_labels", "mix", "run"]


class MaskSchedule(Section):
    schedule: Literal["none", "constant", "linear"] = Field("constant", description="Soft mask alpha over training "
                                                            "(attention soft): constant alpha0 then 0, linear to 0, "
                                                            "or none (0 from the start).")
    alpha0: float = Field(1.0, ge=0, le=1)
    cutoff_epochs: float = Field(1.0, ge=0, description="Epochs until alpha reaches 0 (the paper: 25 of 300).")


class ILlamaRecipe(Section):
    recipe: Literal["illama"] = "illama"
    output_dir: str = Field("runs/illama")
    model: ILlamaConfig = Field(default_factory=lambda: ILlamaConfig(image_size=64, patch_size=8, width=96, depth=6,
                                                                      heads=3, num_classes=6))
    data: ClassData = Field(default_factory=ClassData)
    mask: MaskSchedule = Field(default_factory=MaskSchedule)
    augment: Augment = Field(default_factory=Augment)
    train: TrainConfig = Field(default_factory=TrainConfig)


def count_labels(records: list[dict], classes: int, where: str) -> list[int]:
    """Class index (count - 1) of each record; a record without `labels.count` or beyond the head is an error."""
    out = []
    for r in records:
        n = r.get("meta", {}).get("labels", {}).get("count")
        if not isinstance(n, int) or not 1 <= n <= classes:
            raise VlkitError(f"{where}: record {r.get('id', '?')} has labels.count {n!r}; the head has {classes} "
                             "classes (counts 1..classes): set model.num_classes or data.tasks")
        out.append(n - 1)
    return out


@torch.no_grad()
def accuracy(model: ILlama, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> dict:
    """Top-1 over held-out images, each item's hit kept (for intervals and paired comparisons)."""
    model.eval()
    device = next(model.parameters()).device
    hits = []
    for i in range(0, len(pixels), batch_size):
        pred = model(pixels[i:i + batch_size].to(device)).argmax(-1).cpu()
        hits.append((pred == labels[i:i + batch_size]).float())
    h = torch.cat(hits)
    return {"acc": float(h.mean()), "items": h.tolist()}


def run(cfg: ILlamaRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = load_splits(cfg.data, progress=progress)
    if not train_recs or not test_recs:
        raise VlkitError(f"{out}: the illama recipe needs class records in both splits; check data.tasks")
    classes = cfg.model.num_classes
    train_y, test_y = count_labels(train_recs, classes, "train"), count_labels(test_recs, classes, "test")
    transform = cfg.model.transform()
    train_px = image_arrays(transform, train_recs, progress)
    test_px = transform.normalize(image_arrays(transform, test_recs, progress))
    test_t = torch.tensor(test_y)
    chance = float(np.bincount(test_y, minlength=classes).max() / len(test_y))
    seed_everything(cfg.train.seed)
    model = ILlama(cfg.model)
    per_epoch = len(train_y) / (cfg.train.batch_size * cfg.train.grad_accum)

    def objective(logits, target):
        return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean(), {"alpha": model.alpha}

    def set_alpha(step: int, _=None):
        model.alpha = mask_alpha(step, per_epoch, cfg.mask.schedule, cfg.mask.alpha0, cfg.mask.cutoff_epochs)

    def evaluate(m):
        return {"acc": accuracy(model, test_px, test_t)["acc"], "alpha": model.alpha}

    targets = smooth_one_hot(torch.tensor(train_y), classes, cfg.augment.smoothing)
    trainer = fit_classifier(model, cfg, out, transform, train_px, targets, objective, evaluate, record, "illama",
                             resume, overwrite, on_step=set_alpha)
    final = accuracy(model, test_px, test_t)
    trainer.save_model(out / "model", lambda tmp: write_illama(model, tmp))
    curve = [{"step": h["step"], "acc": h["eval/acc"], "alpha": h.get("eval/alpha")} for h in trainer.history
             if "eval/acc" in h]
    return finish(out, {"recipe": "illama", "params": count_parameters(model), "acc": final["acc"],
                        "items": final["items"], "chance": chance, "n": len(test_y), "curve": curve,
                        "train_seconds": trainer.train_seconds, "model_dir": str(out / "model"),
                        "mask_cutoff_step": None if cfg.mask.schedule == "none" or cfg.model.attention != "soft"
                        else round(cfg.mask.cutoff_epochs * per_epoch)})
