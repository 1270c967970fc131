"""`vlkit demo` end to end on tiny stage configs: report, tables, caching, retraining downstream."""

from __future__ import annotations

from pathlib import Path

import yaml

from vlkit.experiments.demo import CONFIG_DIR, STAGES, run_demo

TINY = {
    "lm": {"model": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "intermediate_size": 96},
           "train": {"steps": 4, "batch_size": 8}, "data": {"block_size": 64}},
    "clip_vit": {"vision": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                 "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                 "train": {"steps": 3, "batch_size": 16}, "eval_size": 20},
    "vlm": {"train": {"steps": 3, "batch_size": 8}, "eval": {"max_per_task": 4, "max_new_tokens": 6}},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def tiny_configs(tmp: Path, world: dict, **steps) -> Path:
    d = tmp / "configs"
    d.mkdir(exist_ok=True)
    for name, _ in STAGES:
        cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        kind = "lm" if name.startswith("lm_") else "clip_vit" if name == "clip_vit" else "vlm"
        cfg = merge(cfg, TINY[kind])
        cfg["data"]["world"] = world
        if "model" in cfg and "vpg" in cfg["model"]:
            cfg["model"]["vpg"] = {"kind": "qformer", "num_queries": 4, "qformer": {
                "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}
        if name in steps:
            cfg["train"]["steps"] = steps[name]
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_demo_writes_report_caches_and_retrains_downstream(tmp_path, tiny_world):
    cfg_w, _ = tiny_world
    world = {"seed": cfg_w.seed, "train_scenes": cfg_w.train_scenes, "test_scenes": cfg_w.test_scenes}
    out = tmp_path / "demo"
    first = run_demo(out, progress=False, config_dir=tiny_configs(tmp_path, world))
    report = (out / "report.md").read_text()
    assert "| caption CIDEr |" in report and "VQA accuracy" in report and "blind" in report
    assert (out / "vlm_samples.png").stat().st_size > 0 and (out / "world_preview.png").is_file()
    assert "## VPGTrans" in report and first["vpgtrans"]["line"] in report
    sp = first["vpgtrans"]["speedups"]["caption_cider"]  # measured from this run's two curves
    scratch = [p["caption_cider"] for p in first["vpgtrans"]["scratch_curve"]]
    assert len(scratch) >= 1 and sp["scratch_best"] == max(scratch)
    assert sp["transfer_final"] == first["results"]["transfer_llama_tiny_to_small"]["curve"][-1]["caption_cider"]
    t = first["results"]["vlm_instruct"]["eval"]
    assert set(t["image"]) == set(t["blind"]) and "caption_cider" in t["image"]
    # the figures the README quotes, with what measured them
    import json

    saved = json.loads((out / "results.json").read_text())
    assert saved["figures"]["instruct_image_caption_cider"] == t["image"]["caption_cider"]
    assert saved["figures"]["vpgtrans_scratch_best"] == sp["scratch_best"]
    assert saved["provenance"]["machine"]["cpus"] >= 1 and saved["provenance"]["date"]
    assert "Measured at " in report
    again = run_demo(out, progress=False, config_dir=tiny_configs(tmp_path, world))
    assert again["results"]["vlm_instruct"]["eval"] == t  # every stage cached
    # a changed upstream stage (the LLaMA) retrains the VLM stages that read it, not the others
    mtime = {n: (out / n / "results.json").stat().st_mtime_ns for n, _ in STAGES}
    run_demo(out, progress=False, config_dir=tiny_configs(tmp_path, world, lm_llama_small=5))
    changed = {n for n, _ in STAGES if (out / n / "results.json").stat().st_mtime_ns != mtime[n]}
    assert changed == {"lm_llama_small", "vpg_qformer", "transfer_llama_tiny_to_small", "vlm_instruct"}


def test_vpgtrans_line_says_what_the_transfer_reached_and_when():
    from vlkit.experiments.demo import TRANSFER, vpgtrans_speedup

    def hist(step, cider):
        return {"step": step, "samples": 32 * step, "train_seconds": step / 10, "eval/caption_cider": cider,
                "eval/vqa_acc": 0.3}

    def point(step, cider):
        return {"step": step, "samples": 32 * step, "train_seconds": step / 10, "caption_cider": cider, "vqa_acc": 0.3}

    scratch = {"history": [{"step": 50, "loss": 1.0}, hist(100, 0.1), hist(200, 0.2), hist(300, 0.4)]}
    slow = vpgtrans_speedup({"vpg_qformer": scratch, TRANSFER: {"curve": [point(0, 0.05), point(20, 0.25),
                                                                          point(40, 0.3)]}})
    assert not slow["speedups"]["caption_cider"]["reached"]
    assert "does not pass it in its 40 steps (best 0.300): no speed-up here" in slow["line"]
    assert "half of it (0.200): VPGTrans at step 20, from scratch between steps 100 and 200" in slow["line"]
    fast = vpgtrans_speedup({"vpg_qformer": scratch, TRANSFER: {"curve": [point(0, 0.05), point(20, 0.3),
                                                                          point(40, 0.5)]}})
    assert "from scratch best 0.400 at step 300; VPGTrans passes it at step 40" in fast["line"]
    assert "speed-up 7.5x in steps, 7.5x in optimisation seconds" in fast["line"]
