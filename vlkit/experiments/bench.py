"""`vlkit bench build`: the science bench, the models every experiment (not the demo) builds on.

The demo's models are small enough to train in minutes, and too weak for any paper's mechanism to show:
its 0.9M LLaMA answers about half of the world's questions even when the scene is written out in its
context. The bench trains, once and cached (``runs/bench``), models that know their world:

  world        scenes of 2-6 objects with sizes, colours, positions, text, and spatial relations asked about
               (1,200 held-out scenes: >= 1,000 held-out items per task);
  lm_small     world LLaMA (~0.7M parameters)       | context VQA >= 0.95 (scene in words, 1,000 held-out
  lm_large     world LLaMA (~2.4M, same tokenizer)  | questions), held-out perplexity plateaued (it moves
  lm_opt       world OPT (~1M, its own tokenizer)   | < 1% over the last fifth of training)
  vit          world ViT, CLIP-style              | image->caption R@1 >= 0.8 on 500 held-out scenes

Why the LMs train as they do (measured while building this): a tiny LLaMA given the world's text as one
stream cut into blocks sits for thousands of steps on a plateau where it answers from priors (colour and
shape questions at chance) because it has not yet learnt to look things up in its context, the slow
formation of the attention maps that copy from context (induction heads). What shortens it here: whole
conversations per block (a question never lands in a block without its scene), a multi-question drill
per scene that opens by copying the scene, lr 1e-3 rather than 3e-3 and 3 layers rather than 4 (on
repeated random sequences, 2-4 layers at 1e-3 learn to copy within 200-300 steps; 4 layers at 3e-3 had
not in 600). That alone leaves the LLaMA at ~0.5: it copies but does not bind an attribute to the object a
question names. lm_small first runs the recall warm-up (lm recipe ``recall_warmup``, vlkit/world/recall.py):
the copy task, then the shape <-> colour lookup in the world's words, each until it forms, and keeps a
tenth of its rows synthetic during the world training, which otherwise overwrites the lookup. And it trains
on 32,000 scenes rather than 8,000 (seen ~once each, so that counts are read, not remembered) with each packed
conversation kept to itself (lm recipe ``data.document_mask``), as a question is asked alone at evaluation.

Each stage is a recipe config in ``configs/bench/``; a finished stage is reused. The gates are checked and
written to ``<out>/bench.json`` and ``<out>/report.md``; a gate that is missed is reported, not hidden, and
makes the command exit non-zero (``--no-strict`` keeps going).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vlkit.errors import VlkitError
from vlkit.eval.stats import fmt
from vlkit.experiments import provenance, provenance_line
from vlkit.experiments.stages import Stages
from vlkit.fileio import read_json, write_json, write_text
from vlkit.recipes import CONFIGS

BENCH_CONFIGS = CONFIGS / "bench"
DEFAULT_OUT = Path("runs/bench")

# stage -> (label, the gates it must pass)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lm_small": ("world LLaMA, small (VPGTrans source)", ("context_vqa", "plateau")),
    "lm_large": ("world LLaMA, large (VPGTrans target)", ("context_vqa", "plateau")),
    "lm_opt": ("world OPT (cross-family target)", ("context_vqa", "plateau")),
    "vit": ("world ViT (CLIP-style)", ("retrieval",)),
}
CONTEXT_VQA_MIN = 0.95
RETRIEVAL_MIN = 0.8
PLATEAU_MAX = 0.01  # relative change of held-out perplexity over the last fifth of training


def model_dir(name: str, out: str | Path = DEFAULT_OUT) -> Path:
    """Where a bench stage's model lies: the LM's HF directory, or the ViT's vision tower."""
    if name not in STAGES:
        raise KeyError(f"unknown bench model {name!r}; choose from {sorted(STAGES)}")
    return Path(out) / name / ("vision" if name == "vit" else "model")


