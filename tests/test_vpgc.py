"""VPG-C (Cheetor): exact equality at init, where it acts, generation with the KV cache, save/load, the
attention guidance of synthetic discriminative training, and the `vpgc` recipe end to end."""

import numpy as np
import pytest
import torch

from test_vlm import CONV, images, make
from vlkit.data.tokenizer import IGNORE_INDEX
from vlkit.errors import VlkitError
from vlkit.models.fusion.vpgc import VPGCConfig, instruction_positions
from vlkit.models.generate import GenerationConfig, generate
from vlkit.models.io import load_vlm, save_vlm
from vlkit.models.llm import decoder_layers

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "what color is the circle?"}]}]


def inputs(proc, conv=CONV, n=2):
    b = proc.pad([proc.encode(conv, n)])
    b["pixel_values"] = proc.pixel_values(images(n))
    return b


def perturb(vpgc, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpgc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_fresh_vpgc_leaves_logits_exactly_equal(tiny_tokenizer, family):
    model, proc = make(tiny_tokenizer, family)
    b = inputs(proc)
    with torch.no_grad():
        base = model(**b).logits
        model.add_fusion("vpgc")
        after = model(**b).logits
    assert torch.equal(base, after)
    perturb(model.fusion("vpgc"))
    with torch.no_grad():
        assert not torch.allclose(model(**b).logits, base)  # and it does act once trained


def test_vpgc_acts_from_its_layer_on_and_only_on_later_positions(tiny_tokenizer):
    """Hidden states entering layers before `layer` are untouched; the completed layer input differs exactly at the
    image tokens."""
    model, proc = make(tiny_tokenizer)
    model.add_fusion("vpgc", VPGCConfig(layer=1))
    perturb(model.fusion("vpgc"))
    b = inputs(proc)
    seen = {}
    layers = decoder_layers(model.llm)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"])
                                                                          .clone()), with_kwargs=True)
    with torch.no_grad():
        model(**b)
        completed = dict(seen)
        model.fusion("vpgc").to_llm.weight.zero_()
        model.fusion("vpgc").to_llm.bias.zero_()
        model(**b)
    assert torch.equal(completed[0], seen[0])
    # hooks run in registration order: VPG-C's (registered first) completes, then ours records the result
    diff = (completed[1] - seen[1]).abs().sum(-1)[0] > 0
    assert torch.equal(diff, b["input_ids"][0] == model.image_token_id)


def test_instruction_position_is_before_the_answer_when_training():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = 7
    assert instruction_positions(mask, labels).tolist() == [2, 5]  # row 2 has no labels: its last token
    assert instruction_positions(mask, None).tolist() == [4, 5]


def test_generation_completes_the_prefill_and_reuses_the_cache(tiny_tokenizer):
    from vlkit.models.generate import prepare

    model, proc = make(tiny_tokenizer)
    prompt = proc.pad([proc.encode(QUESTION, 2, add_generation_prompt=True)], side="left")
    px = proc.pixel_values(images(2))
    with torch.no_grad():
        base = model(prompt["input_ids"], prompt["attention_mask"], pixel_values=px).logits[0, -1]
        model.add_fusion("vpgc")
        perturb(model.fusion("vpgc"), seed=3, scale=3.0)
        completed = model(prompt["input_ids"], prompt["attention_mask"], pixel_values=px).logits[0, -1]
        inputs = prepare(model, proc, [QUESTION], [images(2)])
        with inputs.pop("fused"):
            out = model.llm.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=proc.tokenizer.pad_token_id)
        again = generate(model, proc, [QUESTION], [images(2)], GenerationConfig(max_new_tokens=4), return_ids=True)
    assert not torch.allclose(completed, base)
    assert torch.allclose(out.scores[0][0], completed, atol=1e-5)  # the prefill is completed as in a forward pass
    assert len(out.scores) == 4 and again[0]["ids"] == out.sequences[0].tolist()[:len(again[0]["ids"])]


