"""Mini-DEMON: DEMON's seven categories of demonstrative instructions, drawn from the shapes world and
written in the public DEMON layout (see vlkit.eval.demon), so one harness scores both.

    category                    task                 images  answer
    Multimodal Dialogue         md_dialogue          2       open-ended: the last turn of a dialogue about both
    Visual Storytelling         md_storytelling      3       open-ended: how the story goes on (who moves where)
    Visual Relation Inference   md_relation          2       open-ended: what changed between the images
    Multimodal Cloze            md_cloze             6       image option: the frame missing from a sequence
    Knowledge Grounded QA       md_knowledge         1       choice: the image + a snippet of facts
    Text-Rich Images QA         md_text              1       choice: the word written in the image
    Multi-Image Reasoning       md_which_image       3       image option: which image has X
                                md_both              2       choice: the statement true of both images

Every task has >= 5 instruction templates and `instances` held-out instances (default 200), from scene
seeds that no world train or test split uses. ``build_mini_demon(cfg)`` caches the directory by config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from vlkit.config import Section
from vlkit.console import bar
from vlkit.fileio import atomic_dir, cache_root, stable_hash, write_json
from vlkit.world import language as lang
from vlkit.world.edits import edit_scene
from vlkit.world.render import render
from vlkit.world.scene import COLORS, SHAPES, WORDS, Obj, Scene, WorldConfig, generate_scene, overlaps, plural, replace

VERSION = 2
SEED_SPACE = 0xDE30

CATEGORIES = {
    "Multimodal Dialogue": ["md_dialogue"],
    "Visual Storytelling": ["md_storytelling"],
    "Visual Relation Inference": ["md_relation"],
    "Multimodal Cloze": ["md_cloze"],
    "Knowledge Grounded QA": ["md_knowledge"],
    "Text-Rich Images QA": ["md_text"],
    "Multi-Image Reasoning": ["md_which_image", "md_both"],
}

INSTRUCTIONS = {
    "md_dialogue": ["Here is a conversation about the images. Give the assistant's next reply. ",
                    "Read the dialogue about these pictures and answer the last question. ",
                    "Continue the conversation: answer the user's final question about the images. ",
                    "You are the assistant in this chat about several images. Reply to the last message. ",
                    "Look at the images and reply to the final turn of the dialogue. "],
    "md_storytelling": ["These frames tell a short story. Say what happens next. ",
                        "Watch the frames in order and continue the story. ",
                        "The images are consecutive moments of one scene. Describe the next moment. ",
                        "Given this sequence of frames, predict how the story goes on. ",
                        "Continue the visual story told by the frames below. "],
    "md_relation": ["Describe the difference between the two images. ",
                    "What changed from the first image to the second? ",
                    "Compare the two pictures and say what is different. ",
                    "Two images are shown. Explain how the second differs from the first. ",
                    "Spot the change between these images and describe it. "],
    "md_cloze": ["One frame of the sequence is missing. Pick the image that fills the gap. ",
                 "Complete the sequence: which candidate image belongs in the blank? ",
                 "The frames follow one motion, with a gap. Choose the missing frame. ",
                 "Fill in the missing frame of the story with one of the candidate images. ",
                 "Which of the candidate images completes the sequence? "],
    "md_knowledge": ["Use the image and the facts to answer the question. You must choose from the choice list. ",
                     "Read the facts, look at the image, and answer. You must choose from the choice list. ",
                     "Answer the question with the help of the facts below. Choose from the choice list. ",
                     "Combine what you see with the given facts to answer. Choose from the choice list. ",
                     "Based on the image and the facts, pick the right answer from the choice list. "],
    "md_text": ["Read the text in the image and answer. You must choose from the choice list. ",
                "Answer the question about the writing in the picture. Choose from the choice list. ",
                "Look closely at the text in the image. Pick the answer from the choice list. ",
                "What is written in the image? Choose your answer from the choice list. ",
                "Answer using the text shown in the image. Choose from the choice list. "],
    "md_which_image": ["Look at the images and answer which one matches. ",
                       "Several images are shown. Name the image that fits the question. ",
                       "Compare the images and answer with the right image. ",
                       "Answer the question about these images with an image number. ",
                       "Which picture is meant? Look at all of them before answering. "],
    "md_both": ["Look at both images. Pick the statement that is true of both. Choose from the choice list. ",
                "Which statement holds for both pictures? Choose from the choice list. ",
                "Compare the two images and choose the statement true of both from the choice list. ",
                "Reason over both images and pick the correct statement from the choice list. ",
                "Only one statement describes both images. Choose it from the choice list. "],
}

# asked after the two images (phrased unlike the world's own "what changed between the two images?" prompts)
RELATION_QUESTIONS = ("What is different in the second image?", "What has changed?", "What differs between them?")
STEPS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}
STEP = 0.16  # how far the moving object goes between frames (fraction of the image side)


class MiniDemonConfig(Section):
    seed: int = Field(0, ge=0, description="Benchmark seed; scenes never repeat the world splits'.")
    instances: int = Field(200, gt=0, description="Held-out instances per task.")
    resolution: int = Field(64, ge=16, description="Rendered image side in pixels.")


class _Writer:
    """Collects one task's instances and renders its images."""

    def __init__(self, root: Path, task: str, res: int):
        self.task, self.res = task, res
        self.dir = root / task / "core"
        (self.dir / "images").mkdir(parents=True)
        self.data: list[dict] = []

    def image(self, scene: Scene, name: str) -> str:
        path = f"{len(self.data):04d}-{name}.png"
        render(scene, self.res).save(self.dir / "images" / path, optimize=False, compress_level=1)
        return path

    def add(self, rng, context: str, images: list[str], response: str, choices: list[str] | None = None) -> None:
        inst = {"context": context, "images_path": images}
        if choices is not None:
            inst["choice_list"] = choices
        self.data.append({"sample_id": len(self.data), "task_instruction_id": int(rng.integers(5)),
                          "task_instance": inst, "response": response})

    def save(self, category: str) -> None:
        mc = any("choice_list" in d["task_instance"] for d in self.data)
        write_json(self.dir / "core.json", {
            "metadata": {"dataset": self.task, "split": "core", "num_sample": len(self.data), "category": category,
                         "task_instruction": INSTRUCTIONS[self.task],
                         "question_type": "multi-choice" if mc else "open-ended"},
            "data": self.data})


