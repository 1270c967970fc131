"""The VPG-C experiment's summary and report from finished runs: paired intervals against the base on the same
items, seeds for the headline, the diagnostics beside the references, claim by claim (no training here)."""

import numpy as np

from vlkit.eval.stats import interval
from vlkit.eval.world import edit_items
from vlkit.experiments import provenance, vpgc
from vlkit.fileio import write_json

REL = vpgc.RELATION
N = 60


def fake_run(out, name, relation_scores, objects, demon=True):
    """A finished run: mini-DEMON predictions on disk (relation task) and per-item held-out edit scores."""
    items = {"edit_rougeL": [0.4] * N, "edit_object": objects, "edit_kind": [1.0] * N, "edit_acc": [0.0] * N}
    run = {"eval": {"image": {"caption_cider": 0.5, "vqa_acc": 0.4, **{k: float(np.mean(v)) for k, v in items.items()}},
                    "items": {"image": items}},
           "trainable_params": 1000, "train_seconds": 1.0, "vpgc_layer": 2}
    if demon:
        (out / name).mkdir(parents=True)
        write_json(out / name / "demon_predictions.json",
                   {"md_relation": [{"sample_id": i, "score": s} for i, s in enumerate(relation_scores)]})
        rel = 100 * float(np.mean(relation_scores))
        run["demon"] = {"categories": {REL: rel, "Other": 10.0}, "tasks": {"md_relation": rel}, "average": rel,
                        "counts": {"md_relation": len(relation_scores)}}
    return run


def test_the_report_pairs_every_run_with_the_base_and_states_each_claim(tmp_path):
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0.0, 0.3, 200).tolist(), rng.uniform(0.5, 0.9, 200).tolist()
    same = [float(v) for v in rng.integers(0, 2, N)]
    runs = {"base": fake_run(tmp_path, "base", low, same),
            **{vpgc.seeded(k): fake_run(tmp_path, vpgc.seeded(k), high, same) for k in range(3)},
            "vpgc_random_edits": fake_run(tmp_path, "vpgc_random_edits", high, same),
            "diag_llm_too": fake_run(tmp_path, "diag_llm_too", [], [1.0] * N, demon=False)}
    refs_text = [f"the red circle turned {c}." for c in ("blue", "green", "pink")] * (N // 3)
    const = vpgc.constant_answer(["a green star appeared on the left."] + ["the red circle turned pink."] * 9,
                                 refs_text)
    assert const["answer"] == "the red circle turned pink."  # chosen on the training answers
    words = {m: interval(v) for m, v in edit_items(refs_text, refs_text).items()}
    refs = {"constant": const, "llm_in_words": {**words, "examples": []}, "n": N}
    s = vpgc.summarize(runs, {"half": 2, "quarter": 1, "three": 3}, 4, tmp_path, refs, seeds=3)
    s["seconds"], s["provenance"] = {"total": 1.0}, provenance()

    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in s["claims"]}
    assert verdicts["VPG-C with synthetic discriminative training improves visual relation inference"] == "holds"
    assert s["relation"]["paired"]["seeds"] == 3 and s["relation"]["paired"]["n"] == 200
    assert s["relation"]["over_seeds"]["n"] == 3
    # its own task: the same answers as the base name the object no more often; the LLM tuned run does
    assert s["own_task"]["vpgc"]["edit_object"]["diff"] == 0.0
    assert verdicts["VPG-C learns the task it is trained on"] == "not shown (within noise)"
    assert s["own_task"]["diag_llm_too"]["edit_object"]["lo"] > 0
    assert verdicts["editing the least-attended object beats a random one"] == "not shown (within noise)"
    md = vpgc.report(s, vpgc.plot(s, tmp_path))
    assert "the red circle turned pink." in md and "the LLM trains too" in md and "| claim | paper |" in md
    assert (tmp_path / "categories.png").stat().st_size > 0
    assert s["runs"]["diag_llm_too"]["categories"] is None  # diagnostics skip mini-DEMON
