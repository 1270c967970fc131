"""iLLaMA: the published sizes, where the class token looks under each mask, the soft mask's two ends (exact),
its schedules, RoPE, and the model as a VLM tower."""

import pytest
import torch

from vlkit.models.vision.illama import SIZES, ILlama, ILlamaConfig, mask_alpha, rope, soft_mask

TINY = dict(image_size=32, patch_size=8, width=48, depth=2, heads=3, num_classes=5)


@pytest.mark.parametrize("size,count", [("tiny", 5_701_096), ("small", 22_018_024), ("base", 86_502_376),
                                        ("large", 310_445_032)])
def test_published_sizes_on_meta(size, count):
    """iLLaMA-T/S/B/L at 224 px, patch 16, 1000 classes: the parameter counts of the released training logs."""
    with torch.device("meta"):
        model = ILlama(ILlamaConfig(**SIZES[size]))
    assert sum(p.numel() for p in model.parameters()) == count


def model(**kw):
    torch.manual_seed(0)
    return ILlama(ILlamaConfig(**{**TINY, **kw})).eval()


def test_the_class_token_sees_only_itself_first_and_every_patch_last():
    x = torch.randn(2, 3, 32, 32)
    first = model(attention="causal", cls_position="first").attention_maps(x)[:, :, 0]   # the class token's row
    assert torch.equal(first[..., 1:], torch.zeros_like(first[..., 1:]))                   # only itself
    assert torch.allclose(first[..., 0], torch.ones_like(first[..., 0]))
    last = model(attention="causal", cls_position="last").attention_maps(x)[:, :, -1]
    assert bool((last > 0).all())                                                          # every patch and itself


def test_soft_mask_ends_are_exact():
    """alpha = 1: bidirectional attention; alpha = 0: the causal mask multiplied in after the softmax (no
    renormalisation), both bit for bit."""
    x = torch.randn(2, 3, 32, 32)
    soft, bi = model(attention="soft"), model(attention="bidirectional")
    soft.alpha = 1.0
    with torch.no_grad():
        assert torch.equal(soft(x), bi(x))
        soft.alpha = 0.0
        a = soft.attention_maps(x)
        b = bi.attention_maps(x) * torch.tril(torch.ones(17, 17))
        assert torch.equal(a, b)
        assert not torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)))  # rows no longer sum to 1
    assert torch.equal(soft_mask(3, 0.25), torch.tensor([[1, .25, .25], [1, 1, .25], [1, 1, 1]]))


def test_standard_causal_mask_is_before_the_softmax():
    a = model(attention="causal").attention_maps(torch.randn(1, 3, 32, 32))
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)))
    assert torch.equal(a.triu(1), torch.zeros_like(a))


def test_mask_schedules():
    assert [mask_alpha(s, 10, "constant", 1.0, 2) for s in (0, 19, 20, 50)] == [1.0, 1.0, 0.0, 0.0]
    assert [mask_alpha(s, 10, "linear", 1.0, 2) for s in (0, 10, 20)] == [1.0, 0.5, 0.0]
    assert mask_alpha(0, 10, "none", 1.0, 2) == 0.0


def test_rope_rotates_adjacent_pairs_by_position():
    x = torch.zeros(1, 1, 3, 4)
    x[..., 0] = 1.0  # the first pair (channels 0, 1) is (1, 0) at every position
    y = rope(x, 10000.0)
    t = torch.arange(3.0)
    torch.testing.assert_close(y[0, 0, :, :2], torch.stack([t.cos(), t.sin()], -1))
    assert torch.equal(y[..., 2:], x[..., 2:])
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)  # relative: q_i . k_j depends on i - j only
    shifted = torch.cat([torch.zeros(1, 1, 2, 8), q], 2), torch.cat([torch.zeros(1, 1, 2, 8), k], 2)
    torch.testing.assert_close(rope(q, 1e4) @ rope(k, 1e4).transpose(-1, -2),
                               (rope(shifted[0], 1e4) @ rope(shifted[1], 1e4).transpose(-1, -2))[..., 2:, 2:])


