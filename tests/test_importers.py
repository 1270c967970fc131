"""`vlkit data import`: LLaVA and ShareGPT data -> vlkit records, skips by reason, streaming JSON, whole-file errors."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlkit.data.importers import import_file, iter_json_array, read_records, summary_path, summary_text, text_parts
from vlkit.data.records import assistant, load_records, user
from vlkit.errors import VlkitError
from vlkit.fileio import read_json, read_jsonl

FIX = Path(__file__).parent / "fixtures" / "llava"
IMAGES = FIX / "images"
ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"type": "image"}


def run_import(tmp_path, name, fmt="llava", source=None, **kw):
    out = tmp_path / "out" / "records.jsonl"
    kw.setdefault("images", IMAGES)
    summary = import_file(fmt, source or FIX / name, out, progress=False, **kw)
    return summary, read_jsonl(out), out


def record(rid, out, images, *messages, task="llava"):
    """The expected record: image paths relative to the output's folder."""
    rel = os.path.relpath(IMAGES.resolve(), out.parent.resolve())
    return {"id": rid, "task": task, "images": [os.path.join(rel, p) for p in images], "messages": list(messages)}


def test_llava_instruct_converts_to_exact_records_that_load_records_resolves(tmp_path):
    _, rows, out = run_import(tmp_path, "instruct.json")
    assert rows == [
        record("inst-1", out, ["a.png"], user(None, "What colour is the square?"), assistant("Red."),
               user("And is it small?"), assistant("Yes, 8 by 8 pixels.")),
        record("text-1", out, [], user("Write a haiku about pixels."),
               assistant("Eight by eight they glow\nred and blue in tiny squares\nthe model looks on")),
        record("multi-1", out, ["a.png", "b.png", "sub/c.png"],
               user("Image 1: ", None, "Image 2: ", None, "Which is brighter?"), assistant("The first."),
               user("And this one? ", None), assistant("Brighter still.")),
        record("dup", out, ["b.png"], user(None, "Colour?"), assistant("Blue.")),
        record("trail", out, ["a.png"], user(None, "Red?"), assistant("Yes.")),  # its second image went with the turn
        record("lead", out, [], user("Count to two."), assistant("One, two.")),
        record("#15", out, [], user("Who am I?"), assistant("Record 15.")),
    ]
    loaded = {r["id"]: r["images"] for r in load_records(out)}
    assert loaded["multi-1"] == [str(IMAGES.resolve() / p) for p in ("a.png", "b.png", "sub/c.png")]
    assert all(os.path.isfile(p) for paths in loaded.values() for p in paths)


def test_every_skip_and_adjustment_is_counted_with_its_ids(tmp_path):
    summary, _, out = run_import(tmp_path, "instruct.json")
    def one(rid):
        return {"count": 1, "ids": [rid]}
    assert summary["skipped"] == {
        "duplicate id": one("dup"), "unknown speaker": one("bad-speaker"), "empty turn": one("bad-empty"),
        "not alternating": one("bad-order"), "image count mismatch": one("bad-count"),
        "image missing": one("bad-missing"), "no answer": one("no-answer"),
        "malformed record": {"count": 2, "ids": ["#13", "no-turns"]}}  # 42 (position 13) and a record without turns
    assert summary["adjusted"] == {"trailing question dropped": one("trail"), "leading answer dropped": one("lead"),
                                   "id assigned": one("#15")}
    assert (summary["read"], summary["written"]) == (16, 7)
    assert read_json(summary_path(out)) == summary and summary_path(out).name == "records.import.json"
    text = summary_text(summary)
    assert text.splitlines()[0] == f"wrote 7 records to {out} (read 16, skipped 9)"
    assert "  malformed record: 2 (#13, no-turns)" in text and "  id assigned: 1 (#15)" in text


def test_no_check_images_keeps_records_whose_image_is_missing(tmp_path):
    summary, rows, out = run_import(tmp_path, "instruct.json", check_images=False)
    assert "image missing" not in summary["skipped"] and summary["written"] == 8
    assert record("bad-missing", out, ["nowhere.png"], user(None, "What is it?"), assistant("Gone.")) in rows


