"""DEMON-format evaluation: demonstrative (interleaved, multi-image) instructions, scored as DEMON scores them.

The public DEMON layout (Li, Pan et al. 2023), one directory per task:

    <root>/<task>/core/core.json      {"metadata": {"dataset", "task_instruction": [str, ...],
                                                    "question_type": ..., optional "category"},
                                       "data": [instance, ...]}
    <root>/<task>/core/images/...     the files named by the instances
    <root>/categories.json            optional: {category: [task, ...]} (else metadata.category, else the task)

    instance = {"sample_id", "task_instruction_id",
                "task_instance": {"context": "... {image#1} ... {table#2} ...", "images_path": [...],
                                  optional "choice_list": [...]},
                "response": "..."}

The prompt is the task instruction (`task_instruction[task_instruction_id]`), then the context with each
`{image#k}` / `{table#k}` marker replaced by image k of `images_path`, then the choice list when there is one.
Scores (x100): ROUGE-L F1 for open-ended tasks; accuracy for multiple choice, a free-text answer counting as the
option nearest to it by TF-IDF cosine, and image options ("Image 2") judged by the answer's leading "Image X".
A category's score is the mean of its tasks'.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.console import bar
from vlkit.data.features import ImageBank
from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.eval import metrics as M
from vlkit.fileio import read_json, write_json
from vlkit.models.generate import GenerationConfig, generate
from vlkit.models.llm import position_limit
from vlkit.world.demon import MiniDemonConfig, build_mini_demon

MARKER = re.compile(r"\{(image|table)#(\d+)\}")
IMAGE_OPTION = re.compile(r"^\W*image\s*#?\s*([a-z0-9]+)\b", re.IGNORECASE)


@dataclass
class DemonTask:
    name: str
    category: str
    instructions: list[str]
    question_type: str
    instances: list[dict]
    image_dir: Path
    source: Path = field(repr=False, default=Path())

    @property
    def multiple_choice(self) -> bool:
        return any("choice_list" in i["task_instance"] for i in self.instances)


def _check_instance(inst: dict, i: int, source: Path, n_instructions: int) -> None:
    where = f"{source}: data[{i}]"
    for key in ("sample_id", "task_instruction_id", "task_instance", "response"):
        if key not in inst:
            raise VlkitError(f"{where}: key '{key}' is missing; every DEMON instance needs sample_id, "
                             "task_instruction_id, task_instance and response")
    ti = inst["task_instance"]
    if not isinstance(ti, dict) or "context" not in ti or "images_path" not in ti:
        raise VlkitError(f"{where} (sample_id {inst['sample_id']}): task_instance needs 'context' and 'images_path'")
    if not 0 <= int(inst["task_instruction_id"]) < n_instructions:
        raise VlkitError(f"{where} (sample_id {inst['sample_id']}): task_instruction_id {inst['task_instruction_id']} "
                         f"is out of range; metadata.task_instruction has {n_instructions} entries")
    for kind, k in MARKER.findall(ti["context"]):
        if not 1 <= int(k) <= len(ti["images_path"]):
            raise VlkitError(f"{where} (sample_id {inst['sample_id']}): {{{kind}#{k}}} but only "
                             f"{len(ti['images_path'])} images_path entries")


def load_task(core_json: Path, category: str | None = None) -> DemonTask:
    data = read_json(core_json)
    if not isinstance(data, dict) or "metadata" not in data or "data" not in data:
        raise VlkitError(f"{core_json}: expected an object with 'metadata' and 'data' (the DEMON core.json layout)")
    meta = data["metadata"]
    instructions = meta.get("task_instruction")
    if isinstance(instructions, str):
        instructions = [instructions]
    if not instructions:
        raise VlkitError(f"{core_json}: metadata.task_instruction is missing or empty; give the task's instructions")
    for i, inst in enumerate(data["data"]):
        _check_instance(inst, i, core_json, len(instructions))
    folder = core_json.parent
    name = folder.parent.name if folder.name == "core" else folder.name
    return DemonTask(name=name, category=category or meta.get("category") or name, instructions=list(instructions),
                     question_type=str(meta.get("question_type", "")), instances=list(data["data"]),
                     image_dir=folder / "images", source=core_json)


def load_demon(root: str | Path, tasks: list[str] | None = None) -> list[DemonTask]:
    """Every task under `root` (a DEMON-format directory), optionally only those named in `tasks`."""
    root = Path(root)
    if not root.is_dir():
        raise VlkitError(f"{root}: not a directory; point --root at a DEMON-format benchmark")
    categories: dict[str, str] = {}
    if (root / "categories.json").is_file():
        for cat, names in read_json(root / "categories.json").items():
            categories.update({n: cat for n in names})
    found = []
    for core in sorted(root.rglob("core.json")):
        folder = core.parent
        name = folder.parent.name if folder.name == "core" else folder.name
        if tasks and name not in tasks:
            continue
        found.append(load_task(core, categories.get(name)))
    if not found:
        raise VlkitError(f"{root}: no <task>/core/core.json found" + (f" for tasks {tasks}" if tasks else ""))
    return found


# -- prompts --------------------------------------------------------------------------------------------
def choice_text(choices: list[str]) -> str:
    return " Choice list: [" + ", ".join(f"'{c}'" for c in choices) + "]. Your answer is:"


def to_conversation(task: DemonTask, inst: dict) -> tuple[list[dict], list[Path]]:
    """One user message with text and image parts in context order, and the image files in that order."""
    ti = inst["task_instance"]
    text = task.instructions[int(inst["task_instruction_id"])] + ti["context"]
    if "choice_list" in ti:
        text += choice_text(ti["choice_list"])
    paths = [task.image_dir / p for p in ti["images_path"]]
    parts: list[dict] = []
    images: list[Path] = []
    used = {int(k) for _, k in MARKER.findall(text)}
    for k, p in enumerate(paths, 1):  # images no marker names go first, as a leading image would
        if k not in used:
            parts.append({"type": "image"})
            images.append(p)
    pos = 0
    for m in MARKER.finditer(text):
        if text[pos:m.start()].strip():
            parts.append({"type": "text", "text": text[pos:m.start()].strip()})
        parts.append({"type": "image"})
        images.append(paths[int(m.group(2)) - 1])
        pos = m.end()
    if text[pos:].strip():
        parts.append({"type": "text", "text": text[pos:].strip()})
    return [{"role": "user", "content": parts}], images


# -- scoring --------------------------------------------------------------------------------------------
def nearest_option(prediction: str, options: list[str]) -> int:
    """Index of the option most similar to `prediction` by TF-IDF cosine (ties: the first)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [M.normalize_answer(o) for o in options] + [M.normalize_answer(prediction)]
    try:
        tfidf = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit_transform(texts)
    except ValueError:  # nothing but empty strings
        return 0
    sims = (tfidf[:-1] @ tfidf[-1].T).toarray().ravel()
    return int(np.argmax(sims))


