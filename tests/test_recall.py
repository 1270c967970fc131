"""The synthetic recall tasks (vlkit.world.recall) against their definitions, and the lm recipe's warm-up on them."""

import pytest
import torch

from vlkit.world.recall import (BOS, IS, PAD, SEP, SPECIALS, STAGES, answer_accuracy, copy_batch, lookup_batch,
                                parse_stage, world_rows)
from vlkit.world.language import NUMBERS, decided_relations
from vlkit.world.scene import COLORS, REGIONS, SHAPES, Obj, plural


def test_lookup_rows_ask_each_query_for_its_own_pair():
    keys, values, s = 8, 5, SPECIALS
    for order, gap in (("vk", 1), ("kv", 0), ("mix", 1), ("vk", 4)):
        ids, labels, in_seq = lookup_batch(torch.Generator().manual_seed(3), 40, keys, values, (2, 6), 4, order, gap)
        orders = set()
        for row, lab, present in zip(ids.tolist(), labels.tolist(), in_seq):
            assert row[0] == BOS
            sep = row.index(SEP)
            pairs = [row[i:i + 2] for i in range(1, sep, 2)]
            kv = pairs[0][0] < s + keys  # a key first
            orders.add(kv)
            assert all((a < s + keys) == kv for a, _ in pairs)  # one order within a row
            bound = {(a if kv else b): (b if kv else a) for a, b in pairs}  # key -> value
            assert 2 <= len(pairs) <= 6 and len(bound) == len(pairs)  # keys are distinct
            assert all(s <= k < s + keys for k in bound) and all(s + keys <= v < s + keys + values
                                                                 for v in bound.values())
            assert present.nonzero().flatten().tolist() == sorted({v - s - keys for v in bound.values()})
            answers = [i for i, t in enumerate(lab) if t != -100]
            assert len(answers) == 4 and all(lab[i] == row[i] for i in answers)
            for i in answers:  # the query's key sits gap + 1 tokens before its answer, which is that key's value
                assert row[i - 1 - gap] in bound and row[i] == bound[row[i - 1 - gap]]
                assert all(t == IS for t in row[i - gap:i])
            assert set(row[answers[-1] + 1:]) <= {PAD}
        assert orders == ({True, False} if order == "mix" else {order == "kv"})


def test_copy_rows_repeat_the_string_and_score_it_from_its_second_token():
    ids, labels, none = copy_batch(torch.Generator().manual_seed(5), 30, 13, (3, 7))
    assert none is None
    for row, lab in zip(ids.tolist(), labels.tolist()):
        sep = row.index(SEP)
        string = row[1:sep]
        assert row[0] == BOS and 3 <= len(string) <= 7 and all(SPECIALS <= t < SPECIALS + 13 for t in string)
        assert row[sep + 1:sep + 1 + len(string)] == string and set(row[sep + 1 + len(string):]) <= {PAD}
        assert [i for i, t in enumerate(lab) if t != -100] == list(range(sep + 2, sep + 1 + len(string)))
        assert all(lab[i] == row[i] for i in range(sep + 2, sep + 1 + len(string)))


WORDS = [".", "is", *SHAPES, *sorted(COLORS), *NUMBERS, *(plural(s) for s in SHAPES), "top", "bottom", "left", "right",
         "center", "above", "below", "of", "yes", "no"]


class Tok:  # one id per word, as a BPE trained on enough drills gives
    pad_token_id, bos_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [2 + WORDS.index(text.strip())] if text.strip() in WORDS else [900, 901]


