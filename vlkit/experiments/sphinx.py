"""SPHINX's four mixings in miniature, each measured beside its baseline on the same held-out items.

    vlkit experiment sphinx [--out runs/sphinx] [--demo runs/demo] [--only PART ...]

The tiles, merge and instructions parts instruction-tune the demo's VPG-pretrained VLM (world ViT -> 16-query
Q-Former -> world LLaMA; the VPG and the LLM train, LLaVA stage 2, 300 steps); the mix part trains the mix projection
and a fresh Q-Former between frozen encoders and the frozen world LLaMA (`configs/world/sphinx.yaml`, BLIP-2 stage
2, 500 steps), then instruction-tunes each the same way. Parts:
  tiles         small-text reading and fine-detail VQA on 448 px scenes (text at 0.04 of the side: 2 px high
                at 64 px, 5 px at 192 px; objects at 0.6 of their size; a quarter of the images 3.5 : 1
                banners): the global view only vs + 2 x 2 vs + 3 x 3 sub-images vs + 3 x 3 with padded
                sub-images skipped (SPHINX-X), accuracy against visual tokens per image and step time
  mix           the world ViT alone, a world ConvNeXt alone (another kind of encoder, trained on another
                objective: `configs/world/convnext.yaml`) and both mixed (grids resampled to 8 x 8, channels
                concatenated and projected), the same Q-Former and LLM (VPG pretraining on captions and VQA, then
                instruction tuning with boxes), on VQA and referring expressions
  merge         two fine-tunes of the demo's VPG-pretrained VLM on two world domains (objects at their size;
                objects at half their size), mixed as beta * A + (1 - beta) * B for beta in {0, .25, .5, .75, 1}
                (`vlkit merge`), each measured on both domains
  instructions  short VQA, captions and boxes trained together under SPHINX's task-specific instructions vs
                each record's own request (one instruction format for every task)
Comparisons are paired bootstraps over the same items (vlkit.eval.stats) with standard errors. Writes
<out>/report.md, results.json and a chart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from vlkit.errors import VlkitError
from vlkit.eval.stats import fmt_paired, interval, paired, verdict
from vlkit.experiments import provenance_line, publish, save_png
from vlkit.experiments.demo import DEPENDS, stage_overrides
from vlkit.experiments.stages import Stages
from vlkit.fileio import read_json, write_json

PARTS = ("tiles", "mix", "merge", "instructions")
HIRES = {"seed": 11, "train_scenes": 3000, "test_scenes": 1000, "vqa_per_scene": 1,
         "tasks": ["caption", "smalltext", "vqa"],
         "world": {"resolution": 448, "text_prob": 1.0, "size_scale": 0.6, "aspects": [1.0, 1.0, 1.0, 3.5]}}
LOWRES = {"seed": 12, "train_scenes": 4000, "test_scenes": 1000, "vqa_per_scene": 1,
          "tasks": ["caption", "vqa", "refer"]}
SMALL = {"seed": 13, "train_scenes": 4000, "test_scenes": 1000, "vqa_per_scene": 1, "tasks": ["vqa"],
         "world": {"size_scale": 0.5}}
TILES = {"global": ("global view only", None), "2x2": ("global + 2x2", {"k": 2}), "3x3": ("global + 3x3", {"k": 3}),
         "3x3_skip": ("global + 3x3, padded skipped", {"k": 3, "skip_padding": True})}
# instruction tuning from the demo's VPG-pretrained VLM (LLaVA stage 2): the merge and instructions parts
TUNE = ["train.steps=300", "train.batch_size=32", "train.length_groups=4", "train.lr=1.0e-3", "train.warmup_steps=20",
        "train.log_every=20", "train.seed=0", "trainable=[vpg,llm]"]
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOLERANCE = 0.03  # "no loss": the paired 95% interval of (skip - all) lies above -0.03


def j(x) -> str:
    return json.dumps(x)


def run_experiment(out: str | Path = "runs/sphinx", demo: str | Path = "runs/demo", progress: bool | None = None,
                   only: list[str] | None = None) -> dict:
    console = Console(stderr=True)
    out, demo = Path(out), Path(demo)
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown:
        raise VlkitError(f"experiment sphinx: unknown part(s) {unknown}; choose from {list(PARTS)}")
    parts = [p for p in PARTS if not only or p in only]
    t_all = time.perf_counter()
    stages = Stages(console, progress)
    for name in ("lm_llama_small", "clip_vit", "vpg_qformer"):
        stages.run(name, stage_overrides(name, demo), after=DEPENDS.get(name, ()))
    vit = {"path": str(demo / "clip_vit" / "vision"), "feature_layer": -2, "select": "patch"}
    base = [f"model.llm.path={demo / 'lm_llama_small' / 'model'}"]
    s: dict = {"parts": parts}
    if "tiles" in parts:
        s["tiles"] = tiles_part(stages, out, demo / "vpg_qformer" / "model", progress)
    if "mix" in parts:
        stages.run("convnext", [f"output_dir={out / 'convnext'}"], label="world ConvNeXt")
        convnext = {"path": str(out / "convnext" / "tower"), "kind": "hf", "feature_layer": "output",
                    "select": "patch"}
        s["mix"] = mix_part(stages, out, vit, convnext, base)
    if "merge" in parts:
        s["merge"] = merge_part(stages, out, demo / "vpg_qformer" / "model", console, progress)
    if "instructions" in parts:
        s["instructions"] = instructions_part(stages, out, demo / "vpg_qformer" / "model")
    s["claims"] = claims(s)
    return publish(out, s, stages.seconds, t_all, lambda x: plot(x, out), report, console)


# -- tiles ---------------------------------------------------------------------------------------------------
def tiles_part(stages: Stages, out: Path, base_vlm: Path, progress) -> dict:
    from vlkit.data.features import image_size
    from vlkit.data.tiling import TileConfig, Tiler
    from vlkit.eval.world import EvalConfig, select
    from vlkit.world.sources import RecordsConfig, load_split

    test = load_split(RecordsConfig(world=HIRES), "test", progress)
    chosen = select(test, EvalConfig(tasks=["smalltext", "vqa"], max_per_task=1000))
    banner = {t: [r["meta"]["scene"].get("aspect", 1.0) != 1.0 for r in recs] for t, recs in chosen.items()}
    runs = {}
    for name, (label, tiles) in TILES.items():
        r = stages.run(f"tiles_{name}", [f"output_dir={out / 'tiles' / name}", f"init={base_vlm}",
                                         f"tiles={j(tiles)}", "max_length=256", f"data.world={j(HIRES)}",
                                         "data.tasks=[caption,smalltext,vqa]", "data.mix=null",
                                         "eval.tasks=[smalltext,vqa]", "eval.max_per_task=1000", "eval.batch_size=100",
                                         "eval.max_new_tokens=8", *TUNE],
                       config="vlm_instruct", label=f"tiles: {label}", after=("vpg_qformer",))
        items = r["eval"]["items"]["image"]
        views = 1
        if tiles:  # the mask depends on the tiling and the image sizes only
            sizes = [image_size(rec["images"][0]) for rec in chosen["smalltext"] + chosen["vqa"]]
            views = float(Tiler(TileConfig(**tiles), 64, (0, 0, 0)).masks(sizes).sum(1).mean())
        runs[name] = {"label": label, "smalltext": items["smalltext_acc"], "vqa": items["vqa_acc"],
                      "blind": {k: r["eval"].get("blind", {}).get(k) for k in ("smalltext_acc", "vqa_acc")},
                      "views": views, "tokens": views * r["num_image_tokens"],
                      "step_seconds": r["train_seconds"] / r["steps"] if r.get("steps") else None,
                      "train_seconds": r["train_seconds"]}
    return {"runs": runs, "banner": banner, "probe": text_probe(base_vlm.parents[1] / "clip_vit" / "vision", out,
                                                                 progress)}


def text_probe(vit_dir: Path, out: Path, progress) -> dict:
    """What the frozen world ViT can read at each view scale: a linear probe (logistic regression) from the
    features of the 3 x 3 patches around the text's centre, in the view that holds it, to the text itself, on
    square small-text images (train split -> held-out split). An upper bound on what a VPG over the same frozen
    features can read at that scale."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from vlkit.data.tiling import TileConfig, Tiler
    from vlkit.models.vision import EncoderConfig, build_encoder
    from vlkit.world.sources import RecordsConfig, load_split

    cache = out / "tiles" / "probe.json"
    key = {"vit": read_json(vit_dir.parent / "run.json")["config_hash"], "world": HIRES, "n": 2000}
    if cache.is_file() and read_json(cache).get("key") == key:
        return read_json(cache)["probe"]
    enc = build_encoder(EncoderConfig(path=str(vit_dir), feature_layer=-2, select="patch")).eval()
    side = enc.grid[0]
    result = {}
    for k in (None, 2, 3):
        data = {}
        for split, n in (("train", 2000), ("test", 1000)):
            recs = [r for r in load_split(RecordsConfig(world=HIRES, tasks=["smalltext"]), split, progress)
                    if r["meta"]["scene"].get("aspect", 1.0) == 1.0][:n]
            tiler = Tiler(TileConfig(k=k), enc.transform.size, enc.transform.fill) if k else None
            xs, ys = [], []
            for r in recs:
                t = r["meta"]["scene"]["text"]
                img = enc.transform.rgb(r["images"][0])
                if tiler is None:
                    view, (u, v) = enc.transform.array(img), (t["cx"], t["cy"])
                else:
                    row, col = min(k - 1, int(t["cy"] * k)), min(k - 1, int(t["cx"] * k))
                    view = tiler.arrays(img, enc.transform)[1 + row * k + col]
                    u, v = t["cx"] * k - col, t["cy"] * k - row
                with torch.no_grad():
                    f = enc(enc.transform.normalize(view[None]))[0].reshape(side, side, -1)
                pr, pc = min(side - 2, max(1, int(v * side))), min(side - 2, max(1, int(u * side)))
                xs.append(f[pr - 1:pr + 2, pc - 1:pc + 2].reshape(-1).numpy())
                ys.append(r["meta"]["answer"])
            data[split] = (np.stack(xs), ys)
        probe = LogisticRegression(max_iter=300, C=0.5).fit(*data["train"])
        hits = [float(p == y) for p, y in zip(probe.predict(data["test"][0]), data["test"][1])]
        result["global" if k is None else f"{k}x{k}"] = {"scale": enc.transform.size * (k or 1), "items": hits}
    write_json(cache, {"key": key, "probe": result})
    return result


