"""Training recipes, one file each. A config's `recipe:` key picks the file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from pydantic import BaseModel

from vlkit.config import apply_overrides, read_yaml, validate
from vlkit.errors import VlkitError

# name -> (module, config class); each module has run(cfg, resume, overwrite, progress) -> results
RECIPES: dict[str, tuple[str, str]] = {
    "lm": ("vlkit.recipes.lm", "LMRecipe"),
    "clip": ("vlkit.recipes.clip", "CLIPRecipe"),
    "vpg": ("vlkit.recipes.vpg", "VPGRecipe"),
    "instruct": ("vlkit.recipes.instruct", "InstructRecipe"),
    "transfer": ("vlkit.recipes.transfer", "TransferRecipe"),
    "guard": ("vlkit.recipes.guard", "GuardRecipe"),
    "vpgc": ("vlkit.recipes.vpgc", "VPGCRecipe"),
    "ats": ("vlkit.recipes.ats", "ATSRecipe"),
}


def get(name: str) -> tuple[type[BaseModel], Callable]:
    module_name, cls_name = RECIPES[name]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), module.run


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[BaseModel, Callable]:
    """Read a recipe config file (+ overrides) and return (validated config, the recipe's run)."""
    data = apply_overrides(read_yaml(path), overrides, str(path))
    name = data.get("recipe")
    if name is None:
        raise VlkitError(f"{path}: key 'recipe' is missing; set it to one of {sorted(RECIPES)}")
    if name not in RECIPES:
        raise VlkitError(f"{path}: key 'recipe': unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    schema, run = get(name)
    return validate(schema, data, str(path)), run
