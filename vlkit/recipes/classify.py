"""Recipe `classify`: train a vision encoder of any kind with a classification head on the shapes world, and save
the tower as a directory its kind loads (``<out>/tower``; for kind hf, `tower: {kind: hf, path: <out>/tower}`).

The targets are the world's `class` records' labels (vlkit.world.language.class_labels): which shapes a scene
holds and which colours (multi-label: a sigmoid per class) and how many objects (a softmax over 1..max_objects)
-- another objective than the world ViT's CLIP contrast, so a stack of the two (SPHINX) mixes two kinds of
features. The head reads one pooled token:

    pixels (B, 3, S, S) -> tower.tokens (B, N, C) -> its special token | its patches' mean | their max (B, C)
                        -> LayerNorm -> Linear -> logits (B, sum of the heads' classes)

Reports, on held-out scenes, each head's accuracy (a multi-label head's: the whole set right, and per label)
beside chance, and the share of scenes with every head right (`acc`). Training images are turned and mirrored at
random (`dihedral`: no label changes under the square's symmetries); Mixup and CutMix are there, off by default.

The training loop is shared with recipe `illama` (which trains iLLaMA's own head on the count): `fit_classifier`
runs the trainer over uint8 image arrays and target vectors with per-batch Mixup / CutMix (`mix_batch`: one
lambda per batch as timm's `Mixup` defines it, CutMix's lambda corrected to the pasted box's area; written here:
torchvision's and timm's need a torchvision that cannot be installed beside the CPU torch this project pins),
its draws seeded by (seed, step, micro-batch) so a resumed run draws as the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.transforms import ImageTransform, unique_paths
from vlkit.errors import VlkitError
from vlkit.models.llm import count_parameters
from vlkit.models.vision.encoder import EncoderConfig, VisionEncoder, build_encoder
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything
from vlkit.world.scene import COLORS, SHAPES
from vlkit.world.sources import RecordsConfig, load_splits


# -- shared with recipe illama ----------------------------------------------------------------------------
class ClassData(RecordsConfig):
    tasks: list[str] | None = Field(["class"], description="World records carrying class labels.")


class Augment(Section):
    mixup: float = Field(0.8, ge=0, description="Mixup's Beta(alpha, alpha) (0: off).")
    cutmix: float = Field(1.0, ge=0, description="CutMix's Beta(alpha, alpha) (0: off).")
    switch_prob: float = Field(0.5, ge=0, le=1, description="Chance a batch uses CutMix when both are on.")
    prob: float = Field(1.0, ge=0, le=1, description="Chance a batch is mixed at all.")
    smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the soft targets.")


def smooth_one_hot(y: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """Class indices (B,) -> soft targets (B, classes): 1 - smoothing + smoothing / classes on the class."""
    off, on = smoothing / classes, 1 - smoothing + smoothing / classes
    return torch.full((len(y), classes), off, device=y.device).scatter_(1, y[:, None], on)


def mix_batch(x: torch.Tensor, target: torch.Tensor, a: Augment, rng: np.random.Generator):
    """Mixup or CutMix of a batch with its reverse (one lambda per batch); the targets (B, K) mixed alike."""
    if (a.mixup <= 0 and a.cutmix <= 0) or rng.random() >= a.prob:
        return x, target
    cut = a.cutmix > 0 and (a.mixup <= 0 or rng.random() < a.switch_prob)
    lam = float(rng.beta(a.cutmix, a.cutmix) if cut else rng.beta(a.mixup, a.mixup))
    x = x.clone()
    if cut:  # a box of area (1 - lam), centred anywhere, clipped; lam is then the area left
        h, w = x.shape[-2:]
        bh, bw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, target * lam + target.flip(0) * (1 - lam)


def dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image of (B, 3, S, S) moved by one of the square's 8 symmetries (quarter turns, then a mirror or not),
    drawn per image."""
    g = torch.as_tensor(rng.integers(8, size=len(x)))
    out = x.clone()
    for k in range(8):
        rows = (g == k).nonzero().flatten()
        if len(rows):
            turned = x[rows].rot90(k % 4, (-2, -1))
            out[rows] = turned.flip(-1) if k >= 4 else turned
    return out