def split_by(items: list[float], flags: list[bool]) -> tuple[list[float], list[float]]:
    return [x for x, f in zip(items, flags) if not f], [x for x, f in zip(items, flags) if f]


# -- encoder mixing ------------------------------------------------------------------------------------------
def mix_part(stages: Stages, out: Path, vit: dict, convnext: dict, base: list[str]) -> dict:
    arms = {"vit": ("world ViT alone", [vit]), "convnext": ("world ConvNeXt alone", [convnext]),
            "mixed": ("ViT + ConvNeXt mixed", [vit, convnext])}
    runs = {}
    for name, (label, towers) in arms.items():
        align = stages.run(f"mix_{name}", [f"output_dir={out / 'mix' / name}", f"model.tower={j(towers)}",
                                           f"data.world={j(LOWRES)}", *base],
                           config="sphinx", label=f"mix: {label}, VPG pretraining",
                           after=("clip_vit", "lm_llama_small", "convnext"))
        r = stages.run(f"mix_{name}_tuned", [f"output_dir={out / 'mix' / (name + '_tuned')}",
                                             f"init={out / 'mix' / name / 'model'}", f"data.world={j(LOWRES)}",
                                             "data.tasks=[caption,vqa,refer]", "data.mix=null",
                                             "eval.tasks=[vqa,refer]", "eval.max_per_task=1000", "eval.batch_size=100",
                                             "eval.max_new_tokens=24", *TUNE[:-1], "trainable=[vision.mix,vpg,llm]"],
                       config="vlm_instruct", label=f"mix: {label}, instruction tuning", after=(f"mix_{name}",))
        items = r["eval"]["items"]["image"]
        runs[name] = {"label": label, "vqa": items["vqa_acc"], "refer": items["refer_iou50"],
                      "refer_miou": items["refer_miou"], "train_seconds": align["train_seconds"] + r["train_seconds"],
                      "aligned_vqa": align["eval"]["image"]["vqa_acc"],
                      "aligned_blind": align["eval"]["blind"]["vqa_acc"],
                      "blind": {k: r["eval"].get("blind", {}).get(k) for k in ("vqa_acc", "refer_iou50")}}
    return {"runs": runs}


