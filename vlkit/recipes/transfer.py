"""Recipe `transfer`: VPGTrans (Zhang et al., NeurIPS 2023) - move a trained VPG to another LLM.

    source VLM (tower -> VPG -> LLM_s)          target LLM_t (bigger, or another family)
      1. word converter  E_s -> E_t, a linear map fitted on caption tokens (1 - cosine)
      2. projector init  W_t = W_w W_s, b_t = W_w b_s + b_w  (converter after source projector)
      3. stage 1 warm-up inherit queries + Q-Former; train only the projector, one epoch, lr x 5
      4. stage 2         train queries + Q-Former + projector at the base lr

The tower and both LLMs stay frozen. Every piece can be switched off for ablations: `inherit=false`
(a fresh VPG: training from scratch), `converter.enabled=false` (random projector),
`warmup.enabled=false`, `warmup.lr_scale` 1/5/10. Stage 2 is the `train` section; stage 1 is counted
in the reported steps, samples and seconds (``results.json`` "curve": evaluations at total steps).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.processor import VLProcessor
from vlkit.data.records import message_text
from vlkit.data.tokenizer import load_tokenizer
from vlkit.errors import VlkitError
from vlkit.eval.curves import eval_curve, point
from vlkit.eval.world import EvalConfig, evaluate_vlm
from vlkit.models.io import load_vlm
from vlkit.models.llm import load_llm
from vlkit.models.vlm import LLMSource, VisionLanguageModel
from vlkit.models.vpg import build_vpg
from vlkit.models.vpg.converter import compose_projector, token_pairs, train_converter
from vlkit.recipes.common import CACHE_HELP, finish, image_banks, prepare_output, quick, splits, train_and_evaluate
from vlkit.recipes.vpg import VPGData
from vlkit.train import TrainConfig
from vlkit.train.runtime import seed_everything


class ConverterConfig(Section):
    enabled: bool = Field(True, description="Initialise the target projector through a word converter "
                                            "(false: a randomly initialised projector).")
    tasks: list[str] = Field(["caption"], description="Assistant texts of these tasks are the converter's corpus.")
    unit: Literal["text", "word"] = Field("text", description="Align whole texts (the paper's rule: texts both "
                                          "tokenizers split into equally many tokens) or each word on its own "
                                          "(more pairs when long texts rarely split alike).")
    steps: int = Field(300, gt=0, description="Full-batch Adam steps on the token pairs.")
    lr: float = Field(1e-2, gt=0)
    match_norm: bool = Field(True, description="Scale the fitted map so that converted embeddings have the target "
                                               "embeddings' mean length (the cosine loss leaves the scale free; "
                                               "false: keep the scale the optimiser ended at).")


class WarmupConfig(Section):
    enabled: bool = Field(True, description="Stage 1: train only the projector before fine-tuning.")
    epochs: float = Field(1.0, gt=0, description="Passes over the warm-up records.")
    lr_scale: float = Field(5.0, gt=0, description="Warm-up learning rate = train.lr x this (paper: 5).")
    max_records: int | None = Field(None, gt=0, description="Warm up on the first N train records (default: all).")


class TransferRecipe(Section):
    recipe: Literal["transfer"] = "transfer"
    output_dir: str = Field("runs/transfer")
    source: str = Field(..., description="The trained source VLM directory (recipe `vpg`).")
    target: LLMSource = Field(..., description="The target LLM (local HF directory with its tokenizer).")
    inherit: bool = Field(True, description="Inherit the source's queries and Q-Former (false: fresh VPG).")
    converter: ConverterConfig = Field(default_factory=ConverterConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    trainable: list[str] = Field(["vpg.queries", "vpg.qformer", "vpg.projector"], description="Stage-2 groups.")
    max_length: int | None = Field(None, gt=0, description="Token budget (default: the source's).")
    data: VPGData = Field(default_factory=VPGData)
    eval_data: VPGData | None = Field(None, description="Held-out records (default: data's world, every task).")
    cache_features: bool | Literal["fp16"] = Field(True, description=CACHE_HELP)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage 2 (fine-tuning) at the base lr.")


def projector_of(vpg: nn.Module) -> nn.Linear:
    """The linear layer that writes into the LLM's width (each VPG names its own)."""
    if not hasattr(vpg, "out_projection"):
        raise VlkitError(f"transfer: VPG {type(vpg).__name__} names no output projection to convert")
    return vpg.out_projection()


def build_target(cfg: TransferRecipe) -> tuple[VisionLanguageModel, VLProcessor, VisionLanguageModel]:
    """(target VLM with a fresh VPG of the source's shape, its processor, the source VLM)."""
    source, src_proc = load_vlm(cfg.source)
    if not cfg.target.path:
        raise VlkitError("target.path: the transfer recipe needs the target LLM's directory (with its tokenizer)")
    tok = load_tokenizer(cfg.target.tokenizer or cfg.target.path)
    if "<image>" not in tok.get_vocab():
        raise VlkitError(f"{cfg.target.tokenizer or cfg.target.path}: tokenizer has no <image> token; prepare it "
                         "with vlkit's tokenizer tools first")
    llm = load_llm(cfg.target.path)
    if len(tok) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tok))
    trained = [k for k, f in source.fusions.items() if any(True for _ in f.parameters())]
    if trained:
        raise VlkitError(f"{cfg.source}: holds the {', '.join(trained)} fusion, trained on its own LLM; VPGTrans moves "
                         "the VPG alone: transfer from the model before that fusion was added")
    seed_everything(cfg.train.seed)
    vcfg = source.config.model_copy(deep=True)
    vcfg.llm = cfg.target
    if cfg.max_length:
        vcfg.max_length = cfg.max_length
    vision = source.vision
    vpg = build_vpg(vcfg.vpg, vision.width, llm.config.get_text_config().hidden_size, vision.num_tokens)
    model = VisionLanguageModel(vision, vpg, llm, tok.convert_tokens_to_ids("<image>"), vcfg)
    return model, VLProcessor.for_model(tok, model), source


