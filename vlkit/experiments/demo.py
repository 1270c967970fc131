"""`vlkit demo`: the embedded-default pipeline, end to end, on the shapes world.

world -> tiny LLaMAs (0.9M, and 0.2M as a VPGTrans source; one BPE recipe) -> world ViT (CLIP-style)
-> VPG pretraining (Q-Former, tower and LLaMA frozen) -> VPGTrans (the 0.2M LLaMA's VPG moved to the 0.9M
LLaMA, its speed-up against the from-scratch VPG) -> instruction tuning -> held-out evaluation beside a
blind baseline, results tables, ``<out>/report.md`` and a contact sheet of held-out answers. Every
stage is cached by its config: a second run reuses finished stages.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlkit.data.records import load_records
from vlkit.errors import VlkitError
from vlkit.eval.curves import eval_curve, speedup, steps_to_reach, times
from vlkit.experiments.stages import WORLD_CONFIGS, Stages
from vlkit.experiments import provenance, provenance_line
from vlkit.fileio import write_json, write_text
from vlkit.recipes import load_config
from vlkit.world.dataset import build, info
from vlkit.world.preview import contact_sheet, preview_records

CONFIG_DIR = WORLD_CONFIGS

STAGES = (
    ("lm_llama_small", "tiny LLaMA"),
    ("lm_llama_tiny", "tiny LLaMA, VPGTrans source"),
    ("clip_vit", "world ViT (CLIP)"),
    ("vpg_qformer", "VLM: Q-Former VPG"),
    ("vpg_tiny", "VPGTrans source: Q-Former VPG on the 0.2M LLaMA"),
    ("transfer_llama_tiny_to_small", "VPGTrans: that VPG moved to the 0.9M LLaMA"),
    ("vlm_instruct", "VLM: instruction tuning"),
)

TRANSFER = "transfer_llama_tiny_to_small"
SCRATCH_EVAL_EVERY = 100  # vpg_qformer's evaluations during training: the curve VPGTrans is measured against

# a stage is retrained whenever a stage it reads from was retrained in this run
DEPENDS = {"vpg_qformer": ("lm_llama_small", "clip_vit"), "vpg_tiny": ("lm_llama_tiny", "clip_vit"),
           "transfer_llama_tiny_to_small": ("vpg_tiny", "lm_llama_small"), "vlm_instruct": ("vpg_qformer",)}

VLM_METRICS = (("caption_cider", "caption CIDEr"), ("caption_rougeL", "caption ROUGE-L"), ("vqa_acc", "VQA accuracy"),
               ("grounding_iou50", "grounding IoU@0.5"), ("text_acc", "text reading accuracy"))


def stage_overrides(name: str, out: Path) -> list[str]:
    over = [f"output_dir={out / name}"]
    if name in ("vpg_qformer", "vpg_tiny"):  # wire the VLMs to this demo's own stages
        llm = "lm_llama_small" if name == "vpg_qformer" else "lm_llama_tiny"
        over += [f"model.tower.path={out / 'clip_vit' / 'vision'}", f"model.llm.path={out / llm / 'model'}"]
    if name == "vpg_qformer":  # evaluated as it trains: the from-scratch curve VPGTrans is measured against
        over += [f"train.eval_every={SCRATCH_EVAL_EVERY}", "eval.during_training=100"]
    if name == "transfer_llama_tiny_to_small":
        over += [f"source={out / 'vpg_tiny' / 'model'}", f"target.path={out / 'lm_llama_small' / 'model'}"]
    if name == "vlm_instruct":
        over += [f"init={out / 'vpg_qformer' / 'model'}"]
    return over


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
    preview_records(load_records(world_dir / "test.jsonl")[:6], out / "world_preview.png",
                    title="shapes world: held-out samples")

    stages = Stages(console, progress, fresh, config_dir)
    for name, label in STAGES:
        results[name] = stages.run(name, stage_overrides(name, out), after=DEPENDS.get(name, ()), label=label)
    timings.update(stages.seconds)
    timings["total"] = time.perf_counter() - t_all

    samples = write_samples(results["vlm_instruct"]["eval"]["examples"], out / "vlm_samples.png")
    tables, md = summary(results, timings, samples.name)
    trans = vpgtrans_speedup(results)
    table, trans_md = vpgtrans_summary(trans, results, timings)
    wide = Console(width=120)
    for t in [*tables, table]:
        wide.print(t)
    wide.print(trans["line"])
    prov = provenance()
    write_text(out / "report.md", md + trans_md + "\n" + provenance_line(prov) + "\n")
    write_json(out / "results.json", {"provenance": prov, "figures": figures(results, trans),
                                      "seconds": {k: round(v, 1) for k, v in timings.items()}})
    console.print(f"report: {out / 'report.md'}")
    return {"results": results, "timings": timings, "vpgtrans": trans}


def figures(results: dict[str, dict], trans: dict) -> dict:
    """The demo's headline figures, by name (the README's full tables read each stage's results.json too)."""
    lm, vit = results["lm_llama_small"], results["clip_vit"]
    v, t = results["vpg_qformer"], results["vlm_instruct"]
    sp = trans["speedups"]["caption_cider"]
    return {"lm_ppl": lm["heldout_ppl"], "lm_context_vqa": lm.get("context_vqa_acc"),
            "vit_i2t_r1": vit["heldout_i2t_r1"],
            **{f"{name}_{mode}_{m}": r["eval"][mode].get(m) for name, r in (("vpg", v), ("instruct", t))
               for mode in ("image", "blind") for m in ("caption_cider", "vqa_acc")},
            "vpgtrans_scratch_best": sp["scratch_best"], "vpgtrans_scratch_best_step": sp["scratch_best_step"],
            "vpgtrans_best": sp["transfer_best"], "vpgtrans_reached": sp["reached"],
            "vpgtrans_speedup_steps": sp.get("speedup_steps")}


