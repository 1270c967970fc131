"""Recipe `vpg`: VPG pretraining, BLIP-2 stage-2 style (Li et al. 2023, section 3.3).

The vision encoders and the LLM are frozen; the VPG (queries + Q-Former + projector, or an MLP /
linear projector) learns to turn image features into prompts the LLM can read, from world captions
with VQA mixed in. With ``cache_features`` the frozen encoders run once over the dataset and training
reads their features from disk. Evaluates on held-out data beside a blind baseline and saves a vlkit
model directory (``<out>/model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from vlkit.config import Section
from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import load_tokenizer
from vlkit.errors import VlkitError
from vlkit.eval.world import EvalConfig
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.recipes.common import CACHE_HELP, finish, prepare_output, splits, train_and_evaluate
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything
from vlkit.world.sources import RecordsConfig


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
    cache_features: bool | Literal["fp16"] = Field(True, description=CACHE_HELP)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def build_model(cfg: VPGRecipe) -> tuple[VisionLanguageModel, VLProcessor]:
    llm_dir = cfg.model.llm.tokenizer or cfg.model.llm.path
    if not llm_dir:
        raise VlkitError("model.llm.path: the vpg recipe needs a trained LLM directory (with its tokenizer)")
    tok = load_tokenizer(llm_dir)
    seed_everything(cfg.train.seed)
    model = VisionLanguageModel.build(cfg.model, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                      vocab_size=len(tok))
    model.set_trainable(cfg.trainable)
    return model, VLProcessor.for_model(tok, model)


def run(cfg: VPGRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = splits(cfg.data, cfg.eval_data, progress)
    model, proc = build_model(cfg)
    result = train_and_evaluate(model, proc, cfg, train_recs, test_recs, out, resume, overwrite, progress,
                                on_start=record)
    return finish(out, {"recipe": "vpg", "vpg": cfg.model.vpg.kind, **result})