def corpus(records: list[dict], tasks: list[str], unit: str = "text") -> list[str]:
    texts = [message_text(m) for r in records if r.get("task") in tasks for m in r["messages"]
             if m["role"] == "assistant"]
    return texts if unit == "text" else [w for t in texts for w in t.split()]


def initialise(model: VisionLanguageModel, target_tok, source: VisionLanguageModel, source_tok,
               cfg: TransferRecipe, texts: list[str], progress: bool | None = None) -> dict:
    """Inherit the VPG body (queries, Q-Former) and set the projector to converter o source projector."""
    info: dict = {"inherit": cfg.inherit, "converter": None}
    if not cfg.inherit:
        return info
    head = projector_of(source.vpg)
    skip = next(name for name, m in source.vpg.named_modules() if m is head) + "."
    body = {k: v for k, v in source.vpg.state_dict().items() if not k.startswith(skip)}
    try:
        missing, unexpected = model.vpg.load_state_dict(body, strict=False)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:200]
        raise VlkitError(f"{cfg.source}: the source VPG does not fit the target's ({reason})") from None
    if unexpected or any(not k.startswith(skip) for k in missing):
        raise VlkitError(f"{cfg.source}: the source VPG does not match the target's (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]})")
    if cfg.converter.enabled:
        t0 = time.perf_counter()
        pairs = token_pairs(source_tok, target_tok, texts)
        conv, stats = train_converter(source.llm.get_input_embeddings().weight,
                                      model.llm.get_input_embeddings().weight, pairs, cfg.converter.steps,
                                      cfg.converter.lr, seed=cfg.train.seed, progress=progress,
                                      match_norm=cfg.converter.match_norm)
        projector_of(model.vpg).load_state_dict(compose_projector(head, conv).state_dict())
        info["converter"] = {**stats, "seconds": time.perf_counter() - t0}
    return info


class _Stage(Section):
    """What train_and_evaluate reads from a config, for one stage."""

    recipe: str
    train: TrainConfig
    eval: EvalConfig
    cache_features: bool | str


def run(cfg: TransferRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    train_recs, test_recs = splits(cfg.data, cfg.eval_data, progress)
    model, proc, source = build_target(cfg)
    init = initialise(model, proc.tokenizer, source, load_tokenizer(cfg.source), cfg,
                      corpus(train_recs, cfg.converter.tasks, cfg.converter.unit), progress)
    del source
    model.set_trainable(cfg.trainable)
    bank, test_bank, feature_seconds = image_banks(model, proc, train_recs, test_recs, cfg.cache_features, out,
                                                   progress)
    during = quick(cfg.eval)
    done = {"step": 0, "samples": 0, "train_seconds": (init["converter"] or {}).get("seconds", 0.0)}
    curve = [point(done, {"step": 0, "samples": 0, "train_seconds": 0.0},
                    evaluate_vlm(model.eval(), proc, test_recs, during, test_bank)["image"])]
    stages: dict = {}
    if cfg.inherit and cfg.warmup.enabled:
        warm = train_recs[: cfg.warmup.max_records]
        steps = max(1, math.ceil(cfg.warmup.epochs * len(warm) / (cfg.train.batch_size * cfg.train.grad_accum)))
        tc = cfg.train.model_copy(update={"steps": steps, "lr": cfg.train.lr * cfg.warmup.lr_scale,
                                          "warmup_steps": min(cfg.train.warmup_steps, steps // 10),
                                          "eval_every": 0})
        model.set_trainable(["vpg.projector"])
        stage = _Stage(recipe="transfer/warmup", train=tc, eval=during, cache_features=cfg.cache_features)
        r = train_and_evaluate(model, proc, stage, warm, test_recs, out / "warmup", resume, overwrite, progress,
                               save=False, banks=(bank, test_bank), on_start=record)
        stages["warmup"] = _brief(r)
        curve.append(point(done, {"step": steps, "samples": steps * tc.batch_size * tc.grad_accum,
                                   "train_seconds": r["train_seconds"]}, r["eval"]["image"]))
        done = {k: curve[-1][k] for k in done}
        model.set_trainable(cfg.trainable)
    stage = _Stage(recipe="transfer/finetune", train=cfg.train, eval=cfg.eval, cache_features=cfg.cache_features)
    r = train_and_evaluate(model, proc, stage, train_recs, test_recs, out / "finetune", resume, overwrite, progress,
                           banks=(bank, test_bank), model_dir=out / "model", on_start=record)
    stages["finetune"] = _brief(r)
    curve += eval_curve(r["history"], done)
    return finish(out, {"recipe": "transfer", "source": cfg.source, "target": cfg.target.path, "init": init,
                        "warmup": cfg.warmup.model_dump() if cfg.inherit and cfg.warmup.enabled else None,
                        "stages": stages, "curve": curve, "feature_seconds": feature_seconds,
                        "steps": done["step"] + cfg.train.steps,
                        "samples": done["samples"] + cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum,
                        "train_seconds": done["train_seconds"] + r["train_seconds"], "eval": r["eval"],
                        "model_dir": str(out / "model"), "trainable_params": r["trainable_params"],
                        "total_params": r["total_params"]})


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("steps", "train_seconds", "feature_seconds", "trainable_params")}
