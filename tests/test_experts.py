"""Expert models at inference (LLaMA-Adapter V2 sec 3.4): their text enters the prompt as context, in chat,
serve and world evaluation; the shapes-world OCR expert reads what the world writes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from test_serve import Live, http, png_url  # tests/ is on sys.path under pytest
from test_vlm import make
from vlkit.data.records import load_records, user
from vlkit.data.tokenizer import IMAGE_TOKEN, render
from vlkit.errors import VlkitError
from vlkit.experts import (INPUT_TEMPLATE, CaptionExpert, CommandExpert, Expert, WorldTextReader, parse_expert,
                           with_context)
from vlkit.models.generate import GenerationConfig


class Fixed:
    """An expert that says the same thing of every image (and keeps what it was shown)."""

    def __init__(self, text: str, name: str = "fixed"):
        self.text, self.name, self.seen = text, name, []

    def __call__(self, image: Image.Image) -> str:
        assert isinstance(image, Image.Image)
        self.seen.append(image)
        return self.text


class Pixel:
    """An expert that tells images apart: the red level of the top-left pixel."""

    name = "pixel"

    def __call__(self, image: Image.Image) -> str:
        return f"r{image.getpixel((0, 0))[0]}"


def filled(v: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), v, dtype=np.uint8)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}


# -- with_context ----------------------------------------------------------------------------------
def test_context_follows_each_image_in_the_world_template():
    msgs = [user(None, "what color is the star?")]
    got = with_context(msgs, [filled(0)], [Fixed("a red star.", "caption"), Fixed("cat", "ocr")])
    assert got == [{"role": "user", "content": [IMAGE, text("(a red star.) (cat) what color is the star?")]}]
    assert msgs == [user(None, "what color is the star?")]  # new messages; the caller's are untouched
    assert isinstance(Fixed("x"), Expert) and isinstance(WorldTextReader(), Expert)


def test_several_images_over_turns_each_get_their_own_context():
    msgs = [user(None, None, "what changed?"), {"role": "assistant", "content": "a circle."},
            {"role": "user", "content": [text("and here? "), IMAGE]}]
    got = with_context(msgs, [filled(10), filled(20), filled(30)], [Pixel()], template=INPUT_TEMPLATE)
    assert got[0]["content"] == [IMAGE, text("### Input: r10\n"), IMAGE, text("### Input: r20\nwhat changed?")]
    assert got[1] == {"role": "assistant", "content": "a circle."}
    assert got[2]["content"] == [text("and here? "), IMAGE, text("### Input: r30\n")]
    assert with_context(msgs, [filled(1)] * 3, [Pixel()], template="[{name}: {text}]")[2]["content"][2] == \
        text("[pixel: r1]")


def test_empty_expert_text_adds_nothing():
    msgs = [user(None, "how many objects are there?")]
    assert with_context(msgs, [filled(0)], [Fixed(""), Fixed("  \n")]) == msgs
    assert with_context(msgs, [filled(0)], [Fixed(""), Fixed("cat")])[0]["content"][1] == \
        text("(cat) how many objects are there?")
    assert with_context(msgs, [filled(0)], []) == msgs


def test_plain_string_contents_take_the_context_at_the_start_of_the_last_user_turn():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
            {"role": "user", "content": "what does the text say?"}]
    got = with_context(msgs, [filled(5), filled(6)], [Pixel()])
    assert got[:2] == msgs[:2] and got[2] == {"role": "user", "content": "(r5) (r6) what does the text say?"}
    got = with_context(msgs, [filled(5)], [Fixed("cat")], template=INPUT_TEMPLATE)
    assert got[2]["content"] == "### Input: cat\nwhat does the text say?"
    assert with_context(msgs, [filled(5)], [Fixed("")]) == msgs


def test_image_parts_and_images_must_agree():
    with pytest.raises(VlkitError, match="2 image parts but 1 images"):
        with_context([user(None, None, "?")], [filled(0)], [Fixed("x")])


# -- parse_expert ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "caption", "caption=", "ocr=paper", "ocr", "=cmd:ls", "x=cmd:", "x=cmd:  ",
                                  "foo=bar", "world"])
def test_bad_specs_are_one_sentence_naming_the_spec_and_the_forms(spec):
    with pytest.raises(VlkitError) as e:
        parse_expert(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "caption=DIR" in msg and "ocr=world" in msg and "NAME=cmd:COMMAND" in msg
    assert "\n" not in msg


def test_good_specs(tmp_path):
    assert isinstance(parse_expert("ocr=world"), WorldTextReader)
    cmd = parse_expert("words=cmd:python -c 'print(1)'")
    assert isinstance(cmd, CommandExpert) and cmd.name == "words" and cmd.argv == ["python", "-c", "print(1)"]
    with pytest.raises(VlkitError, match="expert 'caption': .*not-a-model is not a vlkit model directory"):
        parse_expert(f"caption={tmp_path / 'not-a-model'}")


def test_caption_expert_is_the_model_answering_the_world_caption_prompt(tmp_path, tiny_tokenizer):
    from vlkit.models.generate import generate
    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "m", proc)
    expert = parse_expert(f"caption={tmp_path / 'm'}")
    assert isinstance(expert, CaptionExpert) and expert.name == "caption" and expert.prompt == "describe the image."
    img = Image.fromarray(filled(90))
    want = generate(model, proc, [[user(None, "describe the image.")]], [[img]], GenerationConfig(max_new_tokens=48))
    assert expert(img) == want[0]["text"]


# -- CommandExpert ---------------------------------------------------------------------------------
def test_command_expert_reads_the_png_and_returns_stdout_stripped():
    prog = "import sys; from PIL import Image; im = Image.open(sys.argv[-1]); print(' ', im.format, im.getpixel((0,0)))"
    expert = CommandExpert(f"{sys.executable} -c \"{prog}\"", name="probe")
    assert expert(Image.fromarray(filled(77))) == "PNG (77, 77, 77)"


def test_command_expert_failures_name_the_expert_and_the_command():
    failing = f"{sys.executable} -c \"import sys; sys.stderr.write('no ink here'); sys.exit(3)\""
    with pytest.raises(VlkitError) as e:
        CommandExpert(failing, name="ocr")(Image.fromarray(filled(0)))
    assert str(e.value) == f"expert 'ocr' (command {failing!r}) exited with status 3: no ink here"
    slow = f"{sys.executable} -c \"import time; time.sleep(30)\""
    with pytest.raises(VlkitError, match=r"expert 'slow' \(command .*time.sleep.*\) took over 0.5 s"):
        CommandExpert(slow, name="slow", timeout=0.5)(Image.fromarray(filled(0)))
    with pytest.raises(VlkitError, match="expert 'gone' .*could not start"):
        CommandExpert("no-such-program-vlkit", name="gone")(Image.fromarray(filled(0)))
    with pytest.raises(VlkitError, match="empty"):
        CommandExpert("  ")


# -- WorldTextReader -------------------------------------------------------------------------------
def test_world_text_reader_reads_held_out_scenes():
    """60 held-out scenes given text wherever it fits (58 carry some, 12 of them on objects, 2 found no room):
    all 60 read when measured (benchmarks/world_text_reader.py: 1,000 of 1,000); a blind guess reads 1 in 110."""
    from vlkit.world.dataset import scene_seed
    from vlkit.world.render import render
    from vlkit.world.scene import WorldConfig, generate_scene

    reader, cfg = WorldTextReader(), WorldConfig(text_prob=1.0)
    scenes = [generate_scene(scene_seed(5, "test", i), cfg) for i in range(60)]
    truth = [s.text.value if s.text else "" for s in scenes]
    assert sum(t != "" for t in truth) == 58 and sum(s.text.on is not None for s in scenes if s.text) == 12
    assert [reader(render(s, 64)) for s in scenes] == truth


def test_world_text_reader_on_the_builders_files(tiny_world):
    """The world builder's held-out PNGs: text records read their answer, scenes without text read ""."""
    _, root = tiny_world
    records = load_records(root / "test.jsonl")
    reader = WorldTextReader()
    texts = [r for r in records if r["task"] == "text"]
    blank = [r for r in records if r["task"] == "class" and r["meta"]["scene"]["text"] is None]
    assert len(texts) >= 5 and len(blank) >= 15
    assert [reader(r["images"][0]) for r in texts] == [r["meta"]["answer"] for r in texts]
    assert [reader(r["images"][0]) for r in blank] == [""] * len(blank)
    assert reader(Image.new("RGB", (64, 64))) == ""  # a black image: nothing to read


