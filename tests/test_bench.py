"""The science bench: its gates, its report, what experiments get when it is missing; the world's relation
questions and the LM data that teaches answering from context."""

import numpy as np
import pytest

from vlkit.errors import VlkitError
from vlkit.experiments import bench
from vlkit.world.language import NUMBERS, VQA_KINDS, every_question, relation_question, vqa_pool
from vlkit.world.scene import COLORS, SHAPES, Obj, Scene, generate_scene, plural, WorldConfig


def ppl_curve(values, every=100):
    return [{"step": every * (i + 1), "ppl": v} for i, v in enumerate(values)]


def test_plateau_reads_the_last_fifth_of_training():
    flat = bench.plateau(ppl_curve([3.0, 2.0, 1.6, 1.5, 1.49, 1.489, 1.488, 1.488, 1.4875, 1.4874]))
    assert flat["passed"] and flat["from_step"] == 800 and flat["change"] < 0.01
    falling = bench.plateau(ppl_curve([3.0, 2.5, 2.2, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4]))
    assert not falling["passed"] and falling["change"] > 0.05
    assert not bench.plateau([{"step": 10, "ppl": 2.0}])["passed"]  # too few evaluations to tell


def test_gates_pass_and_miss_on_the_thresholds():
    good = {"context_vqa": {"acc": 0.96, "lo": 0.95, "hi": 0.97, "n": 1000, "per_kind": {"color": 1.0}},
            "ppl_curve": ppl_curve([2.0, 1.5, 1.4, 1.4, 1.4])}
    g = bench.gates("lm_small", good)
    assert g["context_vqa"]["passed"] and g["plateau"]["passed"]
    bad = dict(good, context_vqa={**good["context_vqa"], "acc": 0.94})
    assert not bench.gates("lm_small", bad)["context_vqa"]["passed"]
    assert bench.gates("vit", {"heldout_i2t_r1": 0.81, "gallery": 500})["retrieval"]["passed"]
    assert not bench.gates("vit", {"heldout_i2t_r1": 0.79, "gallery": 500})["retrieval"]["passed"]
    summary = {"stages": {"lm_small": {"label": "LM", "gates": bench.gates("lm_small", bad), "params": 10,
                                       "steps": 500, "seconds": 3.0, "trained_now": True}},
               "passed": False, "seconds": 3.0}
    md = bench.report(summary)
    assert "MISSED" in md and "0.940 [0.950, 0.970]" in md and "All gates passed: NO" in md
    assert "drawn order" not in md  # no any-order check in these results: no line about it
    anyway = {"acc": 0.81, "lo": 0.785, "hi": 0.833, "n": 1000,
              "change": {"diff": -0.109, "lo": -0.134, "hi": -0.085, "n": 1000}}
    summary["stages"]["lm_small"]["gates"] = bench.gates("lm_small", dict(bad, context_vqa_any_order=anyway))
    md = bench.report(summary)
    assert "drawn order rather than reading order, 0.810 [0.785, 0.833] (-0.109 [-0.134, -0.085], paired)" in md
    assert "recall warm-up" not in md
    summary["stages"]["lm_small"]["recall_after"] = {"mix:1": 0.9994, "count": 0.41}
    assert "after the world training (held-out answers): mix:1 0.999, count 0.410" in bench.report(summary)


def test_experiments_refuse_a_missing_bench_with_the_command_to_build_it(tmp_path):
    with pytest.raises(VlkitError, match="vlkit bench build"):
        bench.load_bench(tmp_path)
    with pytest.raises(KeyError, match="unknown bench model"):
        bench.model_dir("lm_huge")