def test_llava_pretrain_keeps_token_position_and_adds_a_missing_token_at_the_start(tmp_path):
    summary, rows, out = run_import(tmp_path, "pretrain.json", task="caption")
    assert rows == [
        record("p-1", out, ["a.png"], user(None, "Render a clear and concise summary of the photo."),
               assistant("a red square"), task="caption"),
        record("p-2", out, ["sub/c.png"], user("Give a brief description of the image.", None),
               assistant("a pale grey square"), task="caption"),
        record("p-3", out, ["b.png"], user(None, "Describe the image concisely."), assistant("a blue square"),
               task="caption"),
    ]
    assert summary["adjusted"] == {"image token added": {"count": 1, "ids": ["p-3"]}} and summary["skipped"] == {}


def test_text_parts_place_images_and_drop_only_the_newlines_beside_them():
    def text(t):
        return {"type": "text", "text": t}
    assert text_parts("<image>\nWhat is it?") == [IMAGE, text("What is it?")]
    assert text_parts("What is it?\n<image>") == [text("What is it?"), IMAGE]
    assert text_parts("a <image> b\n\n<image>") == [text("a "), IMAGE, text(" b"), IMAGE]
    assert text_parts("<image>") == [IMAGE] and text_parts(" \n ") == []
    assert text_parts("  kept  \nverbatim ") == [text("  kept  \nverbatim ")]


def test_sharegpt_system_turns_and_both_spellings(tmp_path):
    summary, rows, out = run_import(tmp_path, "sharegpt.json", fmt="sharegpt", images=None)
    def system(t):
        return {"role": "system", "content": [{"type": "text", "text": t}]}
    assert rows == [
        record("sg-1", out, [], system("You are terse."), user("Capital of France?"), assistant("Paris."),
               task="sharegpt"),
        record("sg-2", out, [], user("2 + 2?"), assistant("4"), user("Times 3?"), assistant("12"), task="sharegpt"),
        record("sg-3", out, [], system("Answer in French."), user("Hello"), assistant("Bonjour"), task="sharegpt"),
    ]
    assert summary["skipped"] == {"not alternating": {"count": 1, "ids": ["sg-4"]}}  # a system turn mid-way


def test_jsonl_input_gives_the_same_records_and_skips_bad_lines(tmp_path):
    lines = [json.dumps(r) for r in json.loads((FIX / "instruct.json").read_text())]
    lines += ["", "{not json", *["7"] * 6]  # a blank line (not a record), a bad line, 6 more non-objects
    src = tmp_path / "instruct.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary, rows, _ = run_import(tmp_path / "jsonl", None, source=src)
    _, expected, _ = run_import(tmp_path / "array", "instruct.json")  # outputs at the same depth: same paths
    assert rows == expected
    assert summary["skipped"]["invalid JSON line"] == {"count": 1, "ids": ["#16"]}
    assert summary["skipped"]["malformed record"] == {"count": 8, "ids": ["#13", "no-turns", "#17", "#18", "#19"]}
    assert "  malformed record: 8 (#13, no-turns, #17, #18, #19, ...)" in summary_text(summary)


TRICKY = ('[12345, -0.5e10, true, null, "a\\"]b,", {"k": [1, {"x": "}"}], "e": "\u00e9\u4e2d\U0001F600"}, [], '
          '{"id": "u", "v": "\\u00e9"}]')


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 20])
def test_incremental_array_reader_equals_json_load_across_chunk_boundaries(chunk):
    for text in (TRICKY, (FIX / "instruct.json").read_text(), " [ ] "):
        pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
        assert list(iter_json_array(pieces)) == json.loads(text)
    raw = TRICKY.encode()  # bytes cut inside multi-byte characters too
    assert list(read_records(io.BytesIO(raw), "x", chunk_bytes=chunk)) == json.loads(raw)


