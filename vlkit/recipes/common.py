"""What every recipe does around the trainer, and the VLM training loop the VLM recipes share.

Run preamble: output directory, config copy, results, caching of finished runs. VLM loop
(`train_and_evaluate`): records -> `VLDataset` (encoded, images as pixels or cached features) -> the trainer
with `vl_loss` -> held-out evaluation beside the blind baseline -> the saved model directory.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel

from vlkit.config import to_yaml
from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import IGNORE_INDEX
from vlkit.errors import VlkitError
from vlkit.eval.world import EvalConfig, evaluate_vlm
from vlkit.fileio import read_json, stable_hash, write_json, write_text
from vlkit.models.io import check_base_outside, load_vlm, write_vlm
from vlkit.models.llm import count_parameters
from vlkit.data.features import ImageBank, count, select
from vlkit.data.lazy import LazyVLDataset, RecordFile
from vlkit.models.vlm import VisionLanguageModel
from vlkit.train import Stream, Trainer
from vlkit.world.dataset import LATER_SETTINGS as WORLD_LATER
from vlkit.world.dataset import LATER_WORLD_SETTINGS as WORLD_CONFIG_LATER
from vlkit.world.dataset import WorldData
from vlkit.world.scene import WorldConfig
from vlkit.world.sources import RecordsConfig, load_split


# Settings added after runs were cached, with the value that reproduces those runs: left out of the hash at
# that value, so adding a setting does not invalidate every finished run. A key is a path into the config
# ("*": every item of a list there); a whole section added later is left out when it equals its default.
LATER_SETTINGS: dict[tuple[str, ...], object] = {
    ("train", "length_groups"): 1,
    ("data", "world", "relations"): False,
    ("eval_data", "world", "relations"): False,
    ("data", "drill"): 0,
    ("data", "drill_repeat"): False,
    ("data", "drill_listing"): False,
    ("data", "drill_balanced"): False,
    ("data", "any_order"): 0.0,
    ("recall_warmup", "kept"): None,
    ("data", "whole"): False,
    ("data", "document_mask"): False,
    ("data", "loss_on"): "all",
    ("model", "mix"): None,
    ("model", "tiles"): None,
    ("data", "instructions"): None,
    ("eval_data", "instructions"): None,
    ("streams", "*", "data", "instructions"): None,
    ("eval", "instructions"): None,
    ("train", "batch_by_task"): False,
    ("train", "parallel"): "ddp",
    ("train", "activation_checkpointing"): False,
    ("train", "num_workers"): 0,
    ("train", "prefetch_factor"): 2,
    ("train", "pin_memory"): None,
    ("data", "lazy"): False,
    ("model", "llm", "attn_implementation"): None,
    ("target", "attn_implementation"): None,
    ("lora", "save_adapter"): False,
    ("eval_data", "lazy"): False,
    ("streams", "*", "data", "lazy"): False,
    ("save_trained_only",): False,
}
# the world's own later settings (vlkit.world.dataset), wherever a recipe holds a world section
for _where in (("data",), ("eval_data",), ("streams", "*", "data")):
    for _name in WORLD_LATER:
        if _where[0] == "streams" and _name == "relations":  # streams came later: their hashes always held it
            continue
        LATER_SETTINGS[(*_where, "world", _name)] = WorldData().model_dump(mode="json")[_name]
    for _name in WORLD_CONFIG_LATER:
        LATER_SETTINGS[(*_where, "world", "world", _name)] = WorldConfig().model_dump(mode="json")[_name]
LATER_SECTIONS: dict[str, dict[str, object]] = {"lm": {"eval": {"context_vqa": 200, "context_vqa_during": 0},
                                                       "init": None,
                                                       "recall_warmup": {"max_steps": 0,
                                                                         "stages": ["copy", "mix:0", "mix:1"],
                                                                         "until": 0.97, "check_every": 250,
                                                                         "pairs": [2, 6], "questions": 8,
                                                                         "heldout": 1000, "keep": 0.0}},
                                                "instruct": {"tiles": None, "max_length": None}}


def drop_later_settings(data: dict, recipe: str | None = None) -> dict:
    """`data` (a config's model_dump) without the settings added later where they hold their old value."""
    for path, old in LATER_SETTINGS.items():
        nodes = [data]
        for key in path[:-1]:
            nodes = [item for n in nodes if isinstance(n, list) for item in n] if key == "*" else \
                [n.get(key) for n in nodes if isinstance(n, dict)]
        for node in nodes:
            if isinstance(node, dict) and path[-1] in node and node[path[-1]] == old:
                node.pop(path[-1])
    for key, default in LATER_SECTIONS.get(recipe or "", {}).items():
        if key in data and data[key] == default:
            data.pop(key)
    return data


def config_hash(cfg: BaseModel) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("output_dir", None)
    return stable_hash(drop_later_settings(data, data.get("recipe")))


def prepare_output(cfg: BaseModel, out: Path, resume: bool, overwrite: bool = False) -> Callable[[], None]:
    """Check, writing nothing, that `cfg` may run in `out`: a resumed run must continue the config that wrote it,
    a fresh one must not land on an earlier run's checkpoints unless `overwrite`. Returns `record`, which writes
    config.yaml and run.json; the trainer calls it once every input is validated, right before its first step,
    so a run that fails on bad records, a bad device or a refused setting leaves the run it landed on as it was."""
    if resume and (out / "run.json").is_file():
        old = read_json(out / "run.json")
        if not isinstance(old, dict) or old.get("config_hash") != config_hash(cfg):
            raise VlkitError(f"{out}: was written by a different config; resume with the same config and "
                             "overrides, or choose another output_dir")
    if not resume and not overwrite and any(out.glob("checkpoints/latest")) | any(out.glob("*/checkpoints/latest")):
        raise VlkitError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to "
                         "start over")
    done: list[bool] = []

    def record() -> None:
        if done:
            return
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", to_yaml(cfg))
        write_json(out / "run.json", {"config_hash": config_hash(cfg), "recipe": getattr(cfg, "recipe", None)})
        done.append(True)
    return record