def test_relation_questions_are_decided_by_the_regions_the_caption_names():
    left, right = Obj("circle", "red", "small", 0.15, 0.5), Obj("square", "blue", "small", 0.85, 0.5)
    scene = Scene((left, right))
    answers = {}
    for seed in range(40):
        q = relation_question(scene, np.random.default_rng(seed))
        answers[q[1]] = q[2]
    assert answers.get("is the red circle left of the blue square?", "yes") == "yes"
    assert answers.get("is the blue square left of the red circle?", "no") == "no"
    assert answers.get("is the red circle right of the blue square?", "no") == "no"
    assert not any("above" in k or "below" in k for k in answers)  # same row: no vertical relation is asked
    same_cell = Scene((Obj("circle", "red", "small", 0.1, 0.1), Obj("square", "blue", "small", 0.25, 0.25)))
    assert relation_question(same_cell, np.random.default_rng(0)) is None
    # the default world asks no relations, so its datasets stay as they were
    s = generate_scene(7, WorldConfig())
    assert all(k != "relation" for k, _, _ in vqa_pool(s, np.random.default_rng(0)))


def caption_records(scenes: list[Scene]) -> list[dict]:
    """A world caption record per scene (one image, its scene in meta), as drills and pack read them."""
    return [{"id": f"caption-{i}", "task": "caption", "images": ["x.png"], "meta": {"scene": s.to_dict()},
             "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a scene."}]}]}
            for i, s in enumerate(scenes)]


def test_drills_and_whole_packing_keep_each_question_with_its_scene():
    from vlkit.data.tokenizer import train_bpe
    from vlkit.recipes.lm import LISTING_PROMPTS, bpe_texts, drills, pack

    scenes = [generate_scene(i, WorldConfig(min_objects=3)) for i in range(30)]
    recs = caption_records(scenes)
    d = drills(recs + recs[:5], per_scene=4, relations=True)
    assert len(d) == 30  # one per distinct scene
    first = d[0]["messages"]
    assert len(first) == 8 and first[0]["content"][0]["text"].startswith("(a ")  # the scene, then the first question
    assert all(not m["content"][0]["text"].startswith("(") for m in first[2::2])
    asked = [m["content"][0]["text"].split(") ")[-1] for r in drills(recs, 9, True, kinds=("color",))
             for m in r["messages"][0::2]]
    assert asked and all(q.startswith("what color is the ") for q in asked)  # only the kinds drilled
    listed = drills(recs, 4, True, listing=True)
    assert [m["content"] for m in listed[0]["messages"][:8]] == [m["content"] for m in first]  # same draws before
    for r, sc in zip(listed, scenes):
        turns = {m["content"][0]["text"]: n["content"][0]["text"] for m, n in
                 zip(r["messages"][8::2], r["messages"][9::2])}
        assert set(turns) <= set(LISTING_PROMPTS)
        shapes, colors = [o.shape for o in sc.objects], [o.color for o in sc.objects]
        said = turns.get(LISTING_PROMPTS[0], "")
        for o in sc.objects:  # every object a shape names alone, with its colour; no other
            assert (f"the {o.shape} is {o.color}" in said) == (shapes.count(o.shape) == 1)
        said = turns.get(LISTING_PROMPTS[1], "")
        for o in sc.objects:
            assert (f"the {o.color} object is a {o.shape}" in said) == (colors.count(o.color) == 1)
    assert sum(len(r["messages"]) > 8 for r in listed) >= 25  # most scenes have an object named alone
    rng = np.random.default_rng(0)
    assert {k for sc in scenes for k, _, _ in vqa_pool(sc, rng, relations=True)} == set(VQA_KINDS)
    tok = train_bpe(bpe_texts(recs + d), 400, "llama")
    packed = pack(tok, d, 256, whole=True)
    ids, labels = packed["input_ids"], packed["labels"]
    bos = tok.bos_token_id
    assert (ids[:, 0] == bos).all()  # every block starts at a conversation
    assert ((labels == -100) == (ids == tok.pad_token_id)).all()  # padding is never learned
    cut = pack(tok, d, 64)  # the stream cut every 64 tokens: blocks start mid-conversation
    assert not (cut["input_ids"][:, 0] == bos).all()
    replies = pack(tok, d, 256, loss_on="assistant", whole=True)  # only the answers are learned
    learned = replies["labels"][replies["labels"] != -100]
    assert 0 < len(learned) < 0.5 * (replies["input_ids"] != tok.pad_token_id).sum()
    assert tok.decode(learned).count("USER") == 0


