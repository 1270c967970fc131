"""Loading vlkit model directories: straight into the asked dtype and device without random init, sharded or not,
and through transformers' AutoConfig / AutoModel."""

import json
import subprocess
import sys

import pytest
import torch

from test_vlm import BLIP2_VISION, CLIP, SIGLIP, batch, make
from vlkit.errors import VlkitError
from vlkit.models.io import INDEX, MODEL_TYPE, is_vlm_directory, load_vlm, save_vlm, shard_bytes
from vlkit.models.vlm import VisionLanguageModel


def saved(tok, tmp_path, family="llama", vpg="mlp", tower=CLIP, **kw):
    model, proc = make(tok, family, vpg, tower)
    save_vlm(model, tmp_path / "m", proc, **kw)
    return model, proc, tmp_path / "m"


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits.float()


@pytest.mark.parametrize("family,vpg,tower", [("llama", "mlp", CLIP), ("qwen2", "linear", SIGLIP),
                                              ("opt", "qformer", BLIP2_VISION), ("gemma2", "mlp", CLIP)])
def test_fp32_load_computes_exactly_the_saved_models_logits(tiny_tokenizer, tmp_path, family, vpg, tower):
    """Every part's computed buffers (rotary inv_freq, position ids, Gemma's embedding scale) come out right."""
    model, proc, d = saved(tiny_tokenizer, tmp_path, family, vpg, tower)
    loaded, _ = load_vlm(d, dtype="fp32")
    b = batch(proc)
    assert torch.equal(logits(loaded, b), logits(model, b))
    assert dict(loaded.named_buffers()).keys() == dict(model.named_buffers()).keys()
    for (name, ours), (_, theirs) in zip(loaded.named_buffers(), model.named_buffers()):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bf16_load_is_bf16_with_integer_buffers_untouched_and_close_logits(tiny_tokenizer, tmp_path, family):
    model, proc, d = saved(tiny_tokenizer, tmp_path, family)
    loaded, _ = load_vlm(d, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ints = {n: b for n, b in loaded.named_buffers() if not b.is_floating_point()}
    assert ints and all(b.dtype == torch.int64 for b in ints.values())  # CLIP's position ids
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in ints.items())
    b = batch(proc)
    ours, ref = logits(loaded, b), logits(model, b)
    assert not torch.equal(ours, ref) and (ours - ref).abs().max() < 0.05 * ref.abs().max()
    again, _ = load_vlm(d, dtype="bf16")
    assert torch.equal(logits(again, b), ours)  # the same bf16 model each time


def test_auto_dtype_keeps_what_is_stored_tensor_by_tensor(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, vpg="mlp")
    model.llm.to(torch.bfloat16)  # a bf16 LLM under an fp32 VPG and tower
    save_vlm(model, tmp_path / "m", proc)
    for dtype in (None, "auto"):
        loaded, _ = load_vlm(tmp_path / "m", dtype=dtype)
        assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}


