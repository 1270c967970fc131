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
