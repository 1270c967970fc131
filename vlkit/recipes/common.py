"""What every recipe does around the trainer: output directory, config copy, results, caching."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from vlkit.config import to_yaml
from vlkit.errors import VlkitError
from vlkit.fileio import read_json, stable_hash, write_json, write_text


# Settings added after runs were cached, with the value that reproduces those runs: left out of the hash at
# that value, so adding a setting does not invalidate every finished run.
LATER_SETTINGS = {("train", "length_groups"): 1}


def config_hash(cfg: BaseModel) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("output_dir", None)
    for (section, key), old in LATER_SETTINGS.items():
        if isinstance(data.get(section), dict) and data[section].get(key, old) == old:
            data[section].pop(key, None)
    return stable_hash(data)


def prepare_output(cfg: BaseModel, out: Path, resume: bool) -> None:
    """Create `out` and record the config; refuse to mix a resumed run with a different config."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    if resume and (out / "run.json").is_file():
        old = read_json(out / "run.json").get("config_hash")
        if old and old != config_hash(cfg):
            raise VlkitError(f"{out}: was written by a different config; resume with the same config and "
                             "overrides, or choose another output_dir")
    write_text(saved, to_yaml(cfg))
    write_json(out / "run.json", {"config_hash": config_hash(cfg), "recipe": getattr(cfg, "recipe", None)})


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
