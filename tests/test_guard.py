"""Guard: prompt layouts (golden strings), answer parsing, P(unsafe) by hand, taxonomies, data, recipe, CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch

from vlkit.errors import VlkitError
from vlkit.guard import Guard, GuardMiddleware, build_prompt, load_taxonomy, parse_answer
from vlkit.guard.taxonomy import Category, Taxonomy

TAX = Taxonomy(name="t", prefix="X", categories=[Category(name="Weapons", description="Building weapons."),
                                                 Category(name="Spam", description="Bulk unsolicited ads.")])
CONV = [{"role": "user", "content": "how do I bake bread?"}, {"role": "assistant", "content": "Mix flour and water."}]

BODY = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
        "with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\nX1: Weapons.\nBuilding weapons.\nX2: Spam.\n"
        "Bulk unsolicited ads.\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conv}\n\n"
        "<END CONVERSATION>\n\nProvide your safety assessment for {target} in the above conversation:\n"
        "{b} First line must read 'safe' or 'unsafe'.\n"
        "{b} If unsafe, a second line must include a comma-separated list of violated categories.")


def test_prompt_v1_golden():
    conv = "User: how do I bake bread?\n\nAgent: Mix flour and water."
    want = "[INST] " + BODY.format(role="Agent", conv=conv, target="Agent", b="-") + " [/INST]"
    assert build_prompt(CONV, TAX, "Agent", version=1) == want


def test_prompt_v2_golden_user():
    want = "[INST] " + BODY.format(role="User", conv="User: how do I bake bread?",
                                   target="ONLY THE LAST User message", b=" -") + " [/INST]"
    assert build_prompt(CONV[:1], TAX, "User", version=2) == want


def test_prompt_v3_uses_the_chat_template(tiny_tokenizer):
    conv = "User: how do I bake bread?\n\nAgent: Mix flour and water."
    body = BODY.format(role="Agent", conv=conv, target="ONLY THE LAST Agent message", b=" -")
    want = tiny_tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                              add_generation_prompt=True)
    got = build_prompt(CONV, TAX, "Agent", version=3, template="chat", tokenizer=tiny_tokenizer)
    assert got == want and got.endswith("ASSISTANT:") and body in got


def test_prompt_bad_input():
    with pytest.raises(VlkitError, match="empty"):
        build_prompt([], TAX)
    with pytest.raises(VlkitError, match="ends with a message of the Agent"):
        build_prompt(CONV, TAX, "User")
    with pytest.raises(VlkitError, match="role 'system'"):
        build_prompt([{"role": "system", "content": "x"}], TAX)
    with pytest.raises(VlkitError, match="version 7"):
        build_prompt(CONV[:1], TAX, version=7)


@pytest.mark.parametrize("text,want", [
    ("safe", ("safe", [], None)), ("  SAFE.\n", ("safe", [], None)), ("unsafe", ("unsafe", [], None)),
    ("Unsafe\n x2 , X1", ("unsafe", ["X2", "X1"], None)), ("unsafe\nX1;X1", ("unsafe", ["X1"], None)),
])
def test_parse_answers(text, want):
    assert parse_answer(text, TAX) == want


@pytest.mark.parametrize("text", ["", "   \n", "maybe", "I cannot help", "unsafe\nX9", "safe-ish"])
def test_malformed_answers_are_errors_never_safe(text):
    verdict, codes, err = parse_answer(text, TAX)
    assert verdict == "error" and codes == [] and err


@pytest.fixture(scope="module")
def tiny_guard_model(tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=1024, pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)).eval()


def test_score_is_the_softmax_of_the_first_unsafe_token(tiny_guard_model, tiny_tokenizer):
    g = Guard(tiny_guard_model, tiny_tokenizer, TAX, version=2)
    convs = [CONV[:1], [{"role": "user", "content": "a much longer message about red circles and squares"}]]
    verdicts = g.classify(convs, "User")
    scored_only = g.classify(convs, "User", generate=False)
    for conv, v, s in zip(convs, verdicts, scored_only):
        prompt = g.prompt(conv, "User")
        ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        unsafe = tiny_tokenizer(prompt + "unsafe", add_special_tokens=False)["input_ids"][ids.shape[1]]
        with torch.no_grad():
            p = torch.softmax(tiny_guard_model(input_ids=ids).logits[0, -1].float(), -1)[unsafe].item()
        assert g.unsafe_id == unsafe
        assert v.score == pytest.approx(p, abs=1e-5) and s.score == pytest.approx(p, abs=1e-5)
        assert v.verdict in ("safe", "unsafe", "error")
        if v.verdict == "error":  # a random model writes nonsense: it must not pass as safe
            assert v.blocked and v.error


def test_threshold_and_middleware(tiny_guard_model, tiny_tokenizer):
    strict = GuardMiddleware(Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=0.0))
    v = strict.check_input(CONV[:1])
    assert v.blocked
    out = strict.check_output(CONV[:1], "Mix flour and water.")
    assert out.blocked
    off = GuardMiddleware(strict.guard, check_inputs=False, check_outputs=False)
    assert off.check_input(CONV[:1]) is None and off.check_output(CONV[:1], "x") is None


def test_tokenizer_that_cannot_tell_safe_from_unsafe(tiny_guard_model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(VlkitError, match="same token"):
        Guard(tiny_guard_model, tok, TAX)


def test_custom_taxonomy_round_trip(tmp_path):
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"name": "policy", "version": 2, "prefix": "P", "categories": [
        {"name": "Phishing", "description": "Stealing credentials.", "examples": [{"text": "fake bank login"}]},
        {"name": "Gambling", "code": "G7"}]}))
    tax = load_taxonomy(path)
    assert tax.codes() == ["P1", "G7"] and tax.by_code("g7").name == "Gambling" and tax.by_name("phishing").code == "P1"
    assert Taxonomy.model_validate(tax.to_yaml_dict()) == tax
    prompt = build_prompt([{"role": "user", "content": "hi"}], tax)
    assert "P1: Phishing.\nStealing credentials.\nExample (unsafe): fake bank login\nG7: Gambling." in prompt
    assert parse_answer("unsafe\nP1, g7", tax)[1] == ["P1", "G7"]
    assert load_taxonomy("llama-guard-v1").codes() == [f"O{i}" for i in range(1, 7)]
    assert len(load_taxonomy("llama-guard-3").codes()) == 14
    assert load_taxonomy("mlcommons").by_code("S10").name == "Hate"
    assert load_taxonomy("llama-guard-2").by_name("Hate").code == "S9"  # codes move between versions
    sub = tax.subset(["Gambling"])
    assert sub.codes() == ["P1"] and sub.categories[0].name == "Gambling"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "categories": [{"name": "A"}, {"name": "a"}]}))
    with pytest.raises(VlkitError, match="bad.yaml.*duplicate category name"):
        load_taxonomy(bad)
    bad.write_text(yaml.safe_dump({"name": "b", "categories": [{"name": "A", "colour": "x"}]}))
    with pytest.raises(VlkitError, match="bad.yaml.*colour"):
        load_taxonomy(bad)
    with pytest.raises(VlkitError, match="unknown category code 'Z1'"):
        tax.by_code("Z1")
    with pytest.raises(VlkitError, match="taxonomy not found"):
        load_taxonomy(tmp_path / "none.yaml")


def test_moderation_loader_split_and_labels(tmp_path):
    from vlkit.guard.data import any_unsafe, is_test, load_moderation, to_example

    rows = [{"prompt": f"row number {i}", "S": i % 2, "H": 0} for i in range(40)] + [{"prompt": "no labels"}]
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    got = load_moderation(path)
    assert len(got) == 41 and got[0]["labels"] == {"S": 0, "H": 0} and any_unsafe(got[-1]) is None
    assert [r["split"] == "test" for r in got] == [is_test(r["prompt"]) for r in rows]
    assert 0 < sum(r["split"] == "test" for r in got) < 41
    ex = to_example(got[1])
    assert ex["unsafe"] == ["sexual"] and ex["known"] == ["sexual", "hate"] and ex["role"] == "User"
    path.write_bytes(b"not gzip")
    with pytest.raises(VlkitError, match="unreadable"):
        load_moderation(path)


def test_the_real_moderation_set_loads():
    from vlkit.experiments.guard import moderation_dir
    from vlkit.guard.data import any_unsafe, load_moderation

    if not moderation_dir().exists():
        pytest.skip("../shared/data/openai-moderation is not beside this checkout")
    rows = load_moderation(moderation_dir())
    assert len(rows) == 1680 and sum(any_unsafe(r) == 1 for r in rows) == 522
    test = sum(r["split"] == "test" for r in rows)
    assert 0.35 < test / 1680 < 0.45


def test_the_guard_report_pairs_each_seed_with_tfidf_on_the_same_rows():
    import numpy as np

    from sklearn.metrics import average_precision_score

    from vlkit.eval.stats import fmt
    from vlkit.experiments import guard as exp
    from vlkit.experiments import provenance

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).tolist()
    ids = [f"mod-{i:05d}" for i in range(300)]

    def method(scores):
        return {"auprc": 0.0, "positives": sum(y), "n": 300, "per_category": {},
                "rows": {"ids": ids, "labels": y, "scores": list(scores)}}
    methods = {exp.TFIDF: method(rng.uniform(size=300)),
               "guard s0": method(np.array(y) + rng.uniform(size=300)),
               "guard s1": method(rng.uniform(size=300))}
    for m in methods.values():
        m["auprc"] = float(average_precision_score(y, m["rows"]["scores"]))
    split = {"train": 1000, "test": 300, "test_known": 300, "test_unsafe": sum(y)}
    s = exp.summarize(methods, ["guard s0", "guard s1"], split)
    verdicts = [c["verdict"] for c in s["claims"]]
    assert verdicts[0] == "does not hold" or s["methods"]["guard s0"]["interval"]["lo"] >= exp.PUBLISHED
    assert verdicts[1:] == ["holds", "not shown (within noise)"]  # the sharp seed beats TF-IDF, the blind does not
    assert s["guard_over_seeds"]["n"] == 2
    s["seconds"], s["provenance"] = {k: 1.0 for k in methods}, provenance()
    md = exp.report(s)
    assert "| claim | paper | ours | verdict |" in md
    assert f"| guard s0 | **{fmt(s['methods']['guard s0']['interval'])}** |" in md  # AUPRC with its interval
    bad = {**methods, "guard s1": {**methods["guard s1"], "rows": {**methods["guard s1"]["rows"],
                                                                     "labels": [1 - v for v in y]}}}
    with pytest.raises(VlkitError, match="disagree on a test row's label"):
        exp.summarize(bad, ["guard s0", "guard s1"], split)


def synthetic_examples(n: int, offset: int = 0) -> list[dict]:
    """Harmless stand-ins: 'spam' texts are unsafe for the Spam category."""
    out = []
    for i in range(offset, offset + n):
        spam = i % 3 == 0
        text = f"buy cheap pills now offer {i}" if spam else f"the weather is mild today number {i}"
        out.append({"id": f"e{i}", "role": "User", "messages": [{"role": "user", "content": text}],
                    "unsafe": ["Spam"] if spam else []})
    return out


def test_guard_recipe_trains_and_the_cli_classifies(tmp_path):
    import yaml

    from vlkit.config import load
    from vlkit.fileio import write_jsonl
    from vlkit.recipes.guard import GuardRecipe, augment, run
    from vlkit.guard.taxonomy import Taxonomy as T

    write_jsonl(tmp_path / "train.jsonl", synthetic_examples(60))
    write_jsonl(tmp_path / "test.jsonl", synthetic_examples(24, offset=100))
    (tmp_path / "tax.yaml").write_text(yaml.safe_dump(TAX.to_yaml_dict()))
    cfg = load(GuardRecipe, None, [
        f"output_dir={tmp_path / 'g'}", f"taxonomy={tmp_path / 'tax.yaml'}", "version=2",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.test={tmp_path / 'test.jsonl'}", "tokenizer.vocab_size=300",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "augment.copies=2", "train.steps=60", "train.batch_size=16", "train.lr=5e-3", "train.progress=false",
        "max_length=256"])
    res = run(cfg)
    assert res["train_items"] == 120 and res["eval"]["n"] == 24 and res["eval"]["positives"] == 8
    assert res["eval"]["auprc"] > 0.9  # the word 'pills' is easy: a guard that learnt nothing scores ~0.33
    assert res["eval"]["per_category"]["Spam"]["positives"] == 8
    rows = res["eval"]["rows"]  # per test row, for intervals and pairing with other methods
    assert rows["ids"] == [f"e{i}" for i in range(100, 124)] and sum(rows["labels"]) == 8 and len(rows["scores"]) == 24
    # augmentation: violated categories stay (with their new codes) unless dropped and relabelled safe
    import random
    rng = random.Random(0)
    for _ in range(50):
        shown, codes = augment(synthetic_examples(1)[0], TAX, cfg.augment, rng)
        assert isinstance(shown, T) and shown.categories
        assert codes == ([shown.by_name("Spam").code] if "Spam" in [c.name for c in shown.categories] else [])
    model = tmp_path / "g" / "model"
    one = subprocess.run([sys.executable, "-m", "vlkit.cli", "guard", str(model), "--prompt", "buy cheap pills now"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    row = json.loads(one.stdout)
    assert row["role"] == "User" and row["verdict"] in ("safe", "unsafe", "error") and 0 <= row["score"] <= 1
    conv = tmp_path / "convs.jsonl"
    write_jsonl(conv, [{"id": "a", "messages": CONV}, {"id": "b", "messages": CONV[:1]}])
    many = subprocess.run([sys.executable, "-m", "vlkit.cli", "guard", str(model), "--jsonl", str(conv), "--out",
                           str(tmp_path / "v.jsonl")], capture_output=True, text=True)
    assert many.returncode == 0, many.stderr
    rows = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(r["id"], r["role"]) for r in rows] == [("a", "Agent"), ("b", "User")]
    bad = subprocess.run([sys.executable, "-m", "vlkit.cli", "guard", str(model)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--prompt" in bad.stderr


def test_native_template_hands_the_conversation_to_the_checkpoint(tiny_tokenizer):
    got = build_prompt(CONV, TAX, "Agent", template="native", tokenizer=tiny_tokenizer)
    assert got == tiny_tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    with pytest.raises(VlkitError, match="ends with a message of the Agent"):
        build_prompt(CONV, TAX, "User", template="native", tokenizer=tiny_tokenizer)


def test_guard_examples_keep_the_answer_and_the_end_of_a_long_prompt(tiny_tokenizer):
    from vlkit.recipes.guard import GuardDataset, GuardRecipe, encode

    tok = tiny_tokenizer
    prompt = "a red circle. " * 50
    ids, w = encode(tok, prompt, "unsafe\nX1", 40, 0.0)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer = tok(prompt + "unsafe\nX1", add_special_tokens=False)["input_ids"][n_prompt:]
    assert len(ids) == 40 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[-len(answer) - 1:-1] == answer and w == [0.0] * (39 - len(answer)) + [1.0] * (len(answer) + 1)
    short, sw = encode(tok, "hi", "safe", 40, 0.25)
    assert len(short) < 40 and sw[0] == 0.25 and sw[-1] == 1.0
    tiny_budget, _ = encode(tok, prompt, "unsafe\nX1", 2, 0.0)  # no room for the prompt: only bos + answer
    assert tiny_budget == [tok.bos_token_id] + answer + [tok.eos_token_id]
    data = GuardDataset([], tok, GuardRecipe(), TAX, 0)
    batch = data.collate([(ids, w), (short, sw)])
    assert batch["attention_mask"].sum(1).tolist() == [len(ids), len(short)]


@pytest.mark.parametrize("text", ["unsafe", "Unsafe", "UNSAFE", " unsafe", "unsafe\nX1", "Unsafe: X2", "unsafe."])
def test_an_answer_that_says_unsafe_blocks_whatever_its_score(tiny_guard_model, tiny_tokenizer, text):
    g = Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=0.5)
    v = g.decide(text, score=0.01)  # the first token's probability can miss a capitalised or spaced spelling
    assert v.verdict == "unsafe" and v.blocked
    assert g.decide("unsafe\nX1", 0.01).categories == ["X1"]


def test_safe_needs_the_text_and_the_score(tiny_guard_model, tiny_tokenizer):
    g = Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=0.5)
    assert not g.decide("safe", 0.1).blocked and not g.decide(" Safe.", 0.1).blocked
    assert g.decide("safe", 0.7).verdict == "unsafe"           # the score says unsafe: blocked
    assert g.decide("safe\nbut here is how", 0.1).verdict == "error"
    assert g.decide("", 0.0).verdict == "error"


@pytest.mark.parametrize("bad", [float("nan"), 2.0, -0.1, "0.5", True, None])
def test_a_threshold_that_is_not_a_probability_is_refused(tiny_guard_model, tiny_tokenizer, tmp_path, bad):
    import json

    with pytest.raises(VlkitError, match="not a probability"):
        Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=bad)
    (tmp_path / "guard_config.json").write_text(json.dumps({"threshold": bad}))
    with pytest.raises(VlkitError, match="guard_config.json: threshold: .* not a probability"):
        Guard.from_pretrained(tmp_path)  # refused before any weights are read


def test_fuzzed_answers_are_safe_only_when_they_say_exactly_safe(tiny_guard_model, tiny_tokenizer):
    from hypothesis import given, settings, strategies as st

    g = Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=0.5)
    words = st.sampled_from(["safe", "Safe", "SAFE", "unsafe", "Unsafe", "UNSAFE", "X1", "x2", "X9", "not", "\n",
                             " ", ".", ",", "safe-ish", "maybe"])
    texts = st.one_of(st.text(max_size=40), st.lists(words, max_size=6).map("".join))

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(texts, st.floats(0, 1))
    def check(text, score):
        v = g.decide(text, score)
        normal = text.strip().lower().rstrip(".").strip()
        if not v.blocked:
            assert normal == "safe" and score < 0.5, (text, score)
        if normal.startswith("unsafe") and not normal[6:7].isalpha():
            assert v.blocked, (text, score)
        assert v.verdict in ("safe", "unsafe", "error")

    check()


def test_a_score_that_is_not_a_number_blocks(tiny_guard_model, tiny_tokenizer):
    g = Guard(tiny_guard_model, tiny_tokenizer, TAX, threshold=0.5)
    assert g.decide("safe", float("nan")).blocked  # fp16 overflow must not read as safe
    assert g.decide("safe", float("inf")).blocked
