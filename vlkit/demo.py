"""`vlkit demo`: the embedded-default pipeline, end to end, on the shapes world.

world -> tokenizers + tiny LLMs (LLaMA, OPT) -> world ViT (CLIP-style), then a results table and
``<out>/report.md``. Every stage is cached by its config: a second run reuses finished stages.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlkit.fileio import write_text
from vlkit.recipes import load_config
from vlkit.recipes.common import cached_results
from vlkit.world.dataset import build, info
from vlkit.world.preview import preview_records

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "world"

STAGES = (
    ("lm_llama_small", "tiny LLaMA"),
    ("lm_opt_small", "tiny OPT"),
    ("clip_vit", "world ViT (CLIP)"),
)


def run_demo(out: str | Path = "runs/demo", fresh: bool = False, progress: bool | None = None,
             config_dir: Path = CONFIG_DIR) -> dict:
    console = Console(stderr=True)
    out = Path(out)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    cfg, _ = load_config(config_dir / f"{STAGES[0][0]}.yaml")
    t0 = time.perf_counter()
    world_dir = build(cfg.data.world, progress=progress)
    timings["world"] = time.perf_counter() - t0
    counts = info(world_dir)["counts"]
    console.print(f"[bold]world[/bold] {counts['train']['scenes']} train / {counts['test']['scenes']} held-out "
                  f"scenes, {counts['train']['records']} records ({timings['world']:.1f}s) -> {world_dir}")
    from vlkit.data.records import load_records

    sample = load_records(world_dir / "test.jsonl")[:6]
    preview_records(sample, out / "world_preview.png", title="shapes world: held-out samples")

    for name, label in STAGES:
        cfg, run = load_config(config_dir / f"{name}.yaml", [f"output_dir={out / name}"])
        t0 = time.perf_counter()
        cached = None if fresh else cached_results(cfg, out / name)
        if cached is not None:
            console.print(f"[bold]{label}[/bold]: cached in {out / name}")
            results[name] = cached
        else:
            console.print(f"[bold]{label}[/bold]: training ({cfg.train.steps} steps) -> {out / name}")
            results[name] = run(cfg, overwrite=True, progress=progress)
        timings[name] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    table, md = summary(results, timings)
    Console(width=120).print(table)
    write_text(out / "report.md", md)
    console.print(f"report: {out / 'report.md'}")
    return {"results": results, "timings": timings}


def summary(results: dict[str, dict], timings: dict[str, float]) -> tuple[Table, str]:
    table = Table(title="vlkit demo: held-out results on the shapes world")
    for col in ("stage", "model", "parameters", "metric", "value", "reference", "time"):
        table.add_column(col)
    rows = []
    for name, label in STAGES:
        r = results[name]
        if r["recipe"] == "lm":
            rows.append((name, label, f"{r['params']:,}", "perplexity", f"{r['heldout_ppl']:.3f}",
                         f"uniform: {r['vocab_size']}", f"{timings[name]:.0f}s"))
        else:
            rows.append((name, label, f"{r['vision_params']:,}", "image->caption R@1", f"{r['heldout_i2t_r1']:.3f}",
                         f"chance: {r['heldout_chance']:.4f}", f"{timings[name]:.0f}s"))
    for row in rows:
        table.add_row(*row)
    md = ["# vlkit demo report", "", "Held-out results on the shapes world (every figure measured by this run).", "",
          "| stage | model | parameters | metric | value | reference | time |", "|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", f"Total time: {timings['total']:.0f}s (world generation {timings['world']:.1f}s).", "",
           "![held-out samples](world_preview.png)", ""]
    return table, "\n".join(md)
