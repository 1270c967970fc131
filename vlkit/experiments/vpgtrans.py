"""VPGTrans on the science bench: transfer a VPG to another LLM against training it from scratch.

    vlkit experiment vpgtrans [--out runs/vpgtrans] [--bench runs/bench] [--seeds 3]

Uses the bench (`vlkit bench build`): its world ViT and its three LLMs. Trains the source VLM, a Q-Former VPG
to convergence on the frozen small LLaMA (the paper transfers converged VPGs), then, every run evaluated at
the same interval on the same held-out captions (CIDEr) and questions (VQA accuracy):
  headline, each with `--seeds` seeds (training order and initialisation; the source VPG is one):
    small -> large LLaMA (same tokenizer): from scratch vs VPGTrans;
    small LLaMA -> OPT (different tokenizers): from scratch vs VPGTrans;
  ablations (seed 0, a short schedule beside VPGTrans on the same one): no converter (random projector),
    no warm-up, warm-up lr x1 / x10 (VPGTrans: x5); and large LLaMA -> OPT, the larger source.
Speed-up as the paper defines it, read off the seed-averaged curves: the step at which from scratch reaches
its best score, divided by the first step at which VPGTrans exceeds that score (stage 1 counted in full);
per seed too (mean and spread). Final quality: paired bootstrap over the held-out items of every seed pair.
Writes <out>/report.md (claim by claim), results.json and PNG plots.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vlkit.eval import stats
from vlkit.eval.curves import speedup, steps_to_reach, times
from vlkit.experiments import provenance, provenance_line, save_png
from vlkit.experiments.bench import BENCH_CONFIGS, DEFAULT_OUT as BENCH, load_bench, model_dir
from vlkit.errors import VlkitError
from vlkit.experiments.stages import Stages
from vlkit.fileio import write_json, write_text

METRICS = (("caption_cider", "caption CIDEr"), ("vqa_acc", "VQA accuracy"))
PAPER_SPEEDUP = 10.0  # VPGTrans (Zhang et al. 2023): over 10x fewer training steps, OPT-350M -> OPT-2.7B
FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # targets, as fractions of from scratch's best
SHORT = "train.steps=100"  # ablations: the early part of training is what they compare

# pair -> (from-scratch run, VPGTrans run, config, target bench LM, from-scratch overrides)
PAIRS: dict[str, tuple[str, str, str, str]] = {
    "small_to_large": ("scratch_large", "vpgtrans_large", "transfer_small_to_large", "lm_large"),
    "llama_to_opt": ("scratch_opt", "vpgtrans_opt", "transfer_to_opt", "lm_opt"),
}
SCRATCH = ["inherit=false", "train.steps=1200"]  # from scratch runs to its plateau
ABLATIONS: dict[str, tuple[str, str, list[str]]] = {  # name -> (config, source: small|large, overrides)
    "vpgtrans_short": ("transfer_small_to_large", "small", [SHORT]),
    "no_converter": ("transfer_small_to_large", "small", [SHORT, "converter.enabled=false"]),
    "no_warmup": ("transfer_small_to_large", "small", [SHORT, "warmup.enabled=false"]),
    "warmup_lr_x1": ("transfer_small_to_large", "small", [SHORT, "warmup.lr_scale=1"]),
    "warmup_lr_x10": ("transfer_small_to_large", "small", [SHORT, "warmup.lr_scale=10"]),
    "vpgtrans_opt_from_large": ("transfer_to_opt", "large", []),
}


def seeded(name: str, seed: int) -> str:
    return f"{name}_s{seed}"


def run_experiment(out: str | Path = "runs/vpgtrans", bench: str | Path = BENCH, progress: bool | None = None,
                   only: list[str] | None = None, seeds: int = 3) -> dict:
    console = Console(stderr=True)
    out, bench = Path(out), Path(bench)
    only = selection(only)
    bench_summary = load_bench(bench, need=("lm_small", "lm_large", "lm_opt", "vit"))
    if not bench_summary.get("passed"):
        console.print(f"[yellow]warning[/yellow]: a bench model missed its gate ({bench / 'report.md'}); the "
                      "report says so beside every figure")
    t_all = time.perf_counter()
    stages = Stages(console, progress, config_dir=BENCH_CONFIGS)
    source_run = stages.run("source_small", [f"output_dir={out / 'source_small'}",
                                             f"model.tower.path={model_dir('vit', bench)}",
                                             f"model.llm.path={model_dir('lm_small', bench)}"], config="vpg_source")
    sources = {"small": out / "source_small" / "model", "large": out / seeded("scratch_large", 0) / "model"}

    def transfer(name: str, config: str, target: str, source: str, extra: list[str]) -> dict:
        over = [f"output_dir={out / name}", f"source={sources[source]}", f"target.path={model_dir(target, bench)}",
                "eval.blind=false", *extra]  # the report compares runs, not image vs blind
        upstream = ("source_small",) + ((seeded("scratch_large", 0),) if source == "large" else ())
        return stages.run(name, over, config=config, after=upstream)

    runs: dict[str, dict] = {}
    for pair, (scratch, trans, config, target) in PAIRS.items():
        if only and pair not in only:
            continue
        for seed in range(seeds):
            for name, extra in ((scratch, SCRATCH), (trans, [])):
                runs[seeded(name, seed)] = transfer(seeded(name, seed), config, target, "small",
                                                    [*extra, f"train.seed={seed}"])
    for name, (config, source, extra) in ABLATIONS.items():
        if only and name not in only:
            continue
        if source == "large" and seeded("scratch_large", 0) not in runs:  # its source: seed 0 from scratch
            runs[seeded("scratch_large", 0)] = transfer(seeded("scratch_large", 0), "transfer_small_to_large",
                                                        "lm_large", "small", [*SCRATCH, "train.seed=0"])
        runs[name] = transfer(name, config, "lm_opt" if "opt" in config else "lm_large", source, extra)
    summary = summarize(runs, seeds)
    summary["bench_passed"] = bool(bench_summary.get("passed"))
    summary["source"] = {"steps": source_run["steps"],
                         **{m: source_run["eval"]["image"].get(m) for m, _ in METRICS}}
    summary["total_seconds"] = time.perf_counter() - t_all
    summary["seconds"] = {k: round(v, 1) for k, v in stages.seconds.items()}
    summary["provenance"] = provenance()
    write_json(out / "results.json", summary)
    plots = plot(runs, summary, out)
    write_text(out / "report.md", report(summary, plots))
    console.print(f"report: {out / 'report.md'} ({summary['total_seconds']:.0f}s)")
    return summary


def selection(only: list[str] | None) -> list[str] | None:
    """What `--only` names, checked: pairs (every seed of both arms) or ablations; an ablation brings the run
    it is compared with (vpgtrans_short)."""
    if not only:
        return None
    known = [*PAIRS, *ABLATIONS]
    unknown = [n for n in only if n not in known]
    if unknown:
        raise VlkitError(f"experiment vpgtrans --only: unknown {unknown}; choose from {known}")
    chosen = list(only)
    if any(n in ABLATIONS and n != "vpgtrans_opt_from_large" for n in chosen) and "vpgtrans_short" not in chosen:
        chosen.append("vpgtrans_short")
    if "vpgtrans_opt_from_large" in chosen and "llama_to_opt" not in chosen:
        chosen.append("llama_to_opt")  # compared with VPGTrans from the small source, seed 0
    return chosen


def _arm(runs: dict, name: str, seeds: int) -> list[dict | None]:
    return [runs.get(seeded(name, s)) for s in range(seeds)]


def _items(run: dict, metric: str) -> list[float]:
    return run["eval"].get("items", {}).get("image", {}).get(metric, [])


def compare(scratch: list[dict | None], trans: list[dict | None]) -> dict:
    """One headline pair over its seeds (seed k beside seed k; a seed missing on either side is left out):
    speed-ups on the seed-averaged curves and per seed, the final scores per seed, and the paired bootstrap
    of final quality over the held-out items (each item's difference averaged over the seeds)."""
    both = [(a, b) for a, b in zip(scratch, trans) if a is not None and b is not None]
    scratch, trans = [a for a, _ in both], [b for _, b in both]
    metrics = [m for m, _ in METRICS]
    mean_s = stats.mean_curve([r["curve"] for r in scratch], metrics)
    mean_t = stats.mean_curve([r["curve"] for r in trans], metrics)
    out: dict = {"seeds": len(both), "curves": {"scratch": mean_s, "transfer": mean_t}}
    for m in metrics:
        per_seed = [speedup(a["curve"], b["curve"], m) for a, b in both]
        finite = [p["speedup_steps"] for p in per_seed
                  if p["reached"] and p["speedup_steps"] not in (None, float("inf"))]
        a_items, b_items = [_items(r, m) for r in scratch], [_items(r, m) for r in trans]
        usable = all(a_items + b_items) and len({len(v) for v in a_items + b_items}) == 1
        out[m] = {"speedup": speedup(mean_s, mean_t, m),
                  "per_seed": per_seed,
                  "per_seed_steps": [times(p["speedup_steps"]) if p["reached"] else "never" for p in per_seed],
                  "speedup_over_seeds": stats.over_seeds(finite) if finite else None,
                  "reached_seeds": sum(p["reached"] for p in per_seed),
                  "final_scratch": stats.over_seeds([r["eval"]["image"][m] for r in scratch]),
                  "final_transfer": stats.over_seeds([r["eval"]["image"][m] for r in trans]),
                  "final_paired": stats.paired_over_seeds(a_items, b_items) if usable else None,
                  "reach": reach(mean_s, mean_t, m)}
    return out


def summarize(runs: dict[str, dict], seeds: int) -> dict:
    s: dict = {"seeds": seeds,
               "runs": {n: {"curve": r["curve"], "init": r.get("init"), "stages": r.get("stages"),
                            "final": {m: r["eval"]["image"].get(m) for m, _ in METRICS}, "steps": r["steps"],
                            "train_seconds": r["train_seconds"]} for n, r in runs.items()},
               "pairs": {}}
    for pair, (scratch, trans, _, _) in PAIRS.items():
        a, b = _arm(runs, scratch, seeds), _arm(runs, trans, seeds)
        if any(x is not None and y is not None for x, y in zip(a, b)):
            s["pairs"][pair] = compare(a, b)
    s["ablations"] = ablations(runs)
    s["claims"] = claims(s)
    return s


def reach(scratch: list[dict], trans: list[dict], metric: str) -> list[dict]:
    """Steps each (mean) curve needs to first reach a fraction of from scratch's best score, and their ratio."""
    best = max(p[metric] for p in scratch)
    rows = []
    for f in FRACTIONS:
        a, b = steps_to_reach(scratch, metric, f * best), steps_to_reach(trans, metric, f * best)
        rows.append({"fraction": f, "value": f * best, "scratch_step": a, "transfer_step": b,
                     "speedup": a / b if a is not None and b else None})
    return rows


def _paired_at(a: dict, b: dict, metric: str) -> dict | None:
    ia, ib = _items(a, metric), _items(b, metric)
    return stats.paired(ia, ib) if ia and len(ia) == len(ib) else None


def ablations(runs: dict[str, dict]) -> list[dict]:
    """The paper's ablation findings, each on the same short schedule and the same held-out items."""
    out = []
    base = runs.get("vpgtrans_short")

    def row(claim: str, other: str) -> None:
        """VPGTrans as it is (b) against the ablated run (a), CIDEr on the same items."""
        if base is None or other not in runs:
            return
        p = _paired_at(runs[other], base, "caption_cider")
        out.append({"claim": claim, "metric": "caption_cider", "paired": p,
                    "verdict": stats.verdict(p) if p else "no items", "a": other, "b": "vpgtrans_short"})

    row("the word converter beats a random projector (final, short schedule)", "no_converter")
    row("warm-up helps (final, short schedule)", "no_warmup")
    row("warm-up at 5x the learning rate beats 1x", "warmup_lr_x1")
    row("warm-up at 5x beats 10x", "warmup_lr_x10")
    if {"vpgtrans_opt_s0", "vpgtrans_opt_from_large"} <= set(runs):
        p = _paired_at(runs["vpgtrans_opt_from_large"], runs["vpgtrans_opt_s0"], "caption_cider")
        out.append({"claim": "a smaller source transfers at least as well as a larger one (to OPT)",
                    "metric": "caption_cider", "paired": p, "a": "vpgtrans_opt_from_large", "b": "vpgtrans_opt_s0",
                    "verdict": ("holds" if p["lo"] > -0.01 else "not shown (within noise)" if p["hi"] > 0
                                else "reversed") if p else "no items"})
    return out


MARGIN = 0.02  # "equal final quality": VPGTrans within 2% (relative) of from scratch, or better


def claims(s: dict) -> list[dict]:
    """The headline claims, paper's figure beside ours with its interval."""
    rows = []
    for pair, label in (("small_to_large", "small -> large LLaMA"), ("llama_to_opt", "LLaMA -> OPT")):
        c = s["pairs"].get(pair)
        if not c:
            continue
        for m, mlabel in METRICS:
            sp, spread = c[m]["speedup"], c[m]["speedup_over_seeds"]
            ratio = sp.get("speedup_steps") if sp["reached"] else None
            ours = (f"{times(ratio)} on the seed-averaged curves" if sp["reached"]
                    else f"never passes from scratch's best {sp['scratch_best']:.3f} (best {sp['transfer_best']:.3f})")
            ours += f"; per seed: {', '.join(c[m]['per_seed_steps'])}"
            if spread:
                ours += f" (mean of the {spread['n']} finite: {spread['mean']:.1f}x ± {spread['std']:.1f})"
            if ratio is not None and ratio >= PAPER_SPEEDUP:
                verdict = "holds"
            elif ratio is not None and ratio > 1:
                verdict = "partly (faster, < 10x)"
            elif sp["reached"] and ratio is None:
                verdict = "undefined (from scratch best at its untrained start)"
            else:
                verdict = "does not hold"
            rows.append({"claim": f"{label}: VPGTrans reaches from scratch's best {mlabel} >= 10x sooner",
                         "paper": ">= 10x (OPT-350M -> OPT-2.7B)", "ours": ours, "verdict": verdict})
            p = c[m]["final_paired"]
            if p:
                margin = MARGIN * abs(p["a"])
                verdict = ("holds" if p["lo"] > -margin else "does not hold" if p["hi"] < -margin
                           else "not shown (within noise)")
                rows.append({"claim": f"{label}: at equal final {mlabel} (within {MARGIN:.0%})",
                             "paper": "equal or better",
                             "ours": f"{p['b']:.3f} vs {p['a']:.3f}, VPGTrans - scratch {stats.fmt_paired(p)} "
                                     f"(paired over {p['n']} items, each averaged over {p['seeds']} seeds)",
                             "verdict": verdict})
    return rows


def plot(runs: dict[str, dict], s: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for pair, c in s["pairs"].items():
        scratch, trans = PAIRS[pair][:2]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (metric, label) in zip(axes, METRICS):
            for arm, color, curve in (("from scratch", "tab:gray", c["curves"]["scratch"]),
                                      ("VPGTrans", "tab:blue", c["curves"]["transfer"])):
                base = scratch if arm == "from scratch" else trans
                for seed in range(s["seeds"]):
                    r = runs.get(seeded(base, seed))
                    if r:
                        ax.plot([p["step"] for p in r["curve"]], [p[metric] for p in r["curve"]], color=color,
                                lw=0.6, alpha=0.4)
                ax.plot([p["step"] for p in curve], [p[metric] for p in curve], color=color, lw=2.2, marker="o",
                        ms=3, label=f"{arm} (mean of {c['seeds']} seeds)")
            ax.set_xlabel("training steps (VPGTrans: warm-up included)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"VPGTrans vs from scratch on the bench: {pair.replace('_', ' ')} (held-out)")
        fig.tight_layout()
        names.append(save_png(fig, out / f"{pair}.png"))
    abl = [n for n in ("vpgtrans_short", "no_converter", "no_warmup", "warmup_lr_x1", "warmup_lr_x10") if n in runs]
    if abl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in abl:
            c = runs[n]["curve"]
            ax.plot([p["step"] for p in c], [p["caption_cider"] for p in c], marker="o", ms=3, label=n,
                    lw=2.2 if n == "vpgtrans_short" else 1.0)
        ax.set_xlabel("training steps")
        ax.set_ylabel("caption CIDEr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle("VPGTrans ablations (seed 0, short schedule)")
        fig.tight_layout()
        names.append(save_png(fig, out / "ablations.png"))
    return names


def _spread(spread: dict | None) -> str:
    return f"{spread['mean']:.1f}x ± {spread['std']:.1f}" if spread else "-"


def _step(step: int | None) -> str:
    return "never" if step is None else f"step {step}"


def _reach_cell(r: dict) -> str:
    if r["transfer_step"] is None or r["scratch_step"] is None:
        return "-"
    return times(r["scratch_step"] / r["transfer_step"]) if r["transfer_step"] else times(float("inf"))


def report(s: dict, plots: list[str]) -> str:
    md = ["# VPGTrans on the science bench (shapes world)", "",
          *([] if s.get("bench_passed", True) else
            ["**A bench model missed its gate** (see the bench's report.md): read every figure with that.", ""]),
          f"Measured by `vlkit experiment vpgtrans` on the bench (`vlkit bench build`), {s['seeds']} seeds per "
          "headline arm, 1,000 held-out items per task for final scores. Speed-up (the paper's definition): the "
          "step at which from scratch reaches its best score, divided by the first step at which VPGTrans exceeds "
          "it, warm-up included, read off the seed-averaged curves (evaluations during training: 200 items per "
          "task). Intervals: paired bootstrap 95%.", "",
          "## Claims", "", "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    md += [f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" for c in s["claims"]]
    for pair, c in s["pairs"].items():
        md += ["", f"## {pair.replace('_', ' ')}", "",
               "| metric | scratch best (step) | VPGTrans passes it at | speed-up (mean curves) | per seed | "
               "final scratch | final VPGTrans |", "|---|---|---|---|---|---|---|"]
        for m, label in METRICS:
            sp, spread = c[m]["speedup"], c[m]["speedup_over_seeds"]
            md.append(f"| {label} | {sp['scratch_best']:.3f} ({sp['scratch_best_step']}) | "
                      f"{_step(sp.get('transfer_step'))} | {times(sp['speedup_steps']) if sp['reached'] else '-'} | "
                      f"{_spread(spread)} | "
                      f"{stats.fmt(c[m]['final_scratch'])} | {stats.fmt(c[m]['final_transfer'])} |")
        md += ["", "Steps to reach a fraction of from scratch's best CIDEr (mean curves):", "",
               "| target | CIDEr | from scratch | VPGTrans | speed-up |", "|---|---|---|---|---|"]
        md += [f"| {r['fraction']:.0%} | {r['value']:.3f} | {_step(r['scratch_step'])} | {_step(r['transfer_step'])} "
               f"| {_reach_cell(r)} |" for r in c["caption_cider"]["reach"]]
    if s["ablations"]:
        md += ["", "## Ablations (seed 0, same held-out items)", "", "| claim | b - a (CIDEr) | verdict |",
               "|---|---|---|"]
        md += [f"| {a['claim']} ({a['b']} vs {a['a']}) | {stats.fmt_paired(a['paired']) if a['paired'] else '-'} | "
               f"{a['verdict']} |" for a in s["ablations"]]
    if s.get("source"):
        src = s["source"]
        md += ["", f"The source VPG ({src['steps']} steps on the frozen small bench LLaMA): caption CIDEr "
               f"{src['caption_cider']:.3f}, VQA {src['vqa_acc']:.3f} (1,000 held-out items each)."]
    conv = [(n, r["init"]["converter"]) for n, r in s["runs"].items() if r.get("init") and r["init"].get("converter")
            and n.endswith("_s0")]
    if conv:
        md += ["", "## Word converter", "", "| run | same tokenizer | pairs | unique pairs | mean cosine |",
               "|---|---|---|---|---|"]
        md += [f"| {n} | {c['same_tokenizer']} | {c['pairs']} | {c['unique_pairs']} | {c['mean_cosine']:.3f} |"
               for n, c in conv]
    md += [""] + [f"![{p}]({p})" for p in plots]
    md += ["", f"Time of the run that wrote this report: {s['total_seconds']:.0f}s (finished stages are reused "
               "from their directories).", ""]
    if s.get("provenance"):
        md += [provenance_line(s["provenance"]), ""]
    return "\n".join(md)
