"""Shapes-world datasets on disk: records (JSONL) + PNGs, cached by (seed, config).

``build(cfg)`` writes ``<cache>/world/<key>/{train,test}.jsonl`` and ``img/``; ``key`` hashes the
config and the generator version, so a repeated call returns at once and a changed generator never
serves stale data. Train and held-out scenes come from disjoint seeds: scene i of split s has seed
``(cfg.seed << 32) | (i << 1) | s``.
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
TASKS = ("caption", "vqa", "grounding", "text", "class", "edit")
SPLITS = {"train": 0, "test": 1}

CAPTION_PROMPTS = ("describe the image.", "what is in this picture?", "write a short caption.",
                   "describe the scene briefly.")
DIFF_PROMPTS = ("what changed between the two images?", "describe the difference between the images.",
                "how does the second image differ from the first?")
TEXT_PROMPTS = ("what does the text say?", "read the text in the image.")
CLASS_PROMPTS = ("which shapes are in the image?", "list the shapes you see.")

Task = Literal["caption", "vqa", "grounding", "text", "class", "edit"]


class WorldData(Section):
    """A generated dataset: which scenes, how many, which tasks."""

    world: WorldConfig = Field(default_factory=WorldConfig, description="Scene drawing settings.")
    seed: int = Field(0, ge=0, description="Dataset seed; scenes of different seeds never repeat.")
    train_scenes: int = Field(4000, ge=0, description="Scenes in the train split.")
    test_scenes: int = Field(500, ge=0, description="Scenes in the held-out split.")
    tasks: list[Task] = Field(default_factory=lambda: list(TASKS), description="Tasks to derive per scene.")
    vqa_per_scene: int = Field(2, ge=0, description="VQA records per scene.")
    relations: bool = Field(False, description="Also ask spatial relations between two objects (VQA kind "
                            "'relation': is the A left of / above the B?).")


def scene_seed(seed: int, split: str, i: int) -> int:
    return (seed << 32) | (i << 1) | SPLITS[split]


def scene_records(scene: Scene, split: str, i: int, cfg: WorldData, img_dir: Path) -> list[dict]:
    """Render a scene (and its edit) to PNG and derive one record per task."""
    rng = np.random.default_rng(scene.seed ^ 0x5EED)
    res = cfg.world.resolution
    name = f"{split}-{i:06d}"
    img = f"img/{name}.png"
    render(scene, res).save(img_dir / f"{name}.png", optimize=False, compress_level=1)
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
            rec("grounding", 0, [img], [user(None, q), assistant(a)], box=list(obj.box))
        elif task == "text" and scene.text is not None:
            prompt = TEXT_PROMPTS[rng.integers(len(TEXT_PROMPTS))]
            rec("text", 0, [img], [user(None, prompt), assistant(scene.text.value)], answer=scene.text.value)
        elif task == "class":
            prompt = CLASS_PROMPTS[rng.integers(len(CLASS_PROMPTS))]
            rec("class", 0, [img], [user(None, prompt), assistant(lang.class_answer(scene))],
                labels=lang.class_labels(scene))
        elif task == "edit":
            edited, kind, desc = edit_scene(scene, rng)
            render(edited, res).save(img_dir / f"{name}-b.png", optimize=False, compress_level=1)
            prompt = DIFF_PROMPTS[rng.integers(len(DIFF_PROMPTS))]
            rec("edit", 0, [img, f"img/{name}-b.png"], [user(None, None, prompt), assistant(desc)],
                edit=kind, edited=edited.to_dict())
    return out


def dataset_dir(cfg: WorldData) -> Path:
    data = cfg.model_dump(mode="json")
    if not data.get("relations"):  # added later: datasets without relations keep their cache key
        data.pop("relations", None)
    key = stable_hash({"cfg": data, "version": GENERATOR_VERSION})
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