def image_option(text: str) -> str | None:
    m = IMAGE_OPTION.match(text.strip())
    return m.group(1).lower() if m else None


def score_instance(prediction: str, inst: dict, multiple_choice: bool) -> float:
    """1/0 for multiple choice (image options by the leading "Image X"), ROUGE-L F1 for open-ended answers."""
    response = str(inst["response"])
    if multiple_choice:
        wanted = image_option(response)
        if wanted is not None:
            return float(image_option(prediction) == wanted)
        options = inst["task_instance"].get("choice_list") or [response]
        picked = options[nearest_option(prediction, options)]
        return float(M.normalize_answer(picked) == M.normalize_answer(response))
    return M.rouge_l([prediction], [[response]])


def summarise(scores: dict[str, list[float]], tasks: list[DemonTask]) -> dict:
    """{"tasks": {task: score x100}, "categories": {category: mean of its tasks}, "average": mean of categories}"""
    per_task = {t.name: 100 * float(np.mean(scores[t.name])) for t in tasks if scores.get(t.name)}
    by_cat: dict[str, list[float]] = defaultdict(list)
    for t in tasks:
        if t.name in per_task:
            by_cat[t.category].append(per_task[t.name])
    cats = {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}
    return {"tasks": per_task, "categories": cats, "average": float(np.mean(list(cats.values()))) if cats else 0.0}


