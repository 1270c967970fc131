"""Recipe `lm`: pretrain a tiny causal LM (LLaMA or OPT family) on world conversations.

Text-only conversations (image parts dropped) are rendered with the chat template, tokenized and
packed into blocks; the model is saved with ``save_pretrained`` so that
``AutoModelForCausalLM.from_pretrained(dir)`` loads it. Reports held-out perplexity.
"""

from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.fileio import read_json, write_json
from vlkit.data.records import text_only
from vlkit.world.sources import RecordsConfig, load_splits
from vlkit.data.tokenizer import TokenizerConfig, encode_chat, load_tokenizer, render, train_bpe
from vlkit.models.llm import LLMConfig, build_llm, count_parameters, load_llm
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.checkpoint import latest_checkpoint
from vlkit.train.runtime import seed_everything
from vlkit.world.recall import STAGES, answer_accuracy, parse_stage, world_rows


class LMData(RecordsConfig):
    block_size: int = Field(128, gt=1, description="Tokens per packed training block.")
    describe_images: float = Field(
        0.5, ge=0, le=1, description="Chance that an image in a conversation is replaced by a sentence describing "
        "it (world records). This is how the LM learns to answer from what its context says about a scene, the "
        "skill a frozen LLM needs to read visual prompts later; otherwise the image is dropped.")
    drill: int = Field(0, ge=0, description="Per train scene, one more conversation: the scene in words, then up to "
                       "this many of its questions, each answered in turn (a multi-turn drill). Many answers per "
                       "description: the skill of answering from context is learned in far fewer steps.")
    whole: bool = Field(False, description="Pack whole conversations only: a block starts at a conversation and "
                        "pads (unlabelled) rather than cutting one in two; longer ones are truncated. Otherwise the "
                        "text is one stream cut every block_size tokens, and a question whose scene fell into the "
                        "block before is answered blind, which teaches guessing.")
    document_mask: bool = Field(False, description="Each conversation in a block attends to itself only, its "
                                "positions counted from 0, as when it is asked alone (position ids restart per "
                                "conversation and a 4D mask, block size squared per row, keeps attention within "
                                "each; flash-attention 2 reads them from the positions). Otherwise a question "
                                "also sees the conversations packed before it, whose scenes a count or an "
                                "existence question then reads too.")
    drill_repeat: bool = Field(False, description="Each drill opens by asking for the scene back, word for word. "
                               "Copying is what induction heads do, and a tiny LM forms them from repeated text in "
                               "a few hundred steps; looking up an answer in the context builds on them.")
    drill_listing: bool = Field(False, description="Each drill closes by naming every object's colour by its shape "
                                "and shape by its colour ('the square is orange, the circle is red'; objects in a "
                                "drawn order). Each answer word follows the word it is bound to, so the lookup "
                                "that colour and shape questions need can form before the head that fetches the "
                                "question's word from further back (experiments/binding_probe.py).")
    any_order: float = Field(0.0, ge=0, le=1, description="Chance that a scene written in words (a training "
                             "conversation's or a drill's) names its objects in a drawn order rather than "
                             "reading order, so that a relation or a position cannot be read from where an "
                             "object is named, only from its words (results.json: context_vqa_any_order).")
    drill_balanced: bool = Field(False, description="Draw each drill's questions over kinds, then answers, then "
                                 "questions, from every question the scene answers (a count for every shape, a "
                                 "relation for every pair), rather than from the questions vqa asks: otherwise "
                                 "per-object kinds outnumber relations ~4:1 and a shape count is 'one' half the "
                                 "time, which a tiny LM learns to guess (README).")
    loss_on: Literal["all", "assistant"] = Field(
        "all", description="Tokens the loss (and held-out perplexity) sees: every token, or only the assistant's "
        "replies (captions and answers), as a chat model is tuned. A tiny LM given every token spends its capacity "
        "on the scene descriptions, which are random, and learns to answer from them slowly.")


class LMEval(Section):
    context_vqa: int = Field(200, ge=0, description="Held-out world questions answered with the scene written "
                             "out in the context (0: skip); >= 1000 for a figure a conclusion rests on.")
    context_vqa_during: int = Field(0, ge=0, description="Also at every evaluation during training (train.eval_every), "
                                    "on this many questions: the curve of the skill, beside perplexity.")


