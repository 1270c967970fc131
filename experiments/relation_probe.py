"""Which spatial-relation questions a world LM answers, by whether reading order decides them.

    python experiments/relation_probe.py runs/bench/lm_large [--questions 1000]

Loads the LM an lm-recipe run saved (RUN/model) and that run's config (RUN/config.yaml), takes the relation
questions among the first --questions held-out questions that context VQA asks (the scene written out in
words), answers them greedily and prints their accuracy split as `vlkit.recipes.lm.relation_layout` splits it:
left/right within one row band (the object named first is the left one) or across rows (only the region words
decide), above/below within one column or across columns (reading order decides both). Every lm run also
writes this split to results.json (context_vqa.relation_layout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM

from vlkit.data.tokenizer import load_tokenizer
from vlkit.eval.metrics import exact_match
from vlkit.recipes import load_config
from vlkit.recipes.common import splits
from vlkit.recipes.lm import answer_in_words, relation_layout, scene_descriptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an lm recipe's output directory (holds model/ and config.yaml)")
    ap.add_argument("--questions", type=int, default=1000, help="held-out questions to draw the relations from")
    args = ap.parse_args()
    cfg, _ = load_config(args.run / "config.yaml", [])
    _, test = splits(cfg.data, None)
    recs = [r for r in test if r.get("task") == "vqa" and scene_descriptions(r)][: args.questions]
    recs = [r for r in recs if r.get("meta", {}).get("kind") == "relation"]
    model_dir = args.run / "model"
    refs, preds = answer_in_words(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir), recs, 8)
    print(f"{args.run}: {len(recs)} relation questions among the first {args.questions} held-out questions")
    for key, v in relation_layout(recs, [exact_match(p, r) for p, r in zip(preds, refs)]).items():
        print(f"  {key:32s} {v['acc']:.3f}  (n={v['n']})")


if __name__ == "__main__":
    main()
