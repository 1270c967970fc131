"""VPGTrans in miniature: transfer a VPG to another LLM against training it from scratch.

    vlkit experiment vpgtrans [--out runs/vpgtrans] [--demo runs/demo]

Reuses the demo's 0.9M LLaMA and world ViT and trains what is missing: the 4M LLaMA, the tiny OPT and
the source VLM, a Q-Former VPG trained to convergence (1,500 steps) on the frozen 0.9M LLaMA (the paper
transfers converged VPGs). Then, every run evaluated at the same interval on the same held-out captions
(CIDEr) and questions (VQA accuracy):
  small -> large LLaMA (same tokenizer): from scratch (800 steps, to its plateau), VPGTrans (300
      fine-tuning steps), and the ablations on a 100-step schedule beside VPGTrans on the same one:
      no converter (random projector), no warm-up, warm-up lr x1 / x10 (VPGTrans: x5);
  LLaMA -> OPT (different tokenizers): from scratch, VPGTrans; and large LLaMA -> OPT, the
      larger source, to compare with the small one.
Speed-up as the paper defines it: the step at which from-scratch reaches its best score, divided by
the first step at which VPGTrans exceeds that score (stage 1 counted in full); also the same ratio
in training samples and in optimisation seconds; and the speed-up to reach lower targets (50-100% of
from scratch's best), which shows where the transfer saves steps. Writes <out>/report.md,
results.json and PNG plots.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console

from vlkit.eval.curves import speedup, steps_to_reach, times
from vlkit.experiments import save_png
from vlkit.experiments.demo import stage_overrides
from vlkit.experiments.stages import Stages
from vlkit.fileio import write_json, write_text

METRICS = (("caption_cider", "caption CIDEr"), ("vqa_acc", "VQA accuracy"))

SHORT = "train.steps=100"  # ablations: the early part of training is what they compare
SOURCE_STEPS = 1500  # the source VPG, trained to convergence on the 0.9M LLaMA
FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # targets, as fractions of from scratch's best

# name -> (target LM stage, source VLM: "small" = source_small, "large" = scratch_large's), overrides
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "scratch_large": ("lm_llama_large", "small", ["inherit=false", "train.steps=800"]),
    "vpgtrans_large": ("lm_llama_large", "small", ["train.steps=300"]),
    "vpgtrans_short": ("lm_llama_large", "small", [SHORT]),
    "no_converter": ("lm_llama_large", "small", [SHORT, "converter.enabled=false"]),
    "no_warmup": ("lm_llama_large", "small", [SHORT, "warmup.enabled=false"]),
    "warmup_lr_x1": ("lm_llama_large", "small", [SHORT, "warmup.lr_scale=1"]),
    "warmup_lr_x10": ("lm_llama_large", "small", [SHORT, "warmup.lr_scale=10"]),
    "scratch_opt": ("lm_opt_small", "small", ["inherit=false"]),
    "vpgtrans_opt": ("lm_opt_small", "small", []),
    "vpgtrans_opt_from_large": ("lm_opt_small", "large", []),
}


def run_experiment(out: str | Path = "runs/vpgtrans", demo: str | Path = "runs/demo",
                   progress: bool | None = None, only: list[str] | None = None) -> dict:
    console = Console(stderr=True)
    out, demo = Path(out), Path(demo)
    t_all = time.perf_counter()
    stages = Stages(console, progress)
    for name in ("lm_llama_small", "clip_vit"):
        stages.run(name, stage_overrides(name, demo))
    for name in ("lm_llama_large", "lm_opt_small"):
        stages.run(name, [f"output_dir={out / name}"])
    source_run = stages.run("source_small", [f"output_dir={out / 'source_small'}", f"train.steps={SOURCE_STEPS}",
                                             f"model.tower.path={demo / 'clip_vit' / 'vision'}",
                                             f"model.llm.path={demo / 'lm_llama_small' / 'model'}"],
                            config="vpg_qformer", after=("lm_llama_small", "clip_vit"))
    sources = {"small": out / "source_small" / "model", "large": out / "scratch_large" / "model"}
    runs: dict[str, dict] = {}
    for name, (target, source, extra) in RUNS.items():
        if only and name not in only:
            continue
        target_dir = out / target / "model"
        over = [f"output_dir={out / name}", f"source={sources[source]}", f"target.path={target_dir}",
                "eval.tasks=[caption,vqa]", "eval.blind=false", *extra]  # the report compares runs, not image vs blind
        upstream = ("source_small", target) + (("scratch_large",) if source == "large" else ())
        runs[name] = stages.run(name, over, config="transfer_llama_small_to_large" if "large" in target
                                else "transfer_llama_to_opt", after=upstream)
    summary = summarize(runs)
    summary["source"] = {"steps": source_run["steps"], **{m: source_run["eval"]["image"].get(m) for m, _ in METRICS}}
    summary["total_seconds"] = time.perf_counter() - t_all
    write_json(out / "results.json", summary)
    plots = plot(runs, out)
    write_text(out / "report.md", report(summary, plots))
    console.print(f"report: {out / 'report.md'} ({summary['total_seconds']:.0f}s)")
    return summary


def summarize(runs: dict[str, dict]) -> dict:
    s: dict = {"runs": {n: {"curve": r["curve"], "init": r.get("init"), "stages": r.get("stages"),
                            "final": {m: r["eval"]["image"].get(m) for m, _ in METRICS},
                            "steps": r["steps"], "train_seconds": r["train_seconds"]} for n, r in runs.items()}}
    pairs = {"small_to_large": ("scratch_large", "vpgtrans_large"), "llama_to_opt": ("scratch_opt", "vpgtrans_opt"),
             "large_llama_to_opt": ("scratch_opt", "vpgtrans_opt_from_large")}
    pairs.update({f"ablation_{n}": ("scratch_large", n) for n in
                  ("vpgtrans_short", "no_converter", "no_warmup", "warmup_lr_x1", "warmup_lr_x10")})
    s["speedups"] = {k: {m: speedup(runs[a]["curve"], runs[b]["curve"], m) for m, _ in METRICS}
                     for k, (a, b) in pairs.items() if a in runs and b in runs}
    s["findings"] = findings(runs, s["speedups"])
    if {"scratch_large", "vpgtrans_large"} <= set(runs):
        s["reach"] = reach(runs["scratch_large"]["curve"], runs["vpgtrans_large"]["curve"], "caption_cider")
    return s


def reach(scratch: list[dict], trans: list[dict], metric: str) -> list[dict]:
    """Steps each run needs to first reach a fraction of from scratch's best score, and their ratio."""
    best = max(p[metric] for p in scratch)
    rows = []
    for f in FRACTIONS:
        a, b = steps_to_reach(scratch, metric, f * best), steps_to_reach(trans, metric, f * best)
        rows.append({"fraction": f, "value": f * best, "scratch_step": a, "transfer_step": b,
                     "speedup": a / b if a is not None and b else None})
    return rows