class RecallWarmup(Section):
    max_steps: int = Field(0, ge=0, description="Before training on the world, train on each synthetic recall "
                           "stage (vlkit.world.recall) for at most this many steps, until its held-out answers "
                           "reach `until` (0: no warm-up). These tasks form the lookup that answering from the "
                           "context needs, which world conversations alone form slowly or never in a tiny LM. "
                           "One process only; skipped on --resume once the world training has a checkpoint.")
    stages: list[str] = Field(list(STAGES), min_length=1, description="In order: 'copy' (the copy task, which "
                              "forms induction heads), then lookups '<order>:<gap>' (order vk, kv or mix, gap "
                              "tokens 'is' between the asked word and its answer), 'count' (how often a shape is "
                              "named), 'where' (a shape's region) and 'relation' (two regions compared), each "
                              "optionally ':<most objects>' ('relation:2'), vlkit.world.recall.")
    until: float = Field(0.97, gt=0, le=1, description="Held-out teacher-forced answer accuracy that ends a stage.")
    check_every: int = Field(250, gt=0, description="Steps between held-out checks of a stage.")
    pairs: tuple[int, int] = Field((2, 6), description="Fewest, most key-value pairs per lookup row (the world's "
                                   "objects per scene).")
    questions: int = Field(8, gt=0, description="Queries per lookup row.")
    heldout: int = Field(1000, gt=0, description="Held-out rows per stage.")
    keep: float = Field(0.0, ge=0, lt=1, description="Share of the world training's rows that are rows of the kept "
                        "stages (`kept`, default the last), padded to a block: world conversations alone overwrite "
                        "the lookup the warm-up formed (0.988 -> 0.23 held out after 12,000 drill steps in "
                        "experiments/binding_probe.py).")
    kept: list[str] | None = Field(None, min_length=1, description="The stages whose rows make up the `keep` "
                                   "share, in equal parts (null: the last stage alone), e.g. [mix:1, count].")

    @field_validator("stages", "kept")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        for stage in v or ():
            parse_stage(stage)  # its ValueError names the stage and the forms allowed
        return v

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"pairs {list(v)}: give [fewest, most] with 1 <= fewest <= most")
        return v