def random_numbers_drawn(fn) -> int:
    """How many random numbers torch draws while `fn` runs (every random op's output counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    drawn = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.Tag.nondeterministic_seeded in func.tags:
                drawn.append(out.numel())
            return out

    with Count():
        fn()
    return sum(drawn)


def test_loading_runs_no_random_initialisation(tiny_tokenizer, tmp_path):
    """Building a model the usual way draws a random number per weight; loading draws none but CLIP's class
    embedding, which its constructor draws itself (C numbers)."""
    model, _, d = saved(tiny_tokenizer, tmp_path)
    weights = sum(p.numel() for p in model.parameters())
    assert random_numbers_drawn(lambda: VisionLanguageModel.build(model.config)) > weights / 2  # so this can fail
    for dtype in (None, "bf16"):
        assert random_numbers_drawn(lambda dtype=dtype: load_vlm(d, dtype=dtype)) == CLIP["hidden_size"]


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT: tied embeddings, stored once across shards
def test_sharded_directories_round_trip(tiny_tokenizer, tmp_path, family):
    model, proc, d = saved(tiny_tokenizer, tmp_path, family, max_shard_size=40_000)
    index = json.loads((d / INDEX).read_text())
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert not (d / "model.safetensors").exists() and len(files) > 2
    assert files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    big = max(p.numel() * p.element_size() for p in model.state_dict().values())
    assert all((d / f).stat().st_size <= max(40_000, big) + 10_000 for f in files)  # + the header
    loaded, _ = load_vlm(d)
    b = batch(proc)
    assert torch.equal(logits(loaded, b), logits(model, b))
    tied = loaded.llm.get_input_embeddings().weight is loaded.llm.get_output_embeddings().weight
    assert tied == (family == "opt")
    save_vlm(loaded, d, proc)  # the default size: one file again, no stale shards
    assert sorted(p.name for p in d.glob("*.safetensors")) == ["model.safetensors"] and not (d / INDEX).exists()
    assert torch.equal(logits(load_vlm(d)[0], b), logits(model, b))


def test_a_missing_or_truncated_shard_is_one_line_naming_it(tiny_tokenizer, tmp_path):
    _, _, d = saved(tiny_tokenizer, tmp_path, max_shard_size="40KB")
    second = d / sorted(p.name for p in d.glob("model-*.safetensors"))[1]
    second.write_bytes(second.read_bytes()[:1000])
    with pytest.raises(VlkitError, match=f"{second.name}: corrupt, truncated") as e:
        load_vlm(d)
    assert "\n" not in str(e.value)
    second.unlink()
    with pytest.raises(VlkitError, match=f"{second.name}: weights file not found"):
        load_vlm(d)


def test_shard_sizes_and_device_and_dtype_names(tiny_tokenizer, tmp_path):
    assert shard_bytes("5GB") == 5 * 10**9 and shard_bytes("1.5MiB") == 3 * 2**19 and shard_bytes(123) == 123
    for bad in ("5 parsecs", 0, "-1GB"):
        with pytest.raises(VlkitError, match="max_shard_size"):
            shard_bytes(bad)
    _, _, d = saved(tiny_tokenizer, tmp_path)
    with pytest.raises(VlkitError, match="dtype: 'fp8' is not a dtype"):
        load_vlm(d, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(VlkitError, match="device: 'cuda:0' asks for CUDA"):
            load_vlm(d, "cuda:0")
    model, _ = load_vlm(d, torch.device("cpu"))  # positional device, as every caller passes it
    assert next(model.parameters()).device.type == "cpu"
    assert is_vlm_directory(d) and not is_vlm_directory(tmp_path)


def test_auto_classes_load_vlkit_directories(tiny_tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModel

    from vlkit.models import auto

    _, proc, d = saved(tiny_tokenizer, tmp_path)
    assert auto.MODEL_TYPE == MODEL_TYPE
    config = AutoConfig.from_pretrained(d)
    assert config.model_type == MODEL_TYPE and config.image_token_id == proc.image_token_id
    model = AutoModel.from_pretrained(d, dtype=torch.bfloat16, device_map="cpu")
    assert isinstance(model, VisionLanguageModel) and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    b = batch(proc)
    assert torch.equal(logits(model, b), logits(load_vlm(d, dtype="bf16")[0], b))
    assert AutoModel.from_pretrained(d, device_map={"": "cpu"}, dtype="auto").vpg.linear_1.weight.dtype == torch.float32
    with pytest.raises(VlkitError, match="vlkit loads a model onto one device"):
        AutoModel.from_pretrained(d, device_map={"llm": 0, "vision": "cpu"})
    with pytest.raises(VlkitError, match=r"dtype and device_map only, not \['quantization_config'\]"):
        AutoModel.from_pretrained(d, quantization_config={"load_in_8bit": True})


def test_import_vlkit_stays_cheap_and_registers_when_transformers_loads(tiny_tokenizer, tmp_path):
    _, _, d = saved(tiny_tokenizer, tmp_path)
    code = ("import sys, vlkit; assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            f"from transformers import AutoConfig; print(AutoConfig.from_pretrained({str(d)!r}).model_type)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == MODEL_TYPE, res.stderr[-2000:]


def test_the_attention_kernel_is_chosen_per_run_and_not_saved(tiny_tokenizer, tmp_path):
    from vlkit.models.llm import attention_kwargs

    model, proc = make(tiny_tokenizer)
    cfg = model.config.model_copy(deep=True)
    cfg.llm.attn_implementation = "eager"
    eager = VisionLanguageModel.build(cfg, image_token_id=model.image_token_id)
    assert eager.llm.config._attn_implementation == "eager" and model.llm.config._attn_implementation == "sdpa"
    save_vlm(eager, tmp_path / "m", proc)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vlm"]["llm"]["attn_implementation"] is None
    assert load_vlm(tmp_path / "m")[0].llm.config._attn_implementation == "sdpa"
    import importlib.util

    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    assert attention_kwargs(None) == {}
    assert attention_kwargs("auto") == {"attn_implementation": "flash_attention_2" if flash else "sdpa"}
    if not flash:
        with pytest.raises(VlkitError, match="flash_attention_2 needs the flash-attn package"):
            attention_kwargs("flash_attention_2")
    with pytest.raises(VlkitError, match="'fast' is not one of auto, sdpa"):
        attention_kwargs("fast")
