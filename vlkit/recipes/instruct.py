"""Recipe `instruct`: multi-task, multi-turn instruction tuning of an existing VLM (LLaVA stage 2).

Starts from a vlkit model directory (typically a VPG-pretrained one, recipe `vpg`) and trains the
parameter groups named in `trainable` (the VPG only, the VPG + the LLM, LoRA adapters on the LLM
through `peft`, ...) on records of any mix of
tasks (`data.mix`: task -> weight). Evaluates on held-out data beside the blind baseline and saves a
vlkit model directory (``<out>/model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vlkit.config import Section
from vlkit.data.processor import VLProcessor
from vlkit.data.tiling import TileConfig
from vlkit.errors import VlkitError
from vlkit.models.llm import position_limit
from vlkit.world.sources import RecordsConfig
from vlkit.eval.world import EvalConfig
from vlkit.models.io import load_vlm
from vlkit.recipes.common import CACHE_HELP, finish, prepare_output, splits, train_and_evaluate
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything


class LoraSettings(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LLM modules to adapt (default: peft's for the "
                                             "model type, e.g. q_proj and v_proj for LLaMA).")
    save_adapter: bool = Field(False, description="Also save the trained adapters as a PEFT adapter directory "
                               "(<out>/lora: adapter_config.json + adapter_model.safetensors, what "
                               "peft.PeftModel.from_pretrained(llm, dir) loads onto the init model's LLM); the "
                               "model directory always holds the LLM with the adapters merged.")


class InstructRecipe(Section):
    recipe: Literal["instruct"] = "instruct"
    output_dir: str = Field("runs/instruct")
    init: str = Field(..., description="vlkit model directory to start from (e.g. <vpg run>/model).")
    trainable: list[str] = Field(["vpg", "llm"], description="Parameter groups to train; everything else is frozen "
                                 "(with `lora`, name the group `lora`).")
    lora: LoraSettings | None = Field(None, description="Add LoRA adapters to the LLM (peft); merged into its "
                                      "weights before evaluation and saving.")
    tiles: TileConfig | None = Field(None, description="See each image as views (global + k x k sub-images, "
                                     "SPHINX) from here on: the loaded model's VPG runs per view.")
    max_length: int | None = Field(None, gt=0, description="Longest token sequence from here on (default: the "
                                   "loaded model's); views take room.")
    save_trained_only: bool = Field(False, description="The model directory keeps only the trained tensors and "
                                    "refers to `init` by path and hash (loading it needs `init`, unchanged); "
                                    "default: every tensor.")
    data: RecordsConfig = Field(default_factory=RecordsConfig)
    eval_data: RecordsConfig | None = Field(None, description="Held-out records (default: data's world, every task).")
    cache_features: bool | Literal["fp16"] = Field(True, description=CACHE_HELP)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _trained_only_without_lora(self):
        if self.save_trained_only and self.lora is not None:
            raise ValueError("save_trained_only: the LoRA adapters are merged into the LLM's weights, which a "
                             "trained-only directory would leave to init; drop one of the two (lora.save_adapter "
                             "saves the adapters alone)")
        return self


def merge_lora(model, lora: LoraSettings, out: Path, save) -> None:
    """Fold the trained adapters into the LLM, first saving them as a PEFT adapter when asked (`save`: the
    trainer's `save_model`, one writer under torchrun)."""
    if lora.save_adapter:
        save(out / "lora", lambda tmp: model.llm.save_pretrained(tmp, safe_serialization=True))
    model.merge_lora()


def run(cfg: InstructRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = splits(cfg.data, cfg.eval_data, progress)
    seed_everything(cfg.train.seed)
    model, proc = load_vlm(cfg.init)
    if cfg.tiles is not None or cfg.max_length is not None:
        if cfg.tiles is not None:
            model.set_tiles(cfg.tiles)
        if cfg.max_length is not None:
            limit = position_limit(model.llm)
            if limit is not None and cfg.max_length > limit:
                raise VlkitError(f"max_length: {cfg.max_length} tokens exceed the LLM's {limit} positions; set "
                                 f"max_length to at most {limit}")
            model.config = model.config.model_copy(update={"max_length": cfg.max_length})
        proc = VLProcessor.for_model(proc.tokenizer, model)
    if cfg.lora:
        model.add_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model.set_trainable(cfg.trainable)
    model.train()
    result = train_and_evaluate(model, proc, cfg, train_recs, test_recs, out, resume, overwrite, progress,
                                before_eval=(lambda save: merge_lora(model, cfg.lora, out, save)) if cfg.lora else None,
                                on_start=record, base=cfg.init if cfg.save_trained_only else None)
    return finish(out, {"recipe": "instruct", "init": cfg.init, "trainable": cfg.trainable, **result})