def _first(runs, name, metric, i=0):
    return runs[name]["curve"][i][metric] if name in runs else None


def findings(runs: dict[str, dict], sp: dict) -> list[dict]:
    """The paper's qualitative findings, each checked on this run's numbers."""
    out = []
    if {"no_converter", "scratch_large"} <= set(runs):
        start, scratch0 = _first(runs, "no_converter", "vqa_acc"), _first(runs, "scratch_large", "vqa_acc")
        after1 = _first(runs, "no_converter", "vqa_acc", 1)
        out.append({"claim": "an inherited VPG with a random projector can start worse on VQA than from scratch",
                    "holds": bool(start < scratch0) or (after1 is not None and after1 < _first(runs, "scratch_large",
                                                                                          "vqa_acc", 1)),
                    "evidence": f"VQA at step 0: {start:.3f} (inherited, random projector) vs {scratch0:.3f} "
                                f"(scratch); first evaluation after it: {after1:.3f}"})
    if {"vpgtrans_short", "no_converter"} <= set(runs):
        a, b = runs["vpgtrans_short"]["curve"], runs["no_converter"]["curve"]
        out.append({"claim": "the word-converter init shortens warm-up (better right after stage 1)",
                    "holds": bool(a[1]["caption_cider"] > b[1]["caption_cider"]),
                    "evidence": f"CIDEr after warm-up: {a[1]['caption_cider']:.3f} with the converter vs "
                                f"{b[1]['caption_cider']:.3f} with a random projector; at step 0: "
                                f"{a[0]['caption_cider']:.3f} vs {b[0]['caption_cider']:.3f}"})
    if {"vpgtrans_short", "warmup_lr_x1"} <= set(runs):
        a, b = runs["vpgtrans_short"]["curve"], runs["warmup_lr_x1"]["curve"]
        end = b[-1]["step"]
        ma, mb = (np.mean([p["caption_cider"] for p in c[1:] if p["step"] <= end]) for c in (a, b))
        out.append({"claim": "warm-up at 5x the learning rate beats 1x",
                    "holds": bool(ma > mb),
                    "evidence": f"mean CIDEr from the end of warm-up to step {end}: {ma:.3f} (5x) vs {mb:.3f} (1x); "
                                f"right after warm-up {a[1]['caption_cider']:.3f} vs {b[1]['caption_cider']:.3f}"})
    if "llama_to_opt" in sp and "large_llama_to_opt" in sp:
        a, b = sp["llama_to_opt"]["caption_cider"], sp["large_llama_to_opt"]["caption_cider"]
        out.append({"claim": "a smaller source transfers at least as well as a larger one",
                    "holds": a["transfer_final"] >= b["transfer_final"] - 0.01,
                    "evidence": f"to OPT, final CIDEr from the small LLaMA's VPG {a['transfer_final']:.3f} vs "
                                f"from the large LLaMA's {b['transfer_final']:.3f}; speed-up "
                                f"{_fmt(a)} vs {_fmt(b)}"})
    return out


