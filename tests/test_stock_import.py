"""Stock transformers checkpoints in (load_vlm of a llava or blip-2 directory) and out (`vlkit export`): tiny random
stock models built here compute the same logits as their vlkit imports; what vlkit cannot represent is refused."""

import json
import shutil

import pytest
import torch

from test_runs import one_line, vlkit
from test_vlm import BLIP2_VISION, CLIP, CONV, LLMS, SIGLIP, batch, images, make
from vlkit.errors import VlkitError
from vlkit.models.export import export_blip2, export_llava
from vlkit.models.io import load_vlm, save_vlm

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def text_config(tok, family, **kw):
    return {**LLMS[family], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, **kw}


def stock_llava(tok, directory, tower="clip", family="llama", strategy="default", tie=False, resize="crop"):
    """A random LlavaForConditionalGeneration with a LlavaProcessor whose image processor crops (CLIP's processor)
    or pads to a square (LLaVA-1.5's)."""
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessorPil, LlavaProcessor)

    special = 1 if tower == "clip" else 0
    seq = 16 + special - (strategy == "default")
    cfg = LlavaConfig(vision_config=CLIP if tower == "clip" else SIGLIP, text_config=text_config(tok, family,
                      tie_word_embeddings=tie), image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, image_seq_length=seq,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                               resample=3, image_mean=MEAN, image_std=STD) if resize == "crop" else \
        LlavaImageProcessorPil(size={"height": 32, "width": 32}, do_pad=True, do_center_crop=False, resample=3,
                               image_mean=MEAN, image_std=STD)
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=special, chat_template=tok.chat_template).save_pretrained(directory)
    return directory


def stock_blip2(tok, directory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessorPil

    qformer = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "encoder_hidden_size": 32, "cross_attention_frequency": 1}
    cfg = Blip2Config(vision_config=BLIP2_VISION, qformer_config=qformer, text_config=text_config(tok, "opt"),
                      num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)  # distinct queries (transformers starts them equal)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    BlipImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=MEAN,
                          image_std=STD).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stock(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("stock")
    return {"llava": stock_llava(tiny_tokenizer, root / "llava"), "blip-2": stock_blip2(tiny_tokenizer, root / "blip2")}


def edited(source, directory, file, change):
    """A copy of a stock directory with one JSON file changed by `change(dict)`."""
    shutil.copytree(source, directory)
    data = json.loads((directory / file).read_text())
    change(data)
    (directory / file).write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("tower,family,strategy,tie,resize", [("clip", "llama", "default", False, "crop"),
                                                              ("siglip", "qwen2", "full", True, "pad")])
def test_llava_imports_with_the_stock_processor_and_logits(tiny_tokenizer, tmp_path, tower, family, strategy, tie,
                                                           resize):
    """The imported processor makes the stock processor's tokens and pixels (non-square images cropped or padded);
    the imported model computes the stock model's logits from them."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    d = stock_llava(tiny_tokenizer, tmp_path / "llava", tower, family, strategy, tie, resize)
    theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    ours, proc = load_vlm(d)
    assert proc.transforms[0].config.resize == resize and proc.transforms[0].mean == MEAN
    assert (ours.llm.get_output_embeddings().weight is ours.llm.get_input_embeddings().weight) == tie
    assert (theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight) == tie
    imgs = images(2, size=40) + [images(1, size=48)[0][:, :40]]
    conv = CONV + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and here?"}]}]
    stock_in = AutoProcessor.from_pretrained(d)(images=imgs, text=tiny_tokenizer.apply_chat_template(
        conv, tokenize=False), return_tensors="pt")
    b = proc.pad([proc.encode(conv, 3)])
    assert torch.equal(stock_in["input_ids"], b["input_ids"])
    assert torch.allclose(stock_in["pixel_values"], proc.pixel_values(imgs), atol=1e-5)
    inputs = {k: stock_in[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5)


def test_a_llava_checkpoint_in_the_older_key_layout_imports_the_same(stock, tmp_path):
    """Checkpoints written before transformers 4.52 (llava-hf's) name the language model language_model.model.*."""
    from safetensors.torch import load_file, save_file

    old = shutil.copytree(stock["llava"], tmp_path / "old")
    layout = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
    state = load_file(old / "model.safetensors")
    renamed = {next((new + k[len(p):] for p, new in layout if k.startswith(p)), k): v for k, v in state.items()}
    assert not any(k.startswith("model.") for k in renamed)
    save_file(renamed, str(old / "model.safetensors"), metadata={"format": "pt"})
    ours, proc = load_vlm(old)
    ref, _ = load_vlm(stock["llava"])
    b = batch(proc)
    with torch.no_grad():
        assert torch.equal(ours(**b).logits, ref(**b).logits)


def test_blip2_imports_with_the_stock_logits(tiny_tokenizer, stock):
    from transformers import Blip2ForConditionalGeneration

    theirs = Blip2ForConditionalGeneration.from_pretrained(stock["blip-2"]).eval()
    ours, proc = load_vlm(stock["blip-2"])
    assert ours.vpg.num_tokens == 4
    assert ours.llm.get_output_embeddings().weight is ours.llm.get_input_embeddings().weight  # OPT ties them
    b = proc.pad([proc.encode(CONV[:2], 1)])
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
              "pixel_values": proc.pixel_values(images(1, size=40))}
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5)