def test_document_mask_keeps_each_packed_conversation_to_itself():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from vlkit.data.tokenizer import train_bpe
    from vlkit.recipes.lm import RecallWarmup, bpe_texts, drills, lm_loss, pack, packed_inputs, with_recall

    recs = caption_records([generate_scene(i, WorldConfig(min_objects=2)) for i in range(60)])
    d = drills(recs, per_scene=1, relations=True)
    tok = train_bpe(bpe_texts(recs + d), 400, "llama")
    plain = pack(tok, d, 256, whole=True)
    packed = pack(tok, d, 256, whole=True, document_mask=True)
    assert torch.equal(packed["input_ids"], plain["input_ids"]) and "position_ids" not in plain
    ids, pos = packed["input_ids"][0], packed["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert starts[0] == 0 and len(starts) >= 3 and (ids[starts[:2]] == tok.bos_token_id).all()
    a, b = starts[1], starts[2]  # the block's second conversation
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=256))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256))
    for m in (opt, model):  # both families the lm recipe builds: learned positions and rotary ones
        m.eval()
        with torch.no_grad():
            alone = m(input_ids=ids[None, a:b]).logits[0]
            masked = m(input_ids=ids[None], **packed_inputs(m, pos[None])).logits[0, a:b]
            seen = m(input_ids=ids[None]).logits[0, a:b]
        assert torch.allclose(masked, alone, atol=1e-5)  # as if asked alone
        assert not torch.allclose(seen, alone, atol=1e-3)  # without it, the conversation before is read too
    for m in (model, opt):  # flash-attention 2 reads the sequences from the positions alone, in a LLaMA only
        m.config._attn_implementation = "flash_attention_2"
    assert set(packed_inputs(model, pos[None])) == {"position_ids", "use_cache"}
    with pytest.raises(VlkitError, match="document_mask with flash_attention_2 needs a LLaMA-family LM"):
        packed_inputs(opt, pos[None])
    model.config._attn_implementation = "sdpa"
    batch = {k: v[:2] for k, v in packed.items()}
    assert lm_loss(model, batch)[0] != lm_loss(model, {k: batch[k] for k in ("input_ids", "labels")})[0]
    rows = with_recall(tok, RecallWarmup(keep=0.2, stages=["mix:1"]), packed, 0)
    extra = rows["position_ids"][len(packed["input_ids"]):]
    assert len(extra) and (extra == torch.arange(256)).all()  # a synthetic row is one sequence


def test_every_question_holds_what_vqa_pool_draws_and_answers_it_from_the_words():
    side = {"left": 0, "right": 2}  # a region's column and row, read from its words as the caption says them
    col = lambda region: next((v for k, v in side.items() if k in region.split()), 1)  # noqa: E731
    row = lambda region: 0 if "top" in region else 2 if "bottom" in region else 1  # noqa: E731
    for seed in range(60):
        scene = generate_scene(seed, WorldConfig(min_objects=2, max_objects=6))
        every = every_question(scene, relations=True)
        asked = {(k, q): a for k, q, a in every}
        assert len(asked) == len(every)  # no question twice
        objs, names = scene.objects, [o.name for o in scene.objects]
        for rng_seed in range(5):
            for k, q, a in vqa_pool(scene, np.random.default_rng(rng_seed), relations=True):
                named = [n for n in names if f"the {n} " in q or f"the {n}?" in q]
                if len(set(named)) == len(named):  # not about one of two same-named objects
                    assert asked.get((k, q)) == a, (seed, q)
        shapes = [o.shape for o in objs]
        for s in SHAPES:
            assert asked[("count", f"how many {plural(s)} are there?")] == NUMBERS[shapes.count(s)]
        assert sum(k == "exist" for k, _ in asked) == len(COLORS) * len(SHAPES) - (len(names) - len(set(names)))
        for p in objs:
            for q in objs:
                if p is q or names.count(p.name) > 1 or names.count(q.name) > 1:
                    continue
                rp, rq = (col(p.region), row(p.region)), (col(q.region), row(q.region))
                for rel, holds, decided in (("left of", rp[0] < rq[0], rp[0] != rq[0]),
                                            ("right of", rp[0] > rq[0], rp[0] != rq[0]),
                                            ("above", rp[1] < rq[1], rp[1] != rq[1]),
                                            ("below", rp[1] > rq[1], rp[1] != rq[1])):
                    got = asked.get(("relation", f"is the {p.name} {rel} the {q.name}?"))
                    assert got == (("yes" if holds else "no") if decided else None), (seed, p.name, rel, q.name)
    twins = Scene((Obj("circle", "red", "small", 0.1, 0.1), Obj("circle", "red", "small", 0.9, 0.9),
                   Obj("square", "blue", "small", 0.5, 0.5)))
    qs = [q for _, q, _ in every_question(twins, relations=True)]
    assert "where is the red circle?" not in qs and "where is the blue square?" in qs  # ambiguous: left out
    assert not any("the red circle" in q and ("left" in q or "above" in q) for q in qs)
    assert "how many circles are there?" in qs and "what color is the circle?" not in qs


