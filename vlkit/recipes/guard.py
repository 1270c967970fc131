"""Recipe `guard`: fine-tune a causal LM as a Llama Guard-style classifier (Inan et al. 2023, section 3).

Each labelled conversation becomes the guard prompt (taxonomy + conversation, judged at its role) and
the answer "safe" or "unsafe\\n<codes>". The loss is on the answer (plus `train_on_prompt` x the
prompt tokens, useful for a tiny model trained from nothing). Augmentations, so that the guard reads
the taxonomy in its prompt instead of memorising codes (what makes custom taxonomies work zero-shot):
- drop a random subset of the categories that are *not* violated (`drop_unviolated`);
- drop every violated category and relabel the example safe (`drop_violated`);
- shuffle the category codes (`shuffle_codes`).
Starts from an LM directory (`init`) or, with `init: null`, trains a BPE on the prompts and builds a
tiny LM from `model`. Saves an HF directory + ``guard_config.json``; evaluates AUPRC on held-out data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.data.tokenizer import TokenizerConfig, load_tokenizer, train_bpe
from vlkit.errors import VlkitError
from vlkit.fileio import write_json
from vlkit.guard.data import any_unsafe, load_moderation, read_examples, to_example
from vlkit.guard.prompt import build_prompt, target_text
from vlkit.guard.taxonomy import Taxonomy, load_taxonomy
from vlkit.models.llm import LLMConfig, build_llm, count_parameters, load_llm
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything


class GuardData(Section):
    train: str | None = Field(None, description="JSONL of guard examples {messages, role, unsafe: [names]}.")
    test: str | None = Field(None, description="JSONL of held-out guard examples.")
    moderation: str | None = Field(None, description="OpenAI moderation directory or file: its train split "
                                   "trains, its test split evaluates (instead of train/test).")
    max_chars: int = Field(1000, gt=0, description="Each message is cut to this many characters.")


class Augment(Section):
    copies: int = Field(2, gt=0, description="Variants of each example: the first with the whole taxonomy, "
                        "the others augmented.")
    drop_unviolated: float = Field(0.5, ge=0, le=1, description="Chance to drop a random subset of the "
                                   "categories that are not violated.")
    drop_violated: float = Field(0.1, ge=0, le=1, description="Chance (unsafe examples) to drop the violated "
                                 "categories and relabel the example safe.")
    shuffle_codes: bool = Field(True, description="Shuffle which code each category gets.")


class GuardRecipe(Section):
    recipe: Literal["guard"] = "guard"
    output_dir: str = Field("runs/guard")
    init: str | None = Field(None, description="LM directory to fine-tune; null: new BPE + tiny LM from `model`.")
    taxonomy: str = Field("llama-guard-3", description="Built-in taxonomy name or a YAML file.")
    version: int = Field(3, description="Prompt layout version (1, 2 or 3).")
    template: Literal["inst", "chat", "native"] = Field("inst", description="[INST] wrapping, the tokenizer's "
                                                        "template, or the checkpoint's own guard template.")
    threshold: float = Field(0.5, ge=0, le=1)
    train_on_prompt: float = Field(0.0, ge=0, le=1, description="Loss weight of prompt tokens (answer: 1).")
    max_length: int = Field(768, gt=8)
    data: GuardData = Field(default_factory=GuardData)
    augment: Augment = Field(default_factory=Augment)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: LLMConfig = Field(default_factory=LLMConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def examples_of(cfg: GuardRecipe) -> tuple[list[dict], list[dict]]:
    if cfg.data.moderation:
        rows = load_moderation(cfg.data.moderation)
        train = [to_example(r) for r in rows if r["split"] == "train" and any_unsafe(r) is not None]
        test = [to_example(r) for r in rows if r["split"] == "test" and any_unsafe(r) is not None]
    elif cfg.data.train:
        train = read_examples(cfg.data.train)
        test = read_examples(cfg.data.test) if cfg.data.test else []
    else:
        raise VlkitError("data: give data.train (guard JSONL) or data.moderation (the OpenAI moderation set)")
    cut = cfg.data.max_chars
    for ex in train + test:
        ex["messages"] = [{"role": m["role"], "content": _text(m)[:cut]} for m in ex["messages"]]
    return train, test


def _text(m: dict) -> str:
    c = m["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text")


def augment(ex: dict, tax: Taxonomy, cfg: Augment, rng: random.Random) -> tuple[Taxonomy, list[str]]:
    """(taxonomy shown in the prompt, violated codes in it) for one augmented variant."""
    names = [c.name for c in tax.categories]
    violated = [n for n in names if n in {tax.by_name(u).name for u in ex.get("unsafe", [])}]
    keep = list(names)
    if violated and rng.random() < cfg.drop_violated:
        keep = [n for n in names if n not in violated]
        violated = []
    elif rng.random() < cfg.drop_unviolated:
        keep = [n for n in names if n in violated or rng.random() < 0.5]
    if not keep:  # a prompt needs at least one category
        keep = [rng.choice([n for n in names if n not in violated] or names)]
    shown = tax.subset(keep, shuffle_codes=cfg.shuffle_codes, rng=rng)
    return shown, [shown.by_name(n).code for n in violated]


class GuardDataset:
    def __init__(self, examples: list[dict], tok, cfg: GuardRecipe, tax: Taxonomy, seed: int):
        rng = random.Random(seed)
        self.items = []
        for ex in examples:
            for k in range(cfg.augment.copies):  # variant 0: the whole taxonomy as given; others: augmented
                if k == 0:
                    shown, codes = tax, [tax.by_name(u).code for u in ex.get("unsafe", [])]
                else:
                    shown, codes = augment(ex, tax, cfg.augment, rng)
                self.items.append(encode(tok, build_prompt(ex["messages"], shown, ex.get("role", "User"),
                                                           cfg.version, cfg.template, tok),
                                         target_text(codes), cfg.max_length, cfg.train_on_prompt))
        self.pad = tok.pad_token_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items):
        n = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), n), self.pad, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        w = torch.zeros(len(items), n)
        for i, (a, b) in enumerate(items):
            ids[i, :len(a)] = torch.tensor(a)
            mask[i, :len(a)] = 1
            w[i, :len(b)] = torch.tensor(b)
        return {"input_ids": ids, "attention_mask": mask, "weights": w}


def encode(tok, prompt: str, answer: str, max_length: int, prompt_weight: float) -> tuple[list[int], list[float]]:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(prompt + answer, add_special_tokens=False)["input_ids"][len(p):] + [tok.eos_token_id]
    keep = max(max_length - len(a) - len(bos), 0)
    p = p[len(p) - min(keep, len(p)):]  # keep the end of the prompt (the conversation and the instruction)
    return bos + p + a, [prompt_weight] * (len(bos) + len(p)) + [1.0] * len(a)


def guard_loss(model, batch):
    ids, w = batch["input_ids"], batch["weights"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                            reduction="none").view_as(w[:, 1:])
    weight = w[:, 1:]
    return (nll * weight).sum() / weight.sum().clamp_min(1e-6), {"tokens": int((weight > 0).sum())}


def auprc(guard, examples: list[dict], tax: Taxonomy, batch_size: int = 16) -> dict:
    """Overall AUPRC (P(unsafe) with the whole taxonomy) and per category (prompt with that category only); "rows":
    each example's id, label and score (overall), for intervals and paired comparisons."""
    from sklearn.metrics import average_precision_score

    convs = [ex["messages"] for ex in examples]
    roles = {ex.get("role", "User") for ex in examples}
    if len(roles) > 1:
        raise VlkitError("guard eval: examples judged at different roles; evaluate User and Agent separately")
    role = roles.pop() if roles else "User"
    y = np.array([int(bool(ex.get("unsafe"))) for ex in examples])
    scores = np.array([v.score for v in guard.classify(convs, role, batch_size, generate=False)])
    out = {"n": len(examples), "positives": int(y.sum()),
           "auprc": float(average_precision_score(y, scores)) if 0 < y.sum() < len(y) else None, "per_category": {},
           "rows": {"ids": [ex.get("id") for ex in examples], "labels": y.tolist(), "scores": scores.tolist()}}
    full = guard.taxonomy
    for cat in tax.categories:  # on the examples whose label for this category is known
        guard.taxonomy = tax.subset([cat.name])
        rows = [i for i, ex in enumerate(examples) if cat.name in ex.get("known", [cat.name])]
        yc = np.array([int(cat.name in examples[i].get("unsafe", [])) for i in rows])
        if 0 < yc.sum() < len(yc):
            sc = np.array([v.score for v in guard.classify([convs[i] for i in rows], role, batch_size,
                                                           generate=False)])
            out["per_category"][cat.name] = {"auprc": float(average_precision_score(yc, sc)),
                                             "positives": int(yc.sum())}
    guard.taxonomy = full
    return out


