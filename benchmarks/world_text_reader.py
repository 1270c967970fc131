"""Exact-match accuracy of the shapes-world OCR expert (vlkit.experts.WorldTextReader) on held-out images.

Two held-out sets from the world builder (PNG files on disk, read back as any caller would): scenes that
carry text wherever it fits (text_prob 1: background words and numbers, text on objects, and the few
scenes where no room was found, which must read ""), and scenes without text (text_prob 0, must read "").
Figures are printed per kind, with the reading time per image; the reader's docstring quotes them.

    python benchmarks/world_text_reader.py [--text-scenes 1000] [--blank-scenes 500] [--seed 3]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from vlkit.data.records import load_records
from vlkit.experts import WorldTextReader
from vlkit.world.dataset import WorldData, build
from vlkit.world.scene import WorldConfig


def held_out(seed: int, scenes: int, text_prob: float) -> list[dict]:
    """One record per held-out scene (its "class" record: every scene has one), truth in meta.scene.text."""
    cfg = WorldData(seed=seed, train_scenes=0, test_scenes=scenes, tasks=["class"],
                    world=WorldConfig(text_prob=text_prob))
    return load_records(build(cfg, progress=False) / "test.jsonl")


def kind(record: dict) -> str:
    text = record["meta"]["scene"]["text"]
    if text is None:
        return "no text"
    where = "background" if text["on"] is None else "on an object"
    return f"{'number' if text['value'].isdigit() else 'word'}, {where}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-scenes", type=int, default=1000)
    ap.add_argument("--blank-scenes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    reader = WorldTextReader()
    for label, records in (("text_prob 1", held_out(args.seed, args.text_scenes, 1.0)),
                           ("text_prob 0", held_out(args.seed + 1, args.blank_scenes, 0.0))):
        hits: dict[str, list[bool]] = defaultdict(list)
        wrong, scores = [], {True: [], False: []}  # best |NCC| of images with text / without
        t0 = time.perf_counter()
        for r in records:
            truth = (r["meta"]["scene"]["text"] or {}).get("value", "")
            best, score = reader.read(r["images"][0])
            read = best if score >= reader.threshold else ""
            hits[kind(r)].append(read == truth)
            scores[bool(truth)].append(score)
            if read != truth:
                wrong.append(f"{r['id']}: {truth!r} read as {read!r} (score {score:.3f})")
        ms = (time.perf_counter() - t0) / max(1, len(records)) * 1e3
        every = [h for v in hits.values() for h in v]
        print(f"{label}: exact match {sum(every) / len(every):.3f} on {len(every)} images ({ms:.0f} ms per image); "
              f"best score: lowest with text {min(scores[True], default=float('nan')):.3f}, highest without "
              f"{max(scores[False], default=float('nan')):.3f} (threshold {reader.threshold})")
        for k, v in sorted(hits.items()):
            print(f"  {k:<22} {sum(v) / len(v):.3f}  (n={len(v)})")
        for w in wrong:
            print("  wrong:", w)


if __name__ == "__main__":
    main()
