"""SPHINX's visual side: views of a high-resolution image (global + k x k sub-images, padded ones skipped) and the
mixing of encoders of different widths and grids, checked on hand-made images and against hand computation."""

import numpy as np
import pytest
import torch
from PIL import Image

from test_vlm import CLIP, CONV, DINO, LLMS
from vlkit.data.features import ImageBank
from vlkit.data.processor import VLProcessor
from vlkit.data.tiling import TileConfig, Tiler
from vlkit.errors import VlkitError
from vlkit.models.io import load_vlm, save_vlm
from vlkit.models.vision import EncoderConfig, VisionEncoder, register_encoder
from vlkit.models.vision.stack import MixConfig
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vpg import VPGConfig

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
DINO16 = {**DINO, "hidden_size": 24, "patch_size": 16}  # width 24, a 2x2 grid at 32 px (CLIP: width 32, 4x4)


def quadrants(side: int) -> Image.Image:
    """A square image whose four quadrants are red, green, blue, yellow (raster order)."""
    a = np.zeros((side, side, 3), np.uint8)
    h = side // 2
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        a[r * h:(r + 1) * h, c * h:(c + 1) * h] = COLORS[i]
    return Image.fromarray(a)


def test_views_are_the_global_image_then_sub_images_in_raster_order():
    tiler = Tiler(TileConfig(k=2), size=8, fill=(0, 0, 0))
    views = tiler.views(quadrants(16))
    assert len(views) == tiler.num_views == 5 and all(v.size == (8, 8) for v in views)
    for view, color in zip(views[1:], COLORS):
        assert (np.asarray(view) == color).all()  # 16 -> 2 * 8: no resampling, each tile one quadrant
    glob = np.asarray(views[0])
    assert tuple(glob[1, 1]) == COLORS[0] and tuple(glob[6, 6]) == COLORS[3]  # the whole image, downsized
    assert len(Tiler(TileConfig(k=3), size=8, fill=(0, 0, 0)).views(quadrants(16))) == 10


def test_a_non_square_image_is_padded_with_the_mean_colour_and_padded_tiles_are_skipped():
    keep3 = Tiler(TileConfig(k=3, skip_padding=True), 8, (10, 20, 30))
    assert keep3.mask(32, 8) == [True] + [False] * 3 + [True] * 3 + [False] * 3
    assert keep3.mask(8, 32) == [True] + [False, True, False] * 3  # tall: the middle column
    assert Tiler(TileConfig(k=2, skip_padding=True), 8, (0, 0, 0)).mask(32, 8) == [True] * 5  # both rows overlap
    assert keep3.mask(40, 40) == [True] * 10  # a square image has no padding
    assert Tiler(TileConfig(k=3), 8, (0, 0, 0)).mask(32, 8) == [True] * 10  # without skipping every view stays
    exact = Tiler(TileConfig(k=3, skip_padding=True), 16, (10, 20, 30))  # 48 x 12 -> a 48 square, no resampling
    views = exact.views(Image.fromarray(np.full((12, 48, 3), 200, np.uint8)))
    assert exact.mask(48, 12) == [True] + [False] * 3 + [True] * 3 + [False] * 3
    assert (np.asarray(views[1]) == (10, 20, 30)).all()  # a skipped tile is pure fill colour
    middle = np.asarray(views[5])
    assert (middle[2:14] == 200).all() and (middle[0] == (10, 20, 30)).all()  # content rows 18..30 of 48
    # a 1-pixel sliver of content in a tile keeps it: geometry decides, not pixel values
    assert keep3.mask(30, 12) == [True] * 10  # content rows 9..21 of 30: one row in tile rows 0 and 2
    assert keep3.mask(30, 10) == [True] + [False] * 3 + [True] * 3 + [False] * 3  # rows 10..20: edges only touch


