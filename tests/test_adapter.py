"""LLaMA-Adapter V2 as the `adapter` fusion: exact at init on every LLaMA-like family, the gated prompt attention
against its definition, early vs late fusion, no token slots, generation with the cache, save/load, the
published V1 parameter count, clear refusals."""

import json

import pytest
import torch

from test_vlm import CLIP, LLMS, images
from test_vlm import batch as vlm_batch
from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.models.fusion.adapter import AdapterConfig, gated_prompt_attention
from vlkit.models.generate import GenerationConfig, generate
from vlkit.models.io import load_vlm, save_vlm
from vlkit.models.llm import decoder_layers
from vlkit.models.vision import EncoderConfig
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vpg import VPGConfig

CONV = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
        {"role": "assistant", "content": "red"}]
THREE = {"num_hidden_layers": 3}


def make(tok, family="llama", fusions=None, queries=4, **arch):
    torch.manual_seed(0)
    llm = {**LLMS[family], **arch, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = VLMConfig(tower=EncoderConfig(arch=CLIP), vpg=VPGConfig(kind="qformer", num_queries=queries),
                    llm=LLMSource(arch=llm), max_length=128, fusions=[] if fusions is None else fusions)
    model = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    return model, VLProcessor.for_model(tok, model)


def batch(proc, conv=CONV, n=1):
    return vlm_batch(proc, conv, n)


def perturb(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fresh_adapter_leaves_logits_exactly_equal(tiny_tokenizer, family, fusion):
    model, proc = make(tiny_tokenizer, family, **THREE)
    b = batch(proc)
    with torch.no_grad():
        base = model.llm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        model.add_fusion("adapter", AdapterConfig(prompt_length=4, fusion=fusion, bias_scale="none"))
        after = model(**b).logits
    assert proc.config.image_tokens == 0 and model.image_slots == 0  # an image takes no slots in the text
    assert torch.equal(base, after)
    perturb(model.fusion("adapter"))
    with torch.no_grad():
        assert not torch.allclose(model(**b).logits, base)


def test_gated_prompt_attention_matches_its_definition(tiny_tokenizer):
    """V1 Eq. 5-8 written out by hand for one layer: RoPE on the token queries only, the layer's own k/v
    projections of the prompts, softmax over the prompts alone, tanh(gate) per head; GQA keys repeated."""
    model, _ = make(tiny_tokenizer, "llama")
    attn = decoder_layers(model.llm)[0].self_attn
    torch.manual_seed(1)
    hidden, prompts = torch.randn(2, 5, 48), torch.randn(1, 3, 48)
    pos = torch.arange(5)[None].expand(2, 5)
    cos, sin = model.llm.model.rotary_emb(hidden, pos)
    gate = torch.tensor([0.3, -0.7, 1.1, 0.0])
    got = gated_prompt_attention(attn, hidden, cos, sin, prompts, None, gate)
    d, heads = 12, 4
    q = (hidden @ attn.q_proj.weight.T).view(2, 5, heads, d).transpose(1, 2)
    half = d // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], -1)
    q = q * cos[:, None] + rot * sin[:, None]
    k = (prompts @ attn.k_proj.weight.T).view(1, 3, 2, d).transpose(1, 2).repeat_interleave(2, 1)
    v = (prompts @ attn.v_proj.weight.T).view(1, 3, 2, d).transpose(1, 2).repeat_interleave(2, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) * torch.tanh(gate)[None, :, None, None]
    want = (w @ v).transpose(1, 2).reshape(2, 5, heads * d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :, 3 * d:], torch.zeros(2, 5, d))  # head 3: gate 0 contributes nothing


def test_early_fusion_puts_the_image_in_the_first_layers_only(tiny_tokenizer):
    """Early: changing the image changes what the first layer's attention adds (and, through it, what follows);
    late, with prompts in the top two of three layers: the first layer is untouched, the image enters at layer 1."""
    for fusion, first_image_layer in (("early", 0), ("late", 1)):
        model, proc = make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_length": 4, "prompt_layers": 2,
                                                              "fusion": fusion, "bias_scale": "none"}], **THREE)
        adapter = model.fusion("adapter")
        perturb(adapter)
        assert adapter.visual_layer_ids == ([0] if fusion == "early" else [])
        assert adapter.prompt_layer_ids == [1, 2]
        extra = {}
        for i, layer in enumerate(decoder_layers(model.llm)):
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: extra.__setitem__(i, a[0].clone()))
        b = batch(proc)
        with torch.no_grad():
            model(**b)
            first = dict(extra)
            b["pixel_values"] = proc.pixel_values(images(1, seed=5))
            model(**b)
        changed = {i for i in extra if not torch.equal(extra[i], first[i])}
        assert min(changed) == first_image_layer  # what attention adds changes from the layer the image enters
        if fusion == "early":  # and the top layers' prompts never hold the image, even while it is active
            x = model.fusion_inputs(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"],
                                    images_per_row=b["images_per_row"])
            with model.fused(x):
                assert torch.equal(adapter._prompts_of(1)[0], adapter.prompts[0][None])
                assert adapter._prompts_of(0)[0] is not None  # while the first layer's are the image's


