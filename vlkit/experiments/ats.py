"""ATS fine-tuning in miniature: the same tiny LLaMA trained on CoT, ATS-BFS or ATS-DFS gold traces.

    vlkit experiment ats [--out runs/ats] [--seeds 3] [--only cot --only ats-bfs ...]

The paper (Zhang, Ye, Shen, Gan 2023, Sec. 4.3) fine-tunes LLaMA-2 7B/13B on GPT-4's ATS responses and
reports ATS-tuned models beating CoT-tuned ones by ~40 points on its four games. Here each run is the
`ats` recipe (configs/world/ats.yaml) with only `data.format` changed: same model size, same training
instances and solutions, same steps and batch size, one tokenizer; once per seed (`train.seed`). Every model
answers the same held-out instances of each game (HELD_OUT: 1,040 in all, every distinct test instance the
procedural arithmetic and water games hold); the games' verifiers judge. Comparisons: paired bootstrap over the
instances, each instance's difference averaged over the seeds (vlkit.eval.stats). Writes <out>/report.md (claim
by claim), results.json and a bar chart.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vlkit.eval import stats
from vlkit.experiments import provenance_line, publish, save_png
from vlkit.experiments.stages import Stages
from vlkit.fileio import read_json

FORMATS = {"cot": "CoT-tuned", "ats-bfs": "ATS-BFS-tuned", "ats-dfs": "ATS-DFS-tuned"}
HELD_OUT = {"water": 120, "arithmetic": 120, "numpath": 250, "grass": 250, "game24": 300}
PAPER_GAIN = {"7B": 40.6, "13B": 38.5}  # ATS-tuned - CoT-tuned LLaMA-2, average points (Sec. 4.3)


def seeded(fmt: str, seed: int) -> str:
    return fmt if seed == 0 else f"{fmt}_s{seed}"


def run_experiment(out: str | Path = "runs/ats", demo: str | Path | None = None,
                   progress: bool | None = None, only: list[str] | None = None, seeds: int = 3) -> dict:
    console = Console(stderr=True)
    out = Path(out)
    t_all = time.perf_counter()
    stages, runs = Stages(console, progress), {}
    held = "{" + ", ".join(f"{g}: {n}" for g, n in HELD_OUT.items()) + "}"
    for fmt in FORMATS:
        if only and fmt not in only:
            continue
        for seed in range(seeds):
            name = seeded(fmt, seed)
            runs[name] = stages.run(name, [f"output_dir={out / name}", f"data.format={fmt}", f"train.seed={seed}",
                                           f"eval.test_per_game={held}"], config="ats")
    return publish(out, summarize(runs, out, seeds), stages.seconds, t_all, lambda s: plot(s, out), report, console)


def correct(out: Path, name: str) -> dict[tuple[str, str], float]:
    """(game, instance id) -> 1.0 if the verifier accepted the run's answer, else 0.0."""
    return {(r["game"], str(r["id"])): float(r["correct"]) for r in read_json(out / name / "eval_rows.json")}


def summarize(runs: dict[str, dict], out: Path, seeds: int) -> dict:
    s: dict = {"seeds": seeds, "runs": {}, "formats": {}}
    for name, r in runs.items():
        per_game = {e["game"]: e for e in r["eval"]}
        n = sum(e["n"] for e in per_game.values())
        fmt, _, seed = name.partition("_s")
        s["runs"][name] = {
            "label": FORMATS[fmt] + (f" (seed {seed})" if seed else ""), "format": fmt, "params": r["params"],
            "train_examples": r["train_examples"],
            "dropped_too_long": r["dropped_too_long"], "train_tokens": r["train_tokens"], "steps": r["steps"],
            "train_seconds": r["train_seconds"],
            "games": {g: {k: e[k] for k in ("n", "accuracy", "tokens_per_answer", "goal_marked", "tree_nodes")}
                      for g, e in per_game.items()},
            "accuracy": sum(e["solved"] for e in per_game.values()) / n,
            "tokens_per_answer": sum(e["tokens_per_answer"] * e["n"] for e in per_game.values()) / n}
    hits = {name: correct(out, name) for name in runs}
    keys = sorted(set.intersection(*(set(h) for h in hits.values()))) if hits else []
    for fmt in FORMATS:
        names = [seeded(fmt, k) for k in range(seeds) if seeded(fmt, k) in runs]
        if names:
            s["formats"][fmt] = {"label": FORMATS[fmt], "runs": names,
                                 "over_seeds": stats.over_seeds([100 * s["runs"][n]["accuracy"] for n in names]),
                                 "interval": stats.interval([sum(hits[n][k] for n in names) / len(names) * 100
                                                             for k in keys])}
    if "cot" in s["formats"]:
        cot = [[100 * hits[n][k] for k in keys] for n in s["formats"]["cot"]["runs"]]
        s["vs_cot"] = {}
        for fmt in s["formats"]:
            mine = [[100 * hits[n][k] for k in keys] for n in s["formats"][fmt]["runs"]]
            if fmt != "cot" and len(mine) == len(cot):
                s["vs_cot"][fmt] = stats.paired_over_seeds(cot, mine)
    s["n"] = len(keys)
    s["claims"] = claims(s)
    return s