class LMRecipe(Section):
    recipe: Literal["lm"] = "lm"
    output_dir: str = Field("runs/lm", description="Where the model, logs and checkpoints go.")
    init: str | None = Field(None, description="LM directory to go on training (its tokenizer and sizes; "
                             "`tokenizer` and `model` are then ignored): a curriculum's next stage, e.g. 2-object "
                             "scenes first, then the bench's 2-6. Null: a new BPE and an LM built from `model`.")
    data: LMData = Field(default_factory=LMData)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: LLMConfig = Field(default_factory=LLMConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: LMEval = Field(default_factory=LMEval)
    recall_warmup: RecallWarmup = Field(default_factory=RecallWarmup)


def scene_descriptions(record: dict, drawn_order: bool = False) -> list[str]:
    """A detailed caption per image of a world record (empty when the record has no scene); `drawn_order`: its
    objects in an order drawn from the record's id rather than reading order."""
    import zlib

    import numpy as np

    from vlkit.world.language import caption
    from vlkit.world.scene import Scene

    meta = record.get("meta", {})
    scenes = [meta.get("scene"), meta.get("edited")][: len(record.get("images", []))]
    if any(s is None for s in scenes) or not scenes:
        return []
    rng = np.random.default_rng(zlib.crc32(f"{record.get('id')}".encode())) if drawn_order else None
    return [caption(Scene.from_dict(s), "detailed", rng) for s in scenes]


def textualize(record: dict, p: float, any_order: float = 0.0) -> list[dict]:
    """The conversation with each image either described in words (chance p) or dropped; with chance
    `any_order`, the record's descriptions name their objects in a drawn order (scene_descriptions)."""
    shuffled = any_order > 0 and random.Random(f"{record.get('id')}-order").random() < any_order
    descriptions = scene_descriptions(record, shuffled)
    if not descriptions or p <= 0:
        return text_only(record["messages"])
    rng = random.Random(f"{record.get('id')}")
    k, out = 0, []
    for m in record["messages"]:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if rng.random() < p:
                        parts.append({"type": "text", "text": f"({descriptions[k]}) "})
                    k += 1
                else:
                    parts.append(part)
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


REPEAT_PROMPT = "say the scene again."
LISTING_PROMPTS = ("what color is each shape?", "what shape is each color?")


def listings(scene, rng) -> list[tuple[str, str]]:
    """(request, reply) naming each object's colour by its shape and its shape by its colour, in a drawn order;
    only the objects that name picks alone, and none when there are none."""
    from vlkit.world.language import a, join

    objs = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    by_shape = [f"the {o.shape} is {o.color}" for o in objs if shapes.count(o.shape) == 1]
    by_color = [f"the {o.color} object is {a(o.shape)} {o.shape}" for o in objs if colors.count(o.color) == 1]
    return [(q, join(items) + ".") for q, items in zip(LISTING_PROMPTS, (by_shape, by_color)) if items]


def balanced_draw(pool: list[tuple[str, str, str]], n: int, rng) -> list[int]:
    """Up to `n` distinct indices into `pool` ((kind, question, answer) items), each drawn uniformly over the
    kinds left, then over that kind's answers, then over its questions: no kind outnumbers another because the
    scene has more of its questions, and no answer can be guessed from how often it is the answer."""
    left, out = list(range(len(pool))), []
    while left and len(out) < n:
        kinds = sorted({pool[i][0] for i in left})
        kind = kinds[int(rng.integers(len(kinds)))]
        answers = sorted({pool[i][2] for i in left if pool[i][0] == kind})
        answer = answers[int(rng.integers(len(answers)))]
        items = [i for i in left if pool[i][0] == kind and pool[i][2] == answer]
        out.append(items[int(rng.integers(len(items)))])
        left.remove(out[-1])
    return out


def drills(records: list[dict], per_scene: int, relations: bool, seed: int = 0, repeat: bool = False,
           kinds: tuple[str, ...] | None = None, listing: bool = False, balanced: bool = False,
           any_order: float = 0.0) -> list[dict]:
    """One multi-turn conversation per distinct train scene: its detailed caption, then up to `per_scene` of its
    questions (vlkit.world.language.vqa_pool, in a seeded order; only those of `kinds` when given), each
    answered; with `balanced`, drawn from every question the scene answers (every_question) by `balanced_draw`;
    with `repeat`, the first reply is the caption itself, copied; with `listing`, the last turns name each
    object's colour by its shape and shape by its colour (`listings`), after the questions so that those are
    answered from the scene alone; with chance `any_order`, the scene names its objects in a drawn order."""
    import numpy as np

    from vlkit.data.records import assistant, user
    from vlkit.world.language import caption, every_question, vqa_pool
    from vlkit.world.scene import Scene

    out, seen = [], set()
    for r in records:
        scene = r.get("meta", {}).get("scene")
        if scene is None or scene.get("seed") in seen:
            continue
        seen.add(scene.get("seed"))
        s = Scene.from_dict(scene)
        rng = np.random.default_rng([seed, int(scene.get("seed", 0))])
        pool = every_question(s, relations) if balanced else vqa_pool(s, rng, relations)
        if kinds:
            pool = [item for item in pool if item[0] in kinds]
            if not pool:
                continue
        order = balanced_draw(pool, per_scene, rng) if balanced else rng.permutation(len(pool))[:per_scene]
        drawn = np.random.default_rng([seed, int(scene.get("seed", 0)), 1])  # its own draws: the others stay
        described = caption(s, "detailed", drawn if any_order and drawn.random() < any_order else None)
        messages = [user(f"({described}) {REPEAT_PROMPT}"), assistant(described)] if repeat else []
        for i in order:
            _, q, a = pool[int(i)]
            messages += [user(q if messages else f"({described}) {q}"), assistant(a)]
        if listing:
            for q, a in listings(s, rng):
                messages += [user(q if messages else f"({described}) {q}"), assistant(a)]
        out.append({"id": f"drill-{scene.get('seed')}", "task": "drill", "images": [], "messages": messages})
    return out


def bpe_texts(records: list[dict]) -> list[str]:
    """Plain strings shaped like rendered conversations, for training the BPE itself."""
    out = []
    for r in records:
        for m in text_only(r["messages"]):
            c = m["content"]
            text = c if isinstance(c, str) else " ".join(p["text"] for p in c)
            out.append(("USER: " if m["role"] == "user" else "ASSISTANT: ") + text)
    return out


def pack(tok, records: list[dict], block_size: int, describe_images: float = 0.0, loss_on: str = "all",
         whole: bool = False, any_order: float = 0.0, document_mask: bool = False) -> dict:
    """Render each conversation as text and cut the token stream into blocks: {"input_ids", "labels"}, each
    (n_blocks, block_size). Labels are -100 outside assistant replies when `loss_on` is "assistant", and on
    padding. `whole`: blocks hold whole conversations (greedy fill, padded; a longer one is truncated).
    `any_order`: textualize's. `document_mask`: also "position_ids", counted from 0 in each conversation (and in
    a block's padding), by which `packed_inputs` keeps each packed conversation to itself."""
    convs = []
    for r in records:
        messages = textualize(r, describe_images, any_order)
        if loss_on == "assistant":
            enc = encode_chat(tok, messages)
            convs.append((enc["input_ids"], enc["labels"]))
        else:
            ids = tok(render(tok, messages), add_special_tokens=False)["input_ids"]
            convs.append((ids, ids))

    def blocks(*rows: list[int]) -> dict:
        keys = ("input_ids", "labels", "position_ids")[:len(rows)]
        return {k: torch.tensor(r, dtype=torch.long).view(-1, block_size) for k, r in zip(keys, rows)}

    if not whole:
        ids = [t for c, _ in convs for t in c]
        n = len(ids) // block_size * block_size
        labels = [t for _, c in convs for t in c]
        positions = [p for c, _ in convs for p in range(len(c))]
        return blocks(ids[:n], labels[:n], *([positions[:n]] if document_mask else []))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows_ids, rows_labels, rows_pos, cur_ids, cur_labels, cur_pos = [], [], [], [], [], []

    def flush():
        if cur_ids:
            fill = block_size - len(cur_ids)
            rows_ids.extend(cur_ids + [pad] * fill)
            rows_labels.extend(cur_labels + [-100] * fill)
            rows_pos.extend(cur_pos + list(range(fill)))

    for ids, labels in convs:
        ids, labels = ids[:block_size], labels[:block_size]
        if len(cur_ids) + len(ids) > block_size:
            flush()
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids, cur_labels, cur_pos = cur_ids + ids, cur_labels + labels, cur_pos + list(range(len(ids)))
    flush()
    return blocks(rows_ids, rows_labels, *([rows_pos] if document_mask else []))


class Blocks(torch.utils.data.Dataset):
    def __init__(self, packed: dict):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.packed.items()}


