import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.images import load_image
from vlkit.data.records import load_records, validate_record
from vlkit.data.tokenizer import (IGNORE_INDEX, IMAGE_TOKEN, encode_chat, image_token_id, load_tokenizer,
                                  render)
from vlkit.errors import VlkitError

CONV = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "and the square?"}, {"type": "image"}]},
    {"role": "assistant", "content": "blue"},
]


def labelled_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def test_tokenizer_round_trip(tiny_tokenizer):
    text = 'a large red circle at the top left. the word "cat" is written in the background.'
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE learnt the world's words


def test_image_token_is_one_special_token(tiny_tokenizer):
    ids = tiny_tokenizer(f"x{IMAGE_TOKEN}y", add_special_tokens=False)["input_ids"]
    assert ids.count(image_token_id(tiny_tokenizer)) == 1


def test_labels_cover_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_chat(tok, CONV)
    assert labelled_text(tok, enc) == " red</s> blue</s>"
    assert enc["input_ids"].count(image_token_id(tok)) == 2
    assert render(tok, CONV).startswith("<s>USER: <image>what color")


def test_truncation_is_reported(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, CONV, max_length=5)
    assert enc["truncated"] and len(enc["input_ids"]) == 5 and len(enc["labels"]) == 5


def test_saved_tokenizer_loads_identically(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert encode_chat(tok, CONV) == encode_chat(tiny_tokenizer, CONV)


def test_foreign_tokenizer_with_its_own_template(tmp_path):
    """Any HF fast tokenizer works the same way: a ChatML-style template, no <image> token yet."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["what color is the circle? red and the square? blue"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
                         "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
                         "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% endif %}")
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    enc = encode_chat(tok, CONV)
    assert labelled_text(tok, enc) == "red<|im_end|>\nblue<|im_end|>\n"
    assert enc["input_ids"].count(image_token_id(tok)) == 2
    assert tok.pad_token is not None


def test_tokenizer_without_template_gets_the_default(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(tmp_path)
    assert labelled_text(tok, encode_chat(tok, CONV)) == " red</s> blue</s>"


def test_record_image_mismatch_names_the_record(tmp_path):
    rec = {"id": "vqa-7", "images": ["a.png"], "messages": CONV}
    with pytest.raises(VlkitError, match="vqa-7: 2 image placeholders but 1 images"):
        validate_record(rec)
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(VlkitError, match=r"r.jsonl:1 vqa-7"):
        load_records(path)
    path.write_text("{not json\n")
    with pytest.raises(VlkitError, match=r"r.jsonl:1: not valid JSON"):
        load_records(path)


def test_record_image_paths_become_absolute_relative_to_their_file(tmp_path, monkeypatch):
    (tmp_path / "data" / "img").mkdir(parents=True)
    rec = {"id": "cap-1", "images": ["img/a.png", "../b.png", "/abs/c.png"],
           "messages": [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "x"}]}
    path = tmp_path / "data" / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    monkeypatch.chdir(tmp_path / "data" / "img")  # the working directory plays no part
    (got,) = load_records(Path("..") / "r.jsonl")
    assert got["images"] == [str(tmp_path / "data" / "img" / "a.png"), str(tmp_path / "b.png"), "/abs/c.png"]


def test_vpg_splits_read_the_train_file_once(monkeypatch):
    import vlkit.world.sources as sources
    from vlkit.recipes.common import splits
    from vlkit.recipes.vpg import VPGData

    read = []
    real = sources.load_records
    monkeypatch.setattr(sources, "load_records", lambda p: read.append(Path(p).name) or real(p))
    data = VPGData(world={"seed": 0, "train_scenes": 8, "test_scenes": 4}, tasks=["caption"])
    train, test = splits(data, None)
    assert sorted(read) == ["test.jsonl", "train.jsonl"]
    assert {r["task"] for r in train} == {"caption"} and len({r["task"] for r in test}) > 1


def save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "I;16"])
def test_odd_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(32 * 32) % 251).reshape(32, 32).astype(np.uint16 if mode == "I;16" else np.uint8)
    base = Image.fromarray(arr)
    img = base if mode in ("L", "I;16") else base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_image(save(img, tmp_path / f"x.{fmt.lower()}", format=fmt))
    assert out.mode == "RGB" and out.size == (32, 32)


def test_transparent_pixels_composite_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.putpixel((2, 2), (0, 0, 255, 128))
    out = load_image(save(img, tmp_path / "t.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # what a viewer shows behind a transparent pixel
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (127, 127, 255)  # half blue over white


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(VlkitError, match="empty.png: image file is empty"):
        load_image(tmp_path / "empty.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(VlkitError, match="trunc.png: unreadable or truncated"):
        load_image(tmp_path / "trunc.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(VlkitError, match="junk.png: unreadable"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(VlkitError, match="missing.png: image not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused(tmp_path):
    path = save(Image.new("1", (8000, 8000)), tmp_path / "bomb.png")  # tiny file, 64M pixels
    assert path.stat().st_size < 100_000
    with pytest.raises(VlkitError, match="bomb.png: image is 8000x8000"):
        load_image(path, max_pixels=10_000_000)


def test_records_cut_before_their_answer_are_dropped_with_a_count_not_a_nan(tiny_tokenizer, tiny_world):
    """A record truncated to zero supervised tokens would make the loss 0/0 (NaN) and the trainer blame the
    learning rate: VLDataset drops it and says how many; if none is left, that is an error naming max_length."""
    from test_vlm import make
    from vlkit.data.features import ImageBank
    from vlkit.data.records import assistant, user
    from vlkit.recipes.common import VLDataset, vl_loss

    model, proc = make(tiny_tokenizer)
    _, root = tiny_world
    img = str(next((root / "img").glob("train-*.png")))
    short = {"id": "ok", "images": [img], "messages": [user(None, "what color?"), assistant("red")]}
    long_ = {"id": "cut", "images": [img], "messages": [user(None, "describe " * 200), assistant("red")]}
    recs = [short, long_, long_]
    bank = ImageBank(recs, proc.transforms)
    with pytest.warns(UserWarning, match="2 of 3 training records have no supervised token within max_length=128"):
        data = VLDataset(recs, proc, bank)
    assert len(data) == 1 and data.dropped == 2
    loss, _ = vl_loss(model, data.collate([data[0]]))
    assert torch.isfinite(loss)
    with pytest.warns(UserWarning), pytest.raises(VlkitError, match="every one of the 2 training records .* raise "
                                                                     "max_length"):
        VLDataset([long_, long_], proc, bank)