def build(tok, tiles=None, mix=None, tower=None, vpg="linear", family="llama", fusions=None):
    torch.manual_seed(0)
    arch = {**LLMS[family], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = VLMConfig(tower=tower or EncoderConfig(arch=CLIP), vpg=VPGConfig(kind=vpg, num_queries=3),
                    llm=LLMSource(arch=arch), max_length=512, tiles=tiles, mix=mix,
                    fusions=fusions or [{"kind": "tokens"}])
    model = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    return model, VLProcessor.for_model(tok, model)


def test_a_tiled_image_takes_views_times_tokens_and_each_view_is_encoded_as_an_image(tiny_tokenizer):
    plain, _ = build(tiny_tokenizer)
    tiled, proc = build(tiny_tokenizer, tiles=TileConfig(k=2))
    tiled.load_state_dict(plain.state_dict())
    img = quadrants(64)
    inputs = proc.image_inputs([img])
    assert inputs["pixel_values"].shape == (1, 5, 3, 32, 32) and inputs["view_mask"].tolist() == [[True] * 5]
    enc = proc.encode(CONV[:2], 1)
    assert enc["input_ids"].count(tiled.image_token_id) == 5 * 16  # linear VPG: 16 patches per view
    with torch.no_grad():
        visual = tiled.encode_images(**inputs)
        views = proc.tiler.views(img)
        expected = plain.encode_images(pixel_values=proc.transforms[0](views))
    assert torch.equal(visual, expected)  # rows are the views, in order, each as the plain model sees an image
    b = proc.pad([enc])
    with torch.no_grad():
        out = tiled(**b, **inputs)
    assert out.logits.shape[:2] == b["input_ids"].shape


def test_skipped_tiles_shorten_the_image_and_generation_takes_tiled_images(tiny_tokenizer):
    from vlkit.models.generate import GenerationConfig, generate

    model, proc = build(tiny_tokenizer, tiles=TileConfig(k=3, skip_padding=True, positions=True))
    wide = np.full((8, 64, 3), 120, np.uint8)
    assert proc.view_counts([wide, quadrants(64)]) == [4, 10]
    enc = proc.encode(CONV, 2, views=[4, 10])
    assert enc["input_ids"].count(model.image_token_id) == (4 + 10) * 16
    b = proc.pad([enc])
    inputs = proc.image_inputs([wide, quadrants(64)])
    assert inputs["view_mask"].sum().item() == 14
    with torch.no_grad():
        assert model(**b, **inputs).logits.shape[1] == b["input_ids"].shape[1]
    with pytest.raises(VlkitError, match="image tokens"):  # all views' slots, but only the kept views given
        model(**proc.pad([proc.encode(CONV, 2)]), **inputs)
    gen = GenerationConfig(max_new_tokens=3)
    a = generate(model, proc, [CONV[:1]], [[wide]], gen)
    bank_style = generate(model, proc, [CONV[:1]], [[None]], gen, image_inputs=proc.image_inputs([wide]))
    assert a == bank_style and a[0]["tokens"] >= 1


def test_view_position_embeddings_start_at_zero_and_are_a_group(tiny_tokenizer):
    with_pos, proc = build(tiny_tokenizer, tiles=TileConfig(k=2, positions=True))
    without, _ = build(tiny_tokenizer, tiles=TileConfig(k=2))
    without.load_state_dict(with_pos.state_dict(), strict=False)
    inputs = proc.image_inputs([quadrants(64)])
    with torch.no_grad():
        assert torch.equal(with_pos.encode_images(**inputs), without.encode_images(**inputs))
        with_pos.vision.view_embed.normal_()
        assert not torch.equal(with_pos.encode_images(**inputs), without.encode_images(**inputs))
    assert with_pos.param_groups()["vision.views"][0] is with_pos.vision.view_embed


def test_mixing_encoders_of_different_widths_and_grids_matches_the_hand_computation(tiny_tokenizer):
    towers = [EncoderConfig(arch=CLIP, feature_layer="output", select="full"),
              EncoderConfig(arch=DINO16, feature_layer="output", select="full")]
    with pytest.raises(VlkitError, match="widths"):
        build(tiny_tokenizer, tower=towers)
    model, proc = build(tiny_tokenizer, tower=towers, mix=MixConfig(width=40))
    stack = model.vision
    assert stack.width == 40 and stack.num_tokens == 1 + 4 * 4 + 2  # CLS, CLIP's 4x4 grid, start/end
    pixels = proc.pixel_values(np.stack([np.asarray(quadrants(32))] * 2))
    clip, dino = stack.encode(pixels)
    assert clip.shape == (2, 17, 32) and dino.shape == (2, 5, 24)
    grid = dino[:, 1:].reshape(2, 2, 2, 24).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 16, 24)
    joined = torch.cat([clip, torch.cat([dino[:, :1], grid], 1)], dim=-1)  # (2, 17, 56)
    m = stack.mixer
    hand = torch.cat([m.start.expand(2, 1, 40), m.grid_proj(joined), m.end.expand(2, 1, 40)], dim=1)
    with torch.no_grad():
        assert torch.allclose(stack.combine([clip, dino]), hand, atol=1e-6)
    assert m.grid_proj[0].weight.shape == (40, 56)
    assert {"vision.mix", "vision.0", "vision.1"} <= set(model.param_groups())