def mix(x: torch.Tensor, y: torch.Tensor, classes: int, a: Augment, rng: np.random.Generator):
    """Mixup or CutMix of a batch of class indices y (B,): the mixed batch and soft targets (B, classes)."""
    return mix_batch(x, smooth_one_hot(y, classes, a.smoothing), a, rng)


class Images:
    """uint8 images (N, S, S, 3) and a target vector (K,) per image."""

    def __init__(self, pixels: np.ndarray, targets):
        self.pixels, self.targets = torch.from_numpy(pixels), targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.pixels[i], self.targets[i]


def image_arrays(transform: ImageTransform, records: list[dict], progress: bool | None = None) -> np.ndarray:
    """Each record's first image as uint8 (N, S, S, 3), decoded once per distinct file (and cached)."""
    paths, rows = unique_paths(records)
    return transform.cached_arrays(paths, progress)[rows]


def fit_classifier(model: nn.Module, cfg, out: Path, transform: ImageTransform, train_px: np.ndarray,
                   targets: torch.Tensor, objective: Callable, evaluate: Callable, record: Callable[[], None],
                   desc: str, resume: bool = False, overwrite: bool = False,
                   on_step: Callable[[int, dict | None], None] | None = None,
                   prepare: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None) -> Trainer:
    """Train `model` (normalised pixels -> logits) on `train_px` and `targets` (N, K) with cfg.train, each batch
    moved by `prepare(x, rng)` (targets unchanged) and mixed by cfg.augment; `objective(logits, mixed targets)` ->
    loss or (loss, logs). `on_step(step)` runs before the first step and after every step. Returns the trainer,
    its model trained."""
    draws = {"step": -1, "k": 0}  # the mixing draws of a step are seeded by (seed, step, micro-batch): exact resume

    def rng():
        draws.update(k=draws["k"] + 1 if draws["step"] == trainer.step else 0, step=trainer.step)
        return np.random.default_rng((cfg.train.seed, trainer.step, draws["k"]))

    def collate(items):
        return {"pixel_values": transform.normalize(torch.stack([p for p, _ in items])),
                "targets": torch.stack([t for _, t in items])}

    def loss_fn(m, batch):
        draw, x = rng(), batch["pixel_values"]
        x, target = mix_batch(prepare(x, draw) if prepare else x, batch["targets"], cfg.augment, draw)
        return objective(m(x), target)

    def start():
        record()
        if on_step is not None:
            on_step(trainer.step)

    trainer = Trainer(model, cfg.train, Images(train_px, targets), collate, loss_fn, out, evaluate=evaluate,
                      run_config=cfg.model_dump(mode="json"), desc=desc, on_start=start)
    trainer.fit(resume=resume, overwrite=overwrite, callbacks=[on_step] if on_step is not None else ())
    return trainer


# -- the classify recipe ----------------------------------------------------------------------------------
Pool = Literal["special", "mean", "max"]
WORLD_CONVNEXT = {"model_type": "convnext", "hidden_sizes": [48, 96, 192], "depths": [1, 1, 2], "image_size": 64}


class ClassifyModel(Section):
    tower: EncoderConfig = Field(default_factory=lambda: EncoderConfig(arch=WORLD_CONVNEXT, feature_layer="output",
                                                                       select="full"),
                                 description="The encoder to train (an arch: random weights; or a path to go on "
                                 "from); its kind must save itself as a directory (hf).")
    pool: Pool = Field("max", description="What the head reads: the tower's (first) special token (ConvNeXt's "
                       "grid mean, a ViT's class token), or the mean or the per-channel max of its patches. Max: "
                       "which shapes and colours a scene holds is a question of presence, and a small ConvNeXt "
                       "trained through its grid mean stays near chance on it.")


