"""Held-out evaluation of a VLM on world tasks, always beside a *blind* baseline.

Tasks and metrics: caption (CIDEr, ROUGE-L against every caption style of the scene), vqa (exact
match), grounding (IoU >= 0.5 accuracy and mean IoU), text (exact match), edit (the difference between two
images: ROUGE-L and exact match). The blind baseline is the
same model given a blank (black) image in place of each image: the gap is what the image adds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.console import bar
from vlkit.data.instructions import apply_named
from vlkit.data.records import message_text
from vlkit.eval import metrics as M
from vlkit.experts import Expert, with_context
from vlkit.models.generate import GenerationConfig, generate
from vlkit.data.features import ImageBank, repeat

TASKS = ("caption", "vqa", "grounding", "text")


class EvalConfig(Section):
    tasks: list[str] = Field(list(TASKS), description="World tasks to evaluate.")
    max_per_task: int = Field(200, gt=0, description="Held-out records per task.")
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(64, gt=0)
    blind: bool = Field(True, description="Also evaluate with blank images.")
    during_training: int = Field(50, gt=0, description="Records per task for evaluations during training "
                                 "(train.eval_every); no blind pass there.")
    instructions: str | None = Field(None, description="Task-specific instructions for the held-out prompts: a "
                                     "built-in set (sphinx, generic) or a YAML/JSON file of task -> template "
                                     "(vlkit.data.instructions); None: the records' own requests.")


def prompt_and_reference(record: dict) -> tuple[list[dict], str]:
    """The conversation up to the last assistant turn, and that turn's text."""
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    content = msgs[last]["content"]
    ref = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    return msgs[:last], ref


def select(records: list[dict], cfg: EvalConfig) -> dict[str, list[dict]]:
    """Up to max_per_task records of each evaluated task, their requests rewritten by cfg.instructions."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("task") in cfg.tasks and len(by_task[r["task"]]) < cfg.max_per_task:
            by_task[r["task"]].append(r)
    if cfg.instructions is not None:
        by_task.update({t: apply_named(recs, cfg.instructions) for t, recs in by_task.items()})
    return by_task


def expert_prompts(records: list[dict], experts: Sequence[Expert], blank=None) -> list[list[dict]]:
    """The records' prompts with the experts' text about their images as context (LLaMA-Adapter V2 sec 3.4);
    with `blank`, the experts see it in place of every image (the blind pass: nothing comes from the image)."""
    return [with_context(prompt_and_reference(r)[0], [blank] * len(r["images"]) if blank is not None
                         else r["images"], experts) for r in records]


@torch.no_grad()
def answers(model, processor, records: list[dict], bank: ImageBank, cfg: EvalConfig, blind: bool,
            progress: bool | None = None, prompts: list[list[dict]] | None = None) -> list[str]:
    """Generated answers in record order; `prompts` (one per record) replace the records' own."""
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    blank = None
    if blind:  # the encoders run once on the blank image; every image of the pass is that one
        blank = model.vision.encode(processor.pixel_values([processor.blank_image()]))
    out: list[str] = []
    for i in bar(range(0, len(records), cfg.batch_size), desc="eval blind" if blind else "eval", enabled=progress):
        chunk = records[i:i + cfg.batch_size]
        chunk_prompts = prompts[i:i + cfg.batch_size] if prompts else [prompt_and_reference(r)[0] for r in chunk]
        rows = [row for r in chunk for row in bank.rows(r)]
        inputs = {"image_features": repeat(blank, len(rows))} if blind else bank.inputs(rows)
        imgs = [[None] * len(r["images"]) for r in chunk]
        out.extend(g["text"] for g in generate(model, processor, chunk_prompts, imgs, gen, image_inputs=inputs))
    return out


def score_items(task: str, records: list[dict], preds: list[str]) -> dict[str, list[float]]:
    """Per-item scores of one task, metric by metric (the paired bootstrap of `vlkit.eval.stats` reads these);
    each metric's mean is its corpus figure (CIDEr's document frequencies come from the whole set).

    The SPHINX tasks (not in TASKS: ask for them in EvalConfig.tasks; a grounded caption runs to ~45
    characters per object: raise max_new_tokens for it): refer, IoU of the first box against meta["box"]
    (`refer_iou50`: IoU >= 0.5, `refer_miou`); grounded, `metrics.grounded_scores` against meta["names"] and
    meta["boxes"] (`grounded_recall`: the share of objects named with a box of IoU >= 0.5, `grounded_precision`:
    the share of predicted boxes that are such a match); detect, `metrics.detect_f1` at IoU 0.5 against
    meta["boxes"] (`detect_f1`; "none" is right exactly when there is nothing to find); smalltext, exact match
    (`smalltext_acc`)."""
    refs = [prompt_and_reference(r)[1] for r in records]
    if task == "caption":
        multi = [r.get("meta", {}).get("refs") or [ref] for r, ref in zip(records, refs)]
        return {"caption_cider": M.cider_items(preds, multi), "caption_rougeL": M.rouge_l_items(preds, multi)}
    if task == "edit":  # "what changed?" between two images: a sentence, scored like a caption (one reference)
        return edit_items(preds, refs)
    if task in ("grounding", "refer"):  # one box for one object
        ious = [M.grounding_iou(p, r["meta"]["box"]) for p, r in zip(preds, records)]
        return {f"{task}_iou50": [float(i >= 0.5) for i in ious], f"{task}_miou": ious}
    if task == "grounded":
        pairs = [M.grounded_scores(p, r["meta"]["names"], r["meta"]["boxes"]) for p, r in zip(preds, records)]
        return {"grounded_recall": [rc for rc, _ in pairs], "grounded_precision": [pr for _, pr in pairs]}
    if task == "detect":
        return {"detect_f1": [M.detect_f1(p, r["meta"]["boxes"]) for p, r in zip(preds, records)]}
    return {f"{task}_acc": [M.exact_match(p, ref) for p, ref in zip(preds, refs)]}


