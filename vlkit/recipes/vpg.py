"""Recipe `vpg`: VPG pretraining, BLIP-2 stage-2 style (Li et al. 2023, section 3.3).

The vision tower and the LLM are frozen; the VPG (queries + Q-Former + projector, or an MLP /
linear projector) learns to turn image features into prompts the LLM can read, from world captions
with VQA mixed in. With ``cache_features`` the frozen tower runs once over the dataset and training
reads its features from disk. Evaluates on held-out data beside a blind baseline and saves a vlkit
model directory (``<out>/model``).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from vlkit.config import Section
from vlkit.data.features import ImageBank
from vlkit.data.processor import ProcessorConfig, VLProcessor
from vlkit.data.sources import RecordsConfig, load_split
from vlkit.data.tokenizer import IGNORE_INDEX, load_tokenizer
from vlkit.errors import VlkitError
from vlkit.eval.world import EvalConfig, evaluate_vlm
from vlkit.models.io import save_vlm
from vlkit.models.llm import count_parameters
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything


class VPGData(RecordsConfig):
    tasks: list[str] | None = Field(["caption", "vqa"], description="Training tasks (BLIP-2: captions; + VQA).")


class VPGRecipe(Section):
    recipe: Literal["vpg"] = "vpg"
    output_dir: str = Field("runs/vpg")
    model: VLMConfig = Field(default_factory=VLMConfig)
    trainable: list[str] = Field(["vpg"], description="Parameter groups to train; everything else is frozen.")
    data: VPGData = Field(default_factory=VPGData)
    eval_data: RecordsConfig | None = Field(None, description="Held-out records for evaluation (default: data's "
                                            "world with every task).")
    cache_features: bool = Field(True, description="Precompute the frozen tower's features once, on disk.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class VLDataset:
    """Encoded records + the image rows they use."""

    def __init__(self, records: list[dict], processor: VLProcessor, bank: ImageBank):
        self.items = []
        for r in records:
            enc = processor.encode(r["messages"], len(r["images"]), record_id=r.get("id", "?"))
            self.items.append((enc, bank.rows(r)[: enc["num_images"]]))
        self.processor, self.bank = processor, bank

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, items):
        batch = self.processor.pad([e for e, _ in items])
        batch.update(self.bank.inputs([row for _, rows in items for row in rows]))
        return batch


def vl_loss(model, batch, groups: int = 1):
    """Mean next-token loss over the batch's target tokens. With `groups` > 1 the rows run as that many
    groups of similar length, each cut to its own longest row: the same loss and gradient (up to float
    rounding) with less compute spent on padding. Needs right padding; one group under DDP."""
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    plain = groups <= 1 or len(labels) < 2 * groups or not isinstance(model, VisionLanguageModel) \
        or not set(batch) <= {"input_ids", "attention_mask", "labels", "image_features", "pixel_values"}
    if plain:
        return model(**batch).loss, {"tokens": tokens}
    lengths = batch["attention_mask"].sum(1)
    if bool((batch["attention_mask"].gather(1, (lengths - 1).clamp(min=0)[:, None]) == 0).any()):
        raise ValueError("vl_loss: length groups need right-padded batches")
    images = (batch["input_ids"] == model.image_token_id).sum(1) // model.num_image_tokens
    first = torch.cumsum(images, 0) - images
    total = torch.tensor(float(max(tokens, 1)))
    loss = 0.0
    for rows in torch.argsort(lengths, stable=True).chunk(groups):
        width = int(lengths[rows].max())
        sub = {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}
        keep = torch.cat([torch.arange(int(first[r]), int(first[r] + images[r])) for r in rows])
        sub.update({k: batch[k][keep] for k in ("image_features", "pixel_values") if batch.get(k) is not None})
        loss = loss + model(**sub, num_items_in_batch=total).loss
    return loss, {"tokens": tokens}


def build_model(cfg: VPGRecipe) -> tuple[VisionLanguageModel, VLProcessor]:
    llm_dir = cfg.model.llm.tokenizer or cfg.model.llm.path
    if not llm_dir:
        raise VlkitError("model.llm.path: the vpg recipe needs a trained LLM directory (with its tokenizer)")
    tok = load_tokenizer(llm_dir)
    seed_everything(cfg.train.seed)
    model = VisionLanguageModel.build(cfg.model, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                      vocab_size=len(tok))
    model.set_trainable(cfg.trainable)
    t = model.vision
    proc = VLProcessor(tok, ProcessorConfig(t.image_size, t.image_mean, t.image_std, model.num_image_tokens,
                                            cfg.model.max_length))
    return model, proc


def run(cfg: VPGRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    prepare_output(cfg, out, resume)
    train_recs, test_recs = splits(cfg.data, cfg.eval_data, progress)
    model, proc = build_model(cfg)
    result = train_and_evaluate(model, proc, cfg, train_recs, test_recs, out, resume, overwrite, progress)
    return finish(out, {"recipe": "vpg", "vpg": cfg.model.vpg.kind, **result})


def splits(data: RecordsConfig, eval_data: RecordsConfig | None, progress: bool | None = None):
    """Train records of `data`; held-out records of `eval_data` (default: data's world, every task)."""
    eval_src = eval_data or RecordsConfig(world=data.world, train=data.train, test=data.test)
    return load_split(data, "train", progress), load_split(eval_src, "test", progress)


def image_banks(model: VisionLanguageModel, train_recs: list[dict], test_recs: list[dict], cache: bool, out: Path,
                progress: bool | None = None) -> tuple[ImageBank, ImageBank, float]:
    """Pixel banks for both splits; with `cache`, the frozen tower's features instead (seconds spent)."""
    t = model.vision
    bank = ImageBank(train_recs, t.image_size, t.image_mean, t.image_std)
    test_bank = ImageBank(test_recs, t.image_size, t.image_mean, t.image_std)
    t0 = time.perf_counter()
    if cache:
        if "vision" in model.trainable_groups:
            raise VlkitError(f"{out}: cache_features needs a frozen tower; drop 'vision' from trainable or set "
                             "cache_features=false")
        bank.use_features(t, progress)
        test_bank.use_features(t, progress)
    return bank, test_bank, time.perf_counter() - t0


def train_and_evaluate(model: VisionLanguageModel, proc: VLProcessor, cfg, train_recs: list[dict],
                       test_recs: list[dict], out: Path, resume: bool = False, overwrite: bool = False,
                       progress: bool | None = None, save: bool = True,
                       banks: tuple[ImageBank, ImageBank] | None = None, before_eval=None) -> dict:
    """Train `model`'s trainable groups on `train_recs` with cfg.train, evaluate beside the blind baseline
    (cfg.eval), save the model to <out>/model. `cfg` has train, eval, cache_features and model_dump();
    `banks` (train, held-out) are reused when given."""
    if banks is None:
        bank, test_bank, feature_seconds = image_banks(model, train_recs, test_recs, cfg.cache_features, out,
                                                       progress)
    else:
        (bank, test_bank), feature_seconds = banks, 0.0
    data = VLDataset(train_recs, proc, bank)
    periodic, last = None, {}
    if cfg.train.eval_every:
        def periodic(m):
            last.update(step=trainer.step, result=evaluate_vlm(m, proc, test_recs, quick(cfg.eval), test_bank))
            return _flat(last["result"])
    loss = partial(vl_loss, groups=cfg.train.length_groups)
    trainer = Trainer(model, cfg.train, data, data.collate, loss, out, run_config=cfg.model_dump(mode="json"),
                      desc=getattr(cfg, "recipe", "train"), evaluate=periodic)
    trainer.fit(resume=resume, overwrite=overwrite)
    trainable_params = count_parameters(model, True)
    if before_eval is not None:  # e.g. merging LoRA adapters into the LLM
        before_eval()
        last.clear()
    # the evaluation at the last step saw the same records with images when during_training >= max_per_task;
    # it ran under the trainer's autocast, so it stands for this fp32 evaluation only where there is none
    reuse = last.get("step") == cfg.train.steps and cfg.eval.during_training >= cfg.eval.max_per_task \
        and trainer.rt.autocast_dtype is None
    model.eval()
    with torch.no_grad():
        result = evaluate_vlm(model, proc, test_recs, cfg.eval, test_bank, progress=progress,
                              with_images=last["result"] if reuse else None)
    if save and trainer.rt.is_main:
        save_vlm(model, out / "model", proc)
    return {"trainable_params": trainable_params, "total_params": count_parameters(model),
            "num_image_tokens": model.num_image_tokens, "steps": cfg.train.steps,
            "train_seconds": trainer.train_seconds, "feature_seconds": feature_seconds, "eval": result,
            "history": trainer.history, "model_dir": str(out / "model")}


def quick(cfg: EvalConfig) -> EvalConfig:
    """Evaluation during training: `during_training` records per task, no blind pass."""
    return cfg.model_copy(update={"max_per_task": min(cfg.max_per_task, cfg.during_training), "blind": False})


def _flat(result: dict) -> dict[str, float]:
    return dict(result["image"])
