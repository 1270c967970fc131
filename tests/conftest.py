"""Shared fixtures: an isolated cache, tiny world datasets and tiny tokenizers built once per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlkit-cache")
    old = os.environ.get("VLKIT_CACHE")
    os.environ["VLKIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VLKIT_CACHE", None)
    else:
        os.environ["VLKIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_world(isolated_cache):
    from vlkit.world import WorldData, build

    cfg = WorldData(seed=7, train_scenes=150, test_scenes=30)
    return cfg, build(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_world):
    from vlkit.data.records import load_records
    from vlkit.data.tokenizer import train_bpe
    from vlkit.recipes.lm import bpe_texts

    _, root = tiny_world
    return train_bpe(bpe_texts(load_records(root / "train.jsonl")), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tiny_world):
    from vlkit.config import load
    from vlkit.recipes.lm import LMRecipe, run

    cfg_w, _ = tiny_world
    out = tmp_path_factory.mktemp("lm")
    cfg = load(LMRecipe, None, [f"output_dir={out}", f"data.world.seed={cfg_w.seed}",
                                f"data.world.train_scenes={cfg_w.train_scenes}",
                                f"data.world.test_scenes={cfg_w.test_scenes}", "data.block_size=64",
                                "tokenizer.vocab_size=400", "model.hidden_size=48", "model.num_layers=2",
                                "model.num_heads=2", "model.intermediate_size=96", "train.steps=30",
                                "train.batch_size=16", "train.lr=5e-3", "train.progress=false"])
    run(cfg)
    return out / "model"


@pytest.fixture(scope="session")
def tiny_tower(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlkit.models.vision.clip import ViTConfig, image_processor

    out = tmp_path_factory.mktemp("tower")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=64, patch_size=16)).save_pretrained(out)
    image_processor(ViTConfig()).save_pretrained(out)
    return out