# -- weight mixing -------------------------------------------------------------------------------------------
def merge_part(stages: Stages, out: Path, base_vlm: Path, console, progress) -> dict:
    from vlkit.eval.world import EvalConfig, evaluate_vlm
    from vlkit.models.io import load_vlm
    from vlkit.models.merge import merge
    from vlkit.world.sources import RecordsConfig, load_split

    domains = {"A": ("objects at their size", {**LOWRES, "tasks": ["vqa"]}), "B": ("objects at half size", SMALL)}
    tuned = {}
    for d, (label, world) in domains.items():
        stages.run(f"merge_{d}", [f"output_dir={out / 'merge' / d}", f"init={base_vlm}", f"data.world={j(world)}",
                                  "data.tasks=[vqa]", "data.mix=null", "eval.tasks=[vqa]", "eval.max_per_task=1000",
                                  "eval.batch_size=100", "eval.blind=false", *TUNE],
                   config="vlm_instruct", label=f"merge: fine-tune on {label}", after=("vpg_qformer",))
        tuned[d] = out / "merge" / d / "model"
    key = {d: read_json(out / "merge" / d / "run.json")["config_hash"] for d in domains} | {"betas": list(BETAS)}
    cache = out / "merge" / "betas.json"
    stale = stages.retrained("merge_A", "merge_B", "vpg_qformer")
    if cache.is_file() and not stale and read_json(cache).get("key") == key:
        return read_json(cache)["merge"]
    tests = {d: load_split(RecordsConfig(world=w, tasks=["vqa"]), "test", progress) for d, (_, w) in domains.items()}
    ev = EvalConfig(tasks=["vqa"], max_per_task=1000, blind=False, batch_size=100, max_new_tokens=8)
    rows = {}
    for beta in BETAS:
        where = out / "merge" / f"beta_{beta:.2f}"
        console.print(f"[bold]merge[/bold]: beta {beta:.2f} (A: {domains['A'][0]}, B: {domains['B'][0]})")
        merge(tuned["A"], tuned["B"], beta, where, overwrite=True)
        model, proc = load_vlm(where)
        rows[f"{beta:.2f}"] = {d: evaluate_vlm(model, proc, tests[d], ev, progress=progress)["items"]["image"]
                               ["vqa_acc"] for d in domains}
    result = {"domains": {d: label for d, (label, _) in domains.items()}, "betas": rows}
    write_json(cache, {"key": key, "merge": result})
    return result


