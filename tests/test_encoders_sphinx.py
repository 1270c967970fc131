"""SPHINX's encoders beside CLIP: a ConvNeXt read as tokens (kind hf, model_type convnext), BLIP-2's Q-Former as a
query stream (kind blip2_qformer), their real shapes on the meta device, and recipe `classify`, which trains the
world's ConvNeXt and saves a tower kind hf loads."""

import json

import pytest
import torch
from transformers import Blip2Config, Blip2Model, ConvNextModel

from vlkit.errors import VlkitError
from vlkit.models.vision import Blip2QFormerEncoder, EncoderConfig, HFEncoder, build_encoder
from vlkit.models.vision.convnext import input_of

TINY = {"model_type": "convnext", "hidden_sizes": [16, 24, 32], "depths": [1, 1, 1], "image_size": 64}
XXL = {"model_type": "convnext", "hidden_sizes": [384, 768, 1536, 3072], "depths": [3, 4, 30, 3], "image_size": 256}


def convnext(select="full", layer="output", **arch):
    torch.manual_seed(0)
    return build_encoder(EncoderConfig(arch={**TINY, **arch}, feature_layer=layer, select=select)).eval()


@torch.no_grad()
def test_convnext_tokens_are_the_grid_mean_then_the_grid():
    enc, x = convnext(), torch.randn(2, 3, 64, 64)
    y = enc(x)
    assert (enc.grid, enc.width, enc.num_special, enc.special_position) == ((4, 4), 32, 1, "first")
    assert y.shape == (2, 1 + 16, 32) and enc.num_tokens == 17
    assert torch.allclose(y[:, 0], y[:, 1:].mean(1), atol=1e-6)
    final = enc.model(pixel_values=x).last_hidden_state                       # (2, 32, 4, 4)
    assert torch.equal(y[:, 1:], final.flatten(2).transpose(1, 2))             # row-major
    patches = convnext(select="patch")
    assert patches.num_tokens == 16 and torch.equal(patches(x), y[:, 1:])


@pytest.mark.parametrize("size", [64, 70, 96])
@pytest.mark.parametrize("layer,stage", [(0, 0), (1, 1), (-2, 2), (-1, 3), ("output", 3)])
@torch.no_grad()
def test_convnext_layers_have_their_own_grid_and_width(size, layer, stage):
    """hidden_states[0] is the stem's output, [i] stage i's; the declared grid and width are what the model gives
    (floors included: 70 px -> 17 -> 8 -> 4)."""
    enc = convnext(layer=layer, image_size=size)
    y = enc(torch.randn(1, 3, size, size))
    h, w = enc.grid
    assert y.shape == (1, 1 + h * w, enc.width) and enc.width == [16, 16, 24, 32][stage]
    assert h == w == (size // 4) // 2 ** max(stage - 1, 0)


def test_convnext_refuses_what_it_does_not_have():
    with pytest.raises(VlkitError, match="feature_layer: 4 is not a ConvNeXt hidden state"):
        convnext(layer=4)
    with pytest.raises(VlkitError, match="depths has 2 entries for 3 stages"):
        build_encoder(EncoderConfig(arch={**TINY, "depths": [1, 1], "num_stages": 3}))


@torch.no_grad()
def test_convnext_round_trips_through_a_directory_and_its_arch(tmp_path):
    enc, x = convnext(), torch.randn(2, 3, 64, 64)
    enc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 64}
    loaded = build_encoder(EncoderConfig(path=str(tmp_path), feature_layer="output", select="full")).eval()
    assert isinstance(loaded, HFEncoder) and loaded.transform == enc.transform
    assert torch.equal(loaded(x), enc(x)) and loaded.fingerprint() == enc.fingerprint()
    rebuilt = build_encoder(enc.saved_config())                          # no path: the arch alone
    assert (rebuilt.grid, rebuilt.width, rebuilt.num_tokens) == ((4, 4), 32, 17) and rebuilt.arch() == enc.arch()
    assert not rebuilt.query_stream
    torch.manual_seed(1)
    ConvNextModel(enc.model.config).save_pretrained(tmp_path / "other")  # other weights, other fingerprint
    (tmp_path / "other" / "preprocessor_config.json").write_text((tmp_path / "preprocessor_config.json").read_text())
    other = build_encoder(EncoderConfig(path=str(tmp_path / "other"), feature_layer="output"))
    assert other.fingerprint() != enc.fingerprint()


