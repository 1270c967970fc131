"""Doing less work for the same numbers: a tower runs only the layers whose output is read, and training computes
the LM head and the loss only where labels are supervised (in chunks) -- each exact against the full computation."""

import copy

import pytest
import torch

from test_vlm import BLIP2_VISION, CLIP, DINO, LLMS, SIGLIP, batch, make
from vlkit.models.vision import EncoderConfig
from vlkit.models.vision.encoder import build_encoder


@pytest.mark.parametrize("arch", [CLIP, SIGLIP, DINO, BLIP2_VISION], ids=lambda a: a["model_type"])
@pytest.mark.parametrize("layer", [-2, 1])
def test_a_tower_runs_only_the_layers_it_reads_and_gives_the_same_tokens(arch, layer):
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(arch={**arch, "num_hidden_layers": 3}, feature_layer=layer, select="full"))
    # the reference on a copy: transformers records hidden states with hooks it installs on its first call
    reference = copy.deepcopy(enc.model)
    px = torch.randn(2, 3, 32, 32)
    ran = []
    hooks = [m.register_forward_hook(lambda *_: ran.append(1)) for m in enc.layers()]
    with torch.no_grad():
        ours = enc.tokens(px)
        assert len(ran) == layer % 4  # -2 of 3 layers: 2 run; 1: 1 runs
        full = reference(pixel_values=px, output_hidden_states=True).hidden_states[layer]
    for h in hooks:
        h.remove()
    assert torch.equal(ours, enc.layout.to_tokens(full))
    assert len(enc.layers()) == 3  # the model keeps every layer (saving and export see them all)


@pytest.mark.parametrize("family", sorted(LLMS))
def test_the_loss_on_supervised_positions_equals_the_full_one_with_its_gradients(tiny_tokenizer, family):
    model, proc = make(tiny_tokenizer, family)
    model.set_trainable(["vpg", "llm"])
    b = batch(proc)
    assert int((b["labels"] != -100).sum()) < b["labels"].numel() / 2  # most positions are not supervised

    def run(**kw):
        model.zero_grad(set_to_none=True)
        loss = model(**b, **kw).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full, full_grads = run()
    for chunk in (None, 3):  # 3 rows a chunk: several chunks, each recomputed in the backward pass
        sparse, grads = run(loss_only=True, loss_chunk=chunk)
        assert torch.allclose(sparse, full, rtol=1e-6, atol=1e-6)
        assert all(torch.allclose(a, g, rtol=1e-5, atol=1e-6) for a, g in zip(full_grads, grads))
    out = model(**b, loss_only=True)
    assert out.logits is None  # nothing of the vocabulary's width was kept


def test_families_the_sparse_loss_does_not_know_take_the_full_path(tiny_tokenizer):
    from vlkit.models.llm import SPARSE_LOSS_FAMILIES

    assert set(LLMS) <= SPARSE_LOSS_FAMILIES  # every family the tests build is checked above or in test_vlm
    model, proc = make(tiny_tokenizer, "llama")
    b = batch(proc)
    model.llm.config.model_type = "unknown_family"  # what an unlisted family looks like to the check
    try:
        out = model(**b, loss_only=True)
    finally:
        model.llm.config.model_type = "llama"
    assert out.logits is not None  # computed the usual way


def test_a_batch_without_images_keeps_the_visual_path_in_the_graph_under_data_parallelism(tiny_tokenizer,
                                                                                             monkeypatch):
    """DDP waits for the gradient of every trainable parameter: a text-only batch gives the VPG zero gradients
    (not none) and the same loss, bit for bit; one process leaves them out (no gradient: AdamW does not move them)."""
    import vlkit.models.vlm as V

    model, proc = make(tiny_tokenizer)
    model.set_trainable(["vpg"])
    conv = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}]
    b = proc.pad([proc.encode(conv, 0)])
    alone = model(**b).loss
    monkeypatch.setattr(V, "_data_parallel", lambda: True)
    loss = model(**b).loss
    loss.backward()
    assert torch.equal(loss, alone)
    grads = [p.grad for p in model.vpg.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    monkeypatch.setattr(V, "_data_parallel", lambda: False)
    assert not model(**b).loss.requires_grad  # one process: the frozen LLM alone, nothing trainable in the graph


def test_the_llava_benchmark_runs_at_a_tiny_size():
    """A smoke run of benchmarks/vlm_vs_llava.py (its figures mean nothing at this size): both models step,
    generate the same greedy tokens, and the report has every figure."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "vlm_vs_llava.py"
    spec = importlib.util.spec_from_file_location("vlm_vs_llava", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--tiny", "--steps", "1", "--batch", "2", "--new-tokens", "2", "--vocab", "512",
                       "--gen-batches", "1,2"])
    assert out["same_greedy_tokens"] and out["vocab"] == 512
    assert set(out["train_step_s"]) == {"vlkit", "llava", "vlkit_cached_features", "vlkit_full_loss"}
    assert all(v > 0 for v in out["train_step_s"].values())
    assert set(out["generate"]) == {"1", "2"} and all(r > 0 for r in out["decode_ratio_vlkit_over_llava"].values())