def claims(s: dict) -> list[dict]:
    rows = []
    for fmt, p in s.get("vs_cot", {}).items():
        rows.append({"claim": f"{FORMATS[fmt]} beats CoT-tuned (same model, data and steps)",
                     "paper": f"+{PAPER_GAIN['7B']} (LLaMA-2 7B), +{PAPER_GAIN['13B']} (13B) points on average",
                     "ours": f"{p['b']:.1f}% vs {p['a']:.1f}%, {stats.fmt_paired(p, 1)} points (paired over "
                             f"{p['n']} held-out instances, {p['seeds']} seed{'s' if p['seeds'] != 1 else ''})",
                     "verdict": stats.verdict(p)})
    return rows


def plot(s: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = s["runs"]
    games = list(next(iter(runs.values()))["games"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(runs)
    for k, r in enumerate(runs.values()):
        x = np.arange(len(games)) + k * width
        axes[0].bar(x, [100 * r["games"][g]["accuracy"] for g in games], width, label=r["label"])
        axes[1].bar(x, [r["games"][g]["tokens_per_answer"] for g in games], width, label=r["label"])
    for ax, title in zip(axes, ("held-out accuracy (%)", "tokens per answer")):
        ax.set_xticks(np.arange(len(games)) + 0.4 - width / 2)
        ax.set_xticklabels(games)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Tiny LLaMA fine-tuned on gold CoT / ATS-BFS / ATS-DFS traces (same size, data and steps)")
    fig.tight_layout()
    return save_png(fig, out / "accuracy.png")


def report(s: dict, chart: str) -> str:
    runs = s["runs"]
    names = list(runs)
    games = list(runs[names[0]]["games"])
    first = runs[names[0]]
    md = ["# ATS fine-tuning in miniature: CoT-tuned vs ATS-BFS-tuned vs ATS-DFS-tuned", "",
          f"One tiny LLaMA ({first['params']:,} parameters) per trace format, trained for {first['steps']} steps on "
          f"the same {first['train_examples'] + first['dropped_too_long']:,} training instances (gold traces written "
          "by the exact solvers, loss on the trace only), then asked the bare question of held-out instances "
          "(greedy); answers are judged by the games' verifiers. Game of 24: rows 900-... of 24.csv.", "",
          "## Claims", "", "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    md += [f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" for c in s["claims"]]
    md += ["", f"## Accuracy over seeds ({s['seeds']} per format; {s['n']} held-out instances)", "",
           "| format | accuracy, mean over seeds ± SD | per instance, seeds averaged (95% CI) |", "|---|---|---|"]
    md += [f"| {f['label']} | {stats.fmt(f['over_seeds'], 1)} | {stats.fmt(f['interval'], 1)} |"
           for f in s["formats"].values()]
    md += ["", "## Accuracy on held-out instances, per run", "",
          "| game | n | " + " | ".join(runs[n]["label"] for n in names) + " |", "|---|---|" + "---|" * len(names)]
    md += [f"| {g} | {first['games'][g]['n']} | " + " | ".join(f"{100 * runs[n]['games'][g]['accuracy']:.1f}%"
                                                               for n in names) + " |" for g in games]
    md += ["| **all** | | " + " | ".join(f"**{100 * runs[n]['accuracy']:.1f}%**" for n in names) + " |"]
    md += ["", "## Tokens per answer (generated)", "",
           "| game | " + " | ".join(runs[n]["label"] for n in names) + " |", "|---|" + "---|" * len(names)]
    md += [f"| {g} | " + " | ".join(f"{runs[n]['games'][g]['tokens_per_answer']:.0f}" for n in names) + " |"
           for g in games]
    md += ["| **all** | " + " | ".join(f"**{runs[n]['tokens_per_answer']:.0f}**" for n in names) + " |"]
    ats = [n for n in names if n != "cot"]
    if ats:
        md += ["", "## Search trees written (ATS runs)", "", "| game | " + " | ".join(
            f"{runs[n]['label']} goal marked | nodes" for n in ats) + " |", "|---|" + "---|---|" * len(ats)]
        md += [f"| {g} | " + " | ".join(f"{100 * (runs[n]['games'][g]['goal_marked'] or 0):.0f}% | "
                                        f"{runs[n]['games'][g]['tree_nodes'] or 0:.1f}" for n in ats) + " |"
               for g in games]
    md += ["", "## Training", "",
           "| run | examples (dropped: too long) | tokens per epoch (question + trace) | train seconds |",
           "|---|---|---|---|"]
    md += [f"| {runs[n]['label']} | {runs[n]['train_examples']:,} ({runs[n]['dropped_too_long']}) | "
           f"{runs[n]['train_tokens']:,} | {runs[n]['train_seconds']:.0f} |" for n in names]
    md += ["", f"![accuracy and tokens]({chart})", "", "Wall seconds per run in the invocation that wrote this "
           "report (a run found cached costs ~0): " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".",
           "", provenance_line(s["provenance"]), ""]
    return "\n".join(md)