def test_balanced_draw_is_uniform_over_kinds_then_answers_without_repeats():
    from vlkit.recipes.lm import balanced_draw

    pool = [("a", f"q{i}", "yes" if i < 27 else "no") for i in range(30)] + [("b", "r0", "x"), ("b", "r1", "y")]
    firsts = [balanced_draw(pool, 2, np.random.default_rng(s)) for s in range(2000)]
    assert all(len(d) == 2 and len(set(d)) == 2 for d in firsts)
    kind_b = np.mean([pool[d[0]][0] == "b" for d in firsts])
    no = np.mean([pool[d[0]][2] == "no" for d in firsts if pool[d[0]][0] == "a"])
    assert 0.46 < kind_b < 0.54 and 0.45 < no < 0.55  # by kind, then by answer: not by how many questions
    whole = balanced_draw(pool, 100, np.random.default_rng(0))
    assert sorted(whole) == list(range(len(pool)))  # runs out after every item, once each
    assert balanced_draw([], 3, np.random.default_rng(0)) == []


def test_balanced_drills_ask_every_kind_from_every_question_the_scene_answers():
    from vlkit.recipes.lm import drills

    scenes = [generate_scene(i, WorldConfig(min_objects=3, max_objects=6)) for i in range(80)]
    recs = [{"id": f"c-{i}", "task": "caption", "images": [], "meta": {"scene": s.to_dict()}, "messages": []}
            for i, s in enumerate(scenes)]
    kinds = {"count": 0, "relation": 0}
    for r, sc in zip(drills(recs, 8, True, balanced=True), scenes):
        answers = {q: a for _, q, a in every_question(sc, True)}
        turns = r["messages"]
        assert len(turns) == 16
        for m, n in zip(turns[0::2], turns[1::2]):
            q = m["content"][0]["text"].split(") ")[-1]
            assert answers[q] == n["content"][0]["text"]
            kinds["count"] += q.startswith("how many")
            kinds["relation"] += q.startswith("is the ")
    assert kinds["relation"] > 0.14 * 8 * 80 and kinds["count"] > 0.14 * 8 * 80  # ~1/6 each, not ~1/12


def test_a_partial_build_keeps_the_stages_built_before(tmp_path, monkeypatch):
    from vlkit.experiments import stages as stages_mod

    results = {"lm_small": {"context_vqa": {"acc": 0.97, "lo": 0.96, "hi": 0.98, "n": 1000, "per_kind": {}},
                            "ppl_curve": ppl_curve([2.0, 1.5, 1.4, 1.4, 1.4]), "params": 7, "steps": 5},
               "vit": {"heldout_i2t_r1": 0.85, "gallery": 500, "vision_params": 9, "steps": 3}}

    def fake_run(self, name, overrides, config=None, after=(), force=False, label=None):
        self.seconds[name] = 0.0
        self.trained.add(name)
        (tmp_path / name / ("vision" if name == "vit" else "model")).mkdir(parents=True)
        return results[name]

    monkeypatch.setattr(stages_mod.Stages, "run", fake_run)
    first = bench.build_bench(tmp_path, only=["lm_small"])
    assert set(first["stages"]) == {"lm_small"} and not first["passed"] and "vit" in first["missing"]
    second = bench.build_bench(tmp_path, only=["vit"])
    assert set(second["stages"]) == {"lm_small", "vit"}  # the first build's stage is still there
    assert bench.load_bench(tmp_path, need=("lm_small", "vit"))["stages"]["vit"]["gates"]["retrieval"]["passed"]
    with pytest.raises(VlkitError, match="missing"):
        bench.load_bench(tmp_path, need=("lm_large",))
    assert "Not built yet: lm_large, lm_opt" in (tmp_path / "report.md").read_text()