def test_convnext_input_from_its_image_processor():
    """ConvNextImageProcessor: below 384 px the shorter side, then a centre crop (vlkit's crop); from 384 a squash."""
    from transformers import ConvNextConfig

    c = ConvNextConfig(image_size=224)
    assert input_of({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, c) == (224, "crop")
    assert input_of({"size": {"shortest_edge": 384}, "crop_pct": 0.875}, c) == (384, "squash")
    assert input_of({"size": {"height": 64, "width": 64}}, c) == (64, None)
    assert input_of({}, c) == (224, None)


def test_convnext_xxlarge_shapes_on_meta():
    """SPHINX's ConvNeXt-XXL at 256 px: an 8 x 8 grid of width 3072. Its parameters are the trunk of timm's
    convnext_xxlarge (846.47M, with a 1000-class fc of 3,073,000)."""
    enc = build_encoder(EncoderConfig(arch=XXL, feature_layer="output", select="full"), device="meta")
    assert (enc.grid, enc.width, enc.num_tokens, enc.transform.size) == ((8, 8), 3072, 65, 256)
    assert sum(p.numel() for p in enc.parameters()) == 846_471_016 - 3_073_000
    assert build_encoder(enc.saved_config(), device="meta").grid == (8, 8)


# -- BLIP-2's Q-Former ------------------------------------------------------------------------------------
def tiny_blip2() -> Blip2Config:
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            vocab_size=64, max_position_embeddings=32),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                         vocab_size=64, word_embed_proj_dim=16),
        num_query_tokens=5)