def perplexity(model, packed: dict, batch_size: int = 64) -> float:
    """exp(mean next-token NLL) over the labelled tokens of packed blocks."""
    device = next(model.parameters()).device
    ids_all, labels_all = packed["input_ids"], packed["labels"]
    nll, count = 0.0, 0
    for i in range(0, len(ids_all), batch_size):
        ids, labels = ids_all[i:i + batch_size].to(device), labels_all[i:i + batch_size].to(device)
        positions = packed["position_ids"][i:i + batch_size].to(device) if "position_ids" in packed else None
        logits = model(input_ids=ids, **packed_inputs(model, positions)).logits[:, :-1].float()
        target = labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target, reduction="sum",
                                                 ignore_index=-100)
        nll += loss.item()
        count += int((target != -100).sum())
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def context_vqa(model, tok, records: list[dict], limit: int = 200, batch_size: int = 50,
                items: bool = False, describe: Callable[[dict], list[dict]] | None = None) -> dict | None:
    """Exact-match accuracy on held-out world questions with the scene written out in the context: what the
    LM can answer when it is *told* the scene, the ceiling of a VLM that keeps this LM frozen.
    {"acc", "lo", "hi", "n", "per_kind": {kind: acc}, "per_form": {question template: {"acc", "n"}}, "per_answer":
    {kind: {reference answer: {"acc", "n"}}}} (bootstrap 95% interval; the last two show a constant guess, e.g. a
    count answered 'one' whatever the scene; with `items`, also each question's
    hit, in record order, for paired comparisons), None without such questions. `describe`: record -> its
    text-only conversation (default: each image replaced by its scene in words; e.g. an expert's caption)."""
    from vlkit.eval.metrics import exact_match
    from vlkit.eval.stats import interval

    recs = [r for r in records if r.get("task") == "vqa" and scene_descriptions(r)][:limit]
    if not recs:
        return None
    refs, preds = answer_in_words(model, tok, recs, 8, batch_size, describe)
    hits = [exact_match(p, ref) for p, ref in zip(preds, refs)]
    ci = interval(hits)
    return {"acc": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "n": ci["n"],
            "scenes": len({r.get("meta", {}).get("scene", {}).get("seed") for r in recs}),
            **breakdown(recs, refs, hits), "wrong_object": wrong_object(recs, preds),
            "relation_layout": relation_layout(recs, hits), **({"items": hits} if items else {})}