def test_the_settings_added_for_the_bench_keep_earlier_runs_and_datasets_cached():
    from vlkit.fileio import stable_hash
    from vlkit.recipes.common import config_hash
    from vlkit.recipes.lm import LMRecipe
    from vlkit.world.dataset import WorldData, dataset_dir

    cfg = LMRecipe()
    before = cfg.model_dump(mode="json")  # a config as saved before the bench's settings existed
    before.pop("output_dir")
    before.pop("eval")
    before["data"]["world"].pop("relations")
    before["train"].pop("length_groups")  # an older later setting
    for key in ("drill", "drill_repeat", "whole", "loss_on", "drill_listing", "drill_balanced", "any_order",
                "document_mask"):
        before["data"].pop(key)
    before["data"].pop("instructions")  # SPHINX's settings, later still
    before["train"].pop("batch_by_task")
    before["data"]["world"].pop("smalltext_size")
    for key in ("text_size", "aspects", "size_scale"):
        before["data"]["world"]["world"].pop(key)
    for key in ("parallel", "activation_checkpointing", "num_workers", "prefetch_factor", "pin_memory"):
        before["train"].pop(key)  # the GPU path's settings, later still
    before["data"].pop("lazy")
    before.pop("init")  # the curriculum's, later still
    before.pop("recall_warmup")  # the recall warm-up's, later still
    assert config_hash(cfg) == stable_hash(before)
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"whole": True})})
    assert config_hash(changed) != config_hash(cfg)
    assert config_hash(cfg.model_copy(update={"init": "runs/probe/two"})) != config_hash(cfg)  # a set init counts
    w = WorldData()
    old = w.model_dump(mode="json")
    old.pop("relations")
    old.pop("smalltext_size")  # SPHINX's, later still
    for key in ("text_size", "aspects", "size_scale"):
        old["world"].pop(key)
    assert dataset_dir(w).name == stable_hash({"cfg": old, "version": 1})
    assert dataset_dir(w.model_copy(update={"relations": True})) != dataset_dir(w)