def edit_items(preds: Sequence[str], refs: Sequence[str]) -> dict[str, list[float]]:
    """"What changed?" answers against their references: ROUGE-L and exact match, and, read with
    `vlkit.world.edits.read_edit`, whether the answer names the edited object(s) (`edit_object`) and the kind of
    edit (`edit_kind`: recoloured, reshaped, moved, swapped, gone, added). The template alone ("the X turned Y.")
    earns ROUGE-L; these two say whether the answer saw what changed."""
    from vlkit.world.edits import read_edit

    said, meant = [read_edit(p) for p in preds], [read_edit(r) for r in refs]
    return {"edit_rougeL": M.rouge_l_items(list(preds), [[ref] for ref in refs]),
            "edit_acc": [M.exact_match(p, ref) for p, ref in zip(preds, refs)],
            "edit_object": [float(s is not None and m is not None and s[0] == m[0]) for s, m in zip(said, meant)],
            "edit_kind": [float(s is not None and m is not None and s[1] == m[1]) for s, m in zip(said, meant)]}


def score(task: str, records: list[dict], preds: list[str]) -> dict[str, float]:
    return summarize_items(task, records, score_items(task, records, preds))


def summarize_items(task: str, records: list[dict], items: dict[str, list[float]]) -> dict[str, float]:
    """A task's figures from its per-item scores: each metric's mean, and VQA per question kind."""
    out = {k: float(np.mean(v)) for k, v in items.items()}
    if task == "vqa":  # per question kind (color, shape, count, position, exist, relation), where records say it
        by_kind: dict[str, list[float]] = defaultdict(list)
        for r, h in zip(records, items["vqa_acc"]):
            if r.get("meta", {}).get("kind"):
                by_kind[r["meta"]["kind"]].append(h)
        out.update({f"vqa_acc_{k}": float(np.mean(v)) for k, v in sorted(by_kind.items())})
    return out


def evaluate_vlm(model, processor, records: list[dict], cfg: EvalConfig, bank: ImageBank | None = None,
                 progress: bool | None = None, examples: int = 6, with_images: dict | None = None,
                 experts: Sequence[Expert] | None = None) -> dict:
    """{"image": {metric: v}, "blind": {...}, "counts": {task: n}, "examples": [...],
    "items": {"image": {metric: [per-item score, in record order]}, "blind": ...}}

    `with_images`: this model's result on the same records and tasks, already computed without the
    blind pass (the last evaluation during training, say); it is reused and only the blind pass runs.
    `experts` (vlkit.experts): their text about each record's images is written into its prompt as context
    (`expert_prompts`; in the blind pass they see the blank image too); the examples show those prompts."""
    model.eval()
    by_task = select(records, cfg)
    chosen = [r for t in cfg.tasks for r in by_task.get(t, [])]
    if bank is None:
        bank = ImageBank.of(chosen, processor)
    result: dict = {"counts": {t: len(v) for t, v in by_task.items()}, "examples": [], "items": {}}
    modes = ["image", "blind"] if cfg.blind else ["image"]
    if with_images is not None:
        if with_images["counts"] != result["counts"]:
            raise ValueError(f"with_images was evaluated on {with_images['counts']}, not {result['counts']}")
        result.update(image=with_images["image"], examples=with_images["examples"])
        if "image" in with_images.get("items", {}):
            result["items"]["image"] = with_images["items"]["image"]
        modes.remove("image")
    for mode in modes:
        prompts = None
        if experts:
            prompts = expert_prompts(chosen, experts, processor.blank_image() if mode == "blind" else None)
        preds = answers(model, processor, chosen, bank, cfg, blind=(mode == "blind"), progress=progress,
                        prompts=prompts)
        metrics, items, k = {}, {}, 0
        for t in cfg.tasks:
            recs = by_task.get(t, [])
            if recs:
                task_items = score_items(t, recs, preds[k:k + len(recs)])
                items.update(task_items)
                metrics.update(summarize_items(t, recs, task_items))
                if mode == "image":
                    shown = list(zip(recs, preds[k:k + len(recs)]))[:max(1, examples // len(cfg.tasks))]
                    for j, (r, p) in enumerate(shown):
                        prompt, ref = prompt_and_reference(r)
                        prompt = prompts[k + j] if prompts else prompt
                        result["examples"].append({"id": r["id"], "task": t, "images": r["images"],
                                                   "question": message_text(prompt[-1]), "reference": ref,
                                                   "prediction": p})
            k += len(recs)
        result[mode] = metrics
        result["items"][mode] = items
    return result
