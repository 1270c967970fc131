"""configs/real/*.yaml build on the meta device (no weights, no files) with the published sizes."""

from pathlib import Path

import pytest

from vlkit.models.llm import count_parameters
from vlkit.models.vlm import VisionLanguageModel
from vlkit.recipes import load_config

REAL = Path(__file__).resolve().parent.parent / "configs" / "real"


def build(name):
    cfg, _ = load_config(REAL / name)
    model = VisionLanguageModel.build(cfg.model, device="meta")
    model.set_trainable(cfg.trainable)
    return model


def test_llava15_7b_matches_published_counts():
    m = build("llava15_7b.yaml")
    assert count_parameters(m.llm) == 6_738_415_616          # LLaMA/Vicuna-7B
    assert count_parameters(m.vision) == 303_507_456         # CLIP ViT-L/14-336 vision tower
    assert count_parameters(m.vpg) == 20_979_712             # 1024->4096->4096 MLP with biases
    assert count_parameters(m) == 7_062_902_784              # LLaVA-1.5-7B
    assert m.num_image_tokens == 576                         # 24 x 24 patches
    assert count_parameters(m, trainable_only=True) == 20_979_712


@pytest.mark.parametrize("name,llm,trainable_m", [("blip2_opt2.7b.yaml", 2_651_596_800, 107),
                                                    ("blip2_opt6.7b.yaml", 6_658_473_984, 108)])
def test_blip2_matches_published_counts(name, llm, trainable_m):
    m = build(name)
    assert count_parameters(m.llm) == llm                    # OPT-2.7B / OPT-6.7B
    assert m.num_image_tokens == 32
    # BLIP-2 paper, Table 1: 107M / 108M trainable parameters (Q-Former + queries + projection)
    assert round(count_parameters(m, trainable_only=True) / 1e6) == trainable_m
    assert count_parameters(m.vision) == 985_952_256         # EVA ViT-g/14 as in transformers' Blip2VisionModel


@pytest.mark.parametrize("name,source_width,same_family", [("vpgtrans_opt2.7b_to_opt6.7b.yaml", 2560, True),
                                                            ("vpgtrans_opt2.7b_to_vicuna7b.yaml", 2560, False)])
def test_vpgtrans_real_configs_compose_on_meta(name, source_width, same_family):
    """Source BLIP-2 OPT-2.7B + target LLM on meta: the converted projector has the target's width and the
    target VPG keeps BLIP-2's trainable size."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlkit.models.vision.encoder import on_device
    from vlkit.models.vpg import build_vpg
    from vlkit.models.vpg.converter import compose_projector
    from vlkit.recipes.transfer import projector_of

    cfg, _ = load_config(REAL / name)
    assert cfg.warmup.lr_scale == 5.0 and cfg.warmup.epochs == 1.0 and cfg.train.lr == 1e-4
    source = build("blip2_opt2.7b.yaml")
    arch = dict(cfg.target.arch)
    with on_device("meta"):
        target = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    width = target.config.hidden_size
    assert source.llm.get_input_embeddings().weight.shape[1] == source_width
    assert (target.config.model_type == "opt") == same_family
    vpg = build_vpg(source.config.vpg, source.vision.width, width, source.vision.num_tokens).to("meta")
    converter = nn.Linear(source_width, width, device="meta")
    new = compose_projector(projector_of(source.vpg), converter)
    assert tuple(new.weight.shape) == tuple(projector_of(vpg).weight.shape) == (width, 768)
    assert new.weight.device == torch.device("meta")
    assert round(count_parameters(vpg) / 1e6) == 108              # BLIP-2 with a 4096-wide LLM: 108M trainable


def test_cheetor_vpgc_on_vicuna7b_has_the_published_parameter_count():
    """VPG-C on BLIP-2's Q-Former (32 queries, 768 wide) + Vicuna-7B: 6,320,896 trainable, 0.09% of the LLM."""
    from vlkit.models.fusion.vpgc import VPGCConfig
    from vlkit.models.vlm import LLMSource

    cheetor, _ = load_config(REAL / "cheetor_vicuna7b.yaml")
    vicuna, _ = load_config(REAL / "vpgtrans_opt2.7b_to_vicuna7b.yaml")
    blip2, _ = load_config(REAL / "blip2_opt2.7b.yaml")
    cfg = blip2.model.model_copy(update={"llm": LLMSource(arch=vicuna.target.arch)})
    model = VisionLanguageModel.build(cfg, device="meta")
    model.add_fusion("vpgc", VPGCConfig(layer=cheetor.vpgc.layer))
    model.set_trainable(cheetor.trainable)
    assert count_parameters(model.llm) == 6_738_415_616
    assert count_parameters(model, trainable_only=True) == 6_320_896
    assert round(100 * 6_320_896 / count_parameters(model.llm), 2) == 0.09
    assert model.fusion("vpgc").layer == 16 == len(model.llm.model.layers) // 2


