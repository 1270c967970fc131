"""Task-specific instructions (SPHINX) in the data pipeline and at evaluation, and batches of one task."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from vlkit.data.instructions import GENERIC, SPHINX, apply, load_instructions, slots
from vlkit.data.records import assistant, user
from vlkit.errors import VlkitError
from vlkit.train import TrainConfig, Trainer

# the trainer tests' tiny model and data (tests/ is on sys.path under pytest)
from test_trainer import Crash, collate, data, loss_fn, losses, tiny_model


def rec(rid, task, *parts, answer="red", meta=None):
    return {"id": rid, "task": task, "images": ["a.png"] * sum(p is None for p in parts),
            "messages": [user(*parts), assistant(answer)], "meta": meta or {}}


VQA = rec("vqa-1", "vqa", None, "what color is the circle?")
REFER = rec("refer-1", "refer", None, "find it.", answer="[0.1,0.2,0.3,0.4]", meta={"expr": "the red circle"})


def request(record):
    """The text parts of the last user turn."""
    return [p.get("text") for p in record["messages"][-2]["content"]]


def test_sphinx_renders_its_exact_wording():
    vqa, refer = apply([VQA, REFER], SPHINX)
    assert request(vqa) == [None, "what color is the circle?\nAnswer the question using a single word or phrase."]
    assert request(refer) == [None, ("Please provide the bounding box coordinate of the region this sentence "
                                     "describes: the red circle.")]
    assert vqa["meta"] == {"instruction": "sphinx", "request": "what color is the circle?"}
    assert vqa["messages"][-1] == VQA["messages"][-1]  # the answer is untouched
    assert apply([vqa], SPHINX) == [vqa]  # applying again starts from the original request


def test_generic_leaves_records_identical_and_apply_is_pure():
    multi = {"id": "m", "task": "vqa", "images": ["a.png", "b.png", "c.png"], "meta": {"kind": "color"},
             "messages": [user(None, "first?"), assistant("yes"), user("look:", None, "which color?", None),
                          assistant("red")]}
    records = [VQA, REFER, multi]
    before = copy.deepcopy(records)
    assert apply(records, GENERIC) == before
    out = apply(records, SPHINX)
    assert records == before  # the input is not mutated
    new = out[2]["messages"]
    # the request's text parts become one, in the place of the first; its images stay where they were
    assert new[2]["content"] == [{"type": "text", "text": "look: which color?\nAnswer the question using a single "
                                  "word or phrase."}, {"type": "image"}, {"type": "image"}]
    assert new[:2] == multi["messages"][:2] and new[3] == multi["messages"][3]  # only the last request changes
    assert slots(multi) == {"question": "look: which color?"}  # a VQA record's meta kind is its question kind
    assert slots({**multi, "meta": {"slots": {"question": "q", "expr": "e"}}}) == {"question": "q", "expr": "e"}


def test_a_custom_set_from_a_file_and_its_errors_name_file_and_key(tmp_path):
    good = tmp_path / "short.yaml"
    good.write_text("vqa: 'Q: {question} A:'\ndefault: keep\n")
    mine = load_instructions(str(good))
    assert mine.name == "short"
    vqa, refer = apply([VQA, REFER], mine)
    assert request(vqa)[1] == "Q: what color is the circle? A:" and vqa["meta"]["instruction"] == "short"
    assert refer == REFER  # default: keep

    def error(text, suffix=".yaml"):
        path = tmp_path / f"bad{suffix}"
        path.write_text(text)
        with pytest.raises(VlkitError) as e:
            load_instructions(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "key 'vqa': unknown field {answer}" in error("vqa: '{question} {answer}'")
    assert "key 'vqa': the template lacks {question}" in error("vqa: 'Answer briefly.'")
    assert "key 'refer': the template lacks {expr}" in error('{"refer": "Where is it?"}', ".json")
    assert "key 'vqa' must be a template string" in error("vqa: {text: '{question}'}")
    assert "key 'vqa answer' is not a task name" in error("'vqa answer': '{question}'")
    assert "key 'default' must be 'keep' or 'error'" in error("default: drop\n")
    with pytest.raises(VlkitError, match="neither a built-in instruction set"):
        load_instructions(str(tmp_path / "absent.yaml"))

    strict = tmp_path / "strict.yaml"
    strict.write_text("vqa: '{question}'\nrefer: 'Box: {expr}'\n")
    with pytest.raises(VlkitError, match=rf"^{strict}: no template for task 'caption' \(record c-1\)"):
        apply([rec("c-1", "caption", None, "describe.")], load_instructions(str(strict)))
    with pytest.raises(VlkitError, match=rf"^{strict}: key 'refer' needs field 'expr', which record refer-2 lacks"):
        apply([rec("refer-2", "refer", None, "find it.")], load_instructions(str(strict)))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_records_config_instructions_rewrite_both_splits_and_unset_changes_nothing(tmp_path):
    from vlkit.world.dataset import dataset_dir
    from vlkit.world.sources import RecordsConfig, load_split

    train = write_jsonl(tmp_path / "train.jsonl", [VQA, REFER, rec("class-1", "class", None, "which shapes?")])
    test = write_jsonl(tmp_path / "test.jsonl", [rec("vqa-2", "vqa", None, "how many circles?", answer="2")])
    plain = RecordsConfig(train=train, test=test)
    sphinx = plain.model_copy(update={"instructions": "sphinx"})
    assert [request(r)[1] for r in load_split(plain, "train")] == ["what color is the circle?", "find it.",
                                                                    "which shapes?"]
    assert load_split(plain, "test")[0]["meta"] == {}
    assert [request(r)[1] for r in load_split(sphinx, "train")] == [
        "what color is the circle?\nAnswer the question using a single word or phrase.",
        "Please provide the bounding box coordinate of the region this sentence describes: the red circle.",
        "which shapes?"]  # world class has no SPHINX counterpart: it keeps its request
    assert request(load_split(sphinx, "test")[0])[1] == "how many circles?\nAnswer the question using a single " \
                                                        "word or phrase."
    mixed = load_split(sphinx.model_copy(update={"mix": {"vqa": 1.0, "refer": 1.0}}), "train")
    assert sorted(r["id"] for r in mixed) == ["refer-1", "vqa-1"]
    assert all(r["meta"]["instruction"] == "sphinx" for r in mixed)  # given before mixing
    assert dataset_dir(sphinx.world) == dataset_dir(plain.world)  # the world dataset is not rebuilt


NEW_KEYS = {("data", "instructions"), ("eval_data", "instructions"), ("eval", "instructions"),
            ("streams", "*", "data", "instructions"), ("train", "batch_by_task")}


def hashed(cfg) -> dict:
    from vlkit.recipes.common import drop_later_settings

    d = cfg.model_dump(mode="json")
    d.pop("output_dir", None)
    return drop_later_settings(d, d.get("recipe"))


def paths(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from paths(v, path + (k,))
    elif isinstance(node, list):
        for v in node:
            yield from paths(v, path + ("*",))


def test_unset_settings_keep_every_packaged_config_hash():
    from vlkit.recipes import load_config
    from vlkit.recipes.common import config_hash

    for name in ("world/vpg_tiny", "world/vlm_instruct", "world/adapter", "world/vpgc", "world/lm_llama_tiny"):
        cfg, _ = load_config(name)
        dump = cfg.model_dump(mode="json")
        if "eval_data" in dump:  # an eval_data section too
            dump["eval_data"] = dump["streams"][0]["data"] if "streams" in dump else dump["data"]
        cfg = cfg.model_validate(dump)
        kept = hashed(cfg)
        # none of the new keys is hashed at its old value: the hash is the one of a config saved before them
        assert not NEW_KEYS & set(paths(kept)), name
        data = cfg.model_dump(mode="json")
        if "streams" in data:
            data["streams"][1]["data"]["instructions"] = "sphinx"
        else:
            data["data"]["instructions"] = "sphinx"
        assert config_hash(cfg.model_validate(data)) != config_hash(cfg), name
        if "eval" in data and "instructions" in cfg.eval.model_fields:
            data = cfg.model_dump(mode="json")
            data["eval"]["instructions"] = "sphinx"
            assert config_hash(cfg.model_validate(data)) != config_hash(cfg), name
        data = cfg.model_dump(mode="json")
        data["train"]["batch_by_task"] = True
        assert config_hash(cfg.model_validate(data)) != config_hash(cfg), name


def test_eval_instructions_reach_the_prompts_the_model_sees(monkeypatch):
    import vlkit.eval.world as W

    seen = []

    def fake_generate(model, processor, prompts, images, gen, image_inputs=None):
        seen.extend(prompts)
        return [{"text": "red"} for _ in prompts]

    monkeypatch.setattr(W, "generate", fake_generate)
    bank = SimpleNamespace(rows=lambda r: [0] * len(r["images"]), inputs=lambda rows: {})
    model = SimpleNamespace(eval=lambda: None)
    cap = rec("cap-1", "caption", None, "what is in this picture?", answer="a red circle.")
    records = [VQA, cap]
    cfg = W.EvalConfig(tasks=["vqa", "caption"], blind=False, instructions="sphinx")
    result = W.evaluate_vlm(model, None, records, cfg, bank)
    sphinx_vqa = "what color is the circle?\nAnswer the question using a single word or phrase."
    assert [p[-1]["content"][1]["text"] for p in seen] == [sphinx_vqa, "Describe the image concisely."]
    assert [e["question"] for e in result["examples"]] == [sphinx_vqa, "Describe the image concisely."]
    assert result["image"]["vqa_acc"] == 1.0  # the reference is still the record's answer
    prompt, ref = W.prompt_and_reference(W.select(records, cfg)["vqa"][0])
    assert prompt[-1]["content"][1]["text"] == sphinx_vqa and ref == "red"
    seen.clear()
    W.evaluate_vlm(model, None, records, cfg.model_copy(update={"instructions": None}), bank)
    assert [p[-1]["content"][1]["text"] for p in seen] == ["what color is the circle?", "what is in this picture?"]


class TaskedData:
    """The trainer tests' examples, each with a task: 24 of "a" and 16 of "b", interleaved (+ `extra`)."""

    def __init__(self, extra=()):
        self.x = data()
        self.tasks = ["a" if i % 5 < 3 else "b" for i in range(len(self.x))]
        self.x = torch.cat([self.x, self.x[: len(extra)]])
        self.tasks += list(extra)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def by_task_trainer(out, dataset=None, seed=5, model_seed=0, **kw):
    cfg = TrainConfig(steps=kw.pop("steps", 12), batch_size=8, lr=1e-2, warmup_steps=2, save_every=3, log_every=1,
                      progress=False, seed=seed, batch_by_task=kw.pop("batch_by_task", True), **kw)
    dataset = dataset or TaskedData()
    return Trainer(tiny_model(model_seed), cfg, dataset, collate, loss_fn, out), dataset


