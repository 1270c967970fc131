"""The seams, measured: a fusion and a vision encoder written here, in the test file, plug into vlkit without an
edit to the package and go through training (the `vpg` recipe), generation, saving and loading."""

import contextlib
import json

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import nn

from vlkit.config import Section
from vlkit.data.processor import VLProcessor
from vlkit.data.transforms import ImageTransform
from vlkit.errors import VlkitError
from vlkit.models.fusion import Fusion, register_fusion
from vlkit.models.vision import EncoderConfig, VisionEncoder, register_encoder


@register_encoder("test-conv")
class ConvEncoder(VisionEncoder):
    """A convolutional patchifier whose summary token comes *after* the patches (as iLLaMA's class token)."""

    special_position = "last"

    def __init__(self, cfg: EncoderConfig, size: int, patch: int, width: int):
        super().__init__(cfg, ImageTransform.of(size, cfg.image_mean or [0.5] * 3, cfg.image_std or [0.5] * 3,
                                                cfg.resize or "squash"),
                         width, (size // patch, size // patch), 1)
        self.sizes = {"size": size, "patch": patch, "width": width}
        self.patchify = nn.Conv2d(3, width, patch, patch)
        self.summary = nn.Linear(width, width)

    @classmethod
    def build(cls, cfg, device=None):
        if not cfg.arch:
            raise VlkitError("test-conv: set tower.arch {size, patch, width}")
        return cls(cfg, **cfg.arch)

    def tokens(self, pixel_values):
        x = self.patchify(pixel_values).flatten(2).transpose(1, 2)         # (B, N, C)
        return torch.cat([x, self.summary(x.mean(1, keepdim=True))], 1)    # class token last

    def arch(self):
        return dict(self.sizes)


class MeanBiasConfig(Section):
    scale: float = Field(1.0, description="Multiplies the gated bias.")


@register_fusion("test-mean-bias")
class MeanBias(Fusion):
    """Takes no token slots: every text position of a row gets tanh(gate) * the mean visual token of the row's
    images (a toy adapter-style fusion). Zero gate: the base model exactly."""

    Config = MeanBiasConfig

    def __init__(self, config, width):
        super().__init__(config)
        self.gate = nn.Parameter(torch.zeros(1))
        self.proj = nn.Linear(width, width)
        self.calls = 0

    @classmethod
    def build(cls, config, model):
        return cls(config, model.llm_width)

    def embed(self, embeds, x):
        if x.visual is None:
            return embeds
        per_row = torch.zeros(embeds.shape[0], embeds.shape[-1], dtype=embeds.dtype)
        per_row.index_add_(0, x.owner, self.proj(x.visual.mean(1)).to(embeds.dtype))
        counts = torch.bincount(x.owner, minlength=embeds.shape[0]).clamp(min=1)[:, None]
        return embeds + self.config.scale * torch.tanh(self.gate) * (per_row / counts)[:, None, :]

    @contextlib.contextmanager
    def active(self, x):
        self.calls += 1
        yield


ARCH = {"size": 32, "patch": 8, "width": 24}


def vpg_overrides(out, tiny_world, tiny_lm, **extra):
    cfg_w, _ = tiny_world
    items = {"output_dir": out, "model.tower": {"kind": "test-conv", "arch": ARCH},
             "model.fusions": [{"kind": "test-mean-bias", "scale": 2.0}], "model.llm.path": tiny_lm,
             "model.vpg.kind": "mlp", "trainable": ["vpg", "test-mean-bias"], "data.world.seed": cfg_w.seed,
             "data.world.train_scenes": cfg_w.train_scenes, "data.world.test_scenes": cfg_w.test_scenes,
             "data.tasks": ["caption"], "eval.tasks": ["caption"], "eval.max_per_task": 4, "train.steps": 12,
             "train.batch_size": 8, "train.lr": 1e-2, "train.warmup_steps": 2, "train.progress": False, **extra}
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in items.items()]


def test_a_fusion_and_an_encoder_defined_here_train_generate_save_and_load(tmp_path, tiny_world, tiny_lm):
    from vlkit.config import load
    from vlkit.models.generate import GenerationConfig, generate, prepare
    from vlkit.models.io import load_vlm
    from vlkit.recipes.vpg import VPGRecipe, run

    res = run(load(VPGRecipe, None, vpg_overrides(tmp_path / "run", tiny_world, tiny_lm)))
    assert res["num_image_tokens"] == 0  # the fusion takes no slots, so no image takes any
    model, proc = load_vlm(tmp_path / "run" / "model")
    assert isinstance(model.vision.encoders[0], ConvEncoder) and list(model.fusions) == ["test-mean-bias"]
    fusion = model.fusion("test-mean-bias")
    assert fusion.config.scale == 2.0 and float(fusion.gate.detach()) != 0.0  # trained, and saved with its settings
    assert model.trainable_groups == ["vpg", "test-mean-bias"]
    assert proc.config.image_tokens == 0 and proc.transforms[0].size == 32

    # the image reaches the logits through the fusion alone: no token in the text stands for it
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(2))  # any size: resized by the transform
    batch = proc.pad([proc.encode(conv, 1)])
    assert model.image_token_id not in batch["input_ids"][0].tolist()
    with torch.no_grad():
        la = model(**batch, pixel_values=proc.pixel_values([a])).logits
        lb = model(**batch, pixel_values=proc.pixel_values([b])).logits
    assert not torch.allclose(la, lb)

    # generation: one path, whatever the fusion; in a left-padded batch, rows with 2 and 1 images see their own
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]}]

    def next_token_logits(convs, imgs):
        inputs = prepare(model, proc, convs, imgs)
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), inputs.pop("fused"):
            return model.llm(**inputs, position_ids=positions).logits[:, -1]

    together = next_token_logits([two, conv], [[a, b], [b]])
    assert torch.allclose(together[0], next_token_logits([two], [[a, b]])[0], atol=1e-5)
    assert torch.allclose(together[1], next_token_logits([conv], [[b]])[0], atol=1e-5)
    assert not torch.allclose(together[1], next_token_logits([conv], [[a]])[0], atol=1e-5)
    calls = fusion.calls
    gen = GenerationConfig(max_new_tokens=6)
    batched = generate(model, proc, [two, conv], [[a, b], [b]], gen)
    assert [g["text"] for g in batched] == [generate(model, proc, [c], [i], gen)[0]["text"]
                                            for c, i in ((two, [a, b]), (conv, [b]))]
    assert fusion.calls > calls  # generation went through the fusion's context