@pytest.mark.parametrize("bad", ['[1, 2', '[1 2]', '[1,]', '[1] x', '[{"a": 1}', '["abc', '[', '{"a": 1}'])
def test_incremental_array_reader_rejects_what_json_load_rejects(bad):
    if bad != '{"a": 1}':  # valid JSON, but not an array
        with pytest.raises(json.JSONDecodeError):
            json.loads(bad)
    with pytest.raises(VlkitError, match="input: not valid JSON at character"):
        list(iter_json_array([bad[i:i + 3] for i in range(0, len(bad), 3)]))


@pytest.mark.parametrize("case, content, message", [
    ("missing", None, "file not found"),
    ("not json", "hello world", "neither a JSON array nor JSONL"),
    ("one object", '{\n  "data": []\n}\n', ":1: not valid JSON"),
    ("no objects", "[1, 2, 3]", "no record is an object with 'conversations'"),
    ("truncated", '[{"id": "a", "conversations": []}, {"id": ', "not valid JSON at character"),
    ("empty array", "[]", "holds no records"),
    ("not utf-8", b'[{"id": "\xff"}]', "not UTF-8"),
    ("images not a dir", "[]", "not a directory"),
    ("out is the input", "[]", "would overwrite the input"),
    ("out exists", "[]", "already exists; pass --overwrite"),
])
def test_whole_file_errors_are_one_line_and_write_nothing(tmp_path, case, content, message):
    src = tmp_path / "data.json"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content is not None:
        src.write_text(content)
    out = {"out is the input": src, "out exists": tmp_path / "old.jsonl"}.get(case, tmp_path / "records.jsonl")
    if case == "out exists":
        out.write_text("old\n")
    before = sorted(os.listdir(tmp_path))
    images = tmp_path / "nowhere" if case == "images not a dir" else None
    with pytest.raises(VlkitError, match=message) as e:
        import_file("llava", src, out, images=images, progress=False)
    assert "\n" not in str(e.value) and (str(src) in str(e.value) or str(images or out) in str(e.value))
    assert sorted(os.listdir(tmp_path)) == before  # no output, no summary, no temporary file
    assert case != "out exists" or out.read_text() == "old\n"


def test_cli_prints_the_summary_and_refuses_to_overwrite_with_exit_code_2(tmp_path):
    out = tmp_path / "records.jsonl"
    cmd = [sys.executable, "-m", "vlkit", "data", "import", "llava", str(FIX / "instruct.json"), "--images",
           str(IMAGES), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote 7 records to {out} (read 16, skipped 9)\nskipped:\n  malformed record: 2 "
                                 "(#13, no-turns)\n")
    assert len(read_jsonl(out)) == 7 and read_json(tmp_path / "records.import.json")["written"] == 7
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: {out}: already exists; pass --overwrite to replace it"]


def test_imported_records_encode_for_training(tmp_path):
    from vlkit.data.processor import ProcessorConfig, VLProcessor
    from vlkit.data.records import message_text
    from vlkit.data.tokenizer import IGNORE_INDEX, train_bpe
    from vlkit.data.transforms import TransformConfig

    _, _, out = run_import(tmp_path, "instruct.json")
    records = load_records(out)
    tok = train_bpe([message_text(m) for r in records for m in r["messages"]], vocab_size=300)
    proc = VLProcessor(tok, ProcessorConfig(transforms=[TransformConfig(size=8)], image_tokens=3))
    for r in records:
        enc = proc.encode(r["messages"], len(r["images"]), r["id"])
        assert enc["input_ids"].count(proc.image_token_id) == 3 * len(r["images"])
        assert any(label != IGNORE_INDEX for label in enc["labels"])  # the answers are learnt
        if r["images"]:
            assert tuple(proc.pixel_values(r["images"]).shape) == (len(r["images"]), 3, 8, 8)


def test_rss_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "import_rss.py"), "--sizes", "50", "100",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[1:3]]
    assert [r[0] for r in rows] == ["50", "100"] and rows[0][-1] == "1.00"
    assert len(read_jsonl(tmp_path / "records_100.jsonl")) == 100
