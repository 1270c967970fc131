"""Generation, feature caching, metrics and the vpg recipe end to end on a tiny world."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlkit.data.features import ImageBank
from vlkit.eval import metrics as M
from vlkit.errors import VlkitError
from vlkit.models.generate import GenerationConfig, generate, stream

from test_vlm import CONV, images, make  # shared tiny-model builders (tests/ is on sys.path under pytest)


def test_batched_generation_equals_one_by_one_and_streaming(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    convs, imgs = [CONV[:1], CONV[:3]], [images(1), images(2)]
    gen = GenerationConfig(max_new_tokens=8)
    both = generate(model, proc, convs, imgs, gen)
    alone = [generate(model, proc, [c], [i], gen)[0] for c, i in zip(convs, imgs)]
    assert both == alone
    assert "".join(stream(model, proc, convs[1], imgs[1], gen)).strip() == both[1]["text"]
    assert all(r["tokens"] <= 8 for r in both)


def test_sampling_is_seeded_and_differs_from_greedy(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    args = ([CONV[:1]], [images(1)])
    s1 = generate(model, proc, *args, GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3))
    s2 = generate(model, proc, *args, GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3))
    greedy = generate(model, proc, *args, GenerationConfig(max_new_tokens=12))
    assert s1 == s2 and s1 != greedy


def test_stop_strings_cut_the_answer(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    full = generate(model, proc, [CONV[:1]], [images(1)], GenerationConfig(max_new_tokens=12))[0]["text"]
    stop = full[3:5]
    assert stop and stop in full
    cut = generate(model, proc, [CONV[:1]], [images(1)], GenerationConfig(max_new_tokens=12, stop=[stop]))[0]
    assert cut["text"] == full[: full.index(stop)].strip() and cut["finish_reason"] == "stop"
    streamed = "".join(stream(model, proc, CONV[:1], images(1), GenerationConfig(max_new_tokens=12, stop=[stop])))
    assert streamed.strip() == cut["text"]


def test_bad_generation_settings_are_errors(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    for bad in (GenerationConfig(max_new_tokens=0), GenerationConfig(temperature=-1), GenerationConfig(top_p=0)):
        with pytest.raises(VlkitError):
            generate(model, proc, [CONV[:1]], [images(1)], bad)


def test_cached_features_give_the_same_loss(tiny_tokenizer, tiny_world):
    from vlkit.data.records import load_records
    from vlkit.recipes.common import VLDataset

    model, proc = make(tiny_tokenizer, tower={"model_type": "clip_vision_model", "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "image_size": 64, "patch_size": 16})
    _, root = tiny_world
    recs = [r for r in load_records(root / "train.jsonl") if r["task"] in ("caption", "edit")][:12]
    t = model.vision
    assert proc.transforms[0].size == 64  # the processor takes the encoder's transform
    pixels = VLDataset(recs, proc, ImageBank(recs, proc.transforms))
    feats = VLDataset(recs, proc, ImageBank(recs, proc.transforms).use_features(t))
    b1, b2 = pixels.collate(pixels.items), feats.collate(feats.items)
    assert "pixel_values" in b1 and "image_features" in b2
    with torch.no_grad():
        assert torch.allclose(model(**b1).loss, model(**b2).loss, atol=1e-6)
    again = ImageBank(recs, proc.transforms).use_features(t)  # served from the disk cache
    assert np.array_equal(np.asarray(again.features[0]), np.asarray(feats.bank.features[0]))


def test_feature_cache_computes_only_images_it_has_not_seen(tiny_tokenizer, tiny_world, monkeypatch, tmp_path):
    import vlkit.data.features as F
    from vlkit.data.records import load_records

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path))  # an empty feature cache; the world stays where it is
    model, proc = make(tiny_tokenizer, tower={"model_type": "clip_vision_model", "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "image_size": 64, "patch_size": 16})
    t, tf = model.vision, proc.transforms
    _, root = tiny_world
    recs = load_records(root / "train.jsonl")
    paths = list(dict.fromkeys(p for r in recs for p in r["images"]))
    assert len(paths) >= 8
    first = [r for r in recs if set(r["images"]) <= set(paths[:5])]
    computed = []
    real = F.compute_features
    monkeypatch.setattr(F, "compute_features", lambda tower, px, progress=None: computed.append(len(px)) or
                        real(tower, px, progress=progress))
    bank = ImageBank(first, tf).use_features(t)
    assert computed == [len(bank.paths)]
    # other tasks, another order, more images: only the new images go through the tower
    more = list(reversed([r for r in recs if set(r["images"]) <= set(paths[:8])]))
    big = ImageBank(more, tf).use_features(t)
    assert computed == [len(bank.paths), len(big.paths) - len(bank.paths)]
    direct = F.compute_features(t.encoders[0], big.pixels[0])
    assert np.allclose(np.asarray(big.features[0]), direct, atol=1e-6)
    rows = [3, 0, len(big.paths) - 1, 3]  # rows from both shards, repeated, out of order
    assert np.allclose(big.inputs(rows)["image_features"].numpy(), direct[rows], atol=1e-6)
    ImageBank(first, tf).use_features(t)
    assert len(computed) == 3  # the direct call above; the cache answered the rest


def test_tower_fingerprint_follows_the_weights_not_the_files(tiny_tokenizer, tiny_tower, tmp_path):
    from vlkit.models.io import load_vlm, save_vlm

    model, proc = make(tiny_tokenizer, tower=None, path=str(tiny_tower))  # the tower read from its directory
    save_vlm(model, tmp_path / "m", proc)
    loaded, _ = load_vlm(tmp_path / "m")  # the same tower, read back from the VLM's one weights file
    a, b = loaded.vision.encoders[0], model.vision.encoders[0]
    assert a.cfg.path != b.cfg.path
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(a.parameters()).add_(1e-3)
    assert a.fingerprint() != b.fingerprint()


def test_metrics():
    refs = [["a red circle at the top left.", "a red circle."], ["a blue star in the center."]]
    assert M.cider(["a red circle at the top left.", "a blue star in the center."], refs) > \
        M.cider(["a blue star.", "a red circle."], refs)
    assert M.rouge_l(["a red circle."], [refs[0]]) == pytest.approx(1.0)
    assert M.exact_match("Red.", "red") == 1.0 and M.exact_match("blue", "red") == 0.0
    assert M.box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert M.box_iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert M.grounding_iou("[0.00,0.00,0.50,0.50]", (0, 0, 0.5, 1)) == pytest.approx(0.5)
    assert M.grounding_iou("no box", (0, 0, 1, 1)) == 0.0


def test_vpg_recipe_trains_saves_and_chats(tmp_path, tiny_world, tiny_lm, tiny_tower):
    from vlkit.config import load
    from vlkit.models.io import load_vlm
    from vlkit.recipes.vpg import VPGRecipe, run

    cfg_w, root = tiny_world
    out = tmp_path / "vpg"
    cfg = load(VPGRecipe, None, [
        f"output_dir={out}", f"model.tower.path={tiny_tower}", f"model.llm.path={tiny_lm}", "model.vpg.num_queries=4",
        "trainable=[vpg,llm]",
        "model.vpg.qformer.hidden_size=32", "model.vpg.qformer.intermediate_size=64", "model.vpg.qformer.num_heads=2",
        f"data.world.seed={cfg_w.seed}", f"data.world.train_scenes={cfg_w.train_scenes}",
        f"data.world.test_scenes={cfg_w.test_scenes}", "eval.max_per_task=8",
        "train.steps=40", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=5", "train.log_every=2",
        "train.progress=false"])
    res = run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(loss[-5:]) < 0.9 * np.mean(loss[:5])
    assert {"caption_cider", "caption_rougeL", "vqa_acc", "grounding_iou50", "grounding_miou",
            "text_acc"} <= set(res["eval"]["image"])
    assert {k for k in res["eval"]["image"] if k.startswith("vqa_acc_")} <= {
        f"vqa_acc_{k}" for k in ("color", "shape", "count", "position", "exist")}
    assert set(res["eval"]["blind"]) == set(res["eval"]["image"])
    model, proc = load_vlm(out / "model")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"vpg", "llm"}
    tower = {k: v for k, v in model.vision.encoders[0].model.state_dict().items()}
    source = __import__("transformers").CLIPVisionModel.from_pretrained(tiny_tower).state_dict()
    assert all(torch.equal(tower[k], source[k]) for k in source)  # the frozen tower is untouched
    img = next((root / "img").glob("test-*.png"))
    cli = subprocess.run([sys.executable, "-m", "vlkit.cli", "chat", str(out / "model"), "--image", str(img),
                          "--prompt", "describe the image.", "--max-new-tokens", "8"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    direct = generate(model, proc, [[{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "describe the image."}]}]],
                      [[str(img)]], GenerationConfig(max_new_tokens=8))[0]["text"]
    assert cli.stdout.strip() == direct
    ev = subprocess.run([sys.executable, "-m", "vlkit.cli", "eval", str(out / "model"), "--seed", str(cfg_w.seed),
                         "--test-scenes", str(cfg_w.test_scenes), "--max-per-task", "8"],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["image"] == res["eval"]["image"]  # the saved model scores as the trained one
    bad = subprocess.run([sys.executable, "-m", "vlkit.cli", "chat", str(out / "model"), "--image",
                          str(tmp_path / "none.png"), "--prompt", "hi"], capture_output=True, text=True)
    assert bad.returncode == 2 and "none.png: image not found" in bad.stderr


def test_training_moves_only_the_chosen_groups(tiny_tokenizer, tmp_path):
    from vlkit.recipes.common import vl_loss
    from vlkit.train import TrainConfig, Trainer

    model, proc = make(tiny_tokenizer)
    model.set_trainable(["vpg.projector"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = proc.encode(CONV, 2)
    px = proc.pixel_values(images(2))
    data = [(enc, px)] * 4

    def collate(items):
        b = proc.pad([e for e, _ in items])
        b["pixel_values"] = torch.cat([p for _, p in items])
        return b

    Trainer(model, TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, progress=False), data, collate,
            vl_loss, tmp_path).fit()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("vpg.projector"), n


def test_chat_repl_multi_turn(tiny_tokenizer, tmp_path):
    import io

    from vlkit.chat import ChatSession
    from PIL import Image

    model, proc = make(tiny_tokenizer)
    Image.fromarray(images(1)[0]).save(tmp_path / "a.png")
    session = ChatSession(model, proc, GenerationConfig(max_new_tokens=4))
    out = io.StringIO()
    session.repl(io.StringIO(f"/image {tmp_path / 'a.png'}\nwhat is this?\nand now?\n/image nope.png\n/quit\n"), out)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"][0] == {"type": "image"} and len(session.images) == 1
    assert "nope.png: image not found" in out.getvalue()


def test_edit_answers_score_rouge_l_and_exact_match():
    from vlkit.data.records import assistant, user
    from vlkit.eval.world import score

    recs = [{"messages": [user(None, None, "what changed?"), assistant(t)]}
            for t in ("the red circle turned blue.", "a green star appeared on the left.")]
    s = score("edit", recs, ["the red circle turned blue", "the red circle disappeared."])
    assert s["edit_acc"] == 0.5
    assert s["edit_rougeL"] == pytest.approx((1.0 + M.rouge_l(["the red circle disappeared."],
                                                             [["a green star appeared on the left."]])) / 2)
    # which object and which kind of edit, read from the sentences: the template alone earns neither
    refs = ("the red circle turned blue.", "a green star appeared on the left.", "the red circle became a red star.",
            "the red circle and the blue star swapped places.", "the green cross disappeared.")
    preds = ["The red circle turned  green.", "a green star appeared at the top.", "the red circle turned green.",
             "the blue star and the red circle swapped places.", "it is gone"]
    recs = [{"messages": [user(None, None, "what changed?"), assistant(t)]} for t in refs]
    s = score("edit", recs, preds)
    assert (s["edit_object"], s["edit_kind"], s["edit_acc"]) == (0.8, 0.6, 0.0)


def test_an_fp16_feature_cache_halves_the_bytes_and_keeps_the_loss(tiny_tokenizer, tiny_world, monkeypatch, tmp_path):
    from vlkit.data.records import load_records
    from vlkit.recipes.common import VLDataset

    monkeypatch.setenv("VLKIT_CACHE", str(tmp_path))
    model, proc = make(tiny_tokenizer, tower={"model_type": "clip_vision_model", "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 2, "image_size": 64, "patch_size": 16})
    _, root = tiny_world
    recs = [r for r in load_records(root / "train.jsonl") if r["task"] == "caption"][:12]
    full = VLDataset(recs, proc, ImageBank(recs, proc.transforms).use_features(model.vision))
    half = VLDataset(recs, proc, ImageBank(recs, proc.transforms).use_features(model.vision, dtype="fp16"))
    stored = sorted((tmp_path / "features").rglob("*.npy"))
    assert sorted(np.load(p, mmap_mode="r").dtype.name for p in stored) == ["float16", "float32"]  # two caches
    sizes = sorted(p.stat().st_size for p in stored)
    assert sizes[0] < 0.51 * sizes[1]
    a, b = full.collate(full.items), half.collate(half.items)
    assert b["image_features"].dtype == torch.float32  # read back as float32
    assert torch.allclose(a["image_features"], b["image_features"], atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        assert abs(float(model(**a).loss) - float(model(**b).loss)) < 1e-3
    with pytest.raises(VlkitError, match="'bf8' is not a storage dtype"):
        ImageBank(recs, proc.transforms).use_features(model.vision, dtype="bf8")


def test_recipes_take_cache_features_fp16_and_refuse_other_words():
    from vlkit.config import load
    from vlkit.recipes.vpg import VPGRecipe

    assert load(VPGRecipe, None, ["cache_features=fp16"]).cache_features == "fp16"
    assert load(VPGRecipe, None, ["cache_features=true"]).cache_features is True
    with pytest.raises(VlkitError, match="cache_features"):
        load(VPGRecipe, None, ["cache_features=fp8"])