def _scene(seed: int, i: int, k: int, **world) -> Scene:
    """Scene k of instance i; seeds >= 2**60 never meet the world splits' (dataset seed << 32 | ...)."""
    return generate_scene((1 << 60) | (seed << 40) | (i << 12) | k, WorldConfig(**world))


def _motion(scene: Scene, rng: np.random.Generator, frames: int) -> tuple[list[Scene], Obj, str] | None:
    """`frames` scenes in which one object moves a step each frame in one direction, clear of the others."""
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[i]
        for direction in rng.permutation(list(STEPS)):
            dx, dy = STEPS[direction]
            path = [replace(o, cx=round(o.cx + dx * STEP * t, 4), cy=round(o.cy + dy * STEP * t, 4))
                    for t in range(frames)]
            if not all(0 <= v <= 1 for p in path for v in p.box):
                continue
            others = [q for j, q in enumerate(scene.objects)
                      if j != i and not any(overlaps(p.box, [q.box]) for p in path)]
            return [Scene(tuple(others + [p]), None, scene.seed) for p in path], o, str(direction)
    return None


def _moving(rng, seed, i) -> tuple[list[Scene], Obj, str]:
    """Four frames of a motion, from the first of instance i's scenes (at most 4 objects) that allows one."""
    for k in range(20):
        motion = _motion(_scene(seed, i, k, max_objects=4), rng, 4)
        if motion:
            return motion
    raise RuntimeError(f"mini-DEMON: no scene of instance {i} allows a 4-frame motion")


def _dialogue(w, rng, seed, i):
    scenes = [_scene(seed, i, k) for k in range(2)]
    imgs = [w.image(s, f"img{k + 1}") for k, s in enumerate(scenes)]
    turns = []
    for _ in range(3):
        k = int(rng.integers(2))
        _, q, a = lang.vqa(scenes[k], rng)
        turns.append((f"in image {k + 1}, {q}", a))
    history = " ".join(f"User: {q} Assistant: {a}." for q, a in turns[:-1])
    w.add(rng, f"{{image#1}}{{image#2}}{history} User: {turns[-1][0]} Assistant:", imgs, turns[-1][1])


def _storytelling(w, rng, seed, i):
    frames, o, direction = _moving(rng, seed, i)
    imgs = [w.image(s, f"frame{t + 1}") for t, s in enumerate(frames[:3])]
    where = lang.where(frames[3].objects[-1].region)
    w.add(rng, "{image#1}{image#2}{image#3}What happens next?", imgs,
          f"the {o.name} keeps moving {direction} and ends up {where}.")


def _relation(w, rng, seed, i):
    scene = _scene(seed, i, 0)
    edited, _, desc = edit_scene(scene, rng)
    imgs = [w.image(scene, "before"), w.image(edited, "after")]
    w.add(rng, "{image#1}{image#2}" + RELATION_QUESTIONS[rng.integers(len(RELATION_QUESTIONS))], imgs, desc)


def _cloze(w, rng, seed, i):
    frames, o, _ = _moving(rng, seed, i)
    gap = int(rng.integers(1, 3))  # frame 2 or 3 is missing
    moved = frames[gap].objects[-1]
    wrong_place = frames[0]  # the object not moved yet
    recoloured = [c for c in COLORS if c != o.color]
    wrong_colour = Scene(frames[gap].objects[:-1] + (replace(moved, color=recoloured[rng.integers(len(recoloured))]),))
    candidates = [frames[gap], wrong_place, wrong_colour]
    order = rng.permutation(3)
    shown = [t for t in range(4) if t != gap]
    imgs = [w.image(frames[t], f"frame{t + 1}") for t in shown] + \
        [w.image(candidates[j], f"option{n + 1}") for n, j in enumerate(order)]
    seq = ", ".join("[missing]" if t == gap else f"{{image#{shown.index(t) + 1}}}" for t in range(4))
    opts = " ".join(f"Image {n + 4}: {{image#{n + 4}}}" for n in range(3))
    answer = f"Image {int(np.where(order == 0)[0][0]) + 4}"
    w.add(rng, f"Sequence: {seq}. Candidates: {opts}", imgs, answer, [f"Image {n + 4}" for n in range(3)])