def test_vpgc_saves_and_loads_with_its_layer(tmp_path, tiny_tokenizer):
    model, proc = make(tiny_tokenizer)
    model.add_fusion("vpgc", VPGCConfig(layer=0))
    perturb(model.fusion("vpgc"))
    model.set_trainable(["vpgc"])
    save_vlm(model, tmp_path / "m", proc)
    loaded, _ = load_vlm(tmp_path / "m")
    assert loaded.fusion("vpgc").layer == 0 and loaded.trainable_groups == ["vpgc"]
    b = inputs(proc)
    with torch.no_grad():
        assert torch.equal(model.eval()(**b).logits, loaded(**b).logits)


def test_vpgc_errors_are_clear(tiny_tokenizer):
    model, _ = make(tiny_tokenizer)
    with pytest.raises(VlkitError, match="vpgc.layer: 5 is out of range for an LLM with 2 layers"):
        model.add_fusion("vpgc", VPGCConfig(layer=5))
    mlp, _ = make(tiny_tokenizer, vpg="mlp")
    with pytest.raises(VlkitError, match="needs a qformer VPG"):
        mlp.add_fusion("vpgc")


def test_attention_guidance_picks_the_least_attended_object(tiny_tokenizer, monkeypatch):
    from vlkit.recipes.vpgc import object_attention
    from vlkit.world.scene import Obj, Scene

    model, _ = make(tiny_tokenizer)  # tower: 32 px images, 8 px patches -> a 4 x 4 grid
    scene = Scene((Obj("circle", "red", "small", 0.125, 0.125), Obj("square", "blue", "small", 0.875, 0.875),
                   Obj("star", "green", "small", 0.625, 0.125)))
    att = torch.zeros(1, 2, 4, 16)
    att[..., 0] = 0.5       # top-left patch: the red circle
    att[..., 15] = 0.3      # bottom-right patch: the blue square
    att[..., 2] = 0.05      # row 0, column 2: the green star
    att[..., 5] = 0.15      # background

    def fake_query(features, queries, output_attentions=False):
        return torch.zeros(1, 4, 32), (att, att)

    monkeypatch.setattr(model.vpg, "query", fake_query)
    (mass,) = object_attention(model, torch.zeros(1, 16, 32), [scene])
    assert mass.tolist() == pytest.approx([0.5, 0.3, 0.05])
    assert int(np.argmin(mass)) == 2


def test_vpgc_recipe_trains_only_vpgc_and_reports_demon(tmp_path, tiny_world, tiny_tokenizer):
    from vlkit.config import load
    from vlkit.recipes.vpgc import VPGCRecipe, run

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "base", proc)
    cfg_w, _ = tiny_world
    cfg = load(VPGCRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"init={tmp_path / 'base'}", "vpgc.layer=1",
        f"data.world.seed={cfg_w.seed}", f"data.world.train_scenes={cfg_w.train_scenes}",
        f"data.world.test_scenes={cfg_w.test_scenes}", "synthetic.scenes=40", "eval.max_per_task=4",
        "demon.mini.instances=2", "demon.max_new_tokens=4", "train.steps=4", "train.batch_size=8", "train.lr=1e-2",
        "train.progress=false"])
    res = run(cfg)
    assert res["synthetic"]["scenes"] == 40 and sum(res["synthetic"]["edits"].values()) == 40
    assert res["vpgc_layer"] == 1
    q = model.vpg.config.hidden_size  # 96; the LLM is 48 wide; 4 queries
    assert res["trainable_params"] == 4 * q + (48 * q + q) + (q * 48 + 48)  # queries + to_query + to_llm
    assert len(res["demon"]["categories"]) == 7 and res["demon"]["counts"]["md_relation"] == 2
    trained, _ = load_vlm(tmp_path / "run" / "model")
    base = dict(model.named_parameters())
    for name, p in trained.named_parameters():
        if not name.startswith("fusions.vpgc."):
            assert torch.equal(p, base[name]), name  # only VPG-C moved
    to_llm = trained.fusion("vpgc").to_llm.weight
    assert not torch.equal(to_llm, torch.zeros_like(to_llm))