def finish(out: Path, results: dict) -> dict:
    write_json(out / "results.json", results)
    return results


def cached_results(cfg: BaseModel, out: Path) -> dict | None:
    """Results of a finished run of exactly this config in `out`, else None."""
    try:
        if read_json(out / "run.json").get("config_hash") == config_hash(cfg) and (out / "results.json").is_file():
            return json.loads((out / "results.json").read_text())
    except VlkitError:
        return None
    return None


# -- the VLM training loop ---------------------------------------------------------------------------------
def splits(data: RecordsConfig, eval_data: RecordsConfig | None, progress: bool | None = None):
    """Train records of `data`; held-out records of `eval_data` (default: data's world, every task)."""
    eval_src = eval_data or RecordsConfig(world=data.world, train=data.train, test=data.test)
    return load_split(data, "train", progress), load_split(eval_src, "test", progress)


class VLDataset:
    """Encoded records + the image rows they use. Records left with no supervised token (a conversation cut
    to max_length before its first answer) teach nothing and would make a batch's loss 0/0: they are dropped,
    with a warning that counts them."""

    def __init__(self, records: list[dict], processor: VLProcessor, bank: ImageBank):
        self.items = []
        self.tasks = []  # each item's record task (the trainer's train.batch_by_task batches by it)
        dropped = 0
        for r in records:
            enc = processor.encode(r["messages"], len(r["images"]), record_id=r.get("id", "?"),
                                   views=bank.views(bank.rows(r)))
            if not any(lab != IGNORE_INDEX for lab in enc["labels"][1:]):
                dropped += 1
                continue
            self.items.append((enc, bank.rows(r)[: enc["num_images"]]))
            self.tasks.append(r.get("task"))
        self.dropped = dropped
        if dropped:
            warnings.warn(f"{dropped} of {len(records)} training records have no supervised token within "
                          f"max_length={processor.config.max_length} (answer cut off or absent); dropped them",
                          stacklevel=2)
        if records and not self.items:
            raise VlkitError(f"every one of the {len(records)} training records has no supervised token within "
                             f"max_length={processor.config.max_length}; raise max_length or check the records")
        self.processor, self.bank = processor, bank

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate(self, items):
        batch = self.processor.pad([e for e, _ in items])
        batch.update(self.bank.inputs([row for _, rows in items for row in rows]))
        return batch


BATCH_KEYS = {"input_ids", "attention_mask", "labels", "image_features", "pixel_values", "images_per_row",
              "view_mask"}