def vpgtrans_speedup(results: dict[str, dict]) -> dict:
    """The demo's VPGTrans stage against the from-scratch VPG on the same LLM (vpg_qformer), per metric."""
    scratch = eval_curve(results["vpg_qformer"]["history"])
    if not scratch:
        raise VlkitError("vpg_qformer: no evaluations during training to compare VPGTrans with; set "
                         f"train.eval_every (the demo sets {SCRATCH_EVAL_EVERY})")
    trans = results[TRANSFER]["curve"]
    sp = {m: speedup(scratch, trans, m) for m in ("caption_cider", "vqa_acc")}
    c = sp["caption_cider"]
    head = (f"VPGTrans (0.2M -> 0.9M LLaMA), caption CIDEr: from scratch best {c['scratch_best']:.3f} at step "
            f"{c['scratch_best_step']}; ")
    if c["reached"]:
        line = head + (f"VPGTrans passes it at step {c['transfer_step']} (warm-up included): speed-up "
                       f"{times(c['speedup_steps'])} in steps, {times(c['speedup_seconds'])} in optimisation seconds")
    else:
        line = head + (f"VPGTrans does not pass it in its {c['transfer_steps']} steps (best "
                       f"{c['transfer_best']:.3f}): no speed-up here")
        half = c["scratch_best"] / 2  # where the transfer does save steps, if anywhere
        a, b = steps_to_reach(trans, "caption_cider", half), steps_to_reach(scratch, "caption_cider", half)
        if a is not None and b is not None:
            before = max((p["step"] for p in scratch if p["step"] < b), default=0)  # its previous evaluation
            line += f"; half of it ({half:.3f}): VPGTrans at step {a}, from scratch between steps {before} and {b}"
    return {"speedups": sp, "scratch_curve": scratch, "line": line}


def vpgtrans_summary(trans: dict, results: dict[str, dict], timings: dict[str, float]) -> tuple[Table, str]:
    table = Table(title="vlkit demo: VPGTrans, the 0.2M LLaMA's VPG moved to the 0.9M LLaMA (held-out, same records)")
    cols = ("metric", "from scratch: best (step)", "final", "VPGTrans: passes at", "final", "speed-up: steps",
            "seconds")
    for col in cols:
        table.add_column(col)
    rows = []
    for metric, label in (("caption_cider", "caption CIDEr"), ("vqa_acc", "VQA accuracy")):
        sp = trans["speedups"][metric]
        passed = f"step {sp['transfer_step']}" if sp["reached"] else f"never in {sp['transfer_steps']} steps"
        ratio = [times(sp[k]) if sp["reached"] else "-" for k in ("speedup_steps", "speedup_seconds")]
        rows.append((label, f"{sp['scratch_best']:.3f} ({sp['scratch_best_step']})", f"{sp['scratch_final']:.3f}",
                     passed, f"{sp['transfer_final']:.3f}", *ratio))
    for row in rows:
        table.add_row(*row)
    src, t = results["vpg_tiny"], results[TRANSFER]
    md = ["", "## VPGTrans", "",
          f"The Q-Former VPG pretrained on the 0.2M LLaMA ({src['steps']} steps, caption CIDEr "
          f"{src['eval']['image']['caption_cider']:.3f} on its own LLM) is moved to the 0.9M LLaMA: word converter, "
          f"projector warm-up ({t['stages'].get('warmup', {}).get('steps', 0)} steps at "
          f"{(t['warmup'] or {}).get('lr_scale', 0):g}x the learning rate), then "
          f"{t['stages']['finetune']['steps']} fine-tuning steps ({timings[TRANSFER]:.0f}s). From scratch = the VPG "
          "pretraining above, evaluated every "
          f"{SCRATCH_EVAL_EVERY} steps on the same held-out records (100 per task). Speed-up as "
          "VPGTrans defines it: the step at which from scratch reaches its best, divided by the first step at which "
          "VPGTrans exceeds it (warm-up counted). `vlkit experiment vpgtrans` measures more (ablations, LLaMA -> OPT).",
          "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", trans["line"] + ".", ""]
    return table, "\n".join(md)


