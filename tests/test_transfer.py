"""VPGTrans: word converter, projector composition, token pairing across tokenizers, stage switches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.vpg.converter import compose_projector, token_pairs, train_converter


class WordTokenizer:
    """A stand-in tokenizer: whitespace words, some of them split into fixed pieces."""

    def __init__(self, words: list[str], pieces: dict[str, list[str]] | None = None):
        self.pieces = pieces or {}
        self.vocab = {t: i for i, t in enumerate(dict.fromkeys(p for w in words for p in self.pieces.get(w, [w])))}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[p] for w in text.split() for p in self.pieces.get(w, [w])]}

    def get_vocab(self):
        return dict(self.vocab)


def test_composed_projector_equals_converter_after_projector():
    torch.manual_seed(0)
    src, conv = nn.Linear(6, 4), nn.Linear(4, 9)
    new = compose_projector(src, conv)
    x = torch.randn(5, 6)
    assert torch.allclose(new(x), conv(src(x)), atol=1e-6)
    with torch.no_grad():
        w = conv.weight.double() @ src.weight.double()
        b = conv.weight.double() @ src.bias.double() + conv.bias.double()
    assert torch.equal(new.weight, w.float()) and torch.equal(new.bias, b.float())
    with pytest.raises(VlkitError, match="width 5"):
        compose_projector(src, nn.Linear(5, 9))


def test_cross_tokenizer_pairs_only_equal_length_texts_by_position():
    texts = ["a red square", "a red circle", "two blue square", ""]
    words = " ".join(texts).split()
    a = WordTokenizer(words)
    b = WordTokenizer(words[::-1], {"circle": ["cir", "cle"]})
    pairs = token_pairs(a, b, texts)
    assert (pairs.texts, pairs.aligned_texts, pairs.same_tokenizer) == (4, 2, False)
    va, vb = a.get_vocab(), b.get_vocab()
    expect = {(va[w], vb[w]): 1 for w in ("a", "red", "two", "blue")}
    expect[(va["square"], vb["square"])] = 2
    assert dict(pairs.pairs) == expect
    assert pairs.summary()["pairs"] == 6 and pairs.summary()["unique_pairs"] == 5


def test_same_tokenizer_pairs_by_id(tiny_tokenizer):
    pairs = token_pairs(tiny_tokenizer, tiny_tokenizer, ["a red square at the top.", "a small cyan cross."])
    assert pairs.same_tokenizer and pairs.aligned_texts == 2
    assert all(s == t for s, t in pairs.pairs)


def test_converter_recovers_a_linear_map():
    torch.manual_seed(0)
    src = torch.randn(50, 8)
    true = torch.randn(12, 8)
    tgt = src @ true.T
    words = [f"w{i}" for i in range(50)]
    pairs = token_pairs(WordTokenizer(words), WordTokenizer(words), [" ".join(words)])
    conv, stats = train_converter(src, tgt, pairs, steps=400, lr=0.05)
    assert stats["mean_cosine"] > 0.99 and stats["unique_pairs"] == 50
    with pytest.raises(VlkitError, match="no token pairs"):
        train_converter(src, tgt, token_pairs(WordTokenizer(["x"]), WordTokenizer(["x"], {"x": ["x", "y"]}), ["x"]))


def test_converter_matches_the_target_embeddings_mean_length():
    torch.manual_seed(0)
    src = torch.randn(40, 8)
    tgt = 0.05 * src @ torch.randn(12, 8).T + 0.01 * torch.randn(40, 12)  # short target embeddings, as in LLMs
    words = [f"w{i}" for i in range(40)]
    pairs = token_pairs(WordTokenizer(words), WordTokenizer(words), [" ".join(words)])
    free, s_free = train_converter(src, tgt, pairs, steps=200, lr=0.05, match_norm=False)
    fitted, s_fit = train_converter(src, tgt, pairs, steps=200, lr=0.05)
    assert s_free["scale"] == 1.0 and abs(s_fit["mean_cosine"] - s_free["mean_cosine"]) < 1e-6
    assert not 0.5 < s_fit["scale"] < 2.0  # the cosine fit alone ends far from the target's length here
    assert torch.allclose(fitted(src), free(src) * s_fit["scale"], atol=1e-5)
    assert fitted(src).norm(dim=-1).mean() == pytest.approx(float(tgt.norm(dim=-1).mean()), rel=1e-4)


@pytest.fixture(scope="module")
def source_vlm(tmp_path_factory, tiny_world, tiny_lm, tiny_tower):
    from vlkit.config import load
    from vlkit.recipes.vpg import VPGRecipe, run

    cfg_w, _ = tiny_world
    out = tmp_path_factory.mktemp("src")
    run(load(VPGRecipe, None, [
        f"output_dir={out}", f"model.tower.path={tiny_tower}", f"model.llm.path={tiny_lm}", "model.vpg.num_queries=4",
        "model.vpg.qformer.hidden_size=32", "model.vpg.qformer.intermediate_size=64", "model.vpg.qformer.num_heads=2",
        f"data.world.seed={cfg_w.seed}", f"data.world.train_scenes={cfg_w.train_scenes}",
        f"data.world.test_scenes={cfg_w.test_scenes}", "eval.max_per_task=4", "eval.tasks=[caption,vqa]",
        "train.steps=10", "train.batch_size=16", "train.lr=1e-2", "train.progress=false"]))
    return out / "model"


@pytest.fixture(scope="module")
def wide_lm(tmp_path_factory, tiny_lm):
    """A wider LLaMA with the same tokenizer (random weights): the 'large' target."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vlkit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_lm)
    out = tmp_path_factory.mktemp("wide")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def transfer_cfg(tmp_path, tiny_world, source, target, *extra):
    from vlkit.config import load
    from vlkit.recipes.transfer import TransferRecipe

    cfg_w, _ = tiny_world
    return load(TransferRecipe, None, [
        f"output_dir={tmp_path}", f"source={source}", f"target.path={target}", f"data.world.seed={cfg_w.seed}",
        f"data.world.train_scenes={cfg_w.train_scenes}", f"data.world.test_scenes={cfg_w.test_scenes}",
        "eval.max_per_task=4", "eval.during_training=4", "eval.tasks=[caption,vqa]", "eval.max_new_tokens=8",
        "converter.steps=50", "train.steps=4", "train.eval_every=2", "train.batch_size=16",
        "train.progress=false", *extra])


