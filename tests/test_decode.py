"""vlkit's decoding loop (vlkit.models.decode): transformers' greedy tokens exactly, rows joining and leaving a
running batch, incremental text with stop strings, per-answer sampling."""

from __future__ import annotations

import threading

import pytest
import torch

from test_vlm import LLMS, images, make
from vlkit.models.decode import Answer, Batch, SlabCache, SlabLayer
from vlkit.models.generate import GenerationConfig, generate, prepare, stream

QUESTIONS = ["what color is the circle?", "describe the image.", "how many shapes are there?"]


def convs(n=3):
    return [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 3] + " " * i}]}]
            for i in range(n)]


def hf_tokens(model, proc, conversations, imgs, new, **kw):
    """transformers' generate on the same fused prompts (what vlkit used before its own loop)."""
    inputs = prepare(model, proc, conversations, imgs)
    tok = proc.tokenizer
    with torch.no_grad(), inputs.pop("fused"):
        out = model.llm.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **kw)
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return rows


@pytest.mark.parametrize("family", sorted(LLMS))
def test_greedy_tokens_equal_transformers_generate_for_every_family(tiny_tokenizer, family):
    model, proc = make(tiny_tokenizer, family)
    if family in ("mistral", "gemma2"):  # a window shorter than the prompts: the sliding mask is exercised
        model.llm.config.sliding_window = 8
    conversations, imgs = convs(), [images(1, seed=i) for i in range(3)]
    got = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=20), return_ids=True)
    assert [g["ids"] for g in got] == hf_tokens(model, proc, conversations, imgs, 20)
    assert all(g["finish_reason"] == ("length" if g["tokens"] == 20 else "stop") for g in got)


def test_the_adapter_and_vpgc_models_decode_as_transformers_does(tiny_tokenizer):
    from test_adapter import make as make_fused, perturb
    from vlkit.models.fusion.adapter import AdapterConfig

    for kind in ("adapter", "vpgc"):
        model, proc = make_fused(tiny_tokenizer, num_hidden_layers=3) if kind == "adapter" else make(tiny_tokenizer)
        model.add_fusion(kind, AdapterConfig(prompt_length=4, bias_scale="none") if kind == "adapter" else None)
        perturb(model.fusion(kind))  # away from their zero init, so the fusions change the answers
        conversations, imgs = convs(2), [images(1, seed=i) for i in range(2)]
        got = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=12), return_ids=True)
        assert [g["ids"] for g in got] == hf_tokens(model, proc, conversations, imgs, 12)


def test_rows_that_join_and_leave_a_running_batch_decode_as_they_would_alone(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    tok = proc.tokenizer
    conversations, imgs = convs(3), [images(1, seed=i) for i in range(3)]
    budgets = [14, 5, 9]

    def start(i):
        inputs = prepare(model, proc, [conversations[i]], [imgs[i]])
        a = Answer(tok, budgets[i], ignore_eos=True, tag=i)
        return Batch.prefill(model.llm, [a], inputs["inputs_embeds"], inputs["attention_mask"], inputs["fused"],
                             tok.pad_token_id)[0]

    alone = []
    for i in range(3):
        b = start(i)
        while not b.done:
            b.step()
        alone.append(b.answers[0].ids)
    running = start(0)
    for _ in range(3):
        running.step()
    running.join(start(1))  # a shorter prompt joins, right-aligned
    running.step()
    running.join(start(2))
    finished = {}
    while running.answers:
        running.step()
        done = [i for i, a in enumerate(running.answers) if a.done]
        finished.update({running.answers[i].tag: running.answers[i].ids for i in done})
        running.keep([i for i, a in enumerate(running.answers) if not a.done])
    assert [finished[i] for i in range(3)] == alone
    assert [len(ids) for ids in alone] == budgets


def test_the_cache_grows_past_its_capacity_and_trims_shared_padding():
    layer = SlabLayer(capacity=1)
    k = torch.randn(2, 1, 3, 4)
    keys, _ = layer.update(k, k)
    more = torch.randn(2, 1, 1, 4)
    keys, values = layer.update(more, more)
    assert torch.equal(keys, torch.cat([k, more], 2)) and layer.get_seq_length() == 4
    cache = SlabCache(8)
    cache.update(k, k, 0)
    other = SlabCache(8)
    other.update(more, more, 0)
    cache.join(other)  # 3 and 1 positions: the second's rows are padded on the left
    keys = cache.layers[0].keys
    assert keys.shape == (4, 1, 3, 4) and torch.equal(keys[2:, :, 2:], more) and not keys[2:, :, :2].any()
    cache.batch_select_indices(torch.tensor([2, 3]))
    cache.trim_left(2)
    assert torch.equal(cache.layers[0].keys, more)


class Chars:
    """A tokenizer whose tokens are characters (ids 10..): exact control of the text."""

    eos_token_id = 1

    def __init__(self, alphabet="abc\n.é"):
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 10] for i in ids if i >= 10)  # below 10: special, no text

    def ids(self, text):
        return [self.alphabet.index(c) + 10 for c in text]


def feed(answer, ids):
    pieces = []
    for t in ids:
        pieces.append(answer.push(t))
        if answer.done:
            break
    return pieces