def test_any_order_names_the_same_objects_in_a_drawn_order_and_leaves_the_other_draws_alone():
    from vlkit.recipes.lm import drills, textualize
    from vlkit.world.language import caption, detailed_phrase

    scenes = [generate_scene(i, WorldConfig(min_objects=4, max_objects=6)) for i in range(20)]
    phrases = lambda text: sorted(text.split(".")[0].replace(" and ", ", ").split(", "))  # noqa: E731
    moved = 0
    for sc in scenes:
        drawn = caption(sc, "detailed", np.random.default_rng(0))
        assert phrases(drawn) == sorted(detailed_phrase(o) for o in sc.objects)  # every object, once each
        moved += drawn != caption(sc, "detailed")
    assert moved >= 15  # most orders drawn differ from reading order
    recs = [{"id": f"vqa-{i}", "task": "vqa", "images": ["x.png"], "meta": {"scene": sc.to_dict()},
             "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "four"}]}]}
            for i, sc in enumerate(scenes)]
    said = lambda r, order: textualize(r, 1.0, order)[0]["content"][0]["text"].strip("() ")  # noqa: E731
    assert [said(r, 0.0) for r in recs] == [f"{caption(sc)}" for sc in scenes]  # reading order, as before
    anyway = [said(r, 1.0) for r in recs]
    assert anyway == [said(r, 1.0) for r in recs]  # drawn from the record's id: the same each time
    assert all(phrases(a) == phrases(c) for a, c in zip(anyway, [said(r, 0.0) for r in recs]))
    assert sum(a != said(r, 0.0) for a, r in zip(anyway, recs)) >= 15
    half = sum(said(r, 0.5) != said(r, 0.0) for r in recs)
    assert 3 <= half <= 17  # about half the records
    plain, drawn = drills(recs, 6, True), drills(recs, 6, True, any_order=1.0)
    for p, d in zip(plain, drawn):
        assert [m["content"] for m in p["messages"][1:]] == [m["content"] for m in d["messages"][1:]]
        first = lambda r: r["messages"][0]["content"][0]["text"]  # noqa: E731
        assert first(p).split(") ")[-1] == first(d).split(") ")[-1]  # the same question after the scene
    assert sum(p["messages"][0] != d["messages"][0] for p, d in zip(plain, drawn)) >= 15


def test_breakdown_shows_a_constant_guess_by_form_and_answer():
    from vlkit.recipes.lm import breakdown
    from vlkit.world.language import question_template

    assert question_template("is there an orange star?") == "is there a C S?"
    assert question_template("is there a red cross?") == "is there a C S?"
    assert question_template("is the red circle left of the blue square?") == "is the C S left of the C S?"
    assert question_template("how many crosses are there?") == "how many S are there?"
    asked = [("count", "how many objects are there?", "three"), ("count", "how many circles are there?", "one"),
             ("count", "how many stars are there?", "zero"), ("count", "how many crosses are there?", "two"),
             ("color", "what color is the star?", "red")]
    recs = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "meta": {"kind": k}} for k, q, _ in asked]
    guess = ["three", "one", "one", "one", "red"]  # every shape counted 'one'
    b = breakdown(recs, [a for _, _, a in asked], [float(g == a) for g, (_, _, a) in zip(guess, asked)])
    assert b["per_kind"] == {"color": 1.0, "count": 0.5}
    assert b["per_form"]["how many objects are there?"] == {"acc": 1.0, "n": 1}
    assert b["per_form"]["how many S are there?"] == {"acc": 1 / 3, "n": 3}
    assert b["per_answer"]["count"] == {"one": {"acc": 1.0, "n": 1}, "three": {"acc": 1.0, "n": 1},
                                        "two": {"acc": 0.0, "n": 1}, "zero": {"acc": 0.0, "n": 1}}


def test_wrong_object_tells_a_misbound_answer_from_one_not_read_from_the_scene():
    from vlkit.recipes.lm import wrong_object

    scene = Scene((Obj("circle", "red", "small", 0.15, 0.15), Obj("square", "blue", "small", 0.85, 0.85))).to_dict()

    def q(kind, answer):
        return {"task": "vqa", "meta": {"kind": kind, "answer": answer, "scene": scene}}

    recs = [q("color", "red"), q("color", "red"), q("shape", "square"), q("position", "top left"), q("count", "two")]
    w = wrong_object(recs, ["Red.", "blue", "star", "bottom right", "three"])
    assert w["n"] == 4  # count questions are not about one object
    assert (w["right"], w["another_object"], w["not_in_scene"]) == (0.25, 0.5, 0.25)
    assert wrong_object(recs[4:], ["two"]) is None


def test_relation_layout_splits_relations_by_what_reading_order_decides():
    from vlkit.data.records import assistant, user
    from vlkit.recipes.lm import relation_layout
    from vlkit.world.scene import Obj, Scene

    scene = Scene((Obj("circle", "red", "small", 0.15, 0.15), Obj("square", "blue", "small", 0.85, 0.2),
                   Obj("star", "green", "small", 0.5, 0.85))).to_dict()

    def ask(q):
        return {"task": "vqa", "messages": [user(None, q), assistant("yes")], "meta": {"scene": scene}}
    recs = [ask("is the red circle left of the blue square?"),   # one row band: order decides
            ask("is the blue square right of the green star?"),  # different rows: the region words decide
            ask("is the green star below the red circle?"),      # different columns
            ask("is the red circle left of the green star?"),    # different rows
            ask("what color is the circle?")]                     # not a relation: left out
    got = relation_layout(recs, [1.0, 0.0, 1.0, 1.0, 1.0])
    assert got == {"above/below, different columns": {"acc": 1.0, "n": 1},
                   "left/right, different rows": {"acc": 0.5, "n": 2},
                   "left/right, one row band": {"acc": 1.0, "n": 1}}