def adapter_groups(name, overrides=()):
    from vlkit.recipes.adapter import build as build_adapter

    cfg, _ = load_config(REAL / name, list(overrides))
    model, _ = build_adapter(cfg, device="meta")
    return {k: sum(p.numel() for p in v) for k, v in model.param_groups().items()}


def test_llama_adapter_v1_7b_count():
    """V1 (Zhang et al. 2023): 10 prompts x 30 layers x 4096 = 1,228,800, + 30 layers x 32 heads = 960 gates."""
    g = adapter_groups("llama_adapter_v1_7b.yaml")
    assert g["adapter.prompts"] == 1_228_800 and g["adapter.gates"] == 960
    assert "adapter.bias_scale" not in g and "adapter.visual_gates" not in g


LLAMA_65B = ["model.llm.arch={model_type: llama, hidden_size: 8192, intermediate_size: 22016, num_hidden_layers: 80, "
             "num_attention_heads: 64, num_key_value_heads: 64, vocab_size: 32000}"]


@pytest.mark.parametrize("form,scales,total", [("input", 5_693_440, 13_811_712), ("output", 6_799_360, 14_917_632)])
def test_llama_adapter_v2_bias_scale_norm_on_65b_shapes(form, scales, total):
    """V2's unlocked bias/scale/norm on LLaMA-65B shapes: biases 6,799,360 and norms 1,318,912 in either form;
    scales on the inputs (the released chat model) or on the outputs (the paper: its "14M")."""
    g = adapter_groups("llama_adapter_v2_7b.yaml", LLAMA_65B + [f"adapter.bias_scale={form}"])
    assert g["adapter.bias_scale"] == 6_799_360 + scales
    assert g["llm.norms"] == 1_318_912
    assert g["adapter.bias_scale"] + g["llm.norms"] == total


def test_llama_adapter_v2_7b_groups():
    """Early fusion: 32 gates for the visual prompts of layer 0, 10 prompts x 31 layers; the projection 1024->4096."""
    g = adapter_groups("llama_adapter_v2_7b.yaml")
    assert g["adapter.visual_gates"] == 32
    assert g["adapter.prompts"] == 10 * 31 * 4096 and g["adapter.gates"] == 31 * 32
    assert g["vpg.projector"] == 1024 * 4096 + 4096


@pytest.mark.parametrize("k,views", [(2, 5), (3, 10)])
def test_sphinx_mixes_four_encoders_into_291_positions_per_view(k, views, tiny_tokenizer):
    """SPHINX (llama_ens5; llama_ens10 at k = 3): 32 Q-Former queries + [CLS; 16 x 16] of CLIP ViT-L/14, ConvNeXt-XXL
    (8 x 8 repeated 2x) and DINOv2 ViT-g/14, channels 1024 + 3072 + 1536 = 5632 -> 5120, + start/end."""
    from vlkit.data.processor import ProcessorConfig, VLProcessor

    cfg, _ = load_config(REAL / "sphinx_1k.yaml", [f"model.tiles.k={k}"])
    m = VisionLanguageModel.build(cfg.model, device="meta")
    m.set_trainable(cfg.trainable)
    q, clip, convnext, dino = m.vision.encoders
    assert [e.num_tokens for e in m.vision.encoders] == [32, 257, 65, 257]
    assert [e.width for e in m.vision.encoders] == [768, 1024, 3072, 1536]
    assert (clip.grid, convnext.grid, dino.grid) == ((16, 16), (8, 8), (16, 16))
    mixer = m.vision.mixer
    assert mixer.grid_proj[0].weight.shape == (5120, 5632) and mixer.grid_proj[1].weight.shape == (5120,)
    assert [p[0].weight.shape for p in mixer.query_proj] == [(5120, 768)]
    assert m.vision.num_tokens == m.image_slots == 291
    assert count_parameters(m.llm) == 13_015_864_320                   # LLaMA-2-13B
    proj = 5632 * 5120 + 5120 + 2 * 5120 + 768 * 5120 + 5120 + 2 * 5120 + 2 * 5120  # projections, norms, tags
    assert count_parameters(m, trainable_only=True) == proj + 13_015_864_320

    proc = VLProcessor(tiny_tokenizer, ProcessorConfig(transforms=[t.config for t in m.vision.transforms],
                                                       image_tokens=m.image_slots, max_length=4096,
                                                       tiles=m.vision.tiles))
    assert proc.num_views == views and proc.slots(None, 1) == [291 * views]  # 1,455 positions (2,910 at k = 3)
    assert [t.size for t in proc.transforms] == [224, 224, 256, 224] and proc.tiler.size == 224