def test_the_encoder_interface_drops_special_tokens_wherever_they_sit():
    enc = ConvEncoder.build(EncoderConfig(kind="test-conv", arch=ARCH))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = enc.tokens(x)
        assert every.shape == (2, 17, 24)
        assert torch.equal(enc(x), every[:, :16])  # select=patch drops the *last* token here
        full = ConvEncoder.build(EncoderConfig(kind="test-conv", arch=ARCH, select="full"))
        full.load_state_dict(enc.state_dict())
        assert torch.equal(full(x), every) and full.num_tokens == 17 and full.patch_slice() == slice(0, 16)
    with pytest.raises(VlkitError, match="unknown vision encoder 'nope'"):
        from vlkit.models.vision import build_encoder

        build_encoder(EncoderConfig(kind="nope"))


def test_unknown_fusion_and_bad_options_are_one_line_errors(tiny_tokenizer):
    from test_vlm import make

    model, _ = make(tiny_tokenizer)
    with pytest.raises(VlkitError, match="unknown fusion kind 'nope'"):
        model.add_fusion("nope")
    with pytest.raises(VlkitError, match=r"fusions \(test-mean-bias\): key 'scael'"):
        model.add_fusion("test-mean-bias", scael=2)
    with pytest.raises(VlkitError, match="already has a tokens fusion"):
        model.add_fusion("tokens")


def test_a_zero_init_fusion_leaves_the_logits_exactly_equal(tiny_tokenizer):
    from test_vlm import CONV, batch, make

    model, proc = make(tiny_tokenizer)
    b = batch(proc)
    with torch.no_grad():
        before = model(**b).logits
        model.add_fusion("test-mean-bias")
        assert torch.equal(model(**b).logits, before)
        model.fusion("test-mean-bias").gate.fill_(0.5)
        assert not torch.allclose(model(**b).logits, before)
    assert "test-mean-bias" in model.param_groups()
    assert proc.encode(CONV, 2) == VLProcessor.for_model(proc.tokenizer, model).encode(CONV, 2)  # no new slots


def test_a_stack_of_two_encoders_each_with_its_own_transform(tiny_tokenizer, tiny_world, tmp_path):
    """Two encoders of one width, different sizes and normalisation: their tokens join one sequence, the processor
    makes one pixel tensor per encoder, cached features per encoder give the pixels' loss, and it saves and loads."""
    from test_vlm import CLIP, CONV, LLMS
    from vlkit.data.features import ImageBank
    from vlkit.data.records import load_records
    from vlkit.models.io import load_vlm, save_vlm
    from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
    from vlkit.models.vpg import VPGConfig
    from vlkit.recipes.common import VLDataset

    small = {**CLIP, "image_size": 16}
    tok = tiny_tokenizer
    arch = {**LLMS["llama"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    cfg = VLMConfig(tower=[EncoderConfig(arch=CLIP), EncoderConfig(arch=small, image_mean=[0.2] * 3, resize="pad")],
                    vpg=VPGConfig(kind="mlp"), llm=LLMSource(arch=arch), max_length=128)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    proc = VLProcessor.for_model(tok, model)
    assert model.vision.num_tokens == model.image_slots == 16 + 4
    assert [t.size for t in proc.transforms] == [32, 16] and proc.transforms[1].mean == [0.2] * 3
    px = proc.pixel_values([np.zeros((20, 30, 3), np.uint8)])
    assert isinstance(px, list) and [tuple(p.shape) for p in px] == [(1, 3, 32, 32), (1, 3, 16, 16)]
    assert {"vision", "vision.0", "vision.1"} <= set(model.param_groups())

    _, root = tiny_world
    recs = [r for r in load_records(root / "train.jsonl") if r["task"] in ("caption", "edit")][:6]
    pixels = VLDataset(recs, proc, ImageBank(recs, proc.transforms))
    cached = VLDataset(recs, proc, ImageBank(recs, proc.transforms).use_features(model.vision))
    b1, b2 = pixels.collate(pixels.items), cached.collate(cached.items)
    assert isinstance(b2["image_features"], list) and len(b2["image_features"]) == 2
    with torch.no_grad():
        assert torch.allclose(model(**b1).loss, model(**b2).loss, atol=1e-6)
    save_vlm(model, tmp_path / "m", proc)
    loaded, proc2 = load_vlm(tmp_path / "m")
    assert proc2.transforms == proc.transforms
    b = proc.pad([proc.encode(CONV, 2)])
    b["pixel_values"] = proc.pixel_values([np.full((8, 8, 3), 90, np.uint8), np.full((8, 9), 200, np.uint8)])
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, model(**b).logits)
    wide = VLMConfig(tower=[EncoderConfig(arch=CLIP), EncoderConfig(arch={**small, "hidden_size": 64})],
                     vpg=VPGConfig(kind="mlp"), llm=LLMSource(arch=arch), max_length=128)
    with pytest.raises(VlkitError, match=r"encoders of widths \[32, 64\] cannot be joined"):
        VisionLanguageModel.build(wide)