@torch.no_grad()
def test_qformer_encoder_is_get_qformer_features(tmp_path):
    """From a stock (sharded) Blip2Model directory: (B, Q, H), exactly the model's own Q-Former features; the
    language model is neither built nor read."""
    from transformers import BlipImageProcessorPil

    torch.manual_seed(0)
    blip = Blip2Model(tiny_blip2()).eval()
    blip.query_tokens.normal_()  # transformers initialises them to zeros: every query would be the same
    blip.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = build_encoder(EncoderConfig(kind="blip2_qformer", path=str(tmp_path), feature_layer="output")).eval()
    x = torch.randn(2, 3, 32, 32)
    want = blip.get_qformer_features(x)
    want = getattr(want, "last_hidden_state", want)  # a tensor in transformers 5, an output object before
    assert enc(x).shape == (2, 5, 24) and torch.equal(enc(x), want)
    assert isinstance(enc, Blip2QFormerEncoder) and enc.query_stream and not HFEncoder.query_stream
    assert (enc.grid, enc.num_special, enc.num_tokens, enc.special_position, enc.width) == ((1, 5), 0, 5, "none", 24)
    assert {k.split(".")[0] for k in enc.model.state_dict()} == {"vision_model", "query_tokens", "qformer"}
    assert enc.transform.size == 32 and enc.transform.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    patch = build_encoder(EncoderConfig(kind="blip2_qformer", path=str(tmp_path), select="patch", feature_layer=-1))
    assert torch.equal(patch.eval()(x), want)
    rebuilt = build_encoder(enc.saved_config())
    assert "text_config" not in enc.arch() and (rebuilt.num_tokens, rebuilt.width) == (5, 24)
    with pytest.raises(VlkitError, match="kind blip2_qformer"):
        build_encoder(EncoderConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(VlkitError, match="feature_layer: output"):
        build_encoder(EncoderConfig(kind="blip2_qformer", path=str(tmp_path)))  # the default, -2


def test_qformer_default_shapes_on_meta():
    """BLIP-2's Q-Former (Blip2Config's defaults: EVA ViT-g at 224 px, 32 queries of width 768)."""
    enc = build_encoder(EncoderConfig(kind="blip2_qformer", arch={"model_type": "blip-2"}, feature_layer="output"),
                        device="meta")
    assert (enc.num_tokens, enc.width, enc.grid, enc.transform.size) == (32, 768, (1, 32), 224)


# -- recipe classify -------------------------------------------------------------------------------------------
def test_classify_targets_and_scores_are_exact():
    from vlkit.recipes.classify import ClassifyRecipe, chance, heads, target_matrix
    from vlkit.world.scene import COLORS, SHAPES

    hs = heads(ClassifyRecipe())
    rec = {"id": "r", "meta": {"labels": {"shapes": ["circle", "star"], "colors": ["red"], "count": 3}}}
    t = target_matrix([rec], hs, "train")[0]
    shapes, colors, count = t.split([len(SHAPES), len(COLORS), 6])
    assert shapes.nonzero().flatten().tolist() == [SHAPES.index("circle"), SHAPES.index("star")]
    assert colors.nonzero().flatten().tolist() == [list(COLORS).index("red")] and count.tolist() == [0, 0, 1, 0, 0, 0]
    with pytest.raises(VlkitError, match="labels.count is 9"):
        target_matrix([{"id": "bad", "meta": {"labels": {**rec["meta"]["labels"], "count": 9}}}], hs, "test")
    other = {"meta": {"labels": {"shapes": ["circle"], "colors": ["red"], "count": 3}}}
    c = chance(target_matrix([rec, rec, other], hs, "test"), hs)
    assert c["acc"] == pytest.approx(2 / 3) and c["colors"] == 1.0 and c["shapes_label"] == pytest.approx(20 / 21)


def test_dihedral_moves_each_image_by_a_symmetry_of_the_square():
    import numpy as np

    from vlkit.recipes.classify import dihedral

    x = torch.randn(64, 3, 8, 8)
    y = dihedral(x, np.random.default_rng(0))
    moves = [lambda a, k=k: a.rot90(k % 4, (-2, -1)).flip(-1) if k >= 4 else a.rot90(k, (-2, -1)) for k in range(8)]
    used = [next(k for k in range(8) if torch.equal(y[i], moves[k](x[i]))) for i in range(64)]
    assert sorted(set(used)) == list(range(8))  # each image is one of the 8, and all 8 occur


@torch.no_grad()
def test_classifier_pools_the_special_token_the_patch_mean_or_max():
    from vlkit.recipes.classify import Classifier

    enc, x = convnext(), torch.randn(2, 3, 64, 64)
    patches = enc.tokens(x)[:, 1:]
    pooled = {p: Classifier(enc, 3, p).pooled(x) for p in ("special", "mean", "max")}
    assert torch.allclose(pooled["special"], pooled["mean"], atol=1e-6)  # ConvNeXt's special token is the mean
    assert torch.equal(pooled["mean"], patches.mean(1)) and torch.equal(pooled["max"], patches.amax(1))
    siglip = build_encoder(EncoderConfig(arch={"model_type": "siglip_vision_model", "hidden_size": 16,
                                               "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}))
    with pytest.raises(VlkitError, match="no special token; set model.pool: mean"):
        Classifier(siglip, 3, "special")


def test_classify_recipe_trains_and_saves_a_tower(tmp_path, tiny_world):
    from vlkit.config import load
    from vlkit.recipes.classify import ClassifyRecipe, run

    cfg_w, _ = tiny_world
    cfg = load(ClassifyRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"data.world.seed={cfg_w.seed}",
        f"data.world.train_scenes={cfg_w.train_scenes}", f"data.world.test_scenes={cfg_w.test_scenes}",
        "model.tower.arch={model_type: convnext, hidden_sizes: [16, 24, 32], depths: [1, 1, 1], image_size: 64}",
        "train.steps=4", "train.batch_size=32", "train.eval_every=2", "train.log_every=1", "train.warmup_steps=0",
        "train.progress=false"])
    res = run(cfg)
    assert res["heads"] == ["shapes", "colors", "count"] and res["n"] == len(res["items"]) == cfg_w.test_scenes
    assert all(0 <= res[k] <= 1 for k in ("acc", "shapes", "shapes_label", "colors", "colors_label", "count"))
    assert [c["step"] for c in res["curve"]] == [2, 4]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"shapes_loss", "colors_loss", "count_loss"} <= set(rows[0])
    tower = build_encoder(EncoderConfig(kind="hf", path=res["tower_dir"], feature_layer="output", select="full"))
    assert (tower.grid, tower.width, tower.num_tokens) == ((4, 4), 32, 17)
    assert tower.transform.size == 64 and tower.transform.config.resize == "squash"
    fresh = convnext()
    assert tower.fingerprint() != fresh.fingerprint()  # trained weights, not the init