# -- chat ------------------------------------------------------------------------------------------
def spy_on(monkeypatch, owner, attr: str, position: int) -> list:
    """`owner.attr` still runs; the argument at `position` of each call is kept, in order."""
    seen, real = [], getattr(owner, attr)

    def spy(*args, **kwargs):
        seen.append(args[position])
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)
    return seen


def spy_prompts(monkeypatch, proc) -> list[str]:
    """The rendered prompts the model is given, as the processor encodes them."""
    seen, encode = [], proc.encode

    def spy(messages, *args, **kwargs):
        seen.append(render(proc.tokenizer, messages, add_generation_prompt=True))
        return encode(messages, *args, **kwargs)

    monkeypatch.setattr(proc, "encode", spy)
    return seen


def test_chat_with_an_expert_puts_its_text_in_the_prompt(tiny_tokenizer, tmp_path, monkeypatch):
    from vlkit.chat import ChatSession

    model, proc = make(tiny_tokenizer)
    Image.fromarray(filled(40)).save(tmp_path / "a.png")
    seen = spy_prompts(monkeypatch, proc)
    ocr = Fixed("cat", "ocr")
    session = ChatSession(model, proc, GenerationConfig(max_new_tokens=3), experts=[ocr])
    session.attach(tmp_path / "a.png")
    first = "".join(session.ask("what does the text say?"))
    "".join(session.ask("and again?"))
    bos = tiny_tokenizer.bos_token
    assert seen[0] == f"{bos}USER: {IMAGE_TOKEN}(cat) what does the text say?\nASSISTANT:"
    assert seen[1] == seen[0] + f" {first.strip()}{tiny_tokenizer.eos_token}USER: and again?\nASSISTANT:"
    assert len(ocr.seen) == 1 and ocr.seen[0].getpixel((0, 0)) == (40, 40, 40)  # once per image, on that image
    plain = ChatSession(model, proc, GenerationConfig(max_new_tokens=3))
    plain.attach(tmp_path / "a.png")
    "".join(plain.ask("what does the text say?"))
    assert seen[2] == f"{bos}USER: {IMAGE_TOKEN}what does the text say?\nASSISTANT:"