def write_samples(examples: list[dict], path: Path) -> Path:
    rows = [(ex["images"], [f"[{ex['task']}] {ex['question']}", f"model: {ex['prediction']}",
                            f"reference: {ex['reference']}"]) for ex in examples]
    return contact_sheet(rows, path,
                         title="held-out answers of the demo VLM (Q-Former VPG + tiny LLaMA, instruction tuned)")


def summary(results: dict[str, dict], timings: dict[str, float], samples_png: str) -> tuple[list[Table], str]:
    stages = Table(title="vlkit demo: foundation models, held-out")
    for col in ("stage", "model", "parameters", "metric", "value", "reference", "time"):
        stages.add_column(col)
    rows = []
    for name, label in STAGES[:3]:
        r = results[name]
        if r["recipe"] == "lm":
            rows.append((name, label, f"{r['params']:,}", "perplexity", f"{r['heldout_ppl']:.3f}",
                         f"uniform: {r['vocab_size']}", f"{timings[name]:.0f}s"))
            if r.get("context_vqa_acc") is not None:
                rows.append(("", "", "", "VQA, scene told in words", f"{r['context_vqa_acc']:.3f}",
                             "ceiling of a frozen-LLM VLM", ""))
        else:
            rows.append((name, label, f"{r['vision_params']:,}", "image->caption R@1", f"{r['heldout_i2t_r1']:.3f}",
                         f"chance: {r['heldout_chance']:.4f}", f"{timings[name]:.0f}s"))
    for row in rows:
        stages.add_row(*row)
    v, t = results["vpg_qformer"], results["vlm_instruct"]
    vlm = Table(title="vlkit demo: the VLM on held-out world tasks, with the image and blind (blank image)")
    for col in ("metric", "VPG pretrained: image", "blind", "+ instruction tuned: image", "blind", "n"):
        vlm.add_column(col)
    vrows = []
    kinds = sorted(k for k in t["eval"]["image"] if k.startswith("vqa_acc_"))
    labels = list(VLM_METRICS) + [(k, f"  VQA: {k[8:]}") for k in kinds]
    for key, label in labels:
        if key not in t["eval"]["image"]:
            continue
        cells = [f"{r['eval'][m][key]:.3f}" if key in r["eval"][m] else "-" for r in (v, t) for m in ("image", "blind")]
        n = "" if key.startswith("vqa_acc_") else str(t["eval"]["counts"].get(key.split("_")[0], ""))
        vrows.append((label, *cells, n))
    for row in vrows:
        vlm.add_row(*row)
    md = ["# vlkit demo report", "", "Every figure below was measured by this run on held-out shapes-world data.", "",
          "## Foundation models", "",
          "| stage | model | parameters | metric | value | reference | time |", "|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "## The vision-language model", "",
           f"World ViT (frozen) -> Q-Former VPG ({v['num_image_tokens']} visual tokens per image) -> tiny LLaMA. "
           f"**VPG pretrained** (BLIP-2 stage 2): tower and LLaMA frozen, {v['trainable_params']:,} trainable of "
           f"{v['total_params']:,} parameters, {v['steps']} steps on captions + VQA ({timings['vpg_qformer']:.0f}s). "
           f"**+ instruction tuned** (LLaVA stage 2): from there, VPG and LLaMA trained together, "
           f"{t['trainable_params']:,} trainable, {t['steps']} steps on VQA and captions mixed 2:1 "
           f"({timings['vlm_instruct']:.0f}s). The blind baseline is the same model given a blank image: the gap is "
           "what the image contributes. CIDEr is CIDEr-D as pycocoevalcap reports it (x1); `-` = not evaluated.", "",
           "| metric | VPG pretrained: image | blind | + instruction tuned: image | blind | n |",
           "|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(row) + " |" for row in vrows]
    md += ["", f"![held-out answers]({samples_png})", "",
           f"Total time: {timings['total']:.0f}s (world generation {timings['world']:.1f}s).", "",
           "![held-out samples](world_preview.png)", ""]
    return [stages, vlm], "\n".join(md)