def test_vlkit_export_import_round_trips_exactly(tiny_tokenizer, tmp_path):
    for fmt, (model, proc) in {"llava": make(tiny_tokenizer, "llama", "mlp", CLIP),
                               "blip-2": make(tiny_tokenizer, "opt", "qformer", BLIP2_VISION, feature_layer="output",
                                              select="full")}.items():
        (export_llava if fmt == "llava" else export_blip2)(model, proc, tmp_path / fmt)
        imported, proc2 = load_vlm(tmp_path / fmt)
        b = batch(proc)
        assert proc2.encode(CONV, 2) == proc.encode(CONV, 2)
        with torch.no_grad():
            assert torch.equal(imported(**b).logits, model(**b).logits), fmt
        save_vlm(imported, tmp_path / f"{fmt}-vlkit", proc2)  # an import is a vlkit model like any other
        with torch.no_grad():
            assert torch.equal(load_vlm(tmp_path / f"{fmt}-vlkit")[0](**b).logits, model(**b).logits), fmt


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])  # fp16: transformers keeps BLIP-2's Q-Former in fp32
def test_stock_directories_load_in_the_asked_dtype_and_device(stock, dtype):
    for kind, d in stock.items():
        ref, proc = load_vlm(d, torch.device("cpu"))
        model, _ = load_vlm(d, "cpu", dtype)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16 if dtype == "bf16" else torch.float16}, kind
        b = proc.pad([proc.encode(CONV[:2], 1)])
        b["pixel_values"] = proc.pixel_values(images(1))
        with torch.no_grad():
            ours, full = model(**b).logits.float(), ref(**b).logits
        assert (ours - full).abs().max() < 0.05 * full.abs().max(), kind


def set_key(key, value):
    def change(d):
        d[key] = value
    return change


def refused_llava(stock, tmp_path):
    """(directory, what the refusal says) for llava checkpoints vlkit cannot represent."""
    llava = stock["llava"]
    return [
        (edited(llava, tmp_path / "layers", "config.json", set_key("vision_feature_layer", [-2, -1])),
         "concatenates several layers"),
        (edited(llava, tmp_path / "strategy", "config.json", set_key("vision_feature_select_strategy", "tokens")),
         "vision_feature_select_strategy.* got tokens"),  # transformers' own validation
        (edited(llava, tmp_path / "bilinear", "processor_config.json",
                lambda d: d["image_processor"].update(resample=2)), "resize bicubic"),
        (edited(llava, tmp_path / "token", "config.json", set_key("image_token_index", 5)),
         "its tokenizer's <image> is id 2, config.json's image token is 5"),
        (edited(llava, tmp_path / "seq", "config.json", set_key("image_seq_length", 576)),
         "image_seq_length is 576, but its tower gives 16 tokens"),
    ]


def test_what_vlkit_cannot_represent_is_refused_in_one_line(tiny_tokenizer, stock, tmp_path):
    siglip = stock_llava(tiny_tokenizer, tmp_path / "siglip", "siglip", strategy="full")
    cases = refused_llava(stock, tmp_path) + [
        (edited(siglip, tmp_path / "siglip-default", "config.json", set_key("vision_feature_select_strategy",
                                                                              "default")), "0 class tokens"),
        (edited(stock["blip-2"], tmp_path / "eps", "config.json",
                lambda d: d["qformer_config"].update(layer_norm_eps=1e-6)), "qformer_config.layer_norm_eps is 1e-06"),
    ]
    for directory, says in cases:
        with pytest.raises(VlkitError, match=says) as e:
            load_vlm(directory)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{directory}: "), str(e.value)
    cut = shutil.copytree(stock["llava"], tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:2000])
    with pytest.raises(VlkitError, match="cut: cannot load the llava checkpoint"):
        load_vlm(cut)


def test_a_stock_llava_directory_trains_through_a_recipe_init(tmp_path, tiny_world, stock):
    from vlkit.config import load
    from vlkit.recipes.instruct import InstructRecipe, run

    w, _ = tiny_world
    cfg = load(InstructRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"init={stock['llava']}", "trainable=[vpg.projector]",
        f"data.world.seed={w.seed}", f"data.world.train_scenes={w.train_scenes}",
        f"data.world.test_scenes={w.test_scenes}", "data.tasks=[vqa]", "eval.max_per_task=2", "eval.tasks=[vqa]",
        "cache_features=false", "train.steps=2", "train.batch_size=4", "train.progress=false"])
    res = run(cfg)
    before, _ = load_vlm(stock["llava"])
    after, _ = load_vlm(tmp_path / "run" / "model")
    assert res["steps"] == 2 and res["trainable_params"] == sum(p.numel() for p in before.vpg.parameters())
    assert not torch.equal(after.vpg.linear_2.weight, before.vpg.linear_2.weight)
    assert torch.equal(after.llm.lm_head.weight, before.llm.lm_head.weight)


def test_cli_exports_and_refuses_in_one_line(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, "llama", "mlp", CLIP)
    save_vlm(model, tmp_path / "m", proc)
    res = vlkit("export", "llava", tmp_path / "m", tmp_path / "out")
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "out"), res.stderr[-1500:]
    b = batch(proc)
    with torch.no_grad():
        assert torch.equal(load_vlm(tmp_path / "out")[0](**b).logits, model(**b).logits)
    for args in (("llava", tmp_path / "m", tmp_path / "out"),  # exists: no --overwrite
                 ("blip-2", tmp_path / "m", tmp_path / "b2"),  # an mlp VPG has no BLIP-2 counterpart
                 ("onnx", tmp_path / "m", tmp_path / "o")):
        res = vlkit("export", *args)
        assert one_line(res)[0], res.stderr
    assert not (tmp_path / "b2").exists() and not (tmp_path / "o").exists()
    assert vlkit("export", "llava", tmp_path / "m", tmp_path / "out", "--overwrite").returncode == 0
