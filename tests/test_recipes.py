"""Recipes end to end on a tiny world: they train, learn, save in HF format and load back exactly."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionModel

from vlkit.config import load
from vlkit.world.sources import load_splits
from vlkit.eval.world import edit_items
from vlkit.data.tokenizer import load_tokenizer
from vlkit.recipes.clip import CLIPRecipe
from vlkit.recipes.clip import run as run_clip
from vlkit.recipes.lm import LMRecipe, context_edit, pack, perplexity, scene_descriptions
from vlkit.recipes.lm import run as run_lm
from vlkit.train.checkpoint import load_safetensors


def metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lm_overrides(tiny_world, out, family, style):
    cfg, _ = tiny_world
    return [f"output_dir={out}", f"data.world.seed={cfg.seed}", f"data.world.train_scenes={cfg.train_scenes}",
            f"data.world.test_scenes={cfg.test_scenes}", "data.block_size=64", f"model.family={family}",
            f"tokenizer.style={style}", "tokenizer.vocab_size=400", "model.hidden_size=48", "model.num_layers=2",
            "model.num_heads=2", "model.intermediate_size=96", "train.steps=40", "train.batch_size=16",
            "train.lr=5e-3", "train.warmup_steps=5", "train.eval_every=10", "train.log_every=5",
            "train.progress=false"]


def check_lm(tmp_path, tiny_world, family, style):
    out = tmp_path / family
    cfg = load(LMRecipe, None, lm_overrides(tiny_world, out, family, style))
    res = run_lm(cfg)
    rows = metrics(out)
    ppl = [r["eval/ppl"] for r in rows if "eval/ppl" in r]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert loss[-1] < 0.5 * loss[0]
    assert ppl[-1] < ppl[0] and res["heldout_ppl"] == ppl[-1] < res["vocab_size"] / 10
    # Saved in HF format: AutoModelForCausalLM loads it, with the weights of the final checkpoint.
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert model.config.model_type == family
    final = load_safetensors(out / "checkpoints" / "step-0000040" / "trainable.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items() if k in state)
    tok = load_tokenizer(out / "model")
    blocks = pack(tok, load_splits(cfg.data)[1], 64, cfg.data.describe_images)
    with torch.no_grad():
        assert abs(perplexity(model, blocks) - res["heldout_ppl"]) < 1e-4
    assert 0 <= res["context_vqa_acc"] <= 1  # questions answered with the scene written in the context
    forms = res["context_vqa"]["per_form"]
    assert sum(f["n"] for f in forms.values()) == res["context_vqa"]["n"] and all("?" in f for f in forms)
    anyway = res["context_vqa_any_order"]  # the same questions, each scene's objects named in a drawn order
    assert anyway["n"] == anyway["change"]["n"] == res["context_vqa"]["n"] and "items" not in res["context_vqa"]
    assert abs(anyway["change"]["diff"] - (anyway["acc"] - res["context_vqa"]["acc"])) < 1e-9
    # "what changed?" with both scenes in words (the VPG-C experiment's ceiling), scored per item
    test = load_splits(cfg.data)[1]
    edit = next(r for r in test if r["task"] == "edit")
    before, after = scene_descriptions(edit)
    assert before != after
    edits = context_edit(model, tok, test, 8)
    assert edits["n"] == 8 and len(edits["items"]["edit_object"]) == 8 and edits["edit_rougeL"]["n"] == 8
    ex = edits["examples"][0]
    assert edit_items([ex["answer"]], [ex["reference"]])["edit_rougeL"] == edits["items"]["edit_rougeL"][:1]
    return tok


def test_lm_llama_and_opt_train_save_and_load(tmp_path, tiny_world):
    tok_llama = check_lm(tmp_path, tiny_world, "llama", "llama")
    tok_opt = check_lm(tmp_path, tiny_world, "opt", "opt")
    text = "what color is the circle?"
    assert tok_llama(text)["input_ids"] != tok_opt(text)["input_ids"]  # different tokenizers
    # a curriculum's next stage: `init` goes on from the saved LM, its tokenizer and its sizes (model.* ignored)
    first = tmp_path / "llama" / "model"
    cfg = load(LMRecipe, None, lm_overrides(tiny_world, tmp_path / "next", "opt", "opt") + [
        f"init={first}", "model.hidden_size=32", "train.steps=10", "train.lr=1e-9", "train.warmup_steps=1"])
    res = run_lm(cfg)
    assert res["init"] == str(first) and res["family"] == "llama"
    before = AutoModelForCausalLM.from_pretrained(first).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "next" / "model")
    assert after.config.hidden_size == 48
    assert all(torch.allclose(after.state_dict()[k], v, atol=1e-6) for k, v in before.items())
    assert load_tokenizer(tmp_path / "next" / "model")(text)["input_ids"] == tok_llama(text)["input_ids"]


def test_clip_vision_encoder(tmp_path, tiny_world):
    cfg_w, root = tiny_world
    out = tmp_path / "clip"
    cfg = load(CLIPRecipe, None, [
        f"output_dir={out}", f"data.world.seed={cfg_w.seed}", f"data.world.train_scenes={cfg_w.train_scenes}",
        f"data.world.test_scenes={cfg_w.test_scenes}", "tokenizer.vocab_size=400", "vision.hidden_size=48",
        "vision.num_layers=2", "vision.num_heads=2", "vision.intermediate_size=96", "text.hidden_size=48",
        "text.intermediate_size=96", "projection_dim=32", "eval_size=30", "train.steps=60",
        "train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=5", "train.log_every=5",
        "train.progress=false"])
    res = run_clip(cfg)
    loss = [r["loss"] for r in metrics(out) if "loss" in r]
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3])
    assert res["heldout_i2t_r1"] > 3 * res["heldout_chance"]
    # Stock HF format: CLIPVisionModel + CLIPImageProcessor; the processor reproduces vlkit's transform.
    vision = CLIPVisionModel.from_pretrained(out / "vision")
    proc = CLIPImageProcessor.from_pretrained(out / "vision")
    from PIL import Image

    img = Image.open(next((root / "img").glob("test-*.png"))).convert("RGB")
    ours = cfg.vision.transform()([img])
    theirs = proc(images=img, return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert vision(pixel_values=ours).last_hidden_state.shape == (1, 65, 48)


def test_instruct_with_lora_trains_adapters_and_saves_them_merged(tmp_path, tiny_world, tiny_tokenizer):
    from test_vlm import make
    from vlkit.models.io import load_vlm, save_vlm
    from vlkit.recipes.instruct import InstructRecipe, run as run_instruct

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "base", proc)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    cfg_w, _ = tiny_world
    cfg = load(InstructRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"init={tmp_path / 'base'}", "trainable=[vpg.projector,lora]",
        "lora.r=4", "lora.target_modules=[q_proj,v_proj]", "lora.save_adapter=true", f"data.world.seed={cfg_w.seed}",
        f"data.world.train_scenes={cfg_w.train_scenes}", f"data.world.test_scenes={cfg_w.test_scenes}",
        "data.tasks=[caption,vqa]", "data.mix={caption: 1, vqa: 1}", "eval.max_per_task=4", "eval.tasks=[vqa]",
        "cache_features=false", "train.steps=6", "train.batch_size=8", "train.lr=1e-2", "train.progress=false"])
    res = run_instruct(cfg)
    q = sum(4 * (m.in_features + m.out_features) for n, m in model.llm.named_modules()
            if n.endswith(("q_proj", "v_proj")))  # rank 4: A is (4 x in), B is (out x 4)
    assert res["trainable_params"] == q + sum(p.numel() for p in model.vpg.projector.parameters())
    merged, _ = load_vlm(tmp_path / "run" / "model")
    after = merged.llm.state_dict()
    assert set(after) == set(before)  # a plain HF LLM again: the adapters are folded in
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) and k.endswith("weight") for k in changed)
    # the adapters also as a stock PEFT adapter: onto the init model's LLM, the merged LLM's logits
    from peft import PeftModel

    assert (tmp_path / "run" / "lora" / "adapter_config.json").is_file()
    base, _ = load_vlm(tmp_path / "base")
    peft_llm = PeftModel.from_pretrained(base.llm, tmp_path / "run" / "lora").eval()
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        assert torch.allclose(peft_llm(input_ids=ids).logits, merged.llm(input_ids=ids).logits, atol=1e-5)
