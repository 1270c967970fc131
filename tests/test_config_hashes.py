"""Settings added later must not invalidate finished runs: every packaged config hashes (run hash and world
dataset key) exactly as it did before they existed. The fixture holds the figures computed at commit 081f5a9, the
last commit before SPHINX's settings (model.mix, model.tiles, instructions, batch_by_task, world text_size /
aspects / size_scale / smalltext_size, instruct tiles / max_length); a config changed on purpose updates it."""

import json
from pathlib import Path

import pytest

from vlkit.recipes import CONFIGS, load_config
from vlkit.recipes.common import config_hash
from vlkit.world.dataset import dataset_dir

PINNED = json.loads((Path(__file__).parent / "fixtures" / "config_hashes.json").read_text())["hashes"]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_packaged_config_keeps_the_hash_its_finished_runs_carry(name):
    cfg, _ = load_config(CONFIGS / name, [])
    data = getattr(cfg, "data", None)
    key = dataset_dir(data.world).name if data is not None and hasattr(data, "world") else None
    assert [config_hash(cfg), key] == PINNED[name]
