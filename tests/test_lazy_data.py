"""data.lazy: records read on demand and images decoded in DataLoader workers train exactly as the eager path."""

import json

import pytest
import torch

from vlkit.config import load
from vlkit.data.lazy import LazyVLDataset, RecordFile
from vlkit.data.records import load_records
from vlkit.errors import VlkitError


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    from test_vlm import make
    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    path = tmp_path_factory.mktemp("lazy") / "base"
    save_vlm(model, path, proc)
    return path


def run_instruct(out, base, tiny_world, *extra):
    from vlkit.recipes.instruct import InstructRecipe, run

    cfg_w, _ = tiny_world
    cfg = load(InstructRecipe, None, [
        f"output_dir={out}", f"init={base}", "trainable=[vpg.projector]", f"data.world.seed={cfg_w.seed}",
        f"data.world.train_scenes={cfg_w.train_scenes}", f"data.world.test_scenes={cfg_w.test_scenes}",
        "data.tasks=[caption,vqa]", "eval.max_per_task=4", "eval.tasks=[vqa]", "eval.blind=false",
        "cache_features=false", "train.steps=4", "train.batch_size=6", "train.lr=1e-2", "train.log_every=1",
        "train.progress=false", "train.length_groups=2", *extra])
    return run(cfg)


def test_lazy_records_with_workers_train_as_the_eager_path(tmp_path, tiny_world, base):
    eager = run_instruct(tmp_path / "eager", base, tiny_world)
    lazy = run_instruct(tmp_path / "lazy", base, tiny_world, "data.lazy=true")
    workers = run_instruct(tmp_path / "workers", base, tiny_world, "data.lazy=true", "train.num_workers=2")
    assert losses(tmp_path / "lazy") == pytest.approx(losses(tmp_path / "eager"), abs=1e-6)
    assert losses(tmp_path / "workers") == losses(tmp_path / "lazy")
    assert lazy["eval"] == eager["eval"] == workers["eval"]


def test_lazy_refuses_what_it_cannot_do(tmp_path, tiny_world, base):
    with pytest.raises(VlkitError, match="cache_features=false"):
        run_instruct(tmp_path / "a", base, tiny_world, "data.lazy=true", "cache_features=true")
    with pytest.raises(VlkitError, match="data.mix"):
        run_instruct(tmp_path / "b", base, tiny_world, "data.lazy=true", "data.mix={caption: 1, vqa: 1}")


def test_record_file_reads_what_load_records_reads_and_names_bad_lines(tmp_path, tiny_world):
    _, root = tiny_world
    path = root / "train.jsonl"
    eager = load_records(path)
    lazy = RecordFile(path, progress=False)
    assert len(lazy) == len(eager) and lazy[5] == eager[5] and lazy[len(eager) - 1] == eager[-1]
    assert lazy.tasks == [r.get("task") for r in eager]
    only = RecordFile(path, tasks=["vqa"], limit=7, progress=False)
    assert len(only) == 7 and [r["id"] for r in only] == [r["id"] for r in eager if r["task"] == "vqa"][:7]
    # 12 bytes a record (offset + task code), not the record
    assert lazy.offsets.itemsize + lazy._task_ids.itemsize == 12
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"id": "x", "messages": []}'] + lines[3:5]) + "\n")
    with pytest.raises(VlkitError, match=r"bad.jsonl:4 x: 'messages' must be a non-empty list"):
        RecordFile(bad, check_images=False, progress=False)
    gone = tmp_path / "gone.jsonl"
    rec = json.loads(lines[0])
    rec["images"] = ["nowhere.png"]
    gone.write_text(json.dumps(rec) + "\n")
    with pytest.raises(VlkitError, match="gone.jsonl:1: .*image .*nowhere.png not found"):
        RecordFile(gone, progress=False)


def test_a_batch_of_records_cut_before_their_answer_still_runs_the_model(tiny_world, tiny_tokenizer):
    """Such a batch teaches nothing (loss 0), but the forward and backward run, so no data-parallel rank waits."""
    from test_vlm import make
    from vlkit.data.processor import VLProcessor
    from vlkit.recipes.common import vl_loss

    _, root = tiny_world
    model, _ = make(tiny_tokenizer)
    proc = VLProcessor.for_model(tiny_tokenizer, model, max_length=model.image_slots + 2)
    cut = LazyVLDataset(RecordFile(root / "train.jsonl", tasks=["caption"], limit=3, progress=False), proc)
    batch = cut.collate([cut[0], cut[1]])
    assert batch["input_ids"].shape[0] == 2 and bool((batch["labels"] == -100).all())
    model.set_trainable(["llm"])
    loss, extra = vl_loss(model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and extra == {"tokens": 0}
    grads = [p.grad for p in model.llm.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)
    full = LazyVLDataset(RecordFile(root / "train.jsonl", tasks=["caption"], limit=3, progress=False),
                         VLProcessor.for_model(tiny_tokenizer, model))
    batch = full.collate([full[0], full[2]])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["images_per_row"], torch.tensor([1, 1]))