def test_initialise_inherits_the_body_and_composes_the_projector(tmp_path, tiny_world, source_vlm, wide_lm):
    from vlkit.world.sources import load_splits
    from vlkit.data.tokenizer import load_tokenizer
    from vlkit.models.vpg.converter import token_pairs as pairs_of
    from vlkit.recipes.transfer import build_target, corpus, initialise

    cfg = transfer_cfg(tmp_path, tiny_world, source_vlm, wide_lm)
    model, proc, source = build_target(cfg)
    assert model.llm.config.hidden_size == 64 and source.llm.config.hidden_size == 48
    texts = corpus(load_splits(cfg.data)[0], ["caption"])
    info = initialise(model, proc.tokenizer, source, load_tokenizer(source_vlm), cfg, texts)
    s, t = source.vpg.state_dict(), model.vpg.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s if not k.startswith("projector."))
    conv = info["converter"]
    assert conv["same_tokenizer"] and conv["aligned_texts"] == len(texts) == pairs_of(
        proc.tokenizer, proc.tokenizer, texts).aligned_texts
    # projector == converter o source projector: check on the converter refitted with the same seed
    refit, _ = train_converter(source.llm.get_input_embeddings().weight, model.llm.get_input_embeddings().weight,
                               pairs_of(proc.tokenizer, proc.tokenizer, texts), steps=50)
    x = torch.randn(3, 32)
    assert torch.allclose(model.vpg.projector(x), refit(source.vpg.projector(x)), atol=1e-5)

    fresh = transfer_cfg(tmp_path, tiny_world, source_vlm, wide_lm, "inherit=false")
    model2, proc2, source2 = build_target(fresh)
    assert initialise(model2, proc2.tokenizer, source2, proc2.tokenizer, fresh, texts)["converter"] is None
    assert not torch.equal(model2.vpg.query_tokens, source2.vpg.query_tokens)


@pytest.mark.parametrize("switches,warm", [([], True), (["warmup.enabled=false"], False),
                                           (["inherit=false"], False), (["converter.enabled=false"], True)])
