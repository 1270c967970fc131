"""Recipe `vpgc`: add VPG-C to an instruction-following VLM and train it by synthetic discriminative training
(Cheetor; Li, Pan et al. 2023, section 4), without any demonstrative-instruction data.

For each training scene the VPG's own Q-Former cross-attention (averaged over blocks, heads and queries)
is summed inside every object's box; the object the VPG attends to *least* is edited with the world
renderer (recolour, reshape, swap, delete; or an object is added), and the model learns to describe the
difference between the original and the edited image, mixed with plain captions. Only VPG-C trains.
`synthetic.guidance: random` edits a random object instead (the ablation of the guidance).

Evaluates on held-out world tasks and zero-shot on mini-DEMON (or any DEMON-format directory) and saves a
vlkit model directory (``<out>/model``) whose config carries the VPG-C settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.console import bar
from vlkit.data.features import ImageBank
from vlkit.data.records import assistant, save_records, user
from vlkit.data.tasks import mix_tasks
from vlkit.world.sources import RecordsConfig
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_path
from vlkit.eval.demon import DemonEval, demon_scores
from vlkit.eval.world import EvalConfig
from vlkit.models.fusion.vpgc import VPGCConfig
from vlkit.models.io import load_vlm
from vlkit.recipes.common import CACHE_HELP, finish, prepare_output, splits, train_and_evaluate
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything
from vlkit.world.dataset import DIFF_PROMPTS
from vlkit.world.edits import edit_scene
from vlkit.world.render import render
from vlkit.world.scene import Scene

Edit = Literal["recolor", "reshape", "move", "swap", "delete", "add"]  # what vlkit.world.edits.edit_scene can do


class SyntheticConfig(Section):
    guidance: Literal["attention", "random"] = Field("attention", description="Edit the object the VPG attends to "
                                                     "least (attention) or a random one (the ablation).")
    edits: list[Edit] = Field(["recolor", "reshape", "swap", "delete", "add"],
                              description="Edits to draw from (the paper: modify, swap, delete, add).")
    scenes: int | None = Field(None, gt=0, description="Train scenes to edit (default: all).")
    captions: float = Field(1.0, ge=0, description="Weight of plain caption records mixed in (edits: 1).")
    seed: int = Field(0, ge=0)


class VPGCRecipe(Section):
    recipe: Literal["vpgc"] = "vpgc"
    output_dir: str = Field("runs/vpgc")
    init: str = Field(..., description="vlkit model directory to complete (an instruction-tuned VLM with a "
                      "Q-Former VPG).")
    vpgc: VPGCConfig = Field(default_factory=VPGCConfig)
    trainable: list[str] = Field(["vpgc"], description="Parameter groups to train (the paper: VPG-C only).")
    save_trained_only: bool = Field(False, description="The model directory keeps only the trained tensors and "
                                    "refers to `init` by path and hash (loading it needs `init`, unchanged); "
                                    "default: every tensor.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    data: RecordsConfig = Field(default_factory=lambda: RecordsConfig(tasks=["caption"]),
                                description="Where the training scenes (and the captions mixed in) come from.")
    eval_data: RecordsConfig | None = Field(None, description="Held-out world records (default: data's world).")
    cache_features: bool | Literal["fp16"] = Field(True, description=CACHE_HELP)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(tasks=["caption", "vqa"], blind=False))
    demon: DemonEval | None = Field(default_factory=DemonEval, description="Zero-shot DEMON-format evaluation "
                                    "after training (null: skip).")
    train: TrainConfig = Field(default_factory=TrainConfig)


@torch.no_grad()
def object_attention(model, features: torch.Tensor, scenes: list[Scene]) -> list[np.ndarray]:
    """Per scene, the VPG's cross-attention mass inside each object's box: the attention maps (B, heads, M, N) of
    every Q-Former cross-attention block averaged over blocks, heads and queries, then summed over the patches
    whose centres lie in the box (the nearest patch when none does). Features are the (B, N, C) features of a
    one-encoder stack; the encoder says where its patches lie and on what grid."""
    if len(model.vision.encoders) != 1:
        raise VlkitError("vpgc: attention guidance reads one encoder's patch grid; this stack has "
                         f"{len(model.vision.encoders)} encoders (use synthetic.guidance=random)")
    encoder = model.vision.encoders[0]
    q = model.vpg.query_tokens.expand(len(features), -1, -1)
    _, maps = model.vpg.query(features.to(model.vpg_dtype), q, output_attentions=True)
    att = torch.stack([m.float().mean(dim=(1, 2)) for m in maps]).mean(0)[:, encoder.patch_slice()]  # (B, patches)
    rows, cols = encoder.grid
    cx, cy = np.meshgrid((np.arange(cols) + 0.5) / cols, (np.arange(rows) + 0.5) / rows)  # row-major: row = y
    cx, cy = cx.ravel(), cy.ravel()
    out = []
    for a, scene in zip(att.numpy(), scenes):
        mass = []
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
            if not inside.any():
                inside = np.zeros(rows * cols, bool)
                inside[np.argmin((cx - o.cx) ** 2 + (cy - o.cy) ** 2)] = True
            mass.append(float(a[inside].sum()))
        out.append(np.array(mass))
    return out


def synthetic_records(model, processor, scenes: list[tuple[Scene, str]], cfg: SyntheticConfig, out: Path,
                      resolution: int, progress: bool | None = None) -> tuple[list[dict], dict]:
    """Edit each (scene, image path) and write the edited image under `out`; one "edit" record per scene.
    Returns (records, stats: how many scenes, and how often each edit was made)."""
    rng = np.random.default_rng(cfg.seed)
    bank = ImageBank.of([{"images": [p]} for _, p in scenes], processor) \
        if cfg.guidance == "attention" else None  # random edits need no pixels
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    records, kinds = [], {}
    model.eval()
    for start in bar(range(0, len(scenes), 128), desc="synthetic edits", enabled=progress):
        chunk = scenes[start:start + 128]
        masses = None
        if bank is not None:
            feats = model.image_features(**bank.inputs([bank.index[p] for _, p in chunk]))
            masses = object_attention(model, feats, [s for s, _ in chunk])
        for k, (scene, path) in enumerate(chunk):
            index = int(np.argmin(masses[k])) if masses is not None else int(rng.integers(len(scene.objects)))
            edited, kind, desc = edit_scene(scene, rng, index=index, kinds=tuple(cfg.edits))
            kinds[kind] = kinds.get(kind, 0) + 1
            name = f"{start + k:06d}.png"
            with atomic_path(img_dir / name) as tmp:  # ranks that render the same file never see it half-written
                render(edited, resolution).save(tmp, format="PNG", optimize=False, compress_level=1)
            prompt = DIFF_PROMPTS[rng.integers(len(DIFF_PROMPTS))]
            records.append({"id": f"synthetic-{start + k:06d}", "task": "edit", "images": [path, str(img_dir / name)],
                            "messages": [user(None, None, prompt), assistant(desc)],
                            "meta": {"edit": kind, "object": index, "guidance": cfg.guidance}})
    save_records(out / "synthetic.jsonl", records)
    return records, {"edits": kinds, "scenes": len(records)}


def run(cfg: VPGCRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = splits(cfg.data, cfg.eval_data, progress)
    seed_everything(cfg.train.seed)
    model, proc = load_vlm(cfg.init)
    model.add_fusion("vpgc", cfg.vpgc)
    model.set_trainable(cfg.trainable)

    scenes, seen = [], set()
    for r in train_recs:
        meta = r.get("meta", {})
        if "scene" in meta and r["images"] and r["images"][0] not in seen:
            seen.add(r["images"][0])
            scenes.append((Scene.from_dict(meta["scene"]), r["images"][0]))
    if not scenes:
        raise VlkitError(f"{cfg.output_dir}: the training records carry no scenes (meta.scene); the vpgc recipe "
                         "edits world scenes, so point data at a world dataset")
    scenes = scenes[: cfg.synthetic.scenes]
    t0 = time.perf_counter()
    synthetic, stats = synthetic_records(model, proc, scenes, cfg.synthetic, out / "synthetic",
                                         cfg.data.world.world.resolution, progress)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    captions = [r for r in train_recs if r.get("task") == "caption"]
    mixed = mix_tasks(synthetic + captions, {"edit": 1.0, "caption": cfg.synthetic.captions},
                      seed=cfg.synthetic.seed) if cfg.synthetic.captions > 0 else synthetic
    model.train()
    result = train_and_evaluate(model, proc, cfg, mixed, test_recs, out, resume, overwrite, progress,
                                on_start=record, base=cfg.init if cfg.save_trained_only else None)
    result["synthetic"] = stats
    result["vpgc_layer"] = model.fusion("vpgc").layer
    if cfg.demon is not None:
        result["demon"] = demon_scores(model, proc, cfg.demon, out, progress)
    return finish(out, {"recipe": "vpgc", "init": cfg.init, **result})
