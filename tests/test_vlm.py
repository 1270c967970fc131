"""The vision-language model: composition across families, interleaved images, groups, save/load, export."""

import numpy as np
import pytest
import torch

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import IGNORE_INDEX
from vlkit.errors import VlkitError
from vlkit.models.export import export_blip2, export_llava
from vlkit.models.io import load_vlm, save_vlm
from vlkit.models.llm import decoder_layers
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vision import EncoderConfig
from vlkit.models.vpg import VPGConfig

CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
BLIP2_VISION = {"model_type": "blip_2_vision_model", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
DINO = {"model_type": "dinov2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
LLMS = {
    "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "opt": {"model_type": "opt", "hidden_size": 48, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 48},
    "qwen2": {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 64},
    "gemma2": {"model_type": "gemma2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "sliding_window": 64},
}

CONV = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "and in this one?"}, {"type": "image"}]},
    {"role": "assistant", "content": "blue"},
]


def make(tok, family="llama", vpg="qformer", tower=CLIP, **tower_kw):
    torch.manual_seed(0)
    arch = {**LLMS[family], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = VLMConfig(tower=EncoderConfig(arch=tower, **tower_kw), vpg=VPGConfig(kind=vpg, num_queries=4),
                    llm=LLMSource(arch=arch), max_length=128)
    model = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    return model, VLProcessor.for_model(tok, model)


def images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def batch(proc, conv=CONV, n_images=2):
    enc = proc.encode(conv, n_images)
    b = proc.pad([enc])
    b["pixel_values"] = proc.pixel_values(images(n_images))
    return b


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("vpg", ["qformer", "mlp", "linear"])
def test_every_family_and_vpg_composes_and_trains(tiny_tokenizer, family, vpg):
    model, proc = make(tiny_tokenizer, family, vpg)
    model.set_trainable(["vpg"])
    b = batch(proc)
    out = model(**b)
    assert out.logits.shape[:2] == b["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.vpg.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert len(decoder_layers(model.llm)) == 2


@pytest.mark.parametrize("tower,n", [(CLIP, 16), (SIGLIP, 16), (DINO, 16), (BLIP2_VISION, 16)])
def test_towers_give_feature_grids(tiny_tokenizer, tower, n):
    model, proc = make(tiny_tokenizer, vpg="mlp", tower=tower)
    feats = model.vision(proc.pixel_values(images(3)))
    assert feats.shape == (3, n, 32)
    assert model.num_image_tokens == n


def test_placeholders_expand_and_labels_cover_answers(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    enc = proc.encode(CONV, 2)
    ids = enc["input_ids"]
    assert ids.count(model.image_token_id) == 2 * model.num_image_tokens
    answer = [t for t, lab in zip(ids, enc["labels"]) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer) == " red</s> blue</s>"


def test_image_changes_only_the_image_positions_downstream(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    b = batch(proc)
    first_image = b["input_ids"][0].tolist().index(model.image_token_id)
    b2 = dict(b, pixel_values=proc.pixel_values(images(2, seed=1)))
    with torch.no_grad():
        a, c = model(**b).logits, model(**b2).logits
    assert torch.equal(a[:, :first_image], c[:, :first_image])  # causal: text before the image is unaffected
    assert not torch.allclose(a[:, first_image:], c[:, first_image:])


def test_mismatched_images_name_the_record(tiny_tokenizer):
    _, proc = make(tiny_tokenizer)
    with pytest.raises(VlkitError, match="rec-9: 2 image placeholders but 1 images"):
        proc.encode(CONV, 1, record_id="rec-9")
    model, proc = make(tiny_tokenizer)
    b = batch(proc)
    b["pixel_values"] = b["pixel_values"][:1]
    with pytest.raises(VlkitError, match="image features and image tokens do not match"):
        model(**b)


def test_long_conversation_truncates_without_splitting_an_image(tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    full = proc.encode(CONV, 2)
    second = [i for i, t in enumerate(full["input_ids"]) if t == model.image_token_id][model.num_image_tokens]
    proc.config.max_length = second + 2  # lands inside the second image's tokens
    with pytest.warns(UserWarning, match="truncated"):
        enc = proc.encode(CONV, 2, record_id="long")
    assert enc["num_images"] == 1 and len(enc["input_ids"]) == second
    assert enc["input_ids"].count(model.image_token_id) == model.num_image_tokens


def test_groups_freeze_and_survive_save_load(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer)
    model.set_trainable(["vpg.queries", "vpg.projector"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vpg.query_tokens", "vpg.projector.weight", "vpg.projector.bias"}
    with pytest.raises(VlkitError, match="unknown group"):
        model.set_trainable(["vpg.everything"])
    save_vlm(model, tmp_path / "m", proc)
    loaded, proc2 = load_vlm(tmp_path / "m")
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    b = batch(proc)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, loaded(**b).logits)
    assert proc2.encode(CONV, 2) == proc.encode(CONV, 2)


def test_truncated_weights_are_a_clear_error(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, vpg="linear")
    save_vlm(model, tmp_path / "m", proc)
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    with pytest.raises(VlkitError, match="model.safetensors: corrupt"):
        load_vlm(tmp_path / "m")


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_llava_export_round_trips_in_transformers(tiny_tokenizer, tmp_path, family, tower):
    """transformers loads the export and its processor: the processor's tokens and pixels are vlkit's, and the
    logits are equal. SigLIP has no class token (llava's "default" strategy would drop a real patch) and its
    hidden_states[-1] is not its post-layernorm output: both must come out right."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    arch, layer = (CLIP, -2) if tower == "clip" else (SIGLIP, -1)
    model, proc = make(tiny_tokenizer, family, vpg="mlp", tower=arch, feature_layer=layer)
    export_llava(model, proc, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    stock = AutoProcessor.from_pretrained(tmp_path / "llava")
    imgs = images(2, size=40)  # not the encoder's size: both processors resize
    text = proc.tokenizer.apply_chat_template(CONV, tokenize=False)
    theirs_in = stock(images=imgs, text=text, return_tensors="pt")
    b = batch(proc)
    b["pixel_values"] = proc.pixel_values(imgs)
    assert torch.equal(theirs_in["input_ids"], b["input_ids"])
    assert torch.allclose(theirs_in["pixel_values"], b["pixel_values"], atol=1e-5)
    with torch.no_grad():
        ours = model(**b).logits
        theirs = llava(input_ids=theirs_in["input_ids"], attention_mask=theirs_in["attention_mask"],
                       pixel_values=theirs_in["pixel_values"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_llava_export_refuses_what_llava_cannot_compute(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, "gemma2", vpg="mlp")
    with pytest.raises(VlkitError, match="final_logit_softcapping"):
        export_llava(model, proc, tmp_path / "g")  # llava's head would drop Gemma-2's logit cap
    model, proc = make(tiny_tokenizer, "llama", vpg="mlp", tower=SIGLIP, feature_layer="output")
    with pytest.raises(VlkitError, match="post-layernorm"):
        export_llava(model, proc, tmp_path / "s")
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()  # nothing half-written


def test_blip2_export_loads_in_transformers_with_equal_logits(tiny_tokenizer, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    model, proc = make(tiny_tokenizer, "opt", vpg="qformer", tower=BLIP2_VISION, feature_layer="output", select="full")
    export_blip2(model, proc, tmp_path / "blip2")
    blip = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2").eval()
    enc = proc.encode(CONV[:2], 1)
    b = proc.pad([enc])
    b.pop("labels")
    b["pixel_values"] = proc.pixel_values(images(1))
    with torch.no_grad():
        ours = model(**b).logits
        theirs = blip(**b).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_export_refuses_the_wrong_architecture(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, vpg="qformer")
    with pytest.raises(VlkitError, match="needs an mlp VPG"):
        export_llava(model, proc, tmp_path / "x")
    with pytest.raises(VlkitError, match="needs a BLIP-2 vision tower"):
        export_blip2(model, proc, tmp_path / "y")


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "mistral", "gemma2"])
def test_parts_declare_their_groups_and_norms_are_found_by_structure(tiny_tokenizer, family):
    from torch import nn

    from vlkit.models.llm import norm_modules

    model, _ = make(tiny_tokenizer, family)
    groups = model.param_groups()
    by_name = [p for m in model.llm.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)]
    assert {id(p) for p in groups["llm.norms"]} == {id(p) for p in by_name} and by_name  # today's families: same set
    assert {id(p) for p in groups["vision"]} == {id(p) for p in model.vision.parameters()}
    assert {id(p) for p in groups["vpg"]} == {id(p) for p in model.vpg.parameters()}
    assert {id(p) for p in groups["llm"]} == {id(p) for p in model.llm.parameters()}

    class Gain(nn.Module):  # a norm whose class name says nothing: found all the same
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(w))

        def forward(self, x):
            return x * self.weight

    base = model.llm.base_model
    final = "norm" if hasattr(base, "norm") else "decoder.final_layer_norm"
    owner = base if final == "norm" else base.decoder
    setattr(owner, final.split(".")[-1], Gain(48))
    assert any(isinstance(m, Gain) for m in norm_modules(model.llm))


def test_a_model_saved_before_format_2_loads_with_the_logits_it_had(tmp_path):
    """tests/fixtures/format1_vlm was written by vlkit before the vision stack and fusions (SigLIP read at
    feature_layer -1, its final output then; VPG-C in a key of its own): it loads with exactly its old logits,
    and saved again it round-trips."""
    from pathlib import Path

    from safetensors.torch import load_file

    fixture = Path(__file__).parent / "fixtures" / "format1_vlm"
    expected = load_file(fixture / "expected.safetensors")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]}]
    img = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    model, proc = load_vlm(fixture)
    assert list(model.fusions) == ["tokens", "vpgc"] and model.trainable_groups == ["vpgc"]
    b = proc.pad([proc.encode(conv, 1, add_generation_prompt=True)])
    b["pixel_values"] = proc.pixel_values([img])
    assert torch.equal(b["pixel_values"], expected["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, expected["logits"], rtol=0, atol=1e-6)  # kernels: ~5e-8
    save_vlm(model, tmp_path / "m", proc)
    again, _ = load_vlm(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, expected["logits"], rtol=0, atol=1e-6)


def test_max_length_beyond_the_llms_positions_is_refused_when_built(tiny_tokenizer):
    arch = {**LLMS["opt"], "vocab_size": len(tiny_tokenizer), "max_position_embeddings": 64}
    cfg = VLMConfig(tower=EncoderConfig(arch=CLIP), vpg=VPGConfig(kind="mlp"), llm=LLMSource(arch=arch), max_length=65)
    with pytest.raises(VlkitError, match="max_length: 65 tokens exceed the LLM's 64 positions"):
        VisionLanguageModel.build(cfg)
    VisionLanguageModel.build(cfg.model_copy(update={"max_length": 64}))


@pytest.mark.parametrize("family", ["opt", "gemma2"])
def test_llms_with_tied_embeddings_save_and_load(tiny_tokenizer, tmp_path, family):
    """safetensors stores a tied tensor once; loading accepts the name left out only where it is tied."""
    model, proc = make(tiny_tokenizer, family, vpg="mlp")
    assert model.llm.get_input_embeddings().weight is model.llm.get_output_embeddings().weight
    save_vlm(model, tmp_path / "m", proc)
    loaded, _ = load_vlm(tmp_path / "m")
    b = batch(proc)
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, model(**b).logits)
    assert loaded.llm.get_input_embeddings().weight is loaded.llm.get_output_embeddings().weight