def test_batch_by_task_draws_single_task_batches_in_proportion_reproducibly(tmp_path):
    t, ds = by_task_trainer(tmp_path)
    assert t.batches_per_epoch() == 5  # 24 // 8 of "a" + 16 // 8 of "b"
    batches = [t._batch_indices(m) for m in range(10)]  # two epochs
    tasks = [{ds.tasks[i] for i in b} for b in batches]
    assert all(len(s) == 1 and len(b) == 8 for s, b in zip(tasks, batches))
    for epoch in (batches[:5], batches[5:]):  # each epoch: every example once, "a" in 3 batches and "b" in 2
        assert sorted(i for b in epoch for i in b) == list(range(40))
        assert [ds.tasks[b[0]] for b in epoch].count("a") == 3
    assert batches[:5] != batches[5:]
    assert [by_task_trainer(tmp_path)[0]._batch_indices(m) for m in range(10)] == batches
    assert [by_task_trainer(tmp_path, seed=6)[0]._batch_indices(m) for m in range(10)] != batches

    t, ds = by_task_trainer(tmp_path, grad_accum=2)  # a step of 16: one of "a" (8 left over), one of "b"
    assert t.batches_per_epoch() == 4
    for step in range(4):
        pair = t._batch_indices(2 * step) + t._batch_indices(2 * step + 1)
        assert len({ds.tasks[i] for i in pair}) == 1 and len(set(pair)) == 16
    from vlkit.train.runtime import Runtime

    halves = []
    for rank in (0, 1):  # two ranks: each its half of the same single-task step
        t, ds = by_task_trainer(tmp_path)
        t.rt = Runtime(torch.device("cpu"), None, rank=rank, world_size=2)
        halves.append([t._batch_indices(m) for m in range(2)])
    for m in range(2):
        both = halves[0][m] + halves[1][m]
        assert len(set(both)) == 16 and len({ds.tasks[i] for i in both}) == 1

    with pytest.warns(UserWarning, match=r"task\(s\) \['c'\] .* fewer examples than one step \(8\)"):
        t, ds = by_task_trainer(tmp_path, TaskedData(extra=["c"] * 3))
    assert all(ds.tasks[i] != "c" for m in range(10) for i in t._batch_indices(m))
    with pytest.raises(VlkitError, match="needs a dataset that says each example's task"):
        Trainer(tiny_model(0), t.cfg, data(), collate, loss_fn, tmp_path)