def plateau(curve: list[dict]) -> dict:
    """How much held-out perplexity still moved (either way) over the last fifth of training: from the last
    evaluation at or before 80% of the steps to the final one."""
    last = curve[-1] if curve else None
    start = next((p for p in reversed(curve) if p["step"] <= 0.8 * last["step"]), None) if last else None
    if len(curve) < 3 or start is None or start is last:
        return {"passed": False, "why": f"only {len(curve)} perplexity evaluations, none before the last fifth; "
                "set train.eval_every"}
    change = abs(start["ppl"] - last["ppl"]) / start["ppl"]
    return {"passed": bool(change < PLATEAU_MAX), "change": change, "from_step": start["step"],
            "to_step": last["step"], "ppl": last["ppl"]}


def gates(name: str, result: dict) -> dict[str, dict]:
    out = {}
    for gate in STAGES[name][1]:
        if gate == "context_vqa":
            c = result.get("context_vqa") or {}
            out[gate] = {"passed": bool(c and c["acc"] >= CONTEXT_VQA_MIN), "value": c.get("acc"), "interval": c,
                         "threshold": CONTEXT_VQA_MIN, "per_kind": c.get("per_kind"),
                         "any_order": result.get("context_vqa_any_order")}
        elif gate == "plateau":
            out[gate] = plateau(result.get("ppl_curve") or [])
        elif gate == "retrieval":
            v = result.get("heldout_i2t_r1")
            out[gate] = {"passed": bool(v is not None and v >= RETRIEVAL_MIN), "value": v,
                         "threshold": RETRIEVAL_MIN, "gallery": result.get("gallery")}
    return out


def build_bench(out: str | Path = DEFAULT_OUT, progress: bool | None = None, only: list[str] | None = None,
                fresh: bool = False) -> dict:
    """Train (or reuse) every bench model, check its gates, write <out>/bench.json and report.md."""
    console = Console(stderr=True)
    out = Path(out)
    unknown = sorted(set(only or ()) - set(STAGES))
    if unknown:
        raise VlkitError(f"bench build: unknown stage(s) {unknown}; choose from {sorted(STAGES)}")
    stages = Stages(console, progress, fresh, BENCH_CONFIGS)
    t0 = time.perf_counter()
    path = out / "bench.json"
    # stages built before (--only) stay in the summary; a stage being rebuilt leaves it until it is done again
    summary: dict = {"stages": {}}
    if path.is_file():
        summary["stages"] = {n: v for n, v in read_json(path).get("stages", {}).items()
                             if n in STAGES and not (fresh and (not only or n in only))}
        if fresh:
            path.unlink()
    for name, (label, _) in STAGES.items():
        if only and name not in only:
            continue
        before = summary["stages"].pop(name, None)  # until this stage is done (again), the bench does not have it
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, summary | {"passed": False, "partial": True})
        result = stages.run(name, [f"output_dir={out / name}"], label=label)
        summary["stages"][name] = {"label": label, "gates": gates(name, result), "model_dir": str(model_dir(name, out)),
                                   "params": result.get("params") or result.get("vision_params"),
                                   "steps": result.get("steps"), "seconds": round(stages.seconds[name], 1),
                                   "recall_after": result.get("recall_after_stages"),
                                   "trained_now": name in stages.trained}
        if name not in stages.trained and before and before.get("seconds"):  # cached: the time it took to build
            summary["stages"][name]["seconds"] = before["seconds"]
        write_json(path, summary | {"passed": False, "partial": True})  # what is done so far
    summary["missing"] = [n for n in STAGES if n not in summary["stages"]]
    summary["passed"] = not summary["missing"] and all(
        g["passed"] for s in summary["stages"].values() for g in s["gates"].values())
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["provenance"] = provenance()
    write_json(out / "bench.json", summary)
    write_text(out / "report.md", report(summary))
    console.print(report(summary))
    return summary