def test_rows_without_images_and_several_images_per_row(tiny_tokenizer):
    """A text-only row in a batch sees no visual prompts (the same logits as alone); a two-image row sees both."""
    model, proc = make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_length": 4,
                                                          "bias_scale": "none"}])
    perturb(model.fusion("adapter"))
    text = [{"role": "user", "content": "what color is the circle?"}, {"role": "assistant", "content": "red"}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]},
           {"role": "assistant", "content": "no"}]
    encs = [proc.encode(text, 0), proc.encode(two, 2)]
    b = proc.pad(encs)
    b["pixel_values"] = proc.pixel_values(images(2))
    with torch.no_grad():
        both = model(**b).logits
        alone = model(**proc.pad([encs[0]])).logits
        n = alone.shape[1]
        torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=1e-5)
        b2 = proc.pad([encs[1]])
        b2["pixel_values"] = proc.pixel_values([images(2)[0], images(2, seed=3)[1]])
        assert not torch.allclose(model(**b2).logits, both[1:, :b2["input_ids"].shape[1]])  # the second image counts


def test_generation_with_cache_equals_full_recompute(tiny_tokenizer):
    model, proc = make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_length": 4,
                                                          "bias_scale": "none"}])
    perturb(model.fusion("adapter"))
    conv = CONV[:1]
    out = generate(model, proc, [conv], [images(1)], GenerationConfig(max_new_tokens=6), return_ids=True)[0]
    enc = proc.pad([proc.encode(conv, 1, add_generation_prompt=True)])
    ids = enc["input_ids"]
    px = proc.pixel_values(images(1))
    with torch.no_grad():
        for want in out["ids"]:  # greedy, no cache: each next token from the whole sequence
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                           images_per_row=torch.tensor([1])).logits
            nxt = int(logits[0, -1].argmax())
            assert nxt == want
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)


def test_adapter_saves_and_loads(tmp_path, tiny_tokenizer):
    model, proc = make(tiny_tokenizer, "qwen2", fusions=[{"kind": "adapter", "prompt_length": 4, "fusion": "late",
                                                          "bias_scale": "none"}])
    perturb(model.fusion("adapter"))
    b = batch(proc)
    with torch.no_grad():
        want = model(**b).logits
    save_vlm(model, tmp_path / "m", proc)
    loaded, lproc = load_vlm(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)
    assert lproc.config.image_tokens == 0
    assert loaded.config.fusions[0]["fusion"] == "late"


def test_groups_and_the_v1_count_on_llama_7b():
    """V1 on LLaMA-7B: 10 prompts in the top 30 of 32 layers of width 4096, a gate per head: 1,228,800 + 960."""
    arch = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000}
    cfg = VLMConfig(tower=EncoderConfig(arch=CLIP), vpg=VPGConfig(kind="linear"), llm=LLMSource(arch=arch),
                    fusions=[{"kind": "adapter", "prompt_length": 10, "prompt_layers": 30, "visual_layers": 0,
                              "bias_scale": "none"}])
    model = VisionLanguageModel.build(cfg, device="meta")
    groups = model.param_groups()
    assert sum(p.numel() for p in groups["adapter.prompts"]) == 1_228_800
    assert sum(p.numel() for p in groups["adapter.gates"]) == 960
    assert "adapter.visual_gates" not in groups and "adapter.bias_scale" not in groups