def test_batch_by_task_off_draws_the_batches_drawn_before_it_existed(tmp_path):
    t, _ = by_task_trainer(tmp_path, batch_by_task=False, grad_accum=2)
    seq = [t._batch_indices(m) for m in range(24)]
    # the sequence this seed drew before train.batch_by_task existed (5 batches an epoch)
    assert seq[:2] == [[33, 15, 35, 25, 38, 20, 26, 9], [37, 8, 11, 10, 23, 31, 34, 36]]
    assert seq[5] == [28, 1, 27, 5, 38, 14, 7, 19]
    for m, b in enumerate(seq):
        epoch, pos = divmod(m, 5)
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
        assert b == perm[pos * 8:(pos + 1) * 8].tolist()


def test_batch_by_task_resumes_exactly(tmp_path):
    full, _ = by_task_trainer(tmp_path / "full")
    full.fit()

    def crash_at_7(step, _metrics):
        if step == 7:
            raise Crash

    crashed, _ = by_task_trainer(tmp_path / "resumed")
    with pytest.raises(Crash):
        crashed.fit(callbacks=[crash_at_7])
    resumed, _ = by_task_trainer(tmp_path / "resumed", model_seed=99)
    resumed.fit(resume=True)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")


def test_vl_dataset_says_the_task_of_each_item_it_keeps():
    from vlkit.data.tokenizer import IGNORE_INDEX
    from vlkit.recipes.common import VLDataset

    def encode(messages, n_images, record_id="?", **_):  # record "b" has no supervised token: dropped
        return {"labels": [IGNORE_INDEX, IGNORE_INDEX if record_id == "b" else 5], "num_images": n_images}

    proc = SimpleNamespace(encode=encode, config=SimpleNamespace(max_length=8))
    records = [rec("a", "vqa", None, "q?"), rec("b", "caption", None, "d."), rec("c", "refer", None, "r.")]
    with pytest.warns(UserWarning, match="1 of 3 training records"):
        ds = VLDataset(records, proc, SimpleNamespace(rows=lambda r: [0], views=lambda rows: None))
    assert ds.tasks == ["vqa", "refer"] and len(ds.items) == 2