def run(cfg: GuardRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    from vlkit.guard.classify import Guard

    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    tax = load_taxonomy(cfg.taxonomy)
    train, test = examples_of(cfg)
    for ex in train + test:
        for u in ex.get("unsafe", []):
            tax.by_name(u)  # unknown category names are errors, naming the taxonomy
    seed_everything(cfg.train.seed)
    if cfg.init:
        tok, model = load_tokenizer(cfg.init), load_llm(cfg.init)
    else:
        texts = [build_prompt(ex["messages"], tax, ex.get("role", "User"), cfg.version, "inst") for ex in train]
        tok = train_bpe(texts + ["safe", "unsafe"], cfg.tokenizer.vocab_size, cfg.tokenizer.style)
        model = build_llm(cfg.model.model_copy(update={"max_position_embeddings": max(
            cfg.model.max_position_embeddings, cfg.max_length + 2)}), tok)
    data = GuardDataset(train, tok, cfg, tax, cfg.train.seed)
    trainer = Trainer(model, cfg.train, data, data.collate, guard_loss, out, run_config=cfg.model_dump(mode="json"),
                      desc="guard", on_start=record)
    trainer.fit(resume=resume, overwrite=overwrite)
    settings = {"taxonomy": tax.to_yaml_dict(), "version": cfg.version, "template": cfg.template,
                "threshold": cfg.threshold}
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "guard_config.json", settings)

    trainer.save_model(out / "model", write)
    guard = Guard(model.eval(), tok, tax, cfg.version, cfg.template, cfg.threshold)
    with torch.no_grad():
        evaluation = auprc(guard, test, tax) if test else None
    return finish(out, {"recipe": "guard", "params": count_parameters(model), "train_examples": len(train),
                        "train_items": len(data), "steps": cfg.train.steps, "train_seconds": trainer.train_seconds,
                        "eval": evaluation, "model_dir": str(out / "model")})