def test_refusals_are_clear(tiny_tokenizer):
    with pytest.raises(VlkitError, match="opt"):
        make(tiny_tokenizer, "opt", fusions=[{"kind": "adapter", "bias_scale": "none"}])
    with pytest.raises(VlkitError, match="prompt_length is 10"):
        make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "fusion": "late", "bias_scale": "none"}])
    with pytest.raises(VlkitError, match="drop the tokens fusion"):
        make(tiny_tokenizer, "llama", fusions=[{"kind": "tokens"}, {"kind": "adapter", "bias_scale": "none"}])
    with pytest.raises(VlkitError, match="exceed"):
        make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_layers": 2, "bias_scale": "none"}])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("form", ["output", "input"])
def test_bias_scale_in_the_adapter_is_exact_at_init_and_merges(tmp_path, tiny_tokenizer, family, form):
    """The full V2 (prompts, early visual prompts, bias/scale): exact at init; once trained, the LLM's bias/scale
    merges into plain HF weights that AutoModelForCausalLM loads with the same logits (prompts gated off)."""
    from transformers import AutoModelForCausalLM

    from vlkit.models.fusion.adapter import merged_llm

    model, proc = make(tiny_tokenizer, family, sliding_window=None) if family == "mistral" else make(tiny_tokenizer,
                                                                                                   family)
    b = batch(proc)
    keys = set(model.llm.state_dict())
    with torch.no_grad():
        base = model.llm(input_ids=b["input_ids"]).logits
        model.add_fusion("adapter", AdapterConfig(prompt_length=4, bias_scale=form))
        assert torch.equal(model(**b).logits, base)
    assert set(model.llm.state_dict()) == keys  # the base checkpoint's keys are unchanged
    adapter = model.fusion("adapter")
    perturb(adapter.bias_scale, scale=0.1)
    with torch.no_grad():
        hooked = model.llm(input_ids=b["input_ids"]).logits  # no images: the visual prompts are absent
        assert not torch.allclose(hooked, base)
        merged_llm(model).save_pretrained(tmp_path / "plain")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
        torch.testing.assert_close(plain(input_ids=b["input_ids"]).logits, hooked, atol=1e-5, rtol=1e-4)


def test_adapter_file_is_small_and_loads_back(tmp_path, tiny_tokenizer):
    from vlkit.models.fusion.adapter import load_adapter, save_adapter

    model, proc = make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_length": 4}])
    perturb(model.fusion("adapter"), scale=0.1)
    b = batch(proc)
    with torch.no_grad():
        want = model(**b).logits
    path = save_adapter(model.fusion("adapter"), tmp_path / "adapter.safetensors")
    fresh, _ = make(tiny_tokenizer, "llama")  # the same base weights (seed 0), no adapter yet
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, want)
    n_adapter = sum(p.numel() for p in model.fusion("adapter").parameters())
    assert n_adapter < sum(p.numel() for p in model.llm.parameters()) / 2
    with pytest.raises(VlkitError, match="adapter settings"):
        other, _ = make(tiny_tokenizer, "llama", fusions=[{"kind": "adapter", "prompt_length": 2}])
        load_adapter(other, path)