def vl_loss(model, batch, groups: int = 1):
    """Mean next-token loss over the batch's target tokens. With `groups` > 1 the rows run as that many
    groups of similar length, each cut to its own longest row: the same loss and gradient (up to float
    rounding) with less compute spent on padding. Needs right padding; one group under DDP."""
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    sparse = {"loss_only": True} if isinstance(getattr(model, "module", model), VisionLanguageModel) else {}
    if tokens == 0:  # every record cut before its answer (data.lazy reads them as they come): a loss of 0 that
        # still runs the model, so that data-parallel ranks meet in their collectives
        return model(**batch, num_items_in_batch=torch.tensor(1.0), **sparse).loss, {"tokens": 0}
    plain = groups <= 1 or len(labels) < 2 * groups or not isinstance(model, VisionLanguageModel) \
        or not set(batch) <= BATCH_KEYS or "images_per_row" not in batch
    if plain:  # the head and the loss only at supervised positions (VisionLanguageModel.forward's loss_only)
        return model(**batch, **sparse).loss, {"tokens": tokens}
    lengths = batch["attention_mask"].sum(1)
    if bool((batch["attention_mask"].gather(1, (lengths - 1).clamp(min=0)[:, None]) == 0).any()):
        raise ValueError("vl_loss: length groups need right-padded batches")
    images = batch["images_per_row"]
    first = torch.cumsum(images, 0) - images
    total = torch.tensor(float(max(tokens, 1)))
    loss = 0.0
    for rows in torch.argsort(lengths, stable=True).chunk(groups):
        width = int(lengths[rows].max())
        sub = {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}
        sub["images_per_row"] = images[rows]
        keep = torch.cat([torch.arange(int(first[r]), int(first[r] + images[r])) for r in rows])
        sub.update({k: select(batch[k], keep) for k in ("image_features", "pixel_values", "view_mask")
                    if count(batch.get(k))})
        loss = loss + model(**sub, num_items_in_batch=total, **sparse).loss
    return loss, {"tokens": tokens}


CACHE_HELP = ("Precompute the frozen encoders' features once, on disk (true: fp32; fp16: half the bytes, read back "
              "as fp32); false: run the encoders on pixels every step (data.lazy needs false).")


def image_banks(model: VisionLanguageModel, proc: VLProcessor, train_recs: list[dict], test_recs: list[dict],
                cache: bool | str, out: Path, progress: bool | None = None) -> tuple[ImageBank, ImageBank, float]:
    """Pixel banks for both splits (the processor's transforms); with `cache`, the frozen encoders' features
    instead (seconds spent)."""
    bank = ImageBank.of(train_recs, proc, progress)
    test_bank = ImageBank.of(test_recs, proc, progress)
    t0 = time.perf_counter()
    if cache:
        if not model.vision.encoders_frozen:
            raise VlkitError(f"{out}: cache_features needs frozen vision encoders; drop the encoders' groups from "
                             "trainable or set cache_features=false")
        stored = "fp16" if cache == "fp16" else "fp32"
        bank.use_features(model.vision, progress, stored)
        test_bank.use_features(model.vision, progress, stored)
    return bank, test_bank, time.perf_counter() - t0