def load_bench(out: str | Path = DEFAULT_OUT, need: tuple[str, ...] = tuple(STAGES)) -> dict:
    """The bench summary, checked to hold the models an experiment needs (a clear error otherwise)."""
    path = Path(out) / "bench.json"
    if not path.is_file():
        raise VlkitError(f"{path}: no bench here; run `vlkit bench build --out {out}` first (about an hour on "
                         "2 CPU cores, once)")
    summary = read_json(path)
    missing = [n for n in need if n not in summary.get("stages", {}) or not model_dir(n, out).is_dir()]
    if missing:
        raise VlkitError(f"{path}: bench models {missing} are missing; run `vlkit bench build --out {out}`")
    return summary


def _gate_cell(gate: str, g: dict) -> str:
    mark = "pass" if g["passed"] else "MISSED"
    if gate == "context_vqa" and g.get("interval"):
        return f"context VQA {fmt({'mean': g['value'], **g['interval']})} (>= {g['threshold']}) {mark}"
    if gate == "plateau":
        if "change" not in g:
            return f"plateau: {g['why']} {mark}"
        return (f"ppl {g['ppl']:.3f}, moved {g['change']:+.2%} over steps {g['from_step']}-{g['to_step']} "
                f"(< {PLATEAU_MAX:.0%}) {mark}")
    if gate == "retrieval":
        return f"image->caption R@1 {g['value']:.3f} over {g['gallery']} (>= {g['threshold']}) {mark}"
    return f"{gate} {mark}"


def report(summary: dict) -> str:
    md = ["# The science bench", "", "| model | parameters | steps | gates | seconds |", "|---|---|---|---|---|"]
    for name, s in summary["stages"].items():
        cells = "; ".join(_gate_cell(g, v) for g, v in s["gates"].items())
        secs = f"{s['seconds']:.0f}" + ("" if s["trained_now"] else " (built earlier)")
        md.append(f"| {name}: {s['label']} | {s['params'] or '-'} | {s['steps']} | {cells} | {secs} |")
    kinds = {n: s["gates"]["context_vqa"]["per_kind"] for n, s in summary["stages"].items()
             if s["gates"].get("context_vqa", {}).get("per_kind")}
    if kinds:
        names = sorted({k for v in kinds.values() for k in v})
        md += ["", "Context VQA by question kind (scene in words):", "", "| model | " + " | ".join(names) + " |",
               "|---|" + "---|" * len(names)]
        md += [f"| {n} | " + " | ".join(f"{v.get(k, float('nan')):.3f}" for k in names) + " |"
               for n, v in kinds.items()]
        for n, s in summary["stages"].items():
            w = (s["gates"].get("context_vqa", {}).get("interval") or {}).get("wrong_object")
            if w:
                md += ["", f"{n}: of {w['n']} colour, shape and position questions, {w['right']:.0%} answered with "
                       f"the named object's value, {w['another_object']:.0%} with another object's (read from the "
                       f"context, bound to the wrong object), {w['not_in_scene']:.0%} with a value in no object."]
            if s.get("recall_after"):
                md += ["", f"{n}: the recall warm-up's stages after the world training (held-out answers): "
                       + ", ".join(f"{k} {v:.3f}" for k, v in s["recall_after"].items())
                       + " (a kept stage the world training overwrote falls here)."]
            a = s["gates"].get("context_vqa", {}).get("any_order")
            if a:
                c = a["change"]
                md += ["", f"{n}: with each scene's objects named in a drawn order rather than reading order, "
                       f"{fmt({'mean': a['acc'], **a})} ({c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}], "
                       f"paired): what it reads from where an object is named rather than from its words."]
    if summary.get("missing"):
        md += ["", f"Not built yet: {', '.join(summary['missing'])} (`vlkit bench build` builds them)."]
    md += ["", f"All gates passed: {'yes' if summary['passed'] else 'NO'}. "
           f"Time of this run: {summary['seconds']:.0f}s.", ""]
    if summary.get("provenance"):
        md += [provenance_line(summary["provenance"]), ""]
    return "\n".join(md)