def test_adapter_recipe_trains_its_two_streams_and_nothing_else(tmp_path, tiny_world, tiny_tokenizer):
    """From a tokens-fusion VLM: the adapter replaces the fusion (no image slots), captions train the projection and
    the early gates, text-only instructions the prompts, gates, bias/scale and norms; all else stays as it was."""
    from test_vlm import make as make_tokens_vlm
    from vlkit.config import load
    from vlkit.recipes.adapter import AdapterRecipe, run

    model, proc = make_tokens_vlm(tiny_tokenizer)
    save_vlm(model, tmp_path / "base", proc)
    cfg_w, _ = tiny_world
    streams = [{"name": "captions", "data": {"world": {"seed": cfg_w.seed, "train_scenes": cfg_w.train_scenes,
                                                       "test_scenes": cfg_w.test_scenes}, "tasks": ["caption"]},
                "trainable": ["vpg.projector", "adapter.visual_gates"]},
               {"name": "instructions", "data": {"world": {"seed": cfg_w.seed, "train_scenes": cfg_w.train_scenes,
                                                           "test_scenes": cfg_w.test_scenes}, "tasks": ["vqa"]},
                "text_only": True, "trainable": ["adapter.prompts", "adapter.gates", "adapter.bias_scale",
                                                 "llm.norms"]}]
    cfg = load(AdapterRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"init={tmp_path / 'base'}", "adapter.prompt_length=4",
        f"streams={json.dumps(streams)}", "eval.tasks=[caption,vqa]", "eval.max_per_task=4", "train.steps=4",
        "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1", "train.progress=false"])
    res = run(cfg)
    assert res["num_image_tokens"] == 0 and res["streams"]["captions"] == ["vpg.projector", "adapter.visual_gates"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("loss/captions" in r, "loss/instructions" in r) for r in rows if "loss" in r] == \
        [(True, False), (False, True)] * 2  # interleaved 1:1
    trained, tproc = load_vlm(tmp_path / "run" / "model")
    assert tproc.config.image_tokens == 0 and list(trained.fusions) == ["adapter"]
    assert (tmp_path / "run" / "model" / "adapter.safetensors").is_file()
    base = dict(model.named_parameters())
    groups = trained.param_groups()
    moved = {id(p) for g in ("vpg.projector", "adapter.visual_gates", "adapter.prompts", "adapter.gates",
                             "adapter.bias_scale", "llm.norms") for p in groups[g]}
    for name, p in trained.named_parameters():
        if id(p) not in moved:
            assert torch.equal(p, base[name]), name  # the tower, the Q-Former, the LLM's matrices: untouched
    assert not torch.equal(trained.fusion("adapter").visual_gates, torch.zeros_like(trained.fusion("adapter")
                                                                                    .visual_gates))
    bs = trained.fusion("adapter").bias_scale
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in bs.bias_params())


def test_experiment_claims_are_paired_and_honest(tmp_path):
    """The report's verdicts come from paired intervals over the same items: a clear gain holds, a tie is within
    noise, and "close to full tuning" needs the interval above the tolerance."""
    import numpy as np

    from vlkit.experiments import adapter as exp

    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.5

    def run(hits, params: int):
        items = {"vqa_acc": hits.astype(float).tolist(), "caption_cider": rng.random(500).tolist()}
        blind = {"vqa_acc": base.astype(float).tolist(), "caption_cider": rng.random(500).tolist()}
        return {"eval": {"image": {"vqa_acc": hits.mean(), "caption_cider": 0.5}, "blind": {"vqa_acc": 0.2},
                         "items": {"image": items, "blind": blind}}, "trainable_params": params,
                "total_params": 10_000, "train_seconds": 1.0}

    tuned = base | (rng.random(1000) < 0.2)        # 0.6: fixes 20% of the base's misses
    shuffled = tuned.copy()
    swap = rng.choice(1000, 20, replace=False)     # 20 items flipped either way: a tie
    shuffled[swap] = ~shuffled[swap]
    runs = {"full": run(tuned, 10_000), "adapter": run(tuned, 100), "late": run(base, 100),
            "sequential": run(shuffled, 100), "paper_data": run(tuned, 100)}
    checks = {n: {"text": {"items": base.astype(float).tolist()},
                  "vqa_expert": {"items": (tuned | (rng.random(1000) < 0.3)).astype(float).tolist()}} for n in runs}
    s = exp.summarize(runs, checks, {"acc": 0.5, "lo": 0.47, "hi": 0.53, "n": 1000,
                                     "expert_alone": {"acc": 0.4, "lo": 0.37, "hi": 0.43, "n": 1000}})
    verdicts = {c["claim"]: c["verdict"] for c in s["claims"]}
    assert verdicts["early fusion beats late fusion"] == "holds"
    assert verdicts["parameter-efficient tuning is close to full fine-tuning"] == "holds"
    assert verdicts["joint training of disjoint groups beats sequential"] == "not shown (within noise)"
    assert verdicts["the caption expert helps"] == "holds"
    assert verdicts["captions + language-only instructions give visual instruction following"] == "holds"
    assert "unlocking bias/scale/norm helps" not in verdicts  # its run is absent: no claim is made
    assert s["methods"]["adapter"]["trainable_pct"] == 1.0
    from vlkit.experiments import provenance

    s.update(provenance=provenance(), seconds={"total": 1.0})
    md = exp.report(s, "adapter.png")
    assert "| early fusion beats late fusion |" in md and "**holds**" in md
    assert "answers 0.400 [0.370, 0.430] of the questions from the expert's caption" in md