# -- task instructions ---------------------------------------------------------------------------------------
def instructions_part(stages: Stages, out: Path, base_vlm: Path) -> dict:
    arms = {"sphinx": "SPHINX's task-specific instructions", "generic": "each record's own request"}
    runs = {}
    for name, label in arms.items():
        r = stages.run(f"instructions_{name}", [
            f"output_dir={out / 'instructions' / name}", f"init={base_vlm}", f"data.world={j(LOWRES)}",
            "data.tasks=[caption,vqa,refer]", "data.mix=null", f"data.instructions={name}",
            f"eval.instructions={name}", "eval.tasks=[caption,vqa,refer]", "eval.max_per_task=1000",
            "eval.batch_size=100", "eval.max_new_tokens=48", *TUNE],
            config="vlm_instruct", label=f"instructions: {label}", after=("vpg_qformer",))
        items = r["eval"]["items"]["image"]
        runs[name] = {"label": label, "vqa": items["vqa_acc"], "caption": items["caption_cider"],
                      "refer": items["refer_iou50"], "train_seconds": r["train_seconds"],
                      "examples": r["eval"].get("examples", [])[:6]}
    return {"runs": runs}


# -- claims --------------------------------------------------------------------------------------------------
def claim(what: str, paper: str, a: list[float], b: list[float], compared: str, tolerance: float | None = None) -> dict:
    p = paired(a, b)
    if tolerance is None:
        v = verdict(p)
    else:
        v = "holds" if p["lo"] > -tolerance else \
            ("does not hold" if p["hi"] < -tolerance else "not shown (within noise)")
    return {"claim": what, "paper": paper, "compared": compared, "paired": p, "verdict": v}


