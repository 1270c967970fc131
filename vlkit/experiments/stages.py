"""The stage runner shared by `vlkit demo` and every experiment.

A stage is a recipe config (by name, from ``configs/world/`` unless told otherwise) plus overrides. It
runs once: a finished run of exactly that config in its ``output_dir`` is reused. A stage is retrained
whenever a stage it reads from (`after`) was retrained in the same run, since its inputs changed.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vlkit.recipes import CONFIGS, load_config
from vlkit.recipes.common import cached_results

WORLD_CONFIGS = CONFIGS / "world"


class Stages:
    def __init__(self, console: Console | None = None, progress: bool | None = None, fresh: bool = False,
                 config_dir: Path = WORLD_CONFIGS):
        self.console = console or Console(stderr=True)
        self.progress, self.fresh, self.config_dir = progress, fresh, Path(config_dir)
        self.trained: set[str] = set()      # stages (re)trained in this run
        self.results: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, overrides: list[str], config: str | None = None, after: tuple[str, ...] = (),
            force: bool = False, label: str | None = None) -> dict:
        """The results of stage `name` (config `config`, default `name`), trained unless cached; `label` names
        it in what is printed."""
        label = label or name
        cfg, run = load_config(self.config_dir / f"{config or name}.yaml", overrides)
        t0 = time.perf_counter()
        stale = self.fresh or force or any(d in self.trained for d in after)
        cached = None if stale else cached_results(cfg, Path(cfg.output_dir))
        if cached is not None:
            self.console.print(f"[bold]{label}[/bold]: cached in {cfg.output_dir}")
            result = cached
        else:
            steps = getattr(getattr(cfg, "train", None), "steps", None)
            self.console.print(f"[bold]{label}[/bold]: training{f' ({steps} steps)' if steps else ''} -> "
                               f"{cfg.output_dir}")
            result = run(cfg, overwrite=True, progress=self.progress)
            self.trained.add(name)
            self.console.print(f"[bold]{label}[/bold]: done in {time.perf_counter() - t0:.0f}s")
        self.seconds[name] = time.perf_counter() - t0
        self.results[name] = result
        return result

    def retrained(self, *names: str) -> bool:
        """Whether any of these stages was (re)trained in this run."""
        return any(n in self.trained for n in names)