def _knowledge(w, rng, seed, i):
    for k in range(20):
        scene = _scene(seed, i, k)
        colors = [o.color for o in scene.objects]
        unique = [o for o in scene.objects if colors.count(o.color) == 1]
        if unique:
            break
    target = unique[rng.integers(len(unique))]
    listed = [target.shape] + [s for s in rng.permutation(SHAPES) if s != target.shape][:3]
    values = rng.choice(np.arange(1, 11), size=4, replace=False)
    order = rng.permutation(4)
    facts = " ".join(f"{plural(listed[j])} are worth {lang.NUMBERS[values[j]]} point{'s' if values[j] > 1 else ''}."
                     for j in order)
    choices = [lang.NUMBERS[values[j]] for j in rng.permutation(4)]
    w.add(rng, f"{{image#1}}Facts: {facts} Question: how many points is the {target.color} object worth?",
          [w.image(scene, "scene")], lang.NUMBERS[values[0]], choices)


def _text(w, rng, seed, i):
    for k in range(20):
        scene = _scene(seed, i, k, text_prob=1.0)
        if scene.text is not None:
            break
    truth = scene.text.value
    pool = [x for x in WORDS if x != truth] if not truth.isdigit() else \
        [str(v) for v in rng.choice(np.arange(10, 100), size=8, replace=False) if str(v) != truth]
    choices = [truth] + [str(x) for x in rng.permutation(pool)[:3]]
    w.add(rng, "{image#1}Question: what is written in the image?", [w.image(scene, "scene")], truth,
          [choices[j] for j in rng.permutation(4)])


def _which_image(w, rng, seed, i):
    for k in range(40):
        scenes = [_scene(seed, i, 3 * k + n) for n in range(3)]
        names = [{o.name for o in s.objects} for s in scenes]
        n = int(rng.integers(3))
        only = sorted(names[n] - names[(n + 1) % 3] - names[(n + 2) % 3])
        if only:
            break
    target = only[rng.integers(len(only))]
    imgs = [w.image(s, f"img{m + 1}") for m, s in enumerate(scenes)]
    w.add(rng, f"{{image#1}}{{image#2}}{{image#3}}Question: which image has {lang.a(target)} {target}?", imgs,
          f"Image {n + 1}", [f"Image {m + 1}" for m in range(3)])


def _both(w, rng, seed, i):
    for k in range(60):
        scenes = [_scene(seed, i, 2 * k + n) for n in range(2)]
        shapes = [{o.shape for o in s.objects} for s in scenes]
        common = sorted(shapes[0] & shapes[1])
        partial = sorted(shapes[0] ^ shapes[1])
        if common and len(partial) >= 2:
            break
    true = common[rng.integers(len(common))]
    false = [partial[j] for j in rng.permutation(len(partial))[:2]]
    absent = [s for s in SHAPES if s not in shapes[0] | shapes[1]]
    if absent:
        false.append(absent[rng.integers(len(absent))])
    choices = [f"both images contain a {s}." for s in [true] + false]
    w.add(rng, "{image#1}{image#2}", [w.image(s, f"img{m + 1}") for m, s in enumerate(scenes)], choices[0],
          [choices[j] for j in rng.permutation(len(choices))])


MAKERS = {"md_dialogue": _dialogue, "md_storytelling": _storytelling, "md_relation": _relation, "md_cloze": _cloze,
          "md_knowledge": _knowledge, "md_text": _text, "md_which_image": _which_image, "md_both": _both}


def build_mini_demon(cfg: MiniDemonConfig | None = None, progress: bool | None = None) -> Path:
    """Generate (or find cached) mini-DEMON for `cfg`; returns its root (DEMON layout + categories.json)."""
    cfg = cfg or MiniDemonConfig()
    root = cache_root() / "mini_demon" / stable_hash({"cfg": cfg.model_dump(mode="json"), "version": VERSION})
    if (root / "categories.json").is_file():
        return root
    with atomic_dir(root) as tmp:
        for category, tasks in CATEGORIES.items():
            for task in tasks:
                w = _Writer(tmp, task, cfg.resolution)
                k = sorted(MAKERS).index(task)
                rng = np.random.default_rng([cfg.seed, SEED_SPACE, k])
                for i in bar(range(cfg.instances), desc=f"mini-DEMON {task}", enabled=progress):
                    MAKERS[task](w, rng, cfg.seed * 16 + k, i)
                w.save(category)
        write_json(tmp / "categories.json", CATEGORIES)
    return root