def claims(s: dict) -> list[dict]:
    out = []
    if "tiles" in s:
        t, flags = s["tiles"]["runs"], s["tiles"]["banner"]
        square = {n: split_by(r["smalltext"], flags["smalltext"])[0] for n, r in t.items()}
        paper = "sub-images raise fine-grained and text-rich understanding (SPHINX sec. 3.3, Table 3)"
        for k in ("2x2", "3x3"):
            out.append(claim("sub-images help small text", paper, square["global"], square[k],
                             f"small-text reading, square images: {t[k]['label']} - global"))
        out.append(claim("sub-images help fine-detail VQA", paper, t["global"]["vqa"], t["3x3"]["vqa"],
                         "VQA on objects at 0.6 size: global + 3x3 - global"))
        for task in ("smalltext", "vqa"):
            out.append(claim("skipping padded sub-images costs nothing", "SPHINX-X: padded sub-images are dropped "
                             "for efficiency (sec. 3)", t["3x3"][task], t["3x3_skip"][task],
                             f"{task}: skipped - all views", tolerance=TOLERANCE))
    if "mix" in s:
        m = s["mix"]["runs"]
        paper = "mixing the embeddings of several encoders beats each alone (SPHINX sec. 3.2, Table 2)"
        for task in ("vqa", "refer"):
            for alone in ("vit", "convnext"):
                out.append(claim("mixing encoders helps", paper, m[alone][task], m["mixed"][task],
                                 f"{task}: mixed - {m[alone]['label']}"))
    if "merge" in s:
        b = s["merge"]["betas"]
        paper = "mixing the weights of two domain fine-tunes keeps both domains' knowledge (SPHINX sec. 3.1)"
        out.append(claim("the weight mix keeps domain B's gain", paper, b["1.00"]["B"], b["0.50"]["B"],
                         "domain B: beta 0.5 - A's fine-tune (beta 1)"))
        out.append(claim("the weight mix keeps domain A's gain", paper, b["0.00"]["A"], b["0.50"]["A"],
                         "domain A: beta 0.5 - B's fine-tune (beta 0)"))
        both = lambda k: [(x + y) / 2 for x, y in zip(b[k]["A"], b[k]["B"])]  # noqa: E731
        for end in ("1.00", "0.00"):
            out.append(claim("the weight mix is better on both domains together", paper, both(end), both("0.50"),
                             f"mean of A and B: beta 0.5 - beta {end}"))
    if "instructions" in s:
        r = s["instructions"]["runs"]
        paper = "task-specific instructions reduce conflicts between tasks trained together (SPHINX sec. 3.4)"
        for task in ("vqa", "caption", "refer"):
            out.append(claim("task-specific instructions help", paper, r["generic"][task], r["sphinx"][task],
                             f"{task}: SPHINX's instructions - the record's own"))
    return out


