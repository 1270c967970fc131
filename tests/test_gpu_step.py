"""benchmarks/gpu_step.py: its FLOP count, its peak table, the real shape's sizes (on meta) and a tiny CPU run."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_flops_of_a_hand_computed_case(gpu_step):
    s = gpu_step.Sizes(llm_params=1000, llm_layers=2, llm_width=8, vpg_params=50, visual_tokens=4,
                       tower_params=300, tower_layers=3, tower_width=6, tower_tokens=5)
    terms = gpu_step.train_flops(s, batch=2, seq_len=10)
    assert terms == {"llm_weights": 6 * 1000 * 2 * 10,            # 120,000
                     "llm_attention": 12 * 2 * 8 * 2 * 10 * 10,   # 38,400
                     "vpg": 6 * 50 * 2 * 4,                       # 2,400
                     "tower_weights": 2 * 300 * 2 * 5,            # 6,000
                     "tower_attention": 4 * 3 * 6 * 2 * 5 * 5}    # 3,600
    assert sum(terms.values()) == 170_400


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                                       ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("NVIDIA L4", 121e12),
                                       ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12),
                                       ("NVIDIA L40", None), ("Tesla T4", None)])
def test_peak_table_reads_cuda_device_names(gpu_step, name, peak):
    assert gpu_step.peak_flops(name) == peak


def test_real_shape_has_the_published_sizes_on_meta(gpu_step):
    model, _ = gpu_step.build("real", "meta")
    d, f, side, patch = 1024, 4096, 336, 14                   # CLIP ViT-L/14-336
    tokens = (side // patch) ** 2 + 1                          # 576 patches + class token
    clip_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    positions = tokens * d
    clip = d + 3 * patch * patch * d + positions + 2 * d + 24 * clip_layer + 2 * d  # class, conv, pos, pre/post LN
    h, i, kv, vocab = 2048, 5632, 4 * 64, 32000                # TinyLlama-1.1B: 4 KV heads of 64
    llama = 2 * vocab * h + 22 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # untied embeddings and head
    mlp = 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    assert (clip, llama) == (303_507_456, 1_100_048_384)
    assert gpu_step.parameter_counts(model) == {"vision": clip, "vpg": mlp, "llm": llama, "total": clip + mlp + llama,
                                                "trainable": mlp + llama}
    assert gpu_step.Sizes.of(model) == gpu_step.Sizes(
        llm_params=llama - vocab * h, llm_layers=22, llm_width=h, vpg_params=mlp, visual_tokens=576,
        tower_params=clip - positions, tower_layers=24, tower_width=d, tower_tokens=577)


def test_real_shape_on_cpu_is_refused(gpu_step, capsys):
    with pytest.raises(SystemExit):
        gpu_step.main(["--device", "cpu", "--shape", "real"])
    assert "--allow-cpu-real" in capsys.readouterr().err


def test_tiny_shape_runs_on_cpu(gpu_step, tmp_path):
    out = tmp_path / "out.json"
    gpu_step.main(["--device", "cpu", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--gen-batches", "1,2",
                   "--gen-reps", "1", "--peak-tflops", "0.001", "--json", str(out)])
    r = json.loads(out.read_text())

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    for k in ("vlkit", "llava"):
        t = r["train"][k]
        assert all(positive(t[m]) for m in ("step_s", "tokens_per_s", "tflops_per_s", "mfu", "first_loss"))
        assert t["peak_memory_gib"] is None  # CUDA only
        assert t["mfu"] == pytest.approx(r["flops_per_step"] / t["step_s"] / 1e9)
    assert positive(r["train_step_ratio_vlkit_over_llava"])
    # the same weights and batch: the same loss before either model has stepped
    assert r["train"]["vlkit"]["first_loss"] == pytest.approx(r["train"]["llava"]["first_loss"], rel=1e-5)
    assert [g["rows"] for g in r["generate"]] == [1, 2]
    for g in r["generate"]:
        assert all(positive(g[m]) for m in ("vlkit_tokens_per_s", "llava_tokens_per_s", "ratio_vlkit_over_llava"))
        assert g["differing_rows"] == 0  # fp32 on CPU: the same greedy tokens
    assert r["seq_len"] == 16 + 32 and r["image_tokens"] == 16 and r["batch"] == 2
    sizes = gpu_step.Sizes(**r["sizes"])
    assert r["flops_per_step"] == sum(gpu_step.train_flops(sizes, 2, 48).values()) == sum(r["flops_terms"].values())
    assert r["parameters"]["llm"] == sizes.llm_params + 400 * 64  # the input embedding table is not counted
    for k in ("command", "date", "torch", "transformers", "device_name", "compile", "params", "autocast"):
        assert k in r
