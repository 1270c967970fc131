"""Recipe `adapter`: LLaMA-Adapter V2 (Gao et al. 2023) on a frozen LLM, by joint training of disjoint groups.

Starts from a vlkit model directory (its vision stack, VPG and LLM; typically a VPG-pretrained one), replaces
its fusions by the `adapter` fusion (vlkit.models.fusion.adapter: gated prompts, early fusion, bias/scale)
and trains several data streams in one run, each updating only its own groups (section 3.2):

    captions       image-text pairs      -> the visual projection (vpg.projector) and the early gates
    instructions   text-only (the scene   -> the late prompts and gates, bias/scale, norms
                   in words, no image)

`order: sequential` trains the streams one after the other instead (the released code's pretrain-then-
finetune). Evaluates on held-out world tasks beside the blind baseline, saves a vlkit model directory
(``<out>/model``) and, beside it, the adapter alone (``<out>/model/adapter.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vlkit.config import Section
from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import load_tokenizer
from vlkit.errors import VlkitError
from vlkit.eval.world import EvalConfig
from vlkit.models.fusion.adapter import AdapterConfig, save_adapter
from vlkit.models.io import load_vlm
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.recipes.common import CACHE_HELP, RecordStream, finish, prepare_output, splits, train_and_evaluate
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything
from vlkit.world.sources import RecordsConfig, load_split


class StreamConfig(Section):
    name: str = Field(..., description="The stream's name (its loss is logged as loss/<name>).")
    data: RecordsConfig = Field(default_factory=RecordsConfig, description="Where its records come from "
                                "(data.tasks picks the tasks).")
    text_only: bool = Field(False, description="Replace each image by its scene written in words (world records): "
                            "language-only instructions, as the paper's GPT-4-LLM data.")
    weight: float = Field(1.0, gt=0, description="Share of the steps drawn from this stream.")
    trainable: list[str] = Field(..., description="Parameter groups its steps update.")


def paper_streams() -> list[StreamConfig]:
    return [StreamConfig(name="captions", data=RecordsConfig(tasks=["caption"]), weight=1.0,
                         trainable=["vpg.projector", "adapter.visual_gates"]),
            StreamConfig(name="instructions", data=RecordsConfig(tasks=["vqa"]), text_only=True, weight=1.0,
                         trainable=["adapter.prompts", "adapter.gates", "adapter.bias_scale", "llm.norms"])]


class AdapterRecipe(Section):
    recipe: Literal["adapter"] = "adapter"
    output_dir: str = Field("runs/adapter")
    init: str | None = Field(None, description="vlkit model directory whose vision stack, VPG and LLM are reused "
                             "(its only fusion must be tokens: the adapter replaces it).")
    model: VLMConfig | None = Field(None, description="Or build from parts (a tower, a VPG, a local LLM directory "
                                    "with its tokenizer), as recipe vpg does; its fusions are the adapter.")
    save_trained_only: bool = Field(False, description="The model directory keeps only the trained tensors and "
                                    "refers to `init` by path and hash (loading it needs `init`, unchanged; set init, "
                                    "not model); default: every tensor.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    streams: list[StreamConfig] = Field(default_factory=paper_streams, min_length=1,
                                        description="Data streams, each with its own groups (the paper's two).")
    order: Literal["joint", "sequential"] = Field("joint", description="joint: streams interleaved by weight; "
                                                  "sequential: one after the other (the released code).")
    eval_data: RecordsConfig | None = Field(None, description="Held-out records (default: the first stream's "
                                            "world, every task).")
    cache_features: bool | Literal["fp16"] = Field(True, description=CACHE_HELP)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _one_start(self):
        if (self.init is None) == (self.model is None):
            raise ValueError("set init (a vlkit model directory) or model (parts), exactly one")
        if self.save_trained_only and self.init is None:
            raise ValueError("save_trained_only: refers to init for the untrained tensors; set init, or drop it")
        return self


def build(cfg: AdapterRecipe, device: str | None = None) -> tuple[VisionLanguageModel, VLProcessor | None]:
    """The model to train: init's parts or cfg.model's, with the adapter as their only fusion (`device="meta"`:
    cfg.model's shapes without weights or files, and no processor)."""
    if cfg.init is not None:
        return with_adapter(*load_vlm(cfg.init), cfg.adapter)
    model_cfg = cfg.model.model_copy(update={"fusions": [{"kind": "adapter", **cfg.adapter.model_dump(mode="json")}]})
    if device == "meta":
        return VisionLanguageModel.build(model_cfg, device="meta"), None
    llm_dir = model_cfg.llm.tokenizer or model_cfg.llm.path
    if not llm_dir:
        raise VlkitError("model.llm.path: the adapter recipe needs an LLM directory (with its tokenizer)")
    tok = load_tokenizer(llm_dir)
    model = VisionLanguageModel.build(model_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                      vocab_size=len(tok))
    return model, VLProcessor.for_model(tok, model)


def with_adapter(model: VisionLanguageModel, processor: VLProcessor,
                 cfg: AdapterConfig) -> tuple[VisionLanguageModel, VLProcessor]:
    """The same vision stack, VPG and LLM with the adapter as their only fusion, and a processor that gives images
    no token slots."""
    kinds = list(model.fusions)
    if kinds not in ([], ["tokens"]):
        raise VlkitError(f"adapter: init's fusions are {kinds}; start from a model whose only fusion is tokens")
    spec = {"kind": "adapter", **cfg.model_dump(mode="json")}
    new = VisionLanguageModel(model.vision, model.vpg, model.llm, model.image_token_id,
                              model.config.model_copy(update={"fusions": [spec]}))
    return new, VLProcessor.for_model(processor.tokenizer, new)


def described(records: list[dict]) -> list[dict]:
    """Records with each image replaced by its scene in words and no image left (a language-only instruction)."""
    from vlkit.recipes.lm import textualize

    return [{**r, "images": [], "messages": textualize(r, 1.0)} for r in records]


def run(cfg: AdapterRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    first, test_recs = splits(cfg.streams[0].data, cfg.eval_data, progress)
    streams = []
    for i, st in enumerate(cfg.streams):
        recs = first if i == 0 else load_split(st.data, "train", progress)
        streams.append(RecordStream(st.name, described(recs) if st.text_only else recs, st.weight, st.trainable))
    seed_everything(cfg.train.seed)
    model, proc = build(cfg)
    groups = model.param_groups()
    for st in cfg.streams:
        unknown = [g for g in st.trainable if g not in groups]
        if unknown:
            raise VlkitError(f"streams ({st.name}).trainable: unknown group(s) {unknown}; choose from "
                             f"{sorted(groups)}")
    model.set_trainable(sorted({g for st in cfg.streams for g in st.trainable}))
    model.train()
    every = [r for st in streams for r in st.records]
    result = train_and_evaluate(model, proc, cfg, every, test_recs, out, resume, overwrite, progress,
                                on_start=record, streams=streams, order=cfg.order,
                                base=cfg.init if cfg.save_trained_only else None)
    save_adapter(model.fusion("adapter"), Path(result["model_dir"]) / "adapter.safetensors")
    return finish(out, {"recipe": "adapter", "init": cfg.init, "order": cfg.order,
                        "streams": {st.name: st.trainable for st in cfg.streams}, **result})