def test_stop_strings_end_the_answer_and_nothing_they_take_back_was_streamed():
    tok = Chars()
    a = Answer(tok, 50, stop=["\n\n", "cab"])
    pieces = feed(a, tok.ids("ab\nc\n\nabc"))
    assert a.finish == "stop" and a.text == "ab\nc" and "".join(pieces) == "ab\nc"
    # a lone newline waits (it may begin "\n\n"), and so does a "c" (it may begin "cab")
    assert pieces[:5] == ["a", "b", "", "\n", "c"]
    b = Answer(tok, 50, stop=["cab", "b"])
    feed(b, tok.ids("acab"))  # both end at the 4th token: the earlier-starting one cuts
    assert b.text == "a" and b.finish == "stop" and len(b.ids) == 4
    c = Answer(tok, 4, stop=["zz"])
    assert "".join(feed(c, tok.ids("abcab"))) == "abca" and c.finish == "length"
    d = Answer(tok, 9)
    assert "".join(feed(d, tok.ids("ab") + [1, 10])) == "ab" and d.finish == "stop" and d.ids == tok.ids("ab")
    e = Answer(tok, 9, ignore_eos=True)
    feed(e, [1, 10])
    assert e.ids == [1, 10] and not e.done


def test_incremental_text_equals_the_whole_decode_for_a_byte_level_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "a red circle, é and ü; the 12 big squares!\n\nnext: ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids += [tok.convert_tokens_to_ids(t) for t in ("Ã", "©")]  # the two byte tokens of "é", one at a time
    a = Answer(tok, 500, text=True)
    pieces = feed(a, ids)
    assert "".join(pieces) == a.final_text() == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # half a character is never released
    assert pieces[-2] == "" and pieces[-1].endswith("é")


def test_a_seeded_answer_samples_the_same_tokens_whatever_its_batch(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    conversations, imgs = convs(3), [images(1, seed=i) for i in range(3)]
    gen = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    together = generate(model, proc, conversations, imgs, gen, return_ids=True)
    alone = generate(model, proc, conversations[:1], imgs[:1], gen, return_ids=True)
    assert together[0]["ids"] == alone[0]["ids"]
    assert together[0]["ids"] != together[1]["ids"]  # rows sample from seed + row
    nucleus = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=10, temperature=1.0,
                                                                          top_p=1e-6, seed=3), return_ids=True)
    greedy = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=10), return_ids=True)
    assert [n["ids"] for n in nucleus] == [g["ids"] for g in greedy]  # a tiny nucleus is the argmax


def test_a_stream_is_the_whole_answer_and_a_cancelled_one_stops(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    conv, imgs = convs(1)[0], images(1)
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    whole = generate(model, proc, [conv], [imgs], gen)[0]
    assert "".join(stream(model, proc, conv, imgs, gen)).strip() == whole["text"]
    cancelled = threading.Event()
    got = []
    for piece in stream(model, proc, conv, imgs, gen, cancelled=cancelled):
        got.append(piece)
        cancelled.set()
    assert len(got) <= 2


def test_an_answer_that_ends_inside_a_character_streams_what_the_whole_decode_gives(tiny_tokenizer):
    tok = tiny_tokenizer
    half = tok.convert_tokens_to_ids("Ã")  # the first byte of "é" alone
    ids = tok("a red", add_special_tokens=False)["input_ids"] + [half]
    for end in ("length", "eos"):
        a = Answer(tok, len(ids) if end == "length" else 99, text=True)
        pieces = feed(a, ids + ([tok.eos_token_id] if end == "eos" else []))
        assert "".join(pieces) == a.final_text() == tok.decode(ids, skip_special_tokens=True)
        assert a.final_text().endswith("\ufffd") and a.finish == ("length" if end == "length" else "stop")


def test_the_llm_generation_configs_end_tokens_end_an_answer(tiny_tokenizer):
    """Llama 3 style: the generation config names more end tokens than the tokenizer's eos."""
    model, proc = make(tiny_tokenizer)
    conversations, imgs = convs(1), [images(1)]
    free = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=8, ignore_eos=True),
                    return_ids=True)[0]["ids"]
    model.llm.generation_config.eos_token_id = [proc.tokenizer.eos_token_id, free[3]]
    ended = generate(model, proc, conversations, imgs, GenerationConfig(max_new_tokens=8), return_ids=True)[0]
    first = min(i for i, t in enumerate(free) if t in (free[3], proc.tokenizer.eos_token_id))
    assert ended["ids"] == free[:first] and ended["finish_reason"] == "stop"


def test_images_given_as_inputs_follow_a_conversation_cut_to_fit(tiny_tokenizer):
    """A conversation longer than max_length keeps only its first images; inputs given for all of them (the
    server's visual cache) are cut alike, and the answer equals the one from the image files."""
    model, proc = make(tiny_tokenizer)
    imgs = images(2)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " big red circle" * 60},
                                         {"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert proc.encode(conv, 2, add_generation_prompt=True)["num_images"] == 1  # the second image is cut
    gen = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    from_files = generate(model, proc, [conv], [imgs], gen, return_ids=True)
    given = generate(model, proc, [conv], [imgs], gen, return_ids=True,
                     image_inputs=proc.image_inputs(imgs))
    assert given == from_files