def test_transfer_stages(tmp_path, tiny_world, source_vlm, wide_lm, switches, warm):
    from vlkit.recipes.transfer import run

    cfg = transfer_cfg(tmp_path, tiny_world, source_vlm, wide_lm, "warmup.max_records=40", *switches)
    res = run(cfg)
    assert ("warmup" in res["stages"]) == warm
    assert (res["init"]["converter"] is not None) == ("converter.enabled=false" not in switches
                                                     and "inherit=false" not in switches)
    steps = [p["step"] for p in res["curve"]]
    w = math.ceil(40 / 16) if warm else 0
    assert steps == ([0, w] if warm else [0]) + [w + 2, w + 4]
    assert res["steps"] == w + 4 and res["samples"] == 16 * (w + 4)
    if warm:  # stage 1 trains the projector only
        assert res["stages"]["warmup"]["trainable_params"] == 32 * 64 + 64
    assert {"caption_cider", "vqa_acc"} <= set(res["curve"][-1])
    assert (tmp_path / "model" / "config.json").is_file()


def test_cross_family_transfer_reports_pairs(tmp_path, tiny_world, source_vlm, tiny_world_opt_lm):
    from vlkit.recipes.transfer import run

    res = run(transfer_cfg(tmp_path, tiny_world, source_vlm, tiny_world_opt_lm, "warmup.max_records=16",
                           "converter.unit=word"))
    conv = res["init"]["converter"]
    assert not conv["same_tokenizer"] and 0 < conv["aligned_texts"] < conv["texts"] and conv["pairs"] > 0
    assert res["eval"]["image"]["caption_cider"] >= 0


@pytest.fixture(scope="module")
def tiny_world_opt_lm(tmp_path_factory, tiny_world):
    from vlkit.config import load
    from vlkit.recipes.lm import LMRecipe, run

    cfg_w, _ = tiny_world
    out = tmp_path_factory.mktemp("opt")
    run(load(LMRecipe, None, [f"output_dir={out}", f"data.world.seed={cfg_w.seed}",
                              f"data.world.train_scenes={cfg_w.train_scenes}",
                              f"data.world.test_scenes={cfg_w.test_scenes}", "data.block_size=64",
                              "tokenizer.vocab_size=300", "tokenizer.style=opt", "model.family=opt",
                              "model.hidden_size=40", "model.num_layers=2", "model.num_heads=2",
                              "model.intermediate_size=80", "train.steps=2", "train.batch_size=8",
                              "train.progress=false"]))
    return out / "model"


def test_speedup_follows_the_paper_definition():
    from vlkit.eval.curves import speedup, times

    def curve(points):
        return [{"step": s, "samples": 32 * s, "train_seconds": 0.5 * s, "m": v} for s, v in points]

    scratch = curve([(0, 0.0), (100, 0.3), (200, 0.5), (300, 0.45)])
    trans = curve([(0, 0.1), (10, 0.4), (20, 0.55), (30, 0.6)])
    sp = speedup(scratch, trans, "m")
    assert sp["reached"] and sp["scratch_best_step"] == 200 and sp["transfer_step"] == 20
    assert sp["speedup_steps"] == sp["speedup_samples"] == sp["speedup_seconds"] == 10.0
    assert not speedup(scratch, curve([(0, 0.1), (10, 0.5)]), "m")["reached"]  # equal is not exceeding
    at_once = speedup(scratch, curve([(0, 0.6)]), "m")  # better before any training: an infinite speed-up
    assert at_once["transfer_step"] == 0 and times(at_once["speedup_steps"]) == "no steps needed (step 0)"
    assert times(sp["speedup_steps"]) == "10.0x"
    flat = speedup(curve([(0, 0.5), (100, 0.3), (200, 0.4)]), trans, "m")  # from scratch best untrained
    assert flat["reached"] and flat["transfer_step"] == 20 and flat["speedup_steps"] is None
    assert times(flat["speedup_seconds"]) == "undefined (from scratch best at step 0)"


def test_steps_to_reach_is_the_first_evaluation_at_or_above():
    from vlkit.eval.curves import steps_to_reach

    curve = [{"step": s, "m": v} for s, v in [(0, 0.1), (20, 0.3), (40, 0.25), (60, 0.5)]]
    assert steps_to_reach(curve, "m", 0.3) == 20 and steps_to_reach(curve, "m", 0.4) == 60
    assert steps_to_reach(curve, "m", 0.51) is None