def test_world_rows_write_each_stage_in_the_worlds_words():
    ids_of = {2 + WORDS.index(w): w for w in WORDS}
    assert STAGES == ("copy", "mix:0", "mix:1")
    copy = world_rows(Tok(), 20, 0, "copy")
    for row, lab in zip(copy["input_ids"].tolist(), copy["labels"].tolist()):  # the string again after '.'
        text = [ids_of[t] for t in row if t > 1]
        sep = text.index(".")
        assert set(text) - {"."} <= set(SHAPES) | set(COLORS) and text[sep + 1:] == text[:sep]
        assert [t for t in lab if t != -100] == [t for t in row if t > 1][sep + 2:]
    for stage in ("mix:0", "mix:1", "vk:3"):
        gap, orders, directions = parse_stage(stage)[2], set(), set()
        rows = world_rows(Tok(), 40, 0, stage, (2, 6))
        for row, lab in zip(rows["input_ids"].tolist(), rows["labels"].tolist()):
            text = [ids_of.get(t) for t in row if t > 1]
            sep = text.index(".")
            key_words = SHAPES if text[sep + 1] in SHAPES else COLORS  # the first query is a key
            pairs = list(zip(text[:sep:2], text[1:sep:2]))
            orders.add(pairs[0][0] in key_words)
            directions.add(key_words is SHAPES)
            bound = {(a if a in key_words else b): (b if a in key_words else a) for a, b in pairs}
            assert len(bound) == len(pairs) and all((v in key_words) is False for v in bound.values())
            answers = [i for i, t in enumerate(lab) if t != -100]
            assert len(answers) == 8
            for i in answers:  # 'is' between the query's key and its answer, gap times
                assert ids_of[row[i]] == bound[ids_of[row[i - 1 - gap]]]
                assert [ids_of[t] for t in row[i - gap:i]] == ["is"] * gap
        want_orders = {True, False} if stage.startswith("mix") else {False}  # vk: the value (colour) first
        assert orders == want_orders and directions == {True, False}  # both directions: shape->colour and back
    with pytest.raises(ValueError, match="splits 'circle'"):
        world_rows(type("Short", (Tok,), {"encode": lambda self, t, add_special_tokens=False: [5, 6]})(), 4, 0)
    for bad in ("lookup", "mix", "vk:", "mix:10", "kv:x", "copy:1", "count:1", "where:10", "relations",
                "relation:"):
        with pytest.raises(ValueError, match="recall stage"):
            parse_stage(bad)


def scored_rows(stage: str, n: int = 200) -> list[tuple[list[str], list[str]]]:
    """world_rows of `stage` read back: per row, its words (BOS dropped) and the words its labels score."""
    ids_of = {2 + WORDS.index(w): w for w in WORDS}
    rows = world_rows(Tok(), n, 4, stage, (2, 6), 6)
    out = []
    for row, lab in zip(rows["input_ids"].tolist(), rows["labels"].tolist()):
        assert row[0] == Tok.bos_token_id
        out.append(([ids_of[t] for t in row[1:] if t != Tok.pad_token_id],
                    [(i - 1, ids_of[t]) for i, t in enumerate(lab) if t != -100]))
    return out


def test_count_rows_answer_how_often_the_row_names_each_shape():
    answers = set()
    for words, scored in scored_rows("count"):
        sep = words.index(".")
        named = words[1:sep:2]  # colour, shape, colour, shape, ...
        assert 2 <= len(named) <= 6 and set(named) <= set(SHAPES) and set(words[:sep:2]) <= set(COLORS)
        assert [i for i, _ in scored] == list(range(sep + 2, len(words), 2)) and len(scored) == 6
        for i, ans in scored:  # the answer is how many times the shape just asked (by its plural) is named before '.'
            assert ans == NUMBERS[[plural(s) for s in named].count(words[i - 1])] and words[i - 1] not in SHAPES
            answers.add(ans)
    assert {"zero", "one", "two", "three"} <= answers  # counts past one, and absent shapes


def placed_cells(words: list[str]) -> dict[str, tuple[int, int]]:
    """'circle top left square right ...' (before '.') -> {shape: (row, column)}; each shape once."""
    region_words = {w for row in REGIONS for r in row for w in r.split()}
    where, shape = {}, None
    for w in words[:words.index(".")]:  # each shape, then its region's words
        if w in SHAPES:
            assert w not in where
            shape, where[w] = w, []
        else:
            assert w in region_words
            where[shape].append(w)
    cell = {s: next((r, c) for r in range(3) for c in range(3) if REGIONS[r][c] == " ".join(ws))
            for s, ws in where.items()}
    assert 2 <= len(cell) <= 6
    return cell


def test_where_rows_answer_each_shape_with_every_word_of_its_region():
    for words, scored in scored_rows("where"):
        cell, sep = placed_cells(words), words.index(".")
        asked = words[sep + 1:]
        queries, k = [], 0
        while k < len(asked):  # shape, then its region's one or two words, all scored
            r, c = cell[asked[k]]
            n = len(REGIONS[r][c].split())
            assert asked[k + 1:k + 1 + n] == REGIONS[r][c].split()
            queries.append(list(range(sep + 2 + k, sep + 2 + k + n)))
            k += 1 + n
        assert len(queries) == 6 and [i for i, _ in scored] == [i for q in queries for i in q]