def _step(step: int | None) -> str:
    return "never" if step is None else f"step {step}"


def _reach_cell(r: dict) -> str:
    if r["transfer_step"] is None or r["scratch_step"] is None:
        return "-"
    return times(r["scratch_step"] / r["transfer_step"]) if r["transfer_step"] else times(float("inf"))


def _fmt(sp: dict) -> str:
    return times(sp["speedup_steps"]) if sp.get("reached") else "not reached"


def plot(runs: dict[str, dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"small_to_large": ["scratch_large", "vpgtrans_large", "vpgtrans_short", "no_converter", "no_warmup",
                                 "warmup_lr_x1", "warmup_lr_x10"],
              "llama_to_opt": ["scratch_opt", "vpgtrans_opt", "vpgtrans_opt_from_large"]}
    names = []
    for group, members in groups.items():
        members = [m for m in members if m in runs]
        if not members:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (metric, label) in zip(axes, METRICS):
            for m in members:
                c = runs[m]["curve"]
                ax.plot([p["step"] for p in c], [p[metric] for p in c], marker="o", ms=3, label=m,
                        lw=2.2 if m.startswith(("scratch", "vpgtrans")) else 1.0,
                        ls="--" if m.startswith("scratch") else "-")
            ax.set_xlabel("training steps (VPGTrans: warm-up included)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"VPGTrans vs from scratch: {group.replace('_', ' ')} (held-out)")
        fig.tight_layout()
        names.append(save_png(fig, out / f"{group}.png"))
    return names


def report(s: dict, plots: list[str]) -> str:
    md = ["# VPGTrans in miniature (shapes world)", "",
          "Every figure was measured by `vlkit experiment vpgtrans` on held-out data. Speed-up (the paper's "
          "definition): the step at which training from scratch reaches its best score, divided by the first step "
          "at which VPGTrans exceeds that score, warm-up steps included; also the ratio of samples seen and of "
          "optimisation seconds (converter fitting included).", "",
          "| transfer | metric | scratch best (step) | VPGTrans passes it at | speed-up steps | samples | seconds "
          "| final scratch | final VPGTrans |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per in s["speedups"].items():
        for metric, label in METRICS:
            sp = per[metric]
            passed = f"step {sp['transfer_step']}" if sp["reached"] else "never"
            cells = [times(sp[k]) if sp["reached"] else "-" for k in ("speedup_steps", "speedup_samples",
                                                                           "speedup_seconds")]
            md.append(f"| {name} | {label} | {sp['scratch_best']:.3f} ({sp['scratch_best_step']}) | {passed} | "
                      + " | ".join(cells) + f" | {sp['scratch_final']:.3f} | {sp['transfer_final']:.3f} |")
    if s.get("reach"):
        md += ["", "## Speed-up to reach a target (small -> large, caption CIDEr)", "",
               "Steps each run needs to first reach a fraction of from scratch's best CIDEr (same evaluation "
               "interval; VPGTrans: warm-up included).", "",
               "| target | CIDEr | from scratch | VPGTrans | speed-up |", "|---|---|---|---|---|"]
        md += [f"| {r['fraction']:.0%} | {r['value']:.3f} | {_step(r['scratch_step'])} | {_step(r['transfer_step'])} | "
               + _reach_cell(r) + " |" for r in s["reach"]]
    if s.get("source") and "vpgtrans_large" in s["runs"]:
        src, t0 = s["source"], s["runs"]["vpgtrans_large"]["curve"][0]
        md += ["", f"The source VPG ({src['steps']} steps on the frozen 0.9M LLaMA) scores caption CIDEr "
               f"{src['caption_cider']:.3f} and VQA {src['vqa_acc']:.3f} on its own LLM (final evaluation); moved "
               f"to the 4M LLaMA through the word converter, before any training: CIDEr {t0['caption_cider']:.3f}, "
               f"VQA {t0['vqa_acc']:.3f}."]
    md += ["", "## The paper's findings, checked", "", "| claim | holds here | evidence |", "|---|---|---|"]
    md += [f"| {f['claim']} | {'yes' if f['holds'] else 'no'} | {f['evidence']} |" for f in s["findings"]]
    conv = [(n, r["init"]["converter"]) for n, r in s["runs"].items() if r.get("init") and r["init"].get("converter")]
    if conv:
        md += ["", "## Word converter", "", "| run | same tokenizer | texts | aligned texts | pairs | unique pairs | "
               "mean cosine |", "|---|---|---|---|---|---|---|"]
        md += [f"| {n} | {c['same_tokenizer']} | {c['texts']} | {c['aligned_texts']} | {c['pairs']} | "
               f"{c['unique_pairs']} | {c['mean_cosine']:.3f} |" for n, c in conv]
    md += [""] + [f"![{p}]({p})" for p in plots]
    md += ["", f"Time of the run that wrote this report: {s['total_seconds']:.0f}s (finished stages are reused "
               "from their directories; each run's own time is in its results.json).", ""]
    return "\n".join(md)
