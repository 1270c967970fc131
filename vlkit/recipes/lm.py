"""Recipe `lm`: pretrain a tiny causal LM (LLaMA or OPT family) on world conversations.

Text-only conversations (image parts dropped) are rendered with the chat template, tokenized and
packed into blocks; the model is saved with ``save_pretrained`` so that
``AutoModelForCausalLM.from_pretrained(dir)`` loads it. Reports held-out perplexity.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.data.records import text_only
from vlkit.world.sources import RecordsConfig, load_splits
from vlkit.data.tokenizer import TokenizerConfig, load_tokenizer, render, train_bpe
from vlkit.models.llm import LLMConfig, build_llm, count_parameters
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything


class LMData(RecordsConfig):
    block_size: int = Field(128, gt=1, description="Tokens per packed training block.")
    describe_images: float = Field(
        0.5, ge=0, le=1, description="Chance that an image in a conversation is replaced by a sentence describing "
        "it (world records). This is how the LM learns to answer from what its context says about a scene, the "
        "skill a frozen LLM needs to read visual prompts later; otherwise the image is dropped.")


class LMRecipe(Section):
    recipe: Literal["lm"] = "lm"
    output_dir: str = Field("runs/lm", description="Where the model, logs and checkpoints go.")
    data: LMData = Field(default_factory=LMData)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: LLMConfig = Field(default_factory=LLMConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def scene_descriptions(record: dict) -> list[str]:
    """A detailed caption per image of a world record (empty when the record has no scene)."""
    from vlkit.world.language import caption
    from vlkit.world.scene import Scene

    meta = record.get("meta", {})
    scenes = [meta.get("scene"), meta.get("edited")][: len(record.get("images", []))]
    if any(s is None for s in scenes) or not scenes:
        return []
    return [caption(Scene.from_dict(s), "detailed") for s in scenes]


def textualize(record: dict, p: float) -> list[dict]:
    """The conversation with each image either described in words (chance p) or dropped."""
    descriptions = scene_descriptions(record)
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


def bpe_texts(records: list[dict]) -> list[str]:
    """Plain strings shaped like rendered conversations, for training the BPE itself."""
    out = []
    for r in records:
        for m in text_only(r["messages"]):
            c = m["content"]
            text = c if isinstance(c, str) else " ".join(p["text"] for p in c)
            out.append(("USER: " if m["role"] == "user" else "ASSISTANT: ") + text)
    return out


def pack(tok, records: list[dict], block_size: int, describe_images: float = 0.0) -> torch.Tensor:
    """Render each conversation as text, concatenate, cut into (n_blocks, block_size) ids."""
    stream: list[int] = []
    for r in records:
        stream.extend(tok(render(tok, textualize(r, describe_images)), add_special_tokens=False)["input_ids"])
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def context_vqa(model, tok, records: list[dict], limit: int = 200, batch_size: int = 50) -> float | None:
    """Exact-match accuracy on held-out world questions with the scene written out in the context: what the
    LM can answer when it is *told* the scene, the ceiling of a VLM that keeps this LM frozen."""
    from vlkit.eval.metrics import exact_match
    from vlkit.eval.world import prompt_and_reference

    recs = [r for r in records if r.get("task") == "vqa" and scene_descriptions(r)][:limit]
    if not recs:
        return None
    model.eval()
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    hits = []
    try:
        for i in range(0, len(recs), batch_size):
            chunk = recs[i:i + batch_size]
            pairs = [prompt_and_reference({"messages": textualize(r, 1.0)}) for r in chunk]
            texts = [render(tok, prompt, add_generation_prompt=True) for prompt, _ in pairs]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            for (_, ref), ids in zip(pairs, out[:, enc["input_ids"].shape[1]:]):
                hits.append(exact_match(tok.decode(ids, skip_special_tokens=True), ref))
    finally:
        tok.padding_side = side
    return sum(hits) / len(hits)


def lm_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {"tokens": batch["input_ids"].numel()}


def collate_blocks(items: list[torch.Tensor]) -> dict:
    return {"input_ids": torch.stack(items)}


def run(cfg: LMRecipe, resume: bool = False, overwrite: bool = False,
        progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = load_splits(cfg.data, progress=progress)
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        tok = train_bpe(bpe_texts(train_recs), cfg.tokenizer.vocab_size, cfg.tokenizer.style)
    train_blocks = pack(tok, train_recs, cfg.data.block_size, cfg.data.describe_images)
    test_blocks = pack(tok, test_recs, cfg.data.block_size, cfg.data.describe_images)
    seed_everything(cfg.train.seed)
    model = build_llm(cfg.model, tok)
    trainer = Trainer(model, cfg.train, train_blocks, collate_blocks, lm_loss, out,
                      evaluate=lambda m: {"ppl": perplexity(m, test_blocks)},
                      run_config=cfg.model_dump(mode="json"), desc=f"lm {cfg.model.family}", on_start=record)
    metrics = trainer.fit(resume=resume, overwrite=overwrite)
    trainer.save_model(out / "model", lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                                   tok.save_pretrained(tmp)))
    return finish(out, {"recipe": "lm", "family": cfg.model.family, "params": count_parameters(model),
                        "vocab_size": len(tok), "train_tokens": int(train_blocks.numel()),
                        "test_tokens": int(test_blocks.numel()), "heldout_ppl": metrics["ppl"],
                        "context_vqa_acc": context_vqa(model, tok, test_recs),
                        "steps": cfg.train.steps, "model_dir": str(out / "model")})