def test_a_text_stage_bounds_the_objects_a_row_by_its_number():
    assert parse_stage("relation:2") == ("relation", None, 2) and parse_stage("where") == ("where", None, 0)
    assert {len(placed_cells(words)) for words, _ in scored_rows("relation:2")} == {2}  # ':2': two objects a row
    assert {len(placed_cells(words)) for words, _ in scored_rows("where:3")} == {2, 3}


def test_relation_rows_ask_only_what_the_regions_decide_and_answer_it():
    answers = []
    for words, scored in scored_rows("relation"):
        cell = placed_cells(words)
        for i, ans in scored:  # 'a rel b ans' ('left of', 'right of', 'above', 'below'): what the regions decide
            q = words[:i]
            a_, b_ = q[-4] if q[-2] == "of" else q[-3], q[-1]
            rel = f"{q[-3]} of" if q[-2] == "of" else q[-2]
            objs = [Obj(s, "red", "small", (cell[s][1] + 0.5) / 3, (cell[s][0] + 0.5) / 3) for s in (a_, b_)]
            assert (rel, ans == "yes") in decided_relations(*objs)
            answers.append(ans)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6  # the relation is drawn among those decided


class Oracle(torch.nn.Module):
    """Next-token logits that peek at the next input token (shift 1: always right), or at another one."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift, self.w = shift, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 32).float()})()


def test_answer_accuracy_scores_the_labelled_tokens_only():
    ids, labels, _ = lookup_batch(torch.Generator().manual_seed(1), 30, 8, 8, (2, 6), 3, "kv", 0)
    rows = {"input_ids": ids, "labels": labels}
    assert answer_accuracy(Oracle(1), rows, batch_size=7) == 1.0
    wrong = answer_accuracy(Oracle(2), rows)  # predicts the token after the answer: PAD or the next query's key
    assert wrong == 0.0
    m = Oracle(1).train()
    answer_accuracy(m, rows)
    assert m.training  # put back as it was


def test_lm_recipe_warms_up_on_each_stage_until_it_forms_then_trains_and_resumes(tmp_path, tiny_world, capsys):
    from test_recipes import lm_overrides
    from vlkit.config import load
    from vlkit.errors import VlkitError
    from vlkit.fileio import read_json
    from vlkit.recipes.lm import LMRecipe, run

    out = tmp_path / "warm"
    base = lm_overrides(tiny_world, out, "llama", "llama") + ["train.steps=4", "train.eval_every=0",
                                                              "data.drill=3"]
    # until 0.001: each stage stops at its first check; max_steps bounds the other stage
    cfg = load(LMRecipe, None, base + ["recall_warmup.max_steps=6", "recall_warmup.check_every=2",
                                       "recall_warmup.until=0.001", "recall_warmup.stages=[copy,vk:1]",
                                       "recall_warmup.heldout=20"])
    res = run(cfg)
    warm = res["recall_warmup"]
    assert [w["stage"] for w in warm] == ["copy", "vk:1"] and [w["steps"] for w in warm] == [2, 2]
    assert all(len(w["curve"]) == 1 and 0 <= w["heldout_acc"] <= 1 for w in warm)
    said = capsys.readouterr().err
    assert "recall warm-up copy step 2: held-out" in said and "recall warm-up vk:1 step 2: held-out" in said
    assert read_json(out / "recall_warmup.json") == warm and (out / "model" / "config.json").is_file()
    assert not list(out.glob("**/recall*/checkpoints"))  # the warm-up's checkpoints stayed in a temporary directory
    # resumed once the world training has a checkpoint: no second warm-up, its figures read back
    again = run(cfg, resume=True)
    assert again["recall_warmup"] == warm
    # until 1.0 is not reached in 4 steps: each stage runs to max_steps, checked every 2 steps and at the end
    cfg = load(LMRecipe, None, base + [f"output_dir={tmp_path / 'full'}", "recall_warmup.max_steps=5",
                                       "recall_warmup.check_every=2", "recall_warmup.until=1.0",
                                       "recall_warmup.stages=[mix:0]", "recall_warmup.heldout=20",
                                       "recall_warmup.keep=0.2"])
    full = run(cfg)
    warm = full["recall_warmup"]
    assert warm[0]["steps"] == 5 and [c[0] for c in warm[0]["curve"]] == [2, 4, 5]
    assert 0 <= full["recall_after"] <= 1 and res["recall_after"] is not None
    # keep 0.2: a quarter as many lookup rows as world blocks, in the training blocks
    assert full["train_tokens"] == round(res["train_tokens"] * 1.25 / 64) * 64
    # a tokenizer that splits a shape or colour word: a clear error before anything is written
    bad = load(LMRecipe, None, base + [f"output_dir={tmp_path / 'bad'}", "tokenizer.vocab_size=300",
                                       "recall_warmup.max_steps=2"])
    with pytest.raises(VlkitError, match="recall_warmup: the tokenizer splits"):
        run(bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(Exception, match="recall stage 'lookup'"):
        load(LMRecipe, None, base + ["recall_warmup.stages=[lookup]"])


def test_with_recall_adds_a_share_of_lookup_rows_padded_to_the_block():
    from vlkit.errors import VlkitError
    from vlkit.recipes.lm import RecallWarmup, with_recall

    packed = {"input_ids": torch.full((30, 64), 7), "labels": torch.full((30, 64), 7)}
    assert with_recall(Tok(), RecallWarmup(), packed, 0) is packed  # keep 0: the blocks as they were
    out = with_recall(Tok(), RecallWarmup(keep=0.25, stages=["mix:1"]), packed, 0)
    assert out["input_ids"].shape == (40, 64) and torch.equal(out["input_ids"][:30], packed["input_ids"])
    extra_ids, extra_labels = out["input_ids"][30:], out["labels"][30:]
    length = 1 + 2 * 6 + 1 + 8 * 3  # BOS, 6 pairs at most, '.', 8 queries of key, 'is', value
    assert (extra_ids[:, length:] == Tok.pad_token_id).all() and (extra_labels[:, length:] == -100).all()
    assert ((extra_labels != -100).sum(1) == 8).all()  # each row's 8 answers, and nothing else, in the loss
    with pytest.raises(VlkitError, match="more than a block"):
        with_recall(Tok(), RecallWarmup(keep=0.5), {k: v[:, :20] for k, v in packed.items()}, 0)
    # kept stages: rows of each in equal parts, in stage order; a single kept stage draws what the last stage did
    assert torch.equal(with_recall(Tok(), RecallWarmup(keep=0.25, stages=["copy", "mix:1"], kept=["mix:1"]), packed,
                                   0)["input_ids"], out["input_ids"])
    kept = with_recall(Tok(), RecallWarmup(keep=0.25, stages=["mix:1"], kept=["mix:1", "count", "relation"]),
                       packed, 0)
    assert kept["input_ids"].shape == (40, 64) and torch.equal(kept["input_ids"][:30], packed["input_ids"])
    words = {2 + WORDS.index(w): w for w in WORDS}
    scored = [{words[t] for t in lab.tolist() if t != -100} for lab in kept["labels"][30:]]
    assert [bool(s & set(NUMBERS)) for s in scored] == [False] * 4 + [True] * 3 + [False] * 3
    assert [s <= {"yes", "no"} for s in scored] == [False] * 7 + [True] * 3
    with pytest.raises(Exception, match="recall stage 'counts'"):
        RecallWarmup(kept=["counts"])
    with pytest.raises(Exception, match="kept\n.*at least 1 item"):  # an empty list: give a stage, or null
        RecallWarmup(kept=[])


def test_recall_after_scores_the_last_and_each_kept_stage_on_the_warm_ups_own_heldout_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlkit.recipes.lm import RecallWarmup, recall_after, recall_warmup
    from vlkit.train import TrainConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2 + len(WORDS), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128))
    w = RecallWarmup(max_steps=3, check_every=3, stages=["copy", "mix:0"], kept=["count", "mix:0"], heldout=30)
    warm = recall_warmup(model, Tok(), w, TrainConfig(steps=1, batch_size=4, lr=1e-2, warmup_steps=0))
    after = recall_after(model, Tok(), w, 0)
    assert list(after) == ["mix:0", "count"]  # the last stage, then each kept stage not named yet
    assert after["mix:0"] == warm[-1]["heldout_acc"]  # nothing trained since: the very rows the warm-up checked
    assert 0 <= after["count"] <= 1