def test_chat_repl_reports_a_failing_expert_and_goes_on(tiny_tokenizer, tmp_path):
    import io

    from vlkit.chat import ChatSession

    model, proc = make(tiny_tokenizer)
    Image.fromarray(filled(40)).save(tmp_path / "a.png")
    bad = CommandExpert(f"{sys.executable} -c \"import sys; sys.exit(1)\"", name="bad")
    session = ChatSession(model, proc, GenerationConfig(max_new_tokens=2), experts=[bad])
    out = io.StringIO()
    session.repl(io.StringIO(f"/image {tmp_path / 'a.png'}\nwhat is it?\n/reset\nhello\n/quit\n"), out)
    assert "error: expert 'bad'" in out.getvalue() and "exited with status 1" in out.getvalue()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the turn after /reset was answered


def test_cli_chat_and_serve_take_experts(tmp_path, tiny_tokenizer, monkeypatch):
    from typer.testing import CliRunner

    import vlkit.chat
    from vlkit.cli import app
    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "m", proc)
    Image.fromarray(filled(40)).save(tmp_path / "a.png")
    seen = spy_on(monkeypatch, vlkit.chat, "stream", 2)
    say = f"words=cmd:{sys.executable} -c \"print('dog')\""
    res = CliRunner().invoke(app, ["chat", str(tmp_path / "m"), "--image", str(tmp_path / "a.png"), "--prompt", "hi",
                                   "--max-new-tokens", "2", "--expert", say, "--expert-template", "input"])
    assert res.exit_code == 0, res.output
    assert seen[0][0]["content"] == [IMAGE, text("### Input: dog\nhi")]
    for args, msg in ((["--expert", "ocr=paper"], "expert spec 'ocr=paper' is not one of caption=DIR"),
                      (["--expert-template", "fancy"], "--expert-template 'fancy' is not one of world, input")):
        for cmd in ("chat", "serve"):
            res = CliRunner().invoke(app, [cmd, str(tmp_path / "m"), *args])
            assert isinstance(res.exception, VlkitError) and str(res.exception).startswith(msg), res.output


