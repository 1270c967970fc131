"""The training data pipeline at scale: peak memory against the record count, and batches/s against workers.

Synthetic LLaVA-style records (a question and a ~300-character answer, one image each, drawn from a pool of
PNG files) are written once; then, each in a fresh process so that peak RSS is its own:
  1. lazy (`data.lazy`: `RecordFile` + `LazyVLDataset` through the trainer's DataLoader) at each record count,
     reading `--batches` batches: peak RSS should barely grow with the record count;
  2. eager (`VLDataset` + `ImageBank`: every record encoded and every image decoded up front), for contrast;
  3. lazy with 0 and `--workers` DataLoader workers: batches/s (decode + transform + tokenise + collate; no model
     step, so this is the pipeline's own ceiling).

    python benchmarks/data_pipeline.py [--sizes 10000 100000] [--images 2000] [--batches 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANSWER = ("a large red circle sits at the top left, beside a small blue star; below them a green square and a "
          "yellow triangle lean on each other, and the word 'vlkit' is written in black across the middle of the "
          "scene, slightly tilted. ")


def write_data(root: Path, n: int, n_images: int, side: int = 224) -> Path:
    """`n` records over a pool of `n_images` PNGs (cached in `root`)."""
    import numpy as np
    from PIL import Image

    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        p = img_dir / f"{i:06d}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(p)
    path = root / f"records-{n}-{n_images}.jsonl"
    if not path.exists():
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"r{i}", "task": "llava", "images": [f"img/{i % n_images:06d}.png"],
                                    "messages": [{"role": "user", "content": [{"type": "image"}, {
                                        "type": "text", "text": f"question {i}: what does the image show?"}]},
                                        {"role": "assistant", "content": [{"type": "text",
                                                                           "text": ANSWER * 2}]}]}) + "\n")
    return path


def processor(root: Path):
    from vlkit.data.processor import VLProcessor
    from vlkit.data.tokenizer import train_bpe
    from vlkit.models.vision import EncoderConfig
    from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
    from vlkit.models.vpg import VPGConfig

    tok = train_bpe([ANSWER, "question what does the image show?"] * 20, 400)
    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    tower = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "image_size": 224, "patch_size": 32}
    model = VisionLanguageModel.build(VLMConfig(tower=EncoderConfig(arch=tower), vpg=VPGConfig(kind="mlp"),
                                                llm=LLMSource(arch=arch), max_length=512),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    return VLProcessor.for_model(tok, model)


def measure(mode: str, path: Path, batches: int, workers: int, batch_size: int) -> dict:
    """One measurement, in this process: build the dataset, read `batches` batches as the trainer does."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    proc = processor(path.parent)
    t0 = time.perf_counter()
    if mode == "lazy":
        from vlkit.data.lazy import LazyVLDataset, RecordFile

        data = LazyVLDataset(RecordFile(path, progress=False), proc)
    else:
        from vlkit.data.features import ImageBank
        from vlkit.data.records import load_records
        from vlkit.recipes.common import VLDataset

        records = load_records(path)
        data = VLDataset(records, proc, ImageBank.of(records, proc, progress=False))
    setup = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)[: batches * batch_size].view(batches, batch_size).tolist()
    extra = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    loader = DataLoader(data, batch_sampler=order, collate_fn=data.collate, **extra)
    t0, rows = time.perf_counter(), 0
    for batch in loader:
        rows += len(batch["input_ids"])
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"mode": mode, "records": len(data), "workers": workers, "setup_s": round(setup, 2),
            "batches_per_s": round(batches / dt, 2), "samples_per_s": round(rows / dt, 1),
            "peak_rss_mib": round(peak, 1), "worker_peak_rss_mib": round(peak_children, 1)}


def spawn(mode: str, path: Path, batches: int, workers: int, batch_size: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(batches), str(workers),
                          str(batch_size)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} at {path.name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--images", type=int, default=2000, help="Distinct image files the records draw from.")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="Also measure the eager path at each size.")
    ap.add_argument("--root", type=Path, default=None, help="Where the synthetic data goes (default: a temp dir).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="vlkit-pipeline-"))
    rows = []
    for n in args.sizes:
        path = write_data(root, n, min(args.images, n))
        rows.append(spawn("lazy", path, args.batches, 0, args.batch_size))
        if args.eager:
            rows.append(spawn("eager", path, args.batches, 0, args.batch_size))
    big = write_data(root, args.sizes[-1], min(args.images, args.sizes[-1]))
    rows.append(spawn("lazy", big, args.batches, args.workers, args.batch_size))
    print(f"{'mode':6} {'records':>8} {'workers':>7} {'setup s':>8} {'samples/s':>9} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['mode']:6} {r['records']:>8} {r['workers']:>7} {r['setup_s']:>8} {r['samples_per_s']:>9} "
              f"{r['peak_rss_mib']:>12}")
    lazy = [r for r in rows if r["mode"] == "lazy" and r["workers"] == 0]
    print(f"lazy peak RSS, {lazy[-1]['records']} vs {lazy[0]['records']} records: "
          f"{lazy[-1]['peak_rss_mib'] / lazy[0]['peak_rss_mib']:.2f}x")
    w = [r for r in rows if r["mode"] == "lazy" and r["records"] == lazy[-1]["records"]]
    print(f"samples/s with {args.workers} workers vs 0: {w[-1]['samples_per_s'] / w[0]['samples_per_s']:.2f}x "
          f"({os.cpu_count()} CPUs)")
    print("command: python benchmarks/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, mode, path, batches, workers, bs = sys.argv
        print(json.dumps(measure(mode, Path(path), int(batches), int(workers), int(bs))))
    else:
        main()