def test_experiment_summary_claims_intervals_and_report(tmp_path):
    from vlkit.experiments.vpgtrans import plot, report, selection, summarize

    rng = np.random.default_rng(0)

    def run(points, seed, final_rate):
        curve = [{"step": s, "samples": 32 * s, "train_seconds": 0.4 * s, "caption_cider": c + 0.01 * seed,
                  "vqa_acc": v} for s, c, v in points]
        items = {"caption_cider": list(rng.random(300) * 2 * final_rate),
                 "vqa_acc": list((rng.random(300) < final_rate).astype(float))}
        return {"curve": curve, "init": None, "stages": {}, "steps": curve[-1]["step"], "train_seconds": 1.0,
                "eval": {"image": {m: float(np.mean(v)) for m, v in items.items()}, "items": {"image": items}}}

    scratch = [(0, 0.1, 0.2), (40, 0.2, 0.25), (400, 0.3, 0.3), (800, 0.4, 0.3)]
    trans = [(0, 0.2, 0.1), (20, 0.25, 0.2), (60, 0.45, 0.31), (200, 0.46, 0.33)]
    runs = {f"scratch_large_s{k}": run(scratch, k, 0.3) for k in range(3)}
    runs |= {f"vpgtrans_large_s{k}": run(trans, k, 0.6) for k in range(3)}
    runs["vpgtrans_short"] = run([(0, 0.2, 0.1), (20, 0.25, 0.2), (60, 0.3, 0.3)], 0, 0.6)
    runs["warmup_lr_x1"] = run([(0, 0.2, 0.1), (20, 0.22, 0.2), (60, 0.26, 0.3)], 0, 0.3)
    s = summarize(runs, seeds=3)
    c = s["pairs"]["small_to_large"]
    assert c["seeds"] == 3 and [p["step"] for p in c["curves"]["scratch"]] == [0, 40, 400, 800]
    sp = c["caption_cider"]["speedup"]  # mean curves: scratch best 0.41 at 800; VPGTrans passes it at 60
    assert sp["reached"] and sp["transfer_step"] == 60 and abs(sp["speedup_steps"] - 800 / 60) < 1e-9
    assert c["caption_cider"]["speedup_over_seeds"]["n"] == 3
    paired = c["vqa_acc"]["final_paired"]
    assert paired["n"] == 300 and paired["seeds"] == 3 and paired["lo"] > 0  # 0.6 vs 0.3, items averaged over seeds
    claim = next(r for r in s["claims"] if "10x" in r["claim"] and "CIDEr" in r["claim"])
    assert claim["verdict"] == "holds" and "13.3x" in claim["ours"]
    equal = next(r for r in s["claims"] if "equal final VQA" in r["claim"])
    assert equal["verdict"] == "holds"  # VPGTrans 0.6 vs 0.3: better, so not worse by more than the margin
    vqa = next(r for r in s["claims"] if "10x" in r["claim"] and "VQA" in r["claim"])
    assert vqa["verdict"] == "partly (faster, < 10x)"  # VQA: scratch best 0.3 at 400, VPGTrans passes at 60: 6.7x
    # a seed missing on one side leaves that seed out of the pairing instead of shifting the others
    del runs["vpgtrans_large_s1"]
    assert summarize(runs, seeds=3)["pairs"]["small_to_large"]["seeds"] == 2
    abl = next(a for a in s["ablations"] if "5x" in a["claim"])
    assert abl["verdict"] == "holds" and abl["paired"]["n"] == 300
    with pytest.raises(VlkitError, match="unknown"):
        selection(["scratch_large_s0"])
    assert set(selection(["no_converter"])) == {"no_converter", "vpgtrans_short"}
    s.update(total_seconds=1.0, seconds={}, source={"steps": 1500, "caption_cider": 0.5, "vqa_acc": 0.31})
    md = report(s, plot(runs, s, tmp_path))
    assert "| 80% |" in md and "13.3x" in md and "## Claims" in md and "paired" in md
    assert (tmp_path / "small_to_large.png").stat().st_size > 0 and (tmp_path / "ablations.png").is_file()


def test_final_evaluation_reuses_the_last_one_during_training(tmp_path, tiny_world, source_vlm, wide_lm, monkeypatch):
    import vlkit.eval.world as world
    from vlkit.recipes.transfer import run

    passes, real = [], world.answers
    monkeypatch.setattr(world, "answers", lambda *a, blind, **k: passes.append(blind) or real(*a, blind=blind, **k))
    res = run(transfer_cfg(tmp_path, tiny_world, source_vlm, wide_lm, "warmup.enabled=false", "eval.blind=true"))
    assert [p["step"] for p in res["curve"]] == [0, 2, 4]
    assert passes == [False, False, False, True]  # steps 0, 2, 4 with images, then the blind pass alone
    last = res["curve"][-1]
    assert all(last[k] == v for k, v in res["eval"]["image"].items()) and res["eval"]["blind"]
    assert res["eval"]["examples"]
    passes.clear()  # evaluations during training under autocast do not stand for the fp32 final one
    run(transfer_cfg(tmp_path / "bf16", tiny_world, source_vlm, wide_lm, "warmup.enabled=false", "eval.blind=true",
                     "train.precision=bf16"))
    assert passes == [False, False, False, False, True]