# -- serve -----------------------------------------------------------------------------------------
def test_serve_engine_writes_expert_text_into_each_request(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as engine_mod
    from vlkit.serve import Engine, ServeLimits, create_app
    from vlkit.serve.app import prepare

    model, proc = make(tiny_tokenizer)
    ocr = Fixed("cat", "ocr")
    engine = Engine(model, proc, "tiny", experts=[ocr], batch_window_ms=0)
    limits = ServeLimits(max_tokens=8, max_images=2, max_pixels=64 * 64)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                                      {"type": "text", "text": "what does the text say?"}]}],
            "max_tokens": 3}
    p = prepare(json.dumps(body).encode(), engine, limits)
    assert p.conversation == [{"role": "user", "content": [IMAGE, text("(cat) what does the text say?")]}]
    plain = Engine(model, proc, "tiny")
    try:
        bare = prepare(json.dumps(body).encode(), plain, limits)
        assert bare.conversation[0]["content"] == [IMAGE, text("what does the text say?")]
        assert p.prompt_tokens == engine.prompt_tokens(p.conversation, p.images) > bare.prompt_tokens  # with it
    finally:
        plain.close()

    seen = spy_on(monkeypatch, engine_mod, "prepare", 2)
    srv = Live(create_app(engine, limits))
    try:
        out = srv.client.chat.completions.create(model="tiny", max_tokens=3, messages=body["messages"])
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens == p.prompt_tokens
        assert seen == [[p.conversation]] and len(ocr.seen) == 2
        engine.experts = [CommandExpert(f"{sys.executable} -c \"import sys; sys.exit(4)\"", name="broken")]
        status, err = http(srv.url + "/v1/chat/completions", json.dumps(body).encode())
        assert status == 500 and "expert 'broken'" in err["error"]["message"]
        engine.experts = []
        assert srv.client.chat.completions.create(model="tiny", max_tokens=2, messages=body["messages"]).choices
    finally:
        srv.close()
        engine.close()


# -- world evaluation ------------------------------------------------------------------------------
def test_evaluate_vlm_with_experts(tiny_tokenizer, tiny_world, monkeypatch):
    import vlkit.eval.world as W

    _, root = tiny_world
    records = load_records(root / "test.jsonl")
    model, proc = make(tiny_tokenizer)
    cfg = W.EvalConfig(tasks=["vqa", "text"], max_per_task=4, max_new_tokens=4, batch_size=3)
    base = W.evaluate_vlm(model, proc, records, cfg)
    assert W.evaluate_vlm(model, proc, records, cfg, experts=None) == base
    silent = Fixed("")  # the expert path with nothing said: every prompt, answer and figure as without experts
    assert W.evaluate_vlm(model, proc, records, cfg, experts=[silent]) == base and len(silent.seen) == 16

    calls = spy_on(monkeypatch, W, "generate", 2)
    ocr = Fixed("cat", "ocr")
    got = W.evaluate_vlm(model, proc, records, cfg, experts=[ocr])
    seen = [conv for convs in calls for conv in convs]
    assert len(seen) == 16 and all(c[0]["content"][1]["text"].startswith("(cat) ") for c in seen)
    assert [e["question"] for e in got["examples"]] == ["(cat) " + e["question"] for e in base["examples"]]
    image_pass, blind_pass = ocr.seen[:8], ocr.seen[8:]
    assert all(not np.asarray(im).any() for im in blind_pass)  # the blind pass shows the experts the blank image
    assert any(np.asarray(im).any() for im in image_pass)