def test_an_unequal_number_of_special_tokens_is_refused(tiny_tokenizer):
    towers = [EncoderConfig(arch=CLIP, select="full"), EncoderConfig(arch=DINO16, select="patch")]
    with pytest.raises(VlkitError, match="special tokens"):
        build(tiny_tokenizer, tower=towers, mix=MixConfig(width=40))


@register_encoder("test_queries")
class FixedQueries(VisionEncoder):
    """A query stream plugged in from outside the package: Q learned tokens shifted by the image's mean."""

    query_stream = True
    special_position = "none"

    @classmethod
    def build(cls, cfg, device=None):
        from vlkit.data.transforms import ImageTransform

        arch = cfg.arch or {}
        enc = cls(cfg, ImageTransform.of(arch.get("image_size", 32)), arch.get("width", 12), (1, arch.get("q", 3)), 0)
        enc.queries = torch.nn.Parameter(torch.randn(arch.get("q", 3), arch.get("width", 12)))
        return enc

    def tokens(self, pixel_values):
        return self.queries + pixel_values.mean((1, 2, 3))[:, None, None]

    def arch(self):
        return {"width": self.width, "q": self.grid[1], "image_size": self.transform.size}


def test_a_query_stream_is_projected_on_its_own_and_placed_before_the_grid(tiny_tokenizer, tmp_path):
    towers = [EncoderConfig(kind="test_queries", arch={"width": 12, "q": 3}),
              EncoderConfig(arch=CLIP, select="patch"), EncoderConfig(arch=DINO16, select="patch")]
    model, proc = build(tiny_tokenizer, tower=towers, mix=MixConfig(), vpg="identity",
                        tiles=TileConfig(k=3, skip_padding=True))
    stack, width = model.vision, model.llm_width
    assert stack.width == width and stack.num_tokens == 3 + 16 + 2  # queries, the grid, start/end
    pixels = proc.transforms[0]([np.asarray(quadrants(32))])
    q, clip, dino = stack.encode([pixels, pixels, pixels])
    mixed = stack.combine([q, clip, dino])
    with torch.no_grad():
        assert torch.allclose(mixed[:, 1:4], stack.mixer.query_proj[0](q), atol=1e-6)
        assert torch.equal(mixed[:, 0], stack.mixer.start.expand(1, -1))
    # a whole SPHINX-style model: views x (queries + grid + 2) positions, saved and loaded with the same logits
    wide = np.full((16, 64, 3), 90, np.uint8)
    enc = proc.encode(CONV[:2], 1, views=proc.view_counts([wide]))
    assert enc["input_ids"].count(model.image_token_id) == 4 * 21  # the global view and the middle row of tiles
    b = {**proc.pad([enc]), **proc.image_inputs([wide])}
    with torch.no_grad():
        before = model(**b).logits
    save_vlm(model, tmp_path / "m", proc)
    loaded, proc2 = load_vlm(tmp_path / "m")
    assert proc2.config.tiles == proc.config.tiles and proc2.tiler.geometry == proc.tiler.geometry
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, before)


def test_cached_view_features_give_the_logits_of_pixels(tiny_tokenizer, tiny_world):
    from vlkit.data.records import load_records

    _, root = tiny_world
    records = load_records(root / "test.jsonl")[:4]
    model, proc = build(tiny_tokenizer, tiles=TileConfig(k=2))
    pixels = ImageBank.of(records, proc)
    feats = ImageBank.of(records, proc).use_features(model.vision)
    rows = [pixels.rows(r)[0] for r in records]
    assert feats.features[0].shape == (len(pixels.paths), 5, 16, 32)
    enc = proc.pad([proc.encode(CONV[:2], 1) for _ in rows])
    with torch.no_grad():
        a = model(**enc, **pixels.inputs(rows)).logits
        b = model(**enc, **feats.inputs(rows)).logits
    assert torch.allclose(a, b, atol=1e-5)
    untiled = ImageBank.of(records, build(tiny_tokenizer)[1]).use_features(model.vision)
    assert untiled.features[0].shape == (len(pixels.paths), 16, 32)  # another cache entry, not the views'