# -- plot and report -----------------------------------------------------------------------------------------
def plot(s: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("tiles", "mix", "merge", "instructions") if p in s]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, part in zip(axes[0], panels):
        if part == "tiles":
            t, flags = s["tiles"]["runs"], s["tiles"]["banner"]
            for task, marker, label in (("smalltext", "o", "small text (square images)"), ("vqa", "s", "VQA")):
                xs, ys, lo, hi = [], [], [], []
                for r in t.values():
                    items = split_by(r[task], flags[task])[0] if task == "smalltext" else r[task]
                    c = interval(items)
                    xs.append(r["tokens"])
                    ys.append(c["mean"])
                    lo.append(c["mean"] - c["lo"])
                    hi.append(c["hi"] - c["mean"])
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=label, ls="none")
                for x, y, r in zip(xs, ys, t.values() if task == "vqa" else ()):  # labelled once, above
                    step = f", {r['step_seconds']:.2f}s/step" if r.get("step_seconds") else ""
                    ax.annotate(f"{r['label'].replace('global + ', '+')}{step}", (x, y), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("visual tokens per image (mean)")
            ax.set_ylabel("exact-match accuracy (95% interval)")
            ax.set_title("sub-images: 448 px scenes")
        elif part == "mix":
            m = s["mix"]["runs"]
            for k, task in enumerate(("vqa", "refer")):
                cs = [interval(r[task]) for r in m.values()]
                ax.bar([i + 0.38 * k for i in range(len(m))], [c["mean"] for c in cs], 0.38,
                       yerr=[[c["mean"] - c["lo"] for c in cs], [c["hi"] - c["mean"] for c in cs]], capsize=3,
                       label={"vqa": "VQA", "refer": "referring IoU@0.5"}[task])
            ax.set_xticks([i + 0.19 for i in range(len(m))])
            ax.set_xticklabels([r["label"] for r in m.values()], fontsize=7)
            ax.set_title("encoder mixing (64 px)")
        elif part == "merge":
            b = s["merge"]["betas"]
            betas = sorted(b, key=float)
            for d, label in s["merge"]["domains"].items():
                cs = [interval(b[k][d]) for k in betas]
                ax.errorbar([float(k) for k in betas], [c["mean"] for c in cs],
                            yerr=[[c["mean"] - c["lo"] for c in cs], [c["hi"] - c["mean"] for c in cs]], marker="o",
                            capsize=3, label=f"domain {d}: {label}")
            ax.set_xlabel("beta (1: A's fine-tune, 0: B's)")
            ax.set_ylabel("VQA accuracy")
            ax.set_title("weight mixing")
        else:
            r = s["instructions"]["runs"]
            for k, name in enumerate(r):
                cs = [interval(r[name][t]) for t in ("vqa", "caption", "refer")]
                ax.bar([i + 0.38 * k for i in range(3)], [c["mean"] for c in cs], 0.38,
                       yerr=[[c["mean"] - c["lo"] for c in cs], [c["hi"] - c["mean"] for c in cs]], capsize=3,
                       label=r[name]["label"])
            ax.set_xticks([i + 0.19 for i in range(3)])
            ax.set_xticklabels(["VQA acc", "caption CIDEr", "refer IoU@0.5"], fontsize=8)
            ax.set_title("task instructions")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out / "sphinx.png")