def test_illama_as_a_vlm_tower(tmp_path, tiny_tokenizer):
    """A saved iLLaMA is a tower: patch tokens (class token dropped wherever it sits), or every token; a VLM on it
    trains, saves and loads with the same logits."""
    from test_vlm import CONV, LLMS, images
    from vlkit.data.processor import VLProcessor
    from vlkit.models.io import load_vlm, save_vlm
    from vlkit.models.vision import EncoderConfig, build_encoder
    from vlkit.models.vision.illama import save_illama
    from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
    from vlkit.models.vpg import VPGConfig

    m = model(cls_position="last", attention="causal")
    save_illama(m, tmp_path / "illama")
    enc = build_encoder(EncoderConfig(kind="illama", path=str(tmp_path / "illama"), feature_layer="output"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = enc(x)
        assert feats.shape == (2, 16, 48)
        assert torch.equal(feats, m.norm(m.hidden_states(x)[-1])[:, :16])  # the patches; the class token is last
    full = build_encoder(EncoderConfig(kind="illama", path=str(tmp_path / "illama"), select="full"))
    assert full(x).shape == (2, 17, 48)
    tok = tiny_tokenizer
    llm = {**LLMS["llama"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = VLMConfig(tower=EncoderConfig(kind="illama", path=str(tmp_path / "illama")),
                    vpg=VPGConfig(kind="mlp"), llm=LLMSource(arch=llm), max_length=128)
    vlm = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>")).eval()
    proc = VLProcessor.for_model(tok, vlm)
    b = proc.pad([proc.encode(CONV, 2)])
    b["pixel_values"] = proc.pixel_values(images(2))
    with torch.no_grad():
        want = vlm(**b).logits
    save_vlm(vlm, tmp_path / "vlm", proc)
    loaded, _ = load_vlm(tmp_path / "vlm")
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)


def test_mixup_and_cutmix_targets_follow_the_pixels():
    import numpy as np

    from vlkit.recipes.illama import Augment, mix

    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    y = torch.tensor([0, 1])
    plain, t = mix(x, y, 3, Augment(mixup=0, cutmix=0, smoothing=0.3), np.random.default_rng(0))
    assert torch.equal(plain, x) and torch.allclose(t, torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]))
    for seed in range(5):
        for a in (Augment(mixup=0.8, cutmix=0, smoothing=0), Augment(mixup=0, cutmix=1.0, smoothing=0)):
            xm, tm = mix(x, y, 3, a, np.random.default_rng(seed))
            share = float(xm[0].mean())  # the share of image 1 (all ones) in mixed image 0
            assert abs(float(tm[0, 1]) - share) < 1e-6 and abs(float(tm[0].sum()) - 1) < 1e-6


def test_illama_recipe_trains_and_schedules_the_mask(tmp_path, tiny_world):
    import json

    from vlkit.config import load
    from vlkit.models.vision.illama import load_illama
    from vlkit.recipes.illama import ILlamaRecipe, run

    cfg_w, _ = tiny_world
    cfg = load(ILlamaRecipe, None, [
        f"output_dir={tmp_path / 'run'}", f"data.world.seed={cfg_w.seed}",
        f"data.world.train_scenes={cfg_w.train_scenes}", f"data.world.test_scenes={cfg_w.test_scenes}",
        "model={image_size: 32, patch_size: 8, width: 48, depth: 2, heads: 3, num_classes: 6}",
        "mask={schedule: linear, cutoff_epochs: 1.0}", "train.steps=8", "train.batch_size=32", "train.eval_every=4",
        "train.log_every=1", "train.warmup_steps=0", "train.progress=false"])
    res = run(cfg)
    assert 0 <= res["acc"] <= 1 and len(res["items"]) == res["n"] == cfg_w.test_scenes
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["alpha"] for r in rows if "alpha" in r]
    per_epoch = cfg_w.train_scenes / 32
    assert alphas[0] == 1.0 and alphas[1] == pytest.approx(1 - 1 / per_epoch)  # linear, set once per step
    assert alphas[-1] == 0.0  # past the cutoff (one epoch of 150 / 32 steps)
    assert [c["step"] for c in res["curve"]] == [4, 8]
    m = load_illama(tmp_path / "run" / "model")
    assert m.cfg.cls_position == "last" and m.cfg.num_classes == 6


def test_experiment_reads_collapse_and_fix_off_paired_seeds():
    import numpy as np

    from vlkit.experiments import illama as exp
    from vlkit.experiments import provenance

    rng = np.random.default_rng(0)
    majority = (rng.random(500) < 0.3).astype(float)  # chance 0.3: the most frequent class's share

    def seeds(p):
        out = []
        for s in range(3):
            items = np.maximum(majority, rng.random(500) < p) if p else majority
            out.append({"acc": float(items.mean()), "items": items.tolist(), "chance": 0.3, "n": 500, "params": 10,
                        "train_seconds": 1.0, "curve": [{"step": 50, "acc": 0.2}, {"step": 100, "acc": float(
                            items.mean())}]})
        return out

    runs = {"vit": seeds(0.5), "causal_first": seeds(0.0), "causal_last": seeds(0.5), "soft_constant": seeds(0.5)}
    s = exp.summarize(runs)
    verdicts = {c["claim"]: c["verdict"] for c in s["claims"]}
    assert verdicts["a causal mask with the class token first collapses"] == "holds"
    assert verdicts["the class token after the patches fixes it"] == "holds"
    assert verdicts["the soft mask helps (constant)"] == "not shown (within noise)"
    assert "the soft mask helps (linear)" not in verdicts  # not run: no claim
    s.update(provenance=provenance(), seconds={"total": 1.0})
    md = exp.report(s, "accuracy.png")
    assert "| causal, class token first |" in md and "vs chance 0.300" in md