class Targets(Section):
    shapes: bool = Field(True, description="Which shapes the scene holds (multi-label, a sigmoid per shape).")
    colors: bool = Field(True, description="Which colours it holds (multi-label).")
    count: bool = Field(True, description="How many objects (one softmax over 1..data.world.world.max_objects).")


class SceneAugment(Augment):
    dihedral: bool = Field(True, description="Turn each training image by quarter turns and mirror it at random "
                           "(the 8 symmetries of the square): a scene's shapes, colours and count stay what they were.")


class ClassifyRecipe(Section):
    recipe: Literal["classify"] = "classify"
    output_dir: str = Field("runs/classify")
    model: ClassifyModel = Field(default_factory=ClassifyModel)
    targets: Targets = Field(default_factory=Targets)
    data: ClassData = Field(default_factory=ClassData)
    augment: SceneAugment = Field(default_factory=lambda: SceneAugment(mixup=0.0, cutmix=0.0, smoothing=0.0),
                                  description="Mixup and CutMix are off by default: a CutMix box can cut an object "
                                  "out of a scene whose targets still name it.")
    train: TrainConfig = Field(default_factory=TrainConfig)


@dataclass(frozen=True)
class Head:
    """One question about a scene: its name (a key of the records' labels), its classes, and whether several
    may hold at once (multi-label: a sigmoid each) or exactly one (a softmax)."""

    name: str
    classes: tuple[str, ...]
    multi: bool

    def target(self, labels: dict, where: str) -> list[float]:
        value = labels.get(self.name)
        held = {str(v) for v in value} if self.multi and isinstance(value, list) else {str(value)}
        if value is None or not held <= set(self.classes):
            raise VlkitError(f"{where}: labels.{self.name} is {value!r}, outside this head's classes "
                             f"{list(self.classes)}; check data.tasks (class records) and data.world")
        return [float(c in held) for c in self.classes]

    def smooth(self, t: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Label smoothing: towards 1/2 for each sigmoid, towards uniform for the softmax."""
        return t * (1 - smoothing) + smoothing / (2 if self.multi else len(self.classes))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multi:
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()

    def hits(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per item: the whole answer right (B,), and each decision right (B, classes)."""
        if self.multi:
            right = (logits > 0) == (target > 0.5)
            return right.all(-1), right
        right = logits.argmax(-1) == target.argmax(-1)
        return right, right[:, None]


def heads(cfg: ClassifyRecipe) -> list[Head]:
    n = cfg.data.world.world.max_objects
    every = {"shapes": Head("shapes", SHAPES, True), "colors": Head("colors", tuple(COLORS), True),
             "count": Head("count", tuple(str(i) for i in range(1, n + 1)), False)}
    chosen = [h for name, h in every.items() if getattr(cfg.targets, name)]
    if not chosen:
        raise VlkitError("targets: every head is off; turn on at least one of shapes, colors, count")
    return chosen


def target_matrix(records: list[dict], hs: list[Head], where: str) -> torch.Tensor:
    """(N, sum of classes): each record's heads' targets side by side, 0/1."""
    return torch.tensor([[v for h in hs for v in h.target(r.get("meta", {}).get("labels", {}),
                                                            f"{where} record {r.get('id', '?')}")]
                         for r in records])


def split_heads(x: torch.Tensor, hs: list[Head]) -> list[torch.Tensor]:
    return list(x.split([len(h.classes) for h in hs], -1))


class Classifier(nn.Module):
    """A tower and a linear head on one pooled token: (B, 3, S, S) -> logits (B, K)."""

    def __init__(self, encoder: VisionEncoder, classes: int, pool: Pool):
        super().__init__()
        if pool == "special" and encoder.num_special == 0:
            raise VlkitError(f"model.pool: the tower (kind {encoder.kind}) has no special token; set model.pool: "
                             "mean")
        self.encoder, self.pool = encoder, pool
        self.norm = nn.LayerNorm(encoder.width)
        self.head = nn.Linear(encoder.width, classes)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C): the first special token wherever the specials sit, or the patches' mean or max."""
        e = self.encoder
        x, n = e.tokens(pixel_values), e.num_special
        if self.pool == "special":
            return x[:, 0] if e.special_position == "first" else x[:, -n]
        patches = x[:, n:] if e.special_position == "first" else x[:, :x.shape[1] - n]
        return patches.mean(1) if self.pool == "mean" else patches.amax(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pooled(pixel_values)))


