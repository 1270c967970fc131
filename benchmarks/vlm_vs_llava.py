"""vlkit's VisionLanguageModel against transformers' LlavaForConditionalGeneration of identical shape.

Same weights (vlkit's model exported to llava), same batch, same machine, one run:
  1. training step (forward + backward + AdamW) with the projector trainable (LLaVA stage 1), vlkit as its
     trainer runs it (`loss_only`: the LM head and loss at supervised positions alone; the tower stops at the
     layer it reads), and vlkit with the full loss (what `loss_only` contributes);
  2. the same step for vlkit with cached vision features (the frozen tower skipped);
  3. greedy generation tokens/s at batch 1 and 8 (prompts each with an image; vlkit's own decoding loop against
     transformers' generate), end to end and in the decoding phase alone, same tokens asserted.

    python benchmarks/vlm_vs_llava.py [--steps 20] [--vocab 32000] [--gen-batches 1,8] [--json out.json]

`--vocab` widens the LLM's vocabulary (the tokenizer's 400 ids stay; the head is that wide), as a real LLM's is:
the LM head's share of the step, which `loss_only` mostly removes, grows with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import train_bpe
from vlkit.models.export import export_llava
from vlkit.models.generate import GenerationConfig, generate
from vlkit.models.vision import EncoderConfig
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vpg import VPGConfig

TOWER = {"model_type": "clip_vision_model", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
         "num_attention_heads": 6, "image_size": 224, "patch_size": 16}
LLM = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
       "num_attention_heads": 8, "num_key_value_heads": 8}
# --tiny: the same code at a size the tests run in seconds (a smoke run, not a measurement)
TINY_TOWER = {**TOWER, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_LLM = {**LLM, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2}


def build(batch: int, vocab: int | None = None, tiny: bool = False):
    torch.manual_seed(0)
    tok = train_bpe(["describe the image. a large red circle at the top left and a small blue star."] * 50, 400)
    arch = {**LLM, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}
    arch = {**arch, **TINY_LLM} if tiny else arch
    cfg = VLMConfig(tower=EncoderConfig(arch=TINY_TOWER if tiny else TOWER), vpg=VPGConfig(kind="mlp"),
                    llm=LLMSource(arch=arch), max_length=512)
    model = VisionLanguageModel.build(cfg, image_token_id=tok.convert_tokens_to_ids("<image>"))
    if vocab is not None:
        torch.manual_seed(1)
        model.llm.resize_token_embeddings(vocab, mean_resizing=False)
    proc = VLProcessor.for_model(tok, model)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
            {"role": "assistant", "content": "a large red circle at the top left and a small blue star."}]
    b = proc.pad([proc.encode(conv, 1)] * batch)
    rng = np.random.default_rng(0)
    b["pixel_values"] = proc.pixel_values([rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(batch)])
    return model, proc, b, conv


def time_interleaved(variants: dict, steps: int) -> dict[str, list[float]]:
    """Training steps of several (loss_fn, params, batch) variants taken in turn, so that drift in the
    machine's speed hits all alike. The first 3 rounds are warm-up."""
    opts = {k: torch.optim.AdamW(params, lr=1e-4) for k, (_, params, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(steps + 3):
        for k, (forward, _, batch) in variants.items():
            t0 = time.perf_counter()
            loss = forward(batch)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return times


def generation(model, llava, proc, prompt, batch: int, new_tokens: int, reps: int = 5) -> dict:
    """Greedy answers of `new_tokens` each for `batch` prompts with an image, both models from the same inputs:
    tokens/s end to end (vision + prefill + decode) and in the decoding phase alone (the time of `new_tokens`
    tokens minus that of 1, over new_tokens - 1). The end-of-sequence token ends no answer (vlkit's ignore_eos,
    llava's generation config without one). vlkit runs its public `generate` from the conversations."""
    imgs = [[np.zeros((224, 224, 3), np.uint8)]] * batch
    pb = proc.pad([proc.encode(prompt, 1, add_generation_prompt=True)] * batch, side="left")
    px = proc.pixel_values([im[0] for im in imgs])
    llava.generation_config.eos_token_id = None

    def ours(n):
        out = generate(model, proc, [prompt] * batch, imgs, GenerationConfig(max_new_tokens=n, ignore_eos=True),
                       image_inputs={"pixel_values": px}, return_ids=True)
        return torch.tensor([o["ids"] for o in out])

    def theirs(n):
        return llava.generate(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"], pixel_values=px,
                              max_new_tokens=n, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)[:, -n:]

    def seconds(fn, n):
        fn(n)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(n)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t = {k: {1: [], new_tokens: []} for k in ("vlkit", "llava")}
    for _ in range(2):  # interleaved, so that drift in the machine's speed hits both alike
        for k, fn in (("vlkit", ours), ("llava", theirs)):
            for n in (1, new_tokens):
                t[k][n].append(seconds(fn, n))
    best = {k: {n: min(v) for n, v in d.items()} for k, d in t.items()}
    e2e = {k: batch * new_tokens / best[k][new_tokens] for k in best}
    dec = {k: batch * (new_tokens - 1) / max(best[k][new_tokens] - best[k][1], 1e-9) for k in best}
    with torch.no_grad():
        a, b = ours(new_tokens), theirs(new_tokens)
    same = torch.equal(a, b)
    if not same:
        print("first differing position:", int((a != b).any(0).nonzero()[0]), a[0].tolist(), b[0].tolist())
    return {"tokens_per_s": e2e, "ratio": e2e["vlkit"] / e2e["llava"], "decode_tokens_per_s": dec,
            "decode_ratio": dec["vlkit"] / dec["llava"],
            "first_token_s": {k: best[k][1] for k in best}, "same_greedy_tokens": same}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8],
                    help="Batch sizes of the generation comparison (comma-separated).")
    ap.add_argument("--vocab", type=int, default=None, help="LLM vocabulary width (default: the tokenizer's).")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="A tiny shape: a smoke run of the code, not a measurement.")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    from transformers import LlavaForConditionalGeneration

    model, proc, batch, conv = build(args.batch, args.vocab, args.tiny)
    with tempfile.TemporaryDirectory() as d:
        export_llava(model, proc, d)
        llava = LlavaForConditionalGeneration.from_pretrained(d)
    model.train(), llava.train()
    model.set_trainable(["vpg.projector"])
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)

    with torch.no_grad():
        feats = model.vision(batch["pixel_values"])
    cached = dict(batch, image_features=feats)
    cached.pop("pixel_values")
    stock = {k: v for k, v in batch.items() if k != "images_per_row"}  # llava places images by their tokens
    ours_params = [p for p in model.parameters() if p.requires_grad]
    t = time_interleaved({
        "vlkit": (lambda b: model(**b, loss_only=True).loss, ours_params, batch),
        "full_loss": (lambda b: model(**b).loss, ours_params, batch),
        "llava": (lambda b: llava(**b).loss, [p for p in llava.parameters() if p.requires_grad], stock),
        "cached": (lambda b: model(**b, loss_only=True).loss, ours_params, cached)}, args.steps)
    ours, theirs, ours_cached = t["vlkit"], t["llava"], t["cached"]
    tower_times, llava_tower_times = [], []
    tower = llava.model.vision_tower if hasattr(llava, "model") else llava.vision_tower
    with torch.no_grad():
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model.vision(batch["pixel_values"])
            tower_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tower(batch["pixel_values"], output_hidden_states=True)
            llava_tower_times.append(time.perf_counter() - t0)

    model.eval(), llava.eval()
    # same greedy tokens from both, on identical weights: the timed training steps above moved each
    # model's projector on its own (float rounding differs), so export the trained model again
    with tempfile.TemporaryDirectory() as d:
        export_llava(model, proc, d)
        llava = LlavaForConditionalGeneration.from_pretrained(d).eval()
    gen = {str(b): generation(model, llava, proc, conv[:1], b, args.new_tokens) for b in args.gen_batches}

    med = statistics.median
    result = {
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(), "batch": args.batch,
        "vocab": model.llm.get_output_embeddings().out_features, "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": model.num_image_tokens,
        "train_step_s": {"vlkit": med(ours), "llava": med(theirs), "vlkit_cached_features": med(ours_cached),
                         "vlkit_full_loss": med(t["full_loss"])},
        "train_step_ratio_vlkit_over_llava": med(ours) / med(theirs),
        "train_step_ratio_vlkit_full_loss_over_llava": med(t["full_loss"]) / med(theirs),
        "tower_forward_s": med(tower_times),
        "llava_tower_forward_s": med(llava_tower_times),
        "tower_share_of_step": med(tower_times) / med(ours),
        "cached_speedup": med(ours) / med(ours_cached),
        "generate": gen,  # per batch size
        "generate_ratio_vlkit_over_llava": {b: g["ratio"] for b, g in gen.items()},
        "decode_ratio_vlkit_over_llava": {b: g["decode_ratio"] for b, g in gen.items()},
        "same_greedy_tokens": all(g["same_greedy_tokens"] for g in gen.values()),
        "command": "python benchmarks/vlm_vs_llava.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