_RELATION = re.compile(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?")


def relation_layout(records: list[dict], hits: list[float]) -> dict:
    """Relation questions by whether reading order (rows top to bottom, then left to right) decides them:
    {"left/right, one row band" (the object named first is the left one), "left/right, different rows" (only the
    region words decide), "above/below, one column", "above/below, different columns" (order decides both):
    {"acc", "n"}}. A model that answers the first near 1 and the second at chance reads order, not words."""
    from vlkit.world.scene import Scene

    groups: dict[str, list[float]] = {}
    for r, h in zip(records, hits):
        m = _RELATION.fullmatch(question_text(r).strip())
        scene = r.get("meta", {}).get("scene")
        if not m or scene is None:
            continue
        objs = {o.name: o for o in Scene.from_dict(scene).objects}
        a_, b_ = objs.get(m.group(1)), objs.get(m.group(3))
        if a_ is None or b_ is None:
            continue
        row, col = (lambda o: min(2, int(o.cy * 3))), (lambda o: min(2, int(o.cx * 3)))
        if m.group(2) in ("left of", "right of"):
            key = "left/right, one row band" if row(a_) == row(b_) else "left/right, different rows"
        else:
            key = "above/below, one column" if col(a_) == col(b_) else "above/below, different columns"
        groups.setdefault(key, []).append(h)
    return {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


@torch.no_grad()
def answer_in_words(model, tok, records: list[dict], max_new_tokens: int, batch_size: int = 50,
                    describe: Callable[[dict], list[dict]] | None = None) -> tuple[list[str], list[str]]:
    """(references, greedy answers) of world records asked text-only, each image replaced by its scene in words
    (`describe`: record -> its text-only conversation, default `textualize(r, 1.0)`)."""
    from vlkit.eval.world import prompt_and_reference

    model.eval()
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    refs, preds = [], []
    try:
        for i in range(0, len(records), batch_size):
            pairs = [prompt_and_reference({"messages": describe(r) if describe else textualize(r, 1.0)})
                     for r in records[i:i + batch_size]]
            texts = [render(tok, prompt, add_generation_prompt=True) for prompt, _ in pairs]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            refs += [ref for _, ref in pairs]
            preds += [tok.decode(ids, skip_special_tokens=True) for ids in out[:, enc["input_ids"].shape[1]:]]
    finally:
        tok.padding_side = side
    return refs, preds


def context_edit(model, tok, records: list[dict], limit: int = 1000, batch_size: int = 50) -> dict | None:
    """"What changed between the two images?" answered with both scenes written out in the context: the ceiling
    of a VLM that keeps this LM frozen on the edit task (VPG-C's synthetic task). {metric: bootstrap interval} for
    `vlkit.eval.world.edit_items`' metrics, "n", and "items" (per-item scores, record order); None without edit
    records that carry both scenes."""
    from vlkit.eval.stats import interval
    from vlkit.eval.world import edit_items

    recs = [r for r in records if r.get("task") == "edit" and len(scene_descriptions(r)) == 2][:limit]
    if not recs:
        return None
    refs, preds = answer_in_words(model, tok, recs, 32, batch_size)
    items = edit_items(preds, refs)
    return {**{k: interval(v) for k, v in items.items()}, "n": len(recs), "items": items,
            "examples": [{"reference": r, "answer": p} for r, p in list(zip(refs, preds))[:6]]}


def any_order_check(model, tok, records: list[dict], reading: list[float]) -> dict | None:
    """context_vqa on the same questions with each scene's objects named in a drawn order, and its paired change
    from `reading` (their hits in reading order): a model that reads a relation or a position from where an
    object is named, not from its words, loses here."""
    from vlkit.eval.stats import paired

    res = context_vqa(model, tok, records, len(reading), items=True, describe=lambda r: textualize(r, 1.0, 1.0))
    if res is None:
        return None
    change = paired(reading, res.pop("items"))
    return {**res, "change": {k: change[k] for k in ("diff", "lo", "hi", "n")}}


def breakdown(records: list[dict], references: list[str], hits: list[float]) -> dict:
    """Scored world questions by kind ({kind: acc}), by form of question ({template: {"acc", "n"}},
    vlkit.world.language.question_template) and by reference answer within a kind ({kind: {answer: {"acc",
    "n"}}})."""
    from vlkit.world.language import question_template

    kinds: dict[str, list[float]] = {}
    forms: dict[str, list[float]] = {}
    answers: dict[str, dict[str, list[float]]] = {}
    for r, ref, h in zip(records, references, hits):
        kind = r.get("meta", {}).get("kind", "other")
        kinds.setdefault(kind, []).append(h)
        forms.setdefault(question_template(question_text(r)), []).append(h)
        answers.setdefault(kind, {}).setdefault(ref, []).append(h)
    score = lambda v: {"acc": sum(v) / len(v), "n": len(v)}  # noqa: E731
    return {"per_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "per_form": {f: score(v) for f, v in sorted(forms.items())},
            "per_answer": {k: {a: score(v) for a, v in sorted(by.items())} for k, by in sorted(answers.items())}}


def question_text(record: dict) -> str:
    """The text of a record's first user turn: the question a world VQA record asks."""
    from vlkit.data.records import message_text

    return next((message_text(m) for m in record.get("messages", []) if m.get("role") == "user"), "")


def wrong_object(records: list[dict], preds: list[str]) -> dict | None:
    """Of the colour, shape and position questions: the share answered with the right object's value, with
    another object's value from the same scene (the context was read but the attribute was bound to the wrong
    object), or with a value that is in no object of the scene."""
    from vlkit.eval.metrics import normalize_answer
    from vlkit.world.scene import Obj

    counts = {"right": 0, "another_object": 0, "not_in_scene": 0}
    for r, p in zip(records, preds):
        kind, scene = r.get("meta", {}).get("kind"), r.get("meta", {}).get("scene")
        if kind not in ("color", "shape", "position") or not scene:
            continue
        objs = [Obj(**o) for o in scene["objects"]]
        values = {"color": [o.color for o in objs], "shape": [o.shape for o in objs],
                  "position": [o.region for o in objs]}[kind]
        pred = normalize_answer(p)
        key = "right" if pred == normalize_answer(r["meta"]["answer"]) else \
            "another_object" if pred in values else "not_in_scene"
        counts[key] += 1
    n = sum(counts.values())
    return {"n": n, **{k: v / n for k, v in counts.items()}} if n else None


def during(model, tok, blocks: dict, records: list[dict], questions: int) -> dict:
    """An evaluation during training: held-out perplexity, and context VQA on `questions` items (0: not)."""
    out = {"ppl": perplexity(model, blocks)}
    if questions:
        c = context_vqa(model, tok, records, questions)
        if c:
            out["context_vqa"] = c["acc"]
    return out  # the trainer puts the model back in training mode


def packed_inputs(model, position_ids: torch.Tensor | None) -> dict:
    """Model inputs that keep each sequence packed into a row to itself, given position ids that restart at each
    (pack's `document_mask`): the positions, and the causal mask within each sequence as a 4D additive mask
    (transformers uses a 4D mask as given, with sdpa and eager attention alike; flash-attention 2 reads the
    sequences from the positions). {} without position ids."""
    if position_ids is None:
        return {}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "flash_attention_2":
        if model.config.model_type != "llama":
            raise VlkitError(f"data.document_mask with flash_attention_2 needs a LLaMA-family LM, not "
                             f"{model.config.model_type}; use attn_implementation sdpa")
        return {"position_ids": position_ids, "use_cache": False}
    # which sequence each token is in: a new one wherever the positions do not go on by one (as transformers'
    # masking_utils.find_packed_sequence_indices, which transformers 4.46, the oldest this package takes, lacks)
    first = position_ids[:, :1] - 1
    seq = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    n = position_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    return {"position_ids": position_ids, "attention_mask": mask[:, None], "use_cache": False}


def lm_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["labels"],
                **packed_inputs(model, batch.get("position_ids")))
    return out.loss, {"tokens": batch["input_ids"].numel()}


def collate_blocks(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def recall_warmup(model, tok, w: RecallWarmup, train: TrainConfig, where: str = "lm",
                  report: Callable[[str], None] | None = None) -> list[dict]:
    """Train `model` on each stage of `w` in turn (with `train`'s batch, learning rate and device), each until its
    held-out answers reach `w.until` or `w.max_steps` ran out; a stage's checkpoints go to a temporary directory.
    `report` gets a line per held-out check. [{"stage", "steps", "heldout_acc", "curve": [[step, acc], ...]}]."""
    import os
    import tempfile

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VlkitError(f"{where}: recall_warmup runs on one process; run it as its own lm run (train.steps=1) and "
                         "give that run's model as `init` to this one, or set recall_warmup.max_steps=0")
    rows_per = w.max_steps * train.batch_size * train.grad_accum
    try:
        data = [(stage, world_rows(tok, rows_per, train.seed + k, stage, w.pairs, w.questions),
                 world_rows(tok, w.heldout, 10**6 + train.seed + k, stage, w.pairs, w.questions))
                for k, stage in enumerate(w.stages)]
    except ValueError as e:
        raise VlkitError(f"{where}: recall_warmup: {e}") from None
    wcfg = train.model_copy(update={"steps": w.max_steps, "eval_every": 0, "save_every": 0, "batch_by_task": False,
                                    "warmup_steps": min(train.warmup_steps, w.max_steps // 2),
                                    "log_every": w.check_every})
    out = []
    for stage, rows, held in data:
        curve: list[list[float]] = []

        def formed(step: int, _metrics, held=held, curve=curve, stage=stage) -> bool:
            if step % w.check_every and step != w.max_steps:
                return False
            curve.append([step, answer_accuracy(model, held)])
            if report:
                report(f"recall warm-up {stage} step {step}: held-out {curve[-1][1]:.3f}")
            return curve[-1][1] >= w.until

        with tempfile.TemporaryDirectory() as tmp:
            t = Trainer(model, wcfg, Blocks(rows), collate_blocks, lm_loss, tmp, desc=f"recall warm-up {stage}")
            t.fit(callbacks=[formed])
        out.append({"stage": stage, "steps": t.step, "heldout_acc": curve[-1][1], "curve": curve})
    return out


def with_recall(tok, w: RecallWarmup, packed: dict, seed: int, where: str = "lm") -> dict:
    """`packed` blocks and then rows of `w`'s kept stages (`w.kept`, default the last), a `w.keep` share of the
    whole in equal parts, each padded to the block length (the trainer draws them in its own seeded order)."""
    if not w.keep:
        return packed
    n, block = packed["input_ids"].shape
    stages = w.kept or [w.stages[-1]]
    total = max(len(stages), round(n * w.keep / (1 - w.keep)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fill = torch.nn.functional.pad
    ids, labels = [packed["input_ids"]], [packed["labels"]]
    for k, stage in enumerate(stages):
        try:  # the first stage keeps the seed it always had, so a single kept stage draws the rows it drew before
            rows = world_rows(tok, total // len(stages) + (k < total % len(stages)), 2 * 10**6 + seed + 7919 * k,
                              stage, w.pairs, w.questions)
        except ValueError as e:
            raise VlkitError(f"{where}: recall_warmup: {e}") from None
        length = rows["input_ids"].shape[1]
        if length > block:
            raise VlkitError(f"{where}: recall_warmup.keep: a row of stage {stage!r} has {length} tokens, more "
                             f"than a block ({block}); raise data.block_size or lower recall_warmup.questions")
        ids.append(fill(rows["input_ids"], (0, block - length), value=pad))
        labels.append(fill(rows["labels"], (0, block - length), value=-100))
    out = {"input_ids": torch.cat(ids), "labels": torch.cat(labels)}
    if "position_ids" in packed:  # a row is one sequence (its padding unlabelled)
        out["position_ids"] = torch.cat([packed["position_ids"],
                                         torch.arange(block).expand(len(out["input_ids"]) - n, block)])
    return out


def recall_after(model, tok, w: RecallWarmup, seed: int) -> dict[str, float]:
    """Held-out answer accuracy after the world training of the last warm-up stage and of every kept stage, each on
    the held-out rows its warm-up was checked on (a kept stage not among the warm-up's: rows of a seed of its own):
    whether the world training kept what the warm-up formed. {stage: accuracy}."""
    index = {stage: k for k, stage in enumerate(w.stages)}  # a stage named twice: its last place
    out = {}
    for j, stage in enumerate(dict.fromkeys([w.stages[-1], *(w.kept or ())])):
        k = index.get(stage, len(w.stages) + j)
        out[stage] = answer_accuracy(model, world_rows(tok, w.heldout, 10**6 + seed + k, stage, w.pairs, w.questions))
    return out


def run(cfg: LMRecipe, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = load_splits(cfg.data, progress=progress)
    if cfg.init:
        tok = load_tokenizer(cfg.init)
    elif cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        tok = train_bpe(bpe_texts(train_recs), cfg.tokenizer.vocab_size, cfg.tokenizer.style)
    if cfg.data.drill:
        train_recs = train_recs + drills(train_recs, cfg.data.drill, cfg.data.world.relations, cfg.data.world.seed,
                                         cfg.data.drill_repeat, listing=cfg.data.drill_listing,
                                         balanced=cfg.data.drill_balanced, any_order=cfg.data.any_order)
        random.Random(cfg.data.world.seed).shuffle(train_recs)
    train_blocks = with_recall(tok, cfg.recall_warmup, pack(tok, train_recs, cfg.data.block_size,
                                                             cfg.data.describe_images, cfg.data.loss_on,
                                                             cfg.data.whole, cfg.data.any_order,
                                                             cfg.data.document_mask),
                               cfg.train.seed, cfg.output_dir)
    test_blocks = pack(tok, test_recs, cfg.data.block_size, cfg.data.describe_images, cfg.data.loss_on,
                       cfg.data.whole, document_mask=cfg.data.document_mask)
    seed_everything(cfg.train.seed)
    model = load_llm(cfg.init) if cfg.init else build_llm(cfg.model, tok)
    warm_file = out / "recall_warmup.json"
    warm = None
    if cfg.recall_warmup.max_steps:
        if resume and latest_checkpoint(out / "checkpoints") is not None:
            warm = read_json(warm_file) if warm_file.is_file() else None  # the checkpoint holds the warmed model
        elif not resume:  # (resuming without a checkpoint: the trainer says so before anything runs)
            warm = recall_warmup(model, tok, cfg.recall_warmup, cfg.train, cfg.output_dir,
                                 lambda line: print(line, file=sys.stderr, flush=True))

    def start() -> None:
        record()
        if warm is not None:
            write_json(warm_file, warm)

    trainer = Trainer(model, cfg.train, Blocks(train_blocks), collate_blocks, lm_loss, out,
                      evaluate=lambda m: during(m, tok, test_blocks, test_recs, cfg.eval.context_vqa_during),
                      run_config=cfg.model_dump(mode="json"), desc=f"lm {model.config.model_type}", on_start=start)
    metrics = trainer.fit(resume=resume, overwrite=overwrite)
    trainer.save_model(out / "model", lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                                   tok.save_pretrained(tmp)))
    cvqa = context_vqa(model, tok, test_recs, cfg.eval.context_vqa, items=True) if cfg.eval.context_vqa else None
    cvqa_any = any_order_check(model, tok, test_recs, cvqa.pop("items")) if cvqa else None
    w = cfg.recall_warmup
    after = recall_after(model, tok, w, cfg.train.seed) if w.max_steps or w.keep else None
    return finish(out, {"recipe": "lm", "family": model.config.model_type, "init": cfg.init,
                        "params": count_parameters(model),
                        "vocab_size": len(tok), "train_tokens": int(train_blocks["input_ids"].numel()),
                        "test_tokens": int(test_blocks["input_ids"].numel()), "loss_on": cfg.data.loss_on,
                        "heldout_ppl": metrics["ppl"],
                        "context_vqa": cvqa, "context_vqa_acc": cvqa["acc"] if cvqa else None,
                        "context_vqa_any_order": cvqa_any,
                        "recall_warmup": warm, "recall_after": after[w.stages[-1]] if after else None,
                        "recall_after_stages": after,
                        "ppl_curve": [{"step": h["step"], "ppl": h["eval/ppl"],
                                       **({"context_vqa": h["eval/context_vqa"]} if "eval/context_vqa" in h else {})}
                                      for h in trainer.history if "eval/ppl" in h],
                        "steps": cfg.train.steps, "model_dir": str(out / "model")})