def test_length_groups_give_the_same_loss_and_gradient(tiny_world, source_vlm):
    from vlkit.data.features import ImageBank
    from vlkit.world.sources import load_split
    from vlkit.models.io import load_vlm
    from vlkit.recipes.common import VLDataset, vl_loss
    from vlkit.recipes.vpg import VPGData

    cfg_w, _ = tiny_world
    model, proc = load_vlm(source_vlm)
    recs = load_split(VPGData(world=cfg_w.model_dump(), tasks=["caption", "vqa", "edit"]), "train")
    recs = [r for t in ("caption", "vqa", "edit") for r in [r for r in recs if r["task"] == t][:4]]
    assert max(len(r["images"]) for r in recs) == 2  # "what changed" records hold two images
    data = VLDataset(recs, proc, ImageBank(recs, proc.transforms))
    batch = data.collate([data[i] for i in range(len(data))])
    torch.manual_seed(0)  # strong random features, so that an image given to the wrong row shows in the loss
    feats = model.vision(batch.pop("pixel_values"))
    batch["image_features"] = torch.randn_like(feats) * 3 * feats.std()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() - 5  # enough padding for groups to differ from one batch
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for groups in (1, 3):
        model.zero_grad()
        loss, extra = vl_loss(model, batch, groups)
        loss.backward()
        out[groups] = (loss.item(), torch.cat([p.grad.flatten() for p in params]), extra["tokens"])
    assert out[1][2] == out[3][2] == int((batch["labels"][:, 1:] != -100).sum())
    assert out[1][0] == pytest.approx(out[3][0], rel=1e-5)
    assert torch.allclose(out[1][1], out[3][1], rtol=1e-4, atol=1e-7)
    model.zero_grad()  # the check can fail: images given to other rows change the VPG's gradient
    vl_loss(model, {**batch, "image_features": batch["image_features"].flip(0)}, 3)[0].backward()
    assert not torch.allclose(torch.cat([p.grad.flatten() for p in params]), out[1][1], rtol=1e-2, atol=1e-5)


def test_a_setting_added_later_keeps_finished_runs_cached_at_its_old_value():
    from vlkit.fileio import stable_hash
    from vlkit.recipes.common import config_hash
    from vlkit.recipes.vpg import VPGRecipe

    cfg = VPGRecipe()
    before = cfg.model_dump(mode="json")  # a config as saved before train.length_groups existed
    before.pop("output_dir")
    before["train"].pop("length_groups")
    before["data"]["world"].pop("relations")  # added later still (the science bench)
    for section, key in (("data", "instructions"), ("train", "batch_by_task"), ("eval", "instructions"),
                         ("model", "mix"), ("model", "tiles")):  # SPHINX's settings
        before[section].pop(key)
    before["data"]["world"].pop("smalltext_size")
    for key in ("text_size", "aspects", "size_scale"):
        before["data"]["world"]["world"].pop(key)
    for key in ("parallel", "activation_checkpointing", "num_workers", "prefetch_factor", "pin_memory"):
        before["train"].pop(key)  # the GPU path's settings, later still
    before["data"].pop("lazy")
    before["model"]["llm"].pop("attn_implementation")
    assert config_hash(cfg) == stable_hash(before)
    assert config_hash(cfg.model_copy(update={"train": cfg.train.model_copy(update={"length_groups": 4})})) \
        != config_hash(cfg)


def test_a_source_holding_a_trained_fusion_is_refused(tmp_path, tiny_world, source_vlm, wide_lm):
    """VPG-C is trained on its own LLM: moving the VPG would silently drop it, so the transfer says so."""
    from vlkit.models.io import load_vlm, save_vlm
    from vlkit.recipes.transfer import build_target

    model, proc = load_vlm(source_vlm)
    model.add_fusion("vpgc")
    save_vlm(model, tmp_path / "with_vpgc", proc)
    with pytest.raises(VlkitError, match="holds the vpgc fusion"):
        build_target(transfer_cfg(tmp_path / "run", tiny_world, tmp_path / "with_vpgc", wide_lm))