def test_fusions_that_read_images_not_views_are_refused_on_a_tiled_model(tiny_tokenizer):
    with pytest.raises(VlkitError, match="views"):
        build(tiny_tokenizer, tiles=TileConfig(k=2), vpg="qformer",
              fusions=[{"kind": "tokens"}, {"kind": "vpgc", "layer": 1}])


def test_set_tiles_turns_a_trained_model_into_its_high_resolution_self(tiny_tokenizer):
    plain, _ = build(tiny_tokenizer)
    tiled, proc = build(tiny_tokenizer, tiles=TileConfig(k=2, positions=True))
    tiled.load_state_dict(plain.state_dict(), strict=False)
    plain.set_trainable(["vpg"])
    plain.set_tiles(TileConfig(k=2, positions=True))
    assert not plain.vision.view_embed.requires_grad  # new parameters train only when their group is named
    assert plain.config.tiles == tiled.config.tiles
    converted = VLProcessor.for_model(tiny_tokenizer, plain)
    assert converted.config == proc.config
    inputs = proc.image_inputs([quadrants(64)])
    with torch.no_grad():
        assert torch.equal(plain.encode_images(**inputs), tiled.encode_images(**inputs))
    plain.set_tiles(None)
    assert plain.vision.view_embed is None and VLProcessor.for_model(tiny_tokenizer, plain).num_views == 1


def test_images_keeping_different_views_batch_through_length_groups_and_the_feature_cache(tiny_tokenizer, tmp_path):
    from vlkit.recipes.common import VLDataset, vl_loss

    model, proc = build(tiny_tokenizer, tiles=TileConfig(k=3, skip_padding=True))
    shapes = [(64, 64), (16, 64), (64, 16), (64, 64)]  # square (10 views), wide and tall (4 views each), square
    records = []
    for i, (h, w) in enumerate(shapes):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        conv = [CONV[0], {"role": "assistant", "content": "red " * (1 + 3 * i)}]
        records.append({"id": f"r{i}", "task": "vqa", "images": [str(path)], "messages": conv})
    bank = ImageBank.of(records, proc)
    assert bank.views(list(range(4))) == [10, 4, 4, 10]
    data = VLDataset(records, proc, bank)
    batch = data.collate([data[i] for i in range(4)])
    assert batch["view_mask"].sum().item() == 28
    with torch.no_grad():
        one, _ = vl_loss(model, batch, groups=1)
        two, _ = vl_loss(model, batch, groups=2)  # rows regrouped by length: images and their masks follow
    assert torch.allclose(one, two, atol=1e-5)
    cached = VLDataset(records, proc, ImageBank.of(records, proc).use_features(model.vision))
    with torch.no_grad():
        from_cache, _ = vl_loss(model, cached.collate([cached[i] for i in range(4)]), groups=2)
    assert torch.allclose(from_cache, one, atol=1e-5)


def test_a_tiled_model_is_served_unchanged_and_its_prompt_counts_the_views_kept(tiny_tokenizer):
    import base64
    import io

    from test_serve import Live, ask
    from vlkit.models.generate import GenerationConfig, generate
    from vlkit.serve import Engine, ServeLimits, create_app

    model, proc = build(tiny_tokenizer, tiles=TileConfig(k=3, skip_padding=True))

    def url(h, w):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    engine = Engine(model, proc, "tiny")
    srv = Live(create_app(engine, ServeLimits(max_tokens=8, max_images=2, max_pixels=64 * 64)))
    try:
        text = {"type": "text", "text": "what color is the circle?"}
        wide = ask(srv.client, [{"type": "image_url", "image_url": {"url": url(16, 64)}}, text], max_tokens=4)
        square = ask(srv.client, [{"type": "image_url", "image_url": {"url": url(64, 64)}}, text], max_tokens=4)
        assert square.usage.prompt_tokens - wide.usage.prompt_tokens == (10 - 4) * 16  # 6 padded tiles skipped
        conv = [{"role": "user", "content": [{"type": "image"}, text]}]
        direct = generate(model, proc, [conv], [[np.full((16, 64, 3), 90, np.uint8)]],
                          GenerationConfig(max_new_tokens=4))
        assert wide.choices[0].message.content == direct[0]["text"]
    finally:
        srv.close()
        engine.close()
