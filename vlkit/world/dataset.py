"""Shapes-world datasets on disk: records (JSONL) + PNGs, cached by (seed, config).

``build(cfg)`` writes ``<cache>/world/<key>/{train,test}.jsonl`` and ``img/``; ``key`` hashes the
config and the generator version, so a repeated call returns at once and a changed generator never
serves stale data. Train and held-out scenes come from disjoint seeds: scene i of split s has seed
``(cfg.seed << 32) | (i << 1) | s``.

Tasks beyond the default six follow SPHINX's mix of tuning tasks (Lin et al. 2023: referring expressions,
grounded captions, detection, and small text that only its high-resolution views can read); a dataset asks
for them in ``tasks``.

    task       request                               answer
    refer      give the box of the red object.       [x1,y1,x2,y2] of the one object the expression picks
    grounded   describe the image with a box for...  a small red circle [..] and a large blue square [..].
    detect     find all the circles.                 every matching box in reading order, "; "-joined, or none
    smalltext  what does the text say?               the text, drawn at `smalltext_size` (see there)

Boxes are normalised in the image's own coordinates (``Scene.box``), also for non-square worlds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from vlkit.config import Section
from vlkit.console import bar
from vlkit.data.records import assistant, save_records, user
from vlkit.fileio import atomic_dir, cache_root, read_json, stable_hash, write_json
from vlkit.world import language as lang
from vlkit.world.edits import edit_scene
from vlkit.world.render import render
from vlkit.world.scene import Scene, WorldConfig, generate_scene

GENERATOR_VERSION = 1
DEFAULT_TASKS = ("caption", "vqa", "grounding", "text", "class", "edit")  # what a dataset derives unless told
TASKS = DEFAULT_TASKS + ("refer", "grounded", "detect", "smalltext")
SPLITS = {"train": 0, "test": 1}

CAPTION_PROMPTS = ("describe the image.", "what is in this picture?", "write a short caption.",
                   "describe the scene briefly.")
DIFF_PROMPTS = ("what changed between the two images?", "describe the difference between the images.",
                "how does the second image differ from the first?")
TEXT_PROMPTS = ("what does the text say?", "read the text in the image.")
CLASS_PROMPTS = ("which shapes are in the image?", "list the shapes you see.")
GROUNDED_PROMPTS = ("describe the image with a box for every object.", "list every object with its box.")

Task = Literal["caption", "vqa", "grounding", "text", "class", "edit", "refer", "grounded", "detect", "smalltext"]

# Font size of the smalltext task (fraction of the shorter side). Measured ink height of the digits "88" (the
# font's digits are 0.72 em tall), |pixel - background| > 40, at this size: 2 px at 64, 4 px at 128, 5 px at
# 192, 14 px at 448 -- two pixel rows cannot tell digits or letters apart once the image is shrunk to 64 px,
# while from ~192 px the glyphs have the 5+ rows of the smallest legible bitmap fonts. (The world's default
# 0.075 is 4 px at 64.) For text legible only at full resolution use 0.025 with resolution 448: 2 px at 64,
# 2 at 128, 4 at 192, 8 at 448.
SMALLTEXT_SIZE = 0.04


class WorldData(Section):
    """A generated dataset: which scenes, how many, which tasks."""

    world: WorldConfig = Field(default_factory=WorldConfig, description="Scene drawing settings.")
    seed: int = Field(0, ge=0, description="Dataset seed; scenes of different seeds never repeat.")
    train_scenes: int = Field(4000, ge=0, description="Scenes in the train split.")
    test_scenes: int = Field(500, ge=0, description="Scenes in the held-out split.")
    tasks: list[Task] = Field(default_factory=lambda: list(DEFAULT_TASKS), description="Tasks to derive per "
                              f"scene, among {', '.join(TASKS)}.")
    vqa_per_scene: int = Field(2, ge=0, description="VQA records per scene.")
    relations: bool = Field(False, description="Also ask spatial relations between two objects (VQA kind "
                            "'relation': is the A left of / above the B?).")
    smalltext_size: float = Field(SMALLTEXT_SIZE, ge=0.01, le=0.2, description="Font size of the text in the "
                                  "smalltext task's images (fraction of the shorter side; those images are the "
                                  "scene redrawn with it unless it equals world.text_size). Unreadable at 64 px, "
                                  "readable from ~192: use resolution >= 192.")


# Settings added after datasets were first cached: left out of the cache key at their defaults, so every dataset
# made before they existed keeps its key (and, the generator drawing nothing new at the defaults, its content).
LATER_SETTINGS = ("relations", "smalltext_size")
LATER_WORLD_SETTINGS = ("text_size", "aspects", "size_scale")


def cache_fields(cfg: WorldData) -> dict:
    """What the cache key of `cfg` hashes: its settings, less those added later that are at their defaults."""
    data = cfg.model_dump(mode="json")
    _drop_defaults(data, WorldData, LATER_SETTINGS)
    _drop_defaults(data["world"], WorldConfig, LATER_WORLD_SETTINGS)
    return data


def _drop_defaults(data: dict, section: type, names: tuple[str, ...]) -> None:
    defaults = section().model_dump(mode="json")
    for name in names:
        if data.get(name) == defaults[name]:
            data.pop(name)


def scene_seed(seed: int, split: str, i: int) -> int:
    return (seed << 32) | (i << 1) | SPLITS[split]


def scene_records(scene: Scene, split: str, i: int, cfg: WorldData, img_dir: Path) -> list[dict]:
    """Render a scene (and its edit) to PNG and derive one record per task."""
    rng = np.random.default_rng(scene.seed ^ 0x5EED)
    res, text_size = cfg.world.resolution, cfg.world.text_size
    name = f"{split}-{i:06d}"
    img = f"img/{name}.png"
    render(scene, res, text_size).save(img_dir / f"{name}.png", optimize=False, compress_level=1)
    meta = {"scene": scene.to_dict(), "split": split, "index": i}
    out: list[dict] = []

    def rec(task: str, k: int, images: list[str], messages: list[dict], **extra) -> None:
        out.append({"id": f"{task}-{name}-{k}", "task": task, "images": images, "messages": messages,
                    "meta": {**meta, **extra}})

    for task in cfg.tasks:
        if task == "caption":
            style = lang.CAPTION_STYLES[rng.integers(len(lang.CAPTION_STYLES))]
            prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
            rec("caption", 0, [img], [user(None, prompt), assistant(lang.caption(scene, style))],
                refs=lang.all_captions(scene), style=style)
        elif task == "vqa":
            for k in range(cfg.vqa_per_scene):
                kind, q, a = lang.vqa(scene, rng, cfg.relations)
                rec("vqa", k, [img], [user(None, q), assistant(a)], kind=kind, answer=a)
        elif task == "grounding":
            obj, q, a = lang.grounding(scene, rng)
            rec("grounding", 0, [img], [user(None, q), assistant(a)], box=list(scene.box(obj)))
        elif task == "text" and scene.text is not None:
            prompt = TEXT_PROMPTS[rng.integers(len(TEXT_PROMPTS))]
            rec("text", 0, [img], [user(None, prompt), assistant(scene.text.value)], answer=scene.text.value)
        elif task == "smalltext" and scene.text is not None:  # the text task on the scene redrawn with small text
            image = img
            if cfg.smalltext_size != text_size:
                image = f"img/{name}-small.png"
                render(scene, res, cfg.smalltext_size).save(img_dir / f"{name}-small.png", optimize=False,
                                                              compress_level=1)
            prompt = TEXT_PROMPTS[rng.integers(len(TEXT_PROMPTS))]
            rec("smalltext", 0, [image], [user(None, prompt), assistant(scene.text.value)], answer=scene.text.value,
                text_size=cfg.smalltext_size, slots={"question": prompt})
        elif task == "refer":
            obj, expr, q, a = lang.refer(scene, rng)
            rec("refer", 0, [img], [user(None, q), assistant(a)], box=list(scene.box(obj)), expr=expr,
                slots={"question": q, "expr": expr})
        elif task == "grounded":
            prompt = GROUNDED_PROMPTS[rng.integers(len(GROUNDED_PROMPTS))]
            objs = scene.ordered()
            rec("grounded", 0, [img], [user(None, prompt), assistant(lang.grounded_caption(scene))],
                boxes=[list(scene.box(o)) for o in objs], names=[o.name for o in objs], slots={"question": prompt})
        elif task == "detect":
            kind, boxes, q, a = lang.detect(scene, rng)
            rec("detect", 0, [img], [user(None, q), assistant(a)], kind=kind, boxes=[list(b) for b in boxes],
                slots={"question": q, "kind": kind})
        elif task == "class":
            prompt = CLASS_PROMPTS[rng.integers(len(CLASS_PROMPTS))]
            rec("class", 0, [img], [user(None, prompt), assistant(lang.class_answer(scene))],
                labels=lang.class_labels(scene))
        elif task == "edit":
            edited, kind, desc = edit_scene(scene, rng)
            render(edited, res, text_size).save(img_dir / f"{name}-b.png", optimize=False, compress_level=1)
            prompt = DIFF_PROMPTS[rng.integers(len(DIFF_PROMPTS))]
            rec("edit", 0, [img, f"img/{name}-b.png"], [user(None, None, prompt), assistant(desc)],
                edit=kind, edited=edited.to_dict())
    return out


def dataset_dir(cfg: WorldData) -> Path:
    key = stable_hash({"cfg": cache_fields(cfg), "version": GENERATOR_VERSION})
    return cache_root() / "world" / key


def build(cfg: WorldData | None = None, progress: bool | None = None) -> Path:
    """Generate (or find cached) the dataset of `cfg`; returns its directory."""
    cfg = cfg or WorldData()
    root = dataset_dir(cfg)
    if (root / "info.json").is_file():
        return root
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        (tmp / "img").mkdir()
        counts = {}
        for split, n in (("train", cfg.train_scenes), ("test", cfg.test_scenes)):
            records: list[dict] = []
            for i in bar(range(n), desc=f"world {split}", enabled=progress):
                scene = generate_scene(scene_seed(cfg.seed, split, i), cfg.world)
                records.extend(scene_records(scene, split, i, cfg, tmp / "img"))
            save_records(tmp / f"{split}.jsonl", records)
            counts[split] = {"scenes": n, "records": len(records)}
        write_json(tmp / "info.json", {"config": cfg.model_dump(mode="json"), "version": GENERATOR_VERSION,
                                       "counts": counts, "seconds": round(time.perf_counter() - t0, 2)})
    return root


def info(root: Path) -> dict:
    return read_json(root / "info.json")
