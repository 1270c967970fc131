"""LLaMA-Adapter V2 against full fine-tuning and LoRA, with its ablations, in miniature.

    vlkit experiment adapter [--out runs/adapter] [--demo runs/demo] [--only NAME ...]

Every method starts from the same base, the demo's VPG-pretrained VLM (world ViT + Q-Former VPG + the 0.9M
world LLaMA, `vpg_qformer`), and trains on the same data for the same steps: held-out world captions and VQA
with images, 1 : 2. They differ in what trains:
  full           the VPG and the whole LLM (LLaVA stage 2)
  lora           the VPG and LoRA adapters on the LLM's attention (peft, r = 8)
  adapter        LLaMA-Adapter V2: early fusion, bias/scale/norm, joint training of disjoint groups
                 (captions -> VPG projection + early gates; VQA -> prompts, gates, bias/scale, norms)
  late           the same with late fusion (visual tokens added to every adaption prompt; captions -> projection
                 + the prompts' gates)
  no_bias_scale  the same without bias/scale and norms
  sequential     the same with the two streams one after the other (captions, then VQA)
Each is scored on 1,000 held-out VQA questions and 500 captions, with images and blind, on the same questions
asked in words (the scene written out, no image: what each method keeps of the LLM's text ability), and on VQA
with the caption expert's caption in the prompt (the demo's instruction-tuned VLM as the captioner, paper
section 3.4). Comparisons are paired bootstraps over the same items (vlkit.eval.stats). Writes
<out>/report.md, results.json and a chart.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rich.console import Console

from vlkit.eval.stats import fmt_paired, interval, paired, verdict
from vlkit.experiments import provenance_line, publish, save_png
from vlkit.experiments.demo import DEPENDS, stage_overrides
from vlkit.experiments.stages import Stages
from vlkit.fileio import read_json, write_json

STEPS = 600
DATA = ["data.world.seed=0", "data.world.train_scenes=4000", "data.world.test_scenes=500"]
EVAL = ["eval.tasks=[caption,vqa]", "eval.max_per_task=1000", "eval.batch_size=100", "eval.max_new_tokens=48"]
TRAIN = [f"train.steps={STEPS}", "train.batch_size=32", "train.length_groups=4", "train.warmup_steps=40",
         "train.log_every=20", "train.seed=0"]
WORLD = {"seed": 0, "train_scenes": 4000, "test_scenes": 500}
VISUAL = ["vpg.projector", "adapter.visual_gates"]
LATE = ["adapter.prompts", "adapter.gates", "adapter.bias_scale", "llm.norms"]


def streams(visual: list[str] = VISUAL, late: list[str] = LATE, text_only: bool = False) -> str:
    """The adapter runs' streams: the same records the full and LoRA runs see (captions : VQA = 1 : 2, images);
    `text_only`: the VQA asked in words, without its image (the paper's language-only instructions)."""
    return "streams=" + json.dumps([
        {"name": "captions", "data": {"world": WORLD, "tasks": ["caption"]}, "weight": 1.0, "trainable": visual},
        {"name": "instructions", "data": {"world": WORLD, "tasks": ["vqa"]}, "weight": 2.0, "trainable": late,
         "text_only": text_only}])


# name -> (label, config, overrides)
METHODS: dict[str, tuple[str, str, list[str]]] = {
    "full": ("full fine-tuning", "vlm_instruct", ["trainable=[vpg,llm]", "train.lr=1.0e-3"] + DATA),
    "lora": ("LoRA (r=8)", "vlm_instruct", ["trainable=[vpg,lora]", "lora={r: 8, alpha: 16}", "train.lr=3.0e-3"]
             + DATA),
    "adapter": ("LLaMA-Adapter V2", "adapter", [streams(), "train.lr=3.0e-3"]),
    "late": ("late fusion", "adapter", ["adapter.fusion=late",
                                        streams(["vpg.projector", "adapter.gates"],
                                                ["adapter.prompts", "adapter.bias_scale", "llm.norms"]),
                                        "train.lr=3.0e-3"]),
    "no_bias_scale": ("no bias/scale/norm", "adapter", ["adapter.bias_scale=none",
                                                        streams(late=["adapter.prompts", "adapter.gates"]),
                                                        "train.lr=3.0e-3"]),
    "sequential": ("sequential, not joint", "adapter", ["order=sequential", streams(), "train.lr=3.0e-3"]),
    "paper_data": ("V2, the paper's data", "adapter", [streams(text_only=True), "train.lr=3.0e-3"]),
}
# (claim, a, b, what is compared, the paper's figure): b - a, paired over the same items
CLAIMS = [
    ("parameter-efficient tuning is close to full fine-tuning", "full", "adapter", "vqa",
     "V2 7B with 14M trainable: instruction following comparable to fully fine-tuned models (sec 4)"),
    ("early fusion beats late fusion", "late", "adapter", "vqa",
     "early fusion avoids the interference of image-text alignment with instruction following (sec 3.3)"),
    ("joint training of disjoint groups beats sequential", "sequential", "adapter", "vqa",
     "joint training avoids the interference between the two tasks (sec 3.2)"),
    ("unlocking bias/scale/norm helps", "no_bias_scale", "adapter", "vqa",
     "bias/scale/norm raise instruction following at +0.04% parameters (sec 3.1)"),
    ("captions + language-only instructions give visual instruction following", "paper_data", "paper_data",
     "vqa_vs_blind", "V2 follows visual instructions with no visual instruction data (sec 3.2)"),
    ("the caption expert helps", "paper_data", "paper_data", "vqa_expert",
     "expert captions as context improve visual understanding (sec 3.4)"),
    ("the caption expert helps", "adapter", "adapter", "vqa_expert",
     "expert captions as context improve visual understanding (sec 3.4)"),
    ("adapters keep the LLM's text ability better than full tuning", "full", "adapter", "text",
     "the frozen LLM keeps its language ability (sec 1)"),
    ("adapters keep the LLM's text ability better than full tuning", "full", "no_bias_scale", "text",
     "the frozen LLM keeps its language ability (sec 1)"),
]
TOLERANCE = 0.03  # "close": the paired 95% interval of (adapter - full) lies above -0.03


def run_experiment(out: str | Path = "runs/adapter", demo: str | Path = "runs/demo", progress: bool | None = None,
                   only: list[str] | None = None) -> dict:
    console = Console(stderr=True)
    out, demo = Path(out), Path(demo)
    t_all = time.perf_counter()
    stages = Stages(console, progress)
    for name in ("lm_llama_small", "clip_vit", "vpg_qformer", "vlm_instruct"):  # the base and the captioner
        stages.run(name, stage_overrides(name, demo), after=DEPENDS.get(name, ()))
    unknown = sorted(set(only or ()) - set(METHODS))
    if unknown:
        from vlkit.errors import VlkitError
        raise VlkitError(f"experiment adapter: unknown run(s) {unknown}; choose from {sorted(METHODS)}")
    init = demo / "vpg_qformer" / "model"
    runs = {}
    for name, (label, config, extra) in METHODS.items():
        if only and name not in only:
            continue
        runs[name] = stages.run(name, [f"output_dir={out / name}", f"init={init}", *EVAL, *TRAIN, *extra],
                                config=config, after=("vpg_qformer",), label=label)
    from vlkit.world.sources import RecordsConfig, load_split

    expert, test = demo / "vlm_instruct" / "model", load_split(RecordsConfig(world=WORLD), "test")
    checks = {name: analyse(out / name, expert, test, stages.retrained(name, "vlm_instruct"), console, progress)
              for name in runs}
    base_text = base_text_vqa(demo / "lm_llama_small" / "model", expert, test, out, console)
    return publish(out, summarize(runs, checks, base_text), stages.seconds, t_all, lambda s: plot(s, out), report,
                   console)


class Memo:
    """An expert whose answer per distinct image is computed once (every method is scored on the same images)."""

    def __init__(self, expert):
        self.expert, self.name, self.cache = expert, expert.name, {}

    def __call__(self, image) -> str:
        key = hashlib.sha1(image.tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.expert(image)
        return self.cache[key]


_EXPERTS: dict[str, Memo] = {}


def captioner(expert_dir: Path) -> Memo:
    """The caption expert of `expert_dir`, loaded once per process and its captions kept."""
    from vlkit.experts import CaptionExpert

    return _EXPERTS.setdefault(str(expert_dir), Memo(CaptionExpert(expert_dir)))


def captioned(memo: Memo):
    """record -> its text-only conversation with each image replaced by the expert's caption."""
    from vlkit.data.records import text_only
    from vlkit.experts import with_context

    return lambda rec: text_only(with_context(rec["messages"], rec["images"], [memo]))


def analyse(run: Path, expert_dir: Path, test: list[dict], stale: bool, console: Console,
            progress: bool | None) -> dict:
    """The checks beyond the recipe's own evaluation, cached beside the run: the questions asked in words, and VQA
    with the caption expert's caption in the prompt."""
    from vlkit.eval.world import EvalConfig, evaluate_vlm
    from vlkit.models.io import load_vlm
    from vlkit.recipes.lm import context_vqa

    key = {"run": read_json(run / "run.json")["config_hash"], "expert": read_json(expert_dir.parent / "run.json")
           ["config_hash"], "n": 1000, "checks": 3}
    cache = run / "checks.json"
    if cache.is_file() and not stale and read_json(cache).get("key") == key:
        return read_json(cache)["checks"]
    console.print(f"[bold]{run.name}[/bold]: questions in words, and VQA with the caption expert")
    model, proc = load_vlm(run / "model")
    text = context_vqa(model.llm, proc.tokenizer, test, limit=1000, items=True)
    memo = captioner(expert_dir)
    expert_text = context_vqa(model.llm, proc.tokenizer, test, limit=1000, items=True, describe=captioned(memo))
    with_expert = evaluate_vlm(model, proc, test, EvalConfig(tasks=["vqa"], max_per_task=1000, blind=False,
                                                              batch_size=100), progress=progress, experts=[memo])
    checks = {"text": {k: text[k] for k in ("acc", "lo", "hi", "n", "items")},
              "vqa_expert": {"acc": with_expert["image"]["vqa_acc"], "items": with_expert["items"]["image"]["vqa_acc"]},
              "expert_text": {k: expert_text[k] for k in ("acc", "lo", "hi", "n", "items")}, "gates": gates(model)}
    write_json(cache, {"key": key, "checks": checks})
    return checks


def base_text_vqa(lm_dir: Path, expert_dir: Path, test: list[dict], out: Path, console: Console) -> dict:
    """The world LLaMA before any visual tuning, on the same questions in words (the text ability to keep), and
    with the caption expert's caption in place of the scene (what the expert's text alone can answer)."""
    from transformers import AutoModelForCausalLM

    from vlkit.data.tokenizer import load_tokenizer
    from vlkit.recipes.lm import context_vqa

    key = {"lm": read_json(lm_dir.parent / "run.json")["config_hash"], "n": 1000,
           "expert": read_json(expert_dir.parent / "run.json")["config_hash"]}
    cache = out / "base_text.json"
    if cache.is_file() and read_json(cache).get("key") == key:
        return read_json(cache)["text"]
    console.print("[bold]base LLM[/bold]: questions in words, and with the expert's caption alone")
    lm, tok = AutoModelForCausalLM.from_pretrained(lm_dir), load_tokenizer(lm_dir)
    r = context_vqa(lm, tok, test, limit=1000, items=True)
    e = context_vqa(lm, tok, test, limit=1000, items=True, describe=captioned(captioner(expert_dir)))
    text = {**{k: r[k] for k in ("acc", "lo", "hi", "n", "items")},
            "expert_alone": {k: e[k] for k in ("acc", "lo", "hi", "n")}}
    write_json(cache, {"key": key, "text": text})
    return text


def gates(model) -> dict | None:
    """Mean |tanh(gate)| over heads, per adapted layer: how far each layer's prompts were let in."""
    if "adapter" not in model.fusions:
        return None
    a = model.fusion("adapter")
    return {"visual": {i: float(g.tanh().abs().mean()) for i, g in zip(a.visual_layer_ids, a.visual_gates)},
            "prompts": {i: float(g.tanh().abs().mean()) for i, g in zip(a.prompt_layer_ids, a.gates)}}


def items_of(s: dict, name: str, what: str) -> list[float]:
    r = s["raw"][name]
    return {"vqa": r["vqa_items"], "blind": r["blind_items"], "vqa_expert": r["checks"]["vqa_expert"]["items"],
            "text": r["checks"]["text"]["items"]}[what]


def summarize(runs: dict[str, dict], checks: dict[str, dict], base_text: dict) -> dict:
    s: dict = {"steps": STEPS, "methods": {}, "raw": {}, "claims": [],
               "base_text": {k: base_text[k] for k in ("acc", "lo", "hi", "n", "expert_alone") if k in base_text}}
    for name, r in runs.items():
        ev, items = r["eval"], r["eval"]["items"]
        s["raw"][name] = {"vqa_items": items["image"]["vqa_acc"], "blind_items": items["blind"]["vqa_acc"],
                          "checks": checks[name]}
        s["methods"][name] = {
            "label": METHODS[name][0], "trainable_params": r["trainable_params"], "total_params": r["total_params"],
            "trainable_pct": 100 * r["trainable_params"] / r["total_params"],
            "vqa": interval(items["image"]["vqa_acc"]),
            "cider_items": interval(items["image"]["caption_cider"]),
            "blind_vqa": ev.get("blind", {}).get("vqa_acc"), "blind_cider": ev.get("blind", {}).get("caption_cider"),
            "text": interval(checks[name]["text"]["items"]),
            "vqa_expert": interval(checks[name]["vqa_expert"]["items"]),
            "expert_text": interval(checks[name]["expert_text"]["items"]) if "expert_text" in checks[name] else None,
            "gates": checks[name].get("gates"), "train_seconds": r["train_seconds"]}
    for claim, a, b, what, paper in CLAIMS:
        if a not in runs or b not in runs:
            continue
        xa = items_of(s, a, {"vqa_expert": "vqa", "vqa_vs_blind": "blind"}.get(what, what))
        xb = items_of(s, b, "vqa" if what == "vqa_vs_blind" else what)
        p = paired(xa, xb)
        if claim.startswith("parameter-efficient"):
            holds = "holds" if p["lo"] > -TOLERANCE else ("does not hold" if p["hi"] < -TOLERANCE else
                                                          "not shown (within noise)")
        else:
            holds = verdict(p)
        s["claims"].append({"claim": claim, "a": a, "b": b, "what": what, "paper": paper, "paired": p,
                            "verdict": holds})
    return s


def plot(s: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(s["methods"])
    m = s["methods"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("vqa", "VQA (image)"), ("vqa_expert", "VQA + caption expert"),
                                      ("text", "questions in words (no image)"))):
        means = [m[n][key]["mean"] for n in names]
        err = [[m[n][key]["mean"] - m[n][key]["lo"] for n in names], [m[n][key]["hi"] - m[n][key]["mean"]
                                                                     for n in names]]
        ax.bar(x + (k - 1) * 0.27, means, 0.27, yerr=err, capsize=3, label=label)
    ax.axhline(s["base_text"]["acc"], color="gray", ls="--", lw=1, label="base LLM, questions in words")
    blind = [m[n]["blind_vqa"] or 0 for n in names]
    ax.scatter(x - 0.27, blind, marker="_", s=300, color="black", zorder=3, label="VQA blind")
    ax.set_xticks(x)
    ax.set_xticklabels([m[n]["label"] for n in names], fontsize=8, rotation=12)
    ax.set_ylabel("exact-match accuracy (95% interval)")
    ax.set_title(f"Held-out world VQA after {s['steps']} steps from the same base")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    bx.barh(x, [m[n]["trainable_params"] for n in names], color="tab:purple")
    bx.set_xscale("log")
    bx.set_yticks(x)
    bx.set_yticklabels([m[n]["label"] for n in names], fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("trainable parameters (log)")
    fig.tight_layout()
    return save_png(fig, out / "adapter.png")


def report(s: dict, chart: str) -> str:
    m, bt = s["methods"], s["base_text"]

    def ci(c):
        return f"{c['mean' if 'mean' in c else 'acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"

    md = ["# LLaMA-Adapter V2 in miniature: against full fine-tuning and LoRA, with its ablations", "",
          f"Every method starts from the demo's VPG-pretrained VLM and trains {s['steps']} steps (batch 32) on the "
          "same world data: captions and VQA with images, 1 : 2 (\"the paper's data\": the VQA asked in words, "
          "without its image, as the paper's language-only instructions). Scores on 1,000 held-out VQA questions "
          "and 500 captions; \"in words\": the same questions with the scene written out and no image (the base "
          f"LLM: {ci(bt)}); \"+ expert\": VQA with the demo's instruction-tuned VLM's caption of the image in the "
          "prompt. Intervals: bootstrap 95% over items.", "",
          "| method | trainable | % of model | VQA | VQA blind | CIDEr | CIDEr blind | in words | VQA + expert "
          "| train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m.values():
        md.append(f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f}% | {ci(r['vqa'])} | "
                  f"{(r['blind_vqa'] or 0):.3f} | {ci(r['cider_items'])} | {(r['blind_cider'] or 0):.3f} | "
                  f"{ci(r['text'])} | {ci(r['vqa_expert'])} | {r['train_seconds']:.0f} |")
    md += ["", "## The paper's claims, one by one", "", "Each row: the difference b - a on the same items with its "
           "paired bootstrap 95% interval.", "", "| claim | the paper | compared | b - a [95%] | here |",
           "|---|---|---|---|---|"]
    for c in s["claims"]:
        what = {"vqa": "VQA", "vqa_expert": "VQA, + expert vs without", "text": "questions in words",
                "vqa_vs_blind": "VQA, image vs blind"}[c["what"]]
        pair = f"{m[c['b']]['label']} - {m[c['a']]['label']}" if c["a"] != c["b"] else m[c["a"]]["label"]
        md.append(f"| {c['claim']} | {c['paper']} | {what}: {pair} | {fmt_paired(c['paired'])} | **{c['verdict']}** |")
    md += ["", f"\"Close\" for the first claim: the interval of adapter - full lies above -{TOLERANCE}.", ""]
    md += ["## What limits it, measured", ""]
    if "expert_alone" in bt:
        e = bt["expert_alone"]
        md.append(f"- The expert's text alone: the base LLM answers {ci(e)} of the questions from the expert's "
                  f"caption (no image), {ci(bt)} from the true scene in words. A method can only gain from the "
                  "expert's caption as far as the caption is right and the method still reads its context: see each "
                  "method's \"in words\" column.")
    both = [(r["label"], r["expert_text"], r["vqa_expert"]) for r in m.values() if r.get("expert_text")]
    if both:
        md += ["- The expert's caption through each method's own LLM, without the image, beside the same prompt with "
               "the image (what the image's path into the LLM adds or costs once the caption is there):", "",
               "| method | caption, no image | caption + image |", "|---|---|---|"]
        md += [f"| {label} | {ci(a)} | {ci(b)} |" for label, a, b in both]
        md.append("")
    gated = {n: r["gates"] for n, r in m.items() if r.get("gates")}
    if gated:
        md += ["- How far the gates opened (mean |tanh(gate)| over heads; the image enters only through the visual "
               "layers under early fusion, through every prompt under late fusion):", "",
               "| method | visual layers | prompt layers |", "|---|---|---|"]
        for n, g in gated.items():
            vis = ", ".join(f"{k}: {v:.3f}" for k, v in g["visual"].items()) or "-"
            md.append(f"| {m[n]['label']} | {vis} | " + ", ".join(f"{k}: {v:.3f}" for k, v in g["prompts"].items())
                      + " |")
    md += ["", f"![methods]({chart})", "", provenance_line(s["provenance"]), "",
           "Wall seconds per stage in the invocation that wrote this report (a stage found cached costs ~0): " +
           ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".", ""]
    return "\n".join(md)
