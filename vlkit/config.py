"""Typed configs: YAML files plus ``key=value`` overrides, validated by pydantic.

A config names a recipe; each recipe declares its config class (a :class:`Section` subclass)
with every key documented where it is declared. Unknown keys and wrong types are errors that
name the key and the file.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vlkit.errors import VlkitError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Replace ${NAME} and ${NAME:-default} with environment values (real checkpoints' paths)."""
    return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VlkitError(f"{path}: config file not found; check the path")
    try:
        data = yaml.safe_load(expand_env(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VlkitError(f"{path}:{where} malformed YAML ({problem}); fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VlkitError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str = "command line") -> dict[str, Any]:
    """Return a copy of `data` with dotted ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise VlkitError(f"{source}: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise VlkitError(f"{source}: override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise VlkitError(f"{source}: override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    """Validate `data` against `schema`; the first problem becomes a one-line error naming key and file."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the recipe's config"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise VlkitError(f"{source}: key '{key}': {msg}{more}") from None


def load(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config of type `schema` from a YAML file (optional) and overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    data = apply_overrides(data, overrides, source)
    return validate(schema, data, source)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