@torch.no_grad()
def scores(model: Classifier, pixels: torch.Tensor, targets: torch.Tensor, hs: list[Head],
           batch_size: int = 250) -> dict:
    """Held-out accuracy per head (`<head>`: whole answer; `<head>_label`: per decision, multi-label heads), `acc`:
    every head right, with each item's hit in `items`."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(pixels[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, len(pixels), batch_size)])
    out, every = {}, torch.ones(len(pixels), dtype=torch.bool)
    for h, lg, t in zip(hs, split_heads(logits, hs), split_heads(targets, hs)):
        whole, each = h.hits(lg, t)
        out[h.name] = float(whole.float().mean())
        if h.multi:
            out[f"{h.name}_label"] = float(each.float().mean())
        every &= whole
    return {"acc": float(every.float().mean()), **out, "items": every.float().tolist()}


def chance(targets: torch.Tensor, hs: list[Head]) -> dict:
    """What answering the most frequent answer scores: per head (and per label), and for every head at once."""
    def top_share(rows: torch.Tensor) -> float:
        return float(torch.unique(rows, dim=0, return_counts=True)[1].max()) / len(rows)

    out = {"acc": top_share(targets)}
    for h, t in zip(hs, split_heads(targets, hs)):
        out[h.name] = top_share(t)
        if h.multi:
            p = t.mean(0)
            out[f"{h.name}_label"] = float(torch.maximum(p, 1 - p).mean())
    return out


def run(cfg: ClassifyRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = load_splits(cfg.data, progress=progress)
    if not train_recs or not test_recs:
        raise VlkitError(f"{out}: the classify recipe needs class records in both splits; check data.tasks")
    hs = heads(cfg)
    train_t, test_t = target_matrix(train_recs, hs, "train"), target_matrix(test_recs, hs, "test")
    seed_everything(cfg.train.seed)
    encoder = build_encoder(cfg.model.tower)
    if not callable(getattr(encoder, "save_pretrained", None)):
        raise VlkitError(f"model.tower: an encoder of kind {encoder.kind} cannot be saved as a directory; classify "
                         "trains towers that can (kind hf)")
    model = Classifier(encoder, train_t.shape[1], cfg.model.pool)
    transform = encoder.transform
    train_px = image_arrays(transform, train_recs, progress)
    test_px = transform.normalize(image_arrays(transform, test_recs, progress))
    soft = torch.cat([h.smooth(t, cfg.augment.smoothing) for h, t in zip(hs, split_heads(train_t, hs))], -1)

    def objective(logits, target):
        parts = {f"{h.name}_loss": h.loss(lg, t) for h, lg, t in zip(hs, split_heads(logits, hs),
                                                                        split_heads(target, hs))}
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    def evaluate(m):
        return {k: v for k, v in scores(model, test_px, test_t, hs).items() if k != "items"}

    trainer = fit_classifier(model, cfg, out, transform, train_px, soft, objective, evaluate, record, "classify",
                             resume, overwrite, prepare=dihedral if cfg.augment.dihedral else None)
    final = scores(model, test_px, test_t, hs)
    trainer.save_model(out / "tower", encoder.save_pretrained)
    curve = [{"step": h["step"], **{k[5:]: v for k, v in h.items() if k.startswith("eval/")}}
             for h in trainer.history if "eval/acc" in h]
    return finish(out, {"recipe": "classify", "params": count_parameters(encoder),
                        "head_params": count_parameters(model) - count_parameters(encoder),
                        **{k: v for k, v in final.items() if k != "items"}, "items": final["items"],
                        "chance": chance(test_t, hs), "n": len(test_t), "heads": [h.name for h in hs],
                        "curve": curve, "train_seconds": trainer.train_seconds, "tower_dir": str(out / "tower")})
