"""Training recipes, one file each. A config's `recipe:` key picks the file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

from pydantic import BaseModel

from vlkit.config import apply_overrides, read_yaml, validate
from vlkit.errors import VlkitError

# the configs that ship inside the package (a checkout also has them as ./configs)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

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
    "adapter": ("vlkit.recipes.adapter", "AdapterRecipe"),
    "illama": ("vlkit.recipes.illama", "ILlamaRecipe"),
    "classify": ("vlkit.recipes.classify", "ClassifyRecipe"),
}


def get(name: str) -> tuple[type[BaseModel], Callable]:
    module_name, cls_name = RECIPES[name]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), module.run


def find_config(path: str | Path) -> Path:
    """A config file as given, else the packaged config of that name (`configs/world/vpg_qformer.yaml`,
    `world/vpg_qformer.yaml` and `world/vpg_qformer` all name it), so an installed vlkit runs its own configs."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    for candidate in (CONFIGS / rel, (CONFIGS / rel).with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    return path


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[BaseModel, Callable]:
    """Read a recipe config file (+ overrides) and return (validated config, the recipe's run)."""
    path = find_config(path)
    data = apply_overrides(read_yaml(path), overrides, str(path))
    name = data.get("recipe")
    if name is None:
        raise VlkitError(f"{path}: key 'recipe' is missing; set it to one of {sorted(RECIPES)}")
    if not isinstance(name, str) or name not in RECIPES:
        raise VlkitError(f"{path}: key 'recipe': unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    schema, run = get(name)
    return validate(schema, data, str(path)), run