# -- running a model ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_demon(model, processor, tasks: list[DemonTask], max_per_task: int | None = None,
                   max_new_tokens: int = 32, batch_size: int = 32, progress: bool | None = None,
                   use_features: bool = True) -> dict:
    """Answer every instance (greedy) and score it. Returns summarise(...) + "predictions" per task
    ([{sample_id, prediction, response, score}])."""
    model.eval()
    # interleaved instances are longer than training records: allow what the LLM's positions allow
    positions = position_limit(model.llm) or 0
    processor = VLProcessor(processor.tokenizer, processor.config.model_copy(
        update={"max_length": max(processor.config.max_length, positions)}))
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    chosen = {t.name: t.instances[:max_per_task] if max_per_task else t.instances for t in tasks}
    prompts = {t.name: [to_conversation(t, i) for i in chosen[t.name]] for t in tasks}
    records = [{"images": [str(p) for p in paths]} for t in tasks for _, paths in prompts[t.name]]
    for r in records:
        missing = [p for p in r["images"] if not Path(p).is_file()]
        if missing:
            raise VlkitError(f"{missing[0]}: image file not found; check the task's core/images folder")
    bank = ImageBank.of(records, processor)
    if use_features:
        bank.use_features(model.vision, progress=progress)
    scores: dict[str, list[float]] = {}
    predictions: dict[str, list[dict]] = {}
    for t in tasks:
        items = prompts[t.name]
        preds: list[str] = []
        for i in bar(range(0, len(items), batch_size), desc=f"demon {t.name}", enabled=progress):
            chunk = items[i:i + batch_size]
            rows = [bank.index[str(p)] for _, paths in chunk for p in paths]
            convs = [conv for conv, _ in chunk]
            imgs = [[None] * len(paths) for _, paths in chunk]
            preds += [g["text"] for g in generate(model, processor, convs, imgs, gen, image_inputs=bank.inputs(rows))]
        mc = t.multiple_choice
        s = [score_instance(p, inst, mc) for p, inst in zip(preds, chosen[t.name])]
        scores[t.name] = s
        predictions[t.name] = [{"sample_id": inst["sample_id"], "prediction": p, "response": inst["response"],
                                "score": v} for p, inst, v in zip(preds, chosen[t.name], s)]
    return {**summarise(scores, tasks), "counts": {k: len(v) for k, v in scores.items()},
            "predictions": predictions}


# -- the recipes' and the CLI's entry point --------------------------------------------------------------
class DemonEval(Section):
    mini: MiniDemonConfig | None = Field(default_factory=MiniDemonConfig, description="Generate mini-DEMON with "
                                         "these settings (ignored when root is set).")
    root: str | None = Field(None, description="A DEMON-format directory to evaluate on instead.")
    max_per_task: int | None = Field(None, gt=0, description="Instances per task (default: all).")
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)


def demon_scores(model, proc, cfg: DemonEval, out: Path | None = None, progress: bool | None = None,
                 keep_predictions: bool = False) -> dict:
    """Zero-shot DEMON-format scores; per-instance predictions go to <out>/demon_predictions.json when `out` is
    given, or stay in the result (key "predictions") with `keep_predictions`."""
    root = Path(cfg.root) if cfg.root else build_mini_demon(cfg.mini or MiniDemonConfig(), progress)
    res = evaluate_demon(model, proc, load_demon(root), cfg.max_per_task, cfg.max_new_tokens, cfg.batch_size,
                         progress)
    predictions = res.pop("predictions")
    if out is not None:
        write_json(out / "demon_predictions.json", predictions)
    if keep_predictions:
        res["predictions"] = predictions
    return res