def ci(items: list[float]) -> str:
    c = interval(items)
    return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def report(s: dict, chart: str) -> str:
    md = ["# SPHINX in miniature: sub-images, encoder mixing, weight mixing, task instructions", "",
          "Sub-images, weight mixing and instructions: the demo's VPG-pretrained VLM instruction-tuned (VPG + "
          "LLM, 300 steps); encoder mixing: the mix projection and a fresh Q-Former between frozen encoders and "
          "the frozen world LLaMA (`configs/world/sphinx.yaml`, 500 steps), then the same instruction tuning. "
          "Intervals: bootstrap 95% over held-out "
          "items; comparisons: paired bootstrap over the same items, with its standard error.", ""]
    if "tiles" in s:
        t, flags = s["tiles"]["runs"], s["tiles"]["banner"]
        md += ["## Sub-images (448 px scenes, 16 visual tokens per view)", "",
               "| views | visual tokens / image | small text, square | small text, banners | VQA (objects at 0.6) | "
               "VQA blind | s / step |", "|---|---|---|---|---|---|---|"]
        for r in t.values():
            sq, ban = split_by(r["smalltext"], flags["smalltext"])
            step = f"{r['step_seconds']:.3f}" if r.get("step_seconds") else "-"
            md.append(f"| {r['label']} | {r['tokens']:.1f} | {ci(sq)} | {ci(ban) if ban else '-'} | {ci(r['vqa'])} | "
                      f"{(r['blind']['vqa_acc'] or 0):.3f} | {step} |")
        md += ["", f"Small text: {sum(not f for f in flags['smalltext'])} square images and "
               f"{sum(flags['smalltext'])} banners (3.5 : 1, whose text is drawn at 0.04 of the shorter side, "
               "so it is smaller still); VQA: 1,000 questions.", ""]
        if s["tiles"].get("probe"):
            pr = s["tiles"]["probe"]
            md += ["What the frozen world ViT can read at each scale, measured: a linear probe (logistic regression) "
                   "from its features of the 3 x 3 patches around the text, in the view that holds it, to the text "
                   "(110 words and numbers; trained on up to 2,000 square train images, scored on held-out ones): " +
                   "; ".join(f"{n} ({p['scale']} px across the image): {ci(p['items'])}" for n, p in pr.items()) +
                   ". A VPG over the same frozen features reads no more than this.", ""]
    if "mix" in s:
        m = s["mix"]["runs"]
        md += ["## Encoder mixing (64 px, 16 queries)", "",
               "Each arm: VPG pretraining (the mix projection + a fresh Q-Former, frozen encoders and LLM, captions "
               "and VQA, 500 steps), then instruction tuning (+ the LLM, captions, VQA and boxes, 300 steps).", "",
               "| encoders | VQA after pretraining (blind) | VQA | VQA blind | referring IoU@0.5 | referring mIoU | "
               "train s |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['label']} | {r['aligned_vqa']:.3f} ({r['aligned_blind']:.3f}) | {ci(r['vqa'])} | "
               f"{(r['blind']['vqa_acc'] or 0):.3f} | {ci(r['refer'])} | "
               f"{sum(r['refer_miou']) / len(r['refer_miou']):.3f} | {r['train_seconds']:.0f} |" for r in m.values()]
        md.append("")
    if "merge" in s:
        b, d = s["merge"]["betas"], s["merge"]["domains"]
        md += ["## Weight mixing (beta * A + (1 - beta) * B)", "",
               f"A: fine-tuned on {d['A']}; B: on {d['B']}; both from the demo's VPG-pretrained VLM, 300 steps.", "",
               "| beta | VQA, domain A | VQA, domain B | mean |", "|---|---|---|---|"]
        for k in sorted(b, key=float, reverse=True):
            mean = [(x + y) / 2 for x, y in zip(b[k]["A"], b[k]["B"])]
            md.append(f"| {k} | {ci(b[k]['A'])} | {ci(b[k]['B'])} | {ci(mean)} |")
        md.append("")
    if "instructions" in s:
        r = s["instructions"]["runs"]
        md += ["## Task instructions (captions, VQA and boxes trained together)", "",
               "| instructions | VQA | caption CIDEr | referring IoU@0.5 |", "|---|---|---|---|"]
        md += [f"| {x['label']} | {ci(x['vqa'])} | {ci(x['caption'])} | {ci(x['refer'])} |" for x in r.values()]
        md.append("")
    md += ["## The paper's claims, one by one", "", "| claim | the paper | compared | b - a [95%] | SE | here |",
           "|---|---|---|---|---|---|"]
    for c in s["claims"]:
        md.append(f"| {c['claim']} | {c['paper']} | {c['compared']} | {fmt_paired(c['paired'])} | "
                  f"{c['paired']['se']:.3f} | **{c['verdict']}** |")
    md += ["", f"\"Costs nothing\": the interval of skipped - all lies above -{TOLERANCE}.", "",
           f"![sphinx]({chart})", "", provenance_line(s["provenance"]), "",
           "Wall seconds per stage in the invocation that wrote this report (a stage found cached costs ~0): " +
           ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".", ""]
    return "\n".join(md)