def train_and_evaluate(model: VisionLanguageModel, proc: VLProcessor, cfg, train_recs: list[dict],
                       test_recs: list[dict], out: Path, resume: bool = False, overwrite: bool = False,
                       progress: bool | None = None, save: bool = True,
                       banks: tuple[ImageBank, ImageBank] | None = None, before_eval=None,
                       model_dir: Path | None = None, on_start: Callable[[], None] | None = None,
                       streams: list[RecordStream] | None = None, order: str = "joint",
                       base: str | Path | None = None) -> dict:
    """Train `model`'s trainable groups on `train_recs` with cfg.train, evaluate beside the blind baseline
    (cfg.eval), save the model to `model_dir` (default <out>/model). `cfg` has train, eval, cache_features and
    model_dump(); `banks` (train, held-out) are reused when given; `on_start` runs before the first step (the run's
    record: see prepare_output). With `streams`, each stream's records train its own groups (joint training of
    disjoint groups, in `order`); `train_recs` is then every stream's records, for the image bank. With `base` (the
    directory the model was loaded from), the saved directory keeps only the trained tensors (`write_vlm`)."""
    model_dir = model_dir or out / "model"
    check_base_outside(base, model_dir)  # before training, not after it
    if isinstance(train_recs, RecordFile):  # data.lazy: records and images read by the trainer's DataLoader
        if streams or cfg.cache_features:
            raise VlkitError(f"{out}: data.lazy reads images as it trains: set cache_features=false"
                             + (" and train one stream" if streams else ""))
        if banks is not None:
            raise VlkitError(f"{out}: data.lazy takes no precomputed image banks")
        banks = (None, ImageBank.of(test_recs, proc, progress))
    if banks is None:
        bank, test_bank, feature_seconds = image_banks(model, proc, train_recs, test_recs, cfg.cache_features, out,
                                                       progress)
    else:
        (bank, test_bank), feature_seconds = banks, 0.0
    groups = model.param_groups()
    datasets = [VLDataset(st.records, proc, bank) for st in streams] if streams else \
        [LazyVLDataset(train_recs, proc) if bank is None else VLDataset(train_recs, proc, bank)]
    data = datasets[0]
    plan = [Stream(st.name, d, d.collate, st.weight, [p for g in st.groups for p in groups[g]])
            for st, d in zip(streams, datasets)] if streams else None
    periodic, last = None, {}
    if cfg.train.eval_every:
        def periodic(m):
            last.update(step=trainer.step, result=evaluate_vlm(m, proc, test_recs, quick(cfg.eval), test_bank))
            return dict(last["result"]["image"])
    loss = partial(vl_loss, groups=cfg.train.length_groups)
    trainer = Trainer(model, cfg.train, data, data.collate, loss, out, run_config=cfg.model_dump(mode="json"),
                      desc=getattr(cfg, "recipe", "train"), evaluate=periodic, on_start=on_start, streams=plan,
                      order=order)
    if trainer.sharded and (periodic is not None or before_eval is not None):
        raise VlkitError(f"{out}: train.parallel=fsdp evaluates the saved model once training ends: set "
                         "train.eval_every=0" + (" and train without lora (merged after training)"
                                                 if before_eval is not None else ""))
    trainer.fit(resume=resume, overwrite=overwrite)
    trainable_params = count_parameters(model, True)
    if trainer.sharded:  # the shards gathered into one directory, evaluated as `vlkit eval` would load it
        total_params = count_parameters(model)
        state = trainer.model_state()
        trainer.save_model(model_dir, lambda tmp: write_vlm(model, tmp, proc, state=state, base=base))
        model, _ = load_vlm(model_dir, device=trainer.rt.device)
        save = False
    if before_eval is not None:  # e.g. merging LoRA adapters into the LLM (given the trainer's collective save)
        before_eval(trainer.save_model)
        last.clear()
    # the evaluation at the last step saw the same records with images when during_training >= max_per_task;
    # it ran under the trainer's autocast, so it stands for this fp32 evaluation only where there is none
    reuse = last.get("step") == cfg.train.steps and cfg.eval.during_training >= cfg.eval.max_per_task \
        and trainer.rt.autocast_dtype is None
    model.eval()
    with torch.no_grad():
        result = evaluate_vlm(model, proc, test_recs, cfg.eval, test_bank, progress=progress,
                              with_images=last["result"] if reuse else None)
    if save:
        trainer.save_model(model_dir, lambda tmp: write_vlm(model, tmp, proc, base=base))
    return {"trainable_params": trainable_params, "total_params": total_params if trainer.sharded else
            count_parameters(model),
            "num_image_tokens": model.image_slots, "steps": cfg.train.steps,
            "train_seconds": trainer.train_seconds, "feature_seconds": feature_seconds, "eval": result,
            "history": trainer.history, "dropped_records": sum(getattr(d, "dropped", 0) for d in datasets),
            "model_dir": str(model_dir)}


@dataclass
class RecordStream:
    """A stream of training records and the parameter groups its steps update."""

    name: str
    records: list[dict]
    weight: float
    groups: list[str]


def quick(cfg: EvalConfig) -> EvalConfig:
    """Evaluation during training: `during_training` records per task, no blind pass."""
    return cfg.model_copy(update={"max_per_task": min(cfg.max_per_task, cfg.during_training), "blind": False})
