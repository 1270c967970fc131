"""A LLaVA-1.5-shaped VLM (random weights) on one GPU: vlkit's VisionLanguageModel against transformers'
LlavaForConditionalGeneration of identical shape and weights (vlkit's model exported to llava), one run.

    python benchmarks/gpu_step.py [--batch 8] [--seq 512] [--params fp32|bf16] [--json out.json]
    python benchmarks/gpu_step.py --device cpu          # CPU: the tiny shape (--shape tiny), for tests

Shape `real`: CLIP ViT-L/14-336 (1024 wide, 24 layers, 577 tokens; hidden_states[-2] without the class token:
576 features) -> 2-layer GELU MLP (LLaVA-1.5) -> a TinyLlama-1.1B-shaped LLaMA (2048 wide, 22 layers, 32 heads,
4 KV heads, MLP 5632, vocab 32000, untied head). Measured:

  1. a LLaVA stage-2 training step (tower frozen; VPG and LLM trained; forward + backward + AdamW) for both
     models, taken in turn (as benchmarks/vlm_vs_llava.py does), with torch.cuda.synchronize around each step:
     median step time of --steps after --warmup, tokens/s, MFU and the peak memory of each;
  2. greedy generation tokens/s (batch 1 and 8, an image per row, --new-tokens each) of vlkit's generation
     path (vlkit.models.generate.prepare + the LLM's generate loop) and llava's .generate, with the number of
     rows whose tokens differ (run before training, while the weights are identical).

Precision: --precision auto (the trainer's setting, vlkit.train.runtime): bf16 autocast on CUDA, none on CPU.
--params fp32 keeps the weights (hence AdamW and its states) in fp32 under that autocast: vlkit's trainer's
mixed precision. --params bf16 casts the weights themselves to bf16.

Model FLOPs of one training step (PaLM, Chowdhery et al. 2022, appendix B; no recomputation counted):

    F = 6 N_llm B T + 12 L d B T^2          LLM: weights fwd+bwd; attention scores and values, fwd+bwd
      + 6 N_vpg B M                         VPG (trained) on the M visual features of each image
      + 2 N_tow B T_v + 4 L_v d_v B T_v^2   frozen tower: forward only (weights; attention)

B rows of T = M + S positions (M visual tokens, S text tokens); L layers of width d (query heads x head dim,
so GQA changes N, not the attention term; the causal mask is not discounted, as in PaLM); T_v the tokens the
tower runs on (patches + class token) in its L_v layers of width d_v. N counts every parameter of the part
except nn.Embedding tables (lookups, not matmuls): the LLM's untied head is counted, its input embedding is not;
the tower's position table is not. The tower's 24 layers all run (both models compute the last one although
LLaVA reads hidden_states[-2]), so all are counted. MFU = F / step time / the GPU's dense bf16 peak. Tokens/s
counts all B T positions the LLM processes, visual ones included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import transformers
from torch import nn

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import train_bpe
from vlkit.devices import check_dtype_on, resolve_device
from vlkit.models.generate import prepare
from vlkit.models.export import export_llava
from vlkit.models.llm import count_parameters
from vlkit.models.vision import EncoderConfig
from vlkit.models.vlm import LLMSource, VisionLanguageModel, VLMConfig
from vlkit.models.vpg import VPGConfig
from vlkit.train.runtime import Runtime, resolve_precision

SHAPES = {
    # the tower of configs/real/llava15_7b.yaml; the LLM of TinyLlama-1.1B (untied embeddings)
    "real": {"tower": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                       "projection_dim": 768, "hidden_act": "quick_gelu"},
             "llm": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                     "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 2048, "tie_word_embeddings": False},
             "max_length": 2048, "batch": 8, "seq": 512, "steps": 10, "warmup": 3, "new_tokens": 64},
    # 16 patches + class token
    "tiny": {"tower": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
             "llm": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 400,
                     "max_position_embeddings": 512, "tie_word_embeddings": False},
             "max_length": 512, "batch": 2, "seq": 32, "steps": 5, "warmup": 1, "new_tokens": 8},
}

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name in order.
# NVIDIA's datasheets quote the sparse figure; the dense one is half of it.
PEAKS = (
    (r"H100.*PCIe", 756e12),   # H100 datasheet: 1,513 sparse
    (r"H100.*NVL", 835e12),    # H100 datasheet: 1,671 sparse
    (r"H100", 989e12),         # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    (r"H200.*NVL", 835e12),    # H200 datasheet: 1,671 sparse
    (r"H200", 989e12),         # H200 SXM: 1,979 sparse
    (r"A100", 312e12),         # A100 datasheet (SXM and PCIe): 312 dense, 624 sparse
    (r"A10G", 70e12),          # AWS's part: no NVIDIA datasheet; ~70 (Baseten's A10 vs A10G spec comparison; a
                               # public bf16 GEMM measurement on an A10G reaches 69.5), not the A10's 125
    (r"A10\b", 125e12),        # A10 datasheet: 125 dense, 250 sparse
    (r"L40S", 362e12),         # L40S datasheet: 362 dense, 733 sparse
    (r"\bL4\b", 121e12),       # L4 datasheet: 242 sparse
    (r"RTX 4090", 165e12),     # Ada whitepaper: 165.2 with FP32 accumulate (GeForce: half the FP16-accumulate rate)
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name (None: not in the table)."""
    return next((peak for pattern, peak in PEAKS if re.search(pattern, device_name, re.IGNORECASE)), None)


@dataclass(frozen=True)
class Sizes:
    """What the FLOP count reads off a model (see the module docstring)."""

    llm_params: int     # N_llm: the LLM's parameters outside nn.Embedding tables
    llm_layers: int     # L
    llm_width: int      # d
    vpg_params: int     # N_vpg
    visual_tokens: int  # M: VPG outputs (= LLM positions) per image
    tower_params: int   # N_tow: the tower's parameters outside nn.Embedding tables
    tower_layers: int   # L_v
    tower_width: int    # d_v
    tower_tokens: int   # T_v: tokens the tower runs on per image

    @classmethod
    def of(cls, model: VisionLanguageModel) -> Sizes:
        enc = model.vision.encoders[0]
        llm, tower = model.llm.config, enc.hf_config
        return cls(matmul_params(model.llm), llm.num_hidden_layers, llm.hidden_size, count_parameters(model.vpg),
                   model.image_slots, matmul_params(model.vision), tower.num_hidden_layers, tower.hidden_size,
                   enc.num_patches + enc.num_special)


def matmul_params(module: nn.Module) -> int:
    tables = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in tables)


def train_flops(s: Sizes, batch: int, seq_len: int) -> dict[str, int]:
    """Model FLOPs of one training step of `batch` rows of `seq_len` LLM positions, term by term."""
    return {"llm_weights": 6 * s.llm_params * batch * seq_len,
            "llm_attention": 12 * s.llm_layers * s.llm_width * batch * seq_len ** 2,
            "vpg": 6 * s.vpg_params * batch * s.visual_tokens,
            "tower_weights": 2 * s.tower_params * batch * s.tower_tokens,
            "tower_attention": 4 * s.tower_layers * s.tower_width * batch * s.tower_tokens ** 2}


def build(shape: str, device: torch.device | str) -> tuple[VisionLanguageModel, VLProcessor]:
    """The shape's model, LLaVA stage 2's groups trainable: on the meta device (no weights) or created directly
    on `device` (a 1.1B LLM initialised on the GPU, not on the CPU)."""
    spec = SHAPES[shape]
    tok = train_bpe(["describe the image. a large red circle at the top left and a small blue star."] * 50, 400)
    arch = {**spec["llm"], "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id}
    cfg = VLMConfig(tower=EncoderConfig(arch=spec["tower"], feature_layer=-2, select="patch"),
                    vpg=VPGConfig(kind="mlp", mlp_act="gelu"), llm=LLMSource(arch=arch), max_length=spec["max_length"])
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    with torch.device(device):
        model = VisionLanguageModel.build(cfg, image_token_id=image_id)
    model.set_trainable(["vpg", "llm"])
    return model, VLProcessor.for_model(tok, model)


def parameter_counts(model: VisionLanguageModel) -> dict[str, int]:
    return {"vision": count_parameters(model.vision), "vpg": count_parameters(model.vpg),
            "llm": count_parameters(model.llm), "total": count_parameters(model),
            "trainable": count_parameters(model, trainable_only=True)}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def resident_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> int:
    """What a model keeps between steps: its parameters and its optimiser's states (gradients are freed)."""
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *states])


def time_steps(variants: dict, steps: int, warmup: int, rt: Runtime) -> dict[str, dict]:
    """Training steps of (module, forward, batch) variants taken in turn, so that drift in the machine's speed hits
    all alike; the first `warmup` rounds are not timed. On CUDA also each step's peak memory: the process's, and
    its own (the process's less what the other variants keep resident)."""
    dev, cuda = rt.device, rt.device.type == "cuda"
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for k, (m, _, _) in variants.items()}
    out = {k: {"times": [], "peak": 0, "own_peak": 0, "first_loss": None} for k in variants}
    for i in range(warmup + steps):
        for k, (module, forward, batch) in variants.items():
            sync(dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            with rt.autocast():
                loss = forward(batch)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            sync(dev)
            dt = time.perf_counter() - t0
            if i == 0:
                out[k]["first_loss"] = loss.item()
            if i >= warmup:
                out[k]["times"].append(dt)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(dev)
                    others = sum(resident_bytes(variants[o][0], opts[o]) for o in variants if o != k)
                    out[k]["peak"] = max(out[k]["peak"], peak)
                    out[k]["own_peak"] = max(out[k]["own_peak"], peak - others)
    return out


def generation(model, llava, proc: VLProcessor, rows: int, new_tokens: int, reps: int, rt: Runtime) -> dict:
    """Greedy tokens/s of both models on the same prompts and images (fixed length: min = max new tokens)."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    size = model.vision.encoders[0].transform.size
    rng = np.random.default_rng(rows)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(rows)]
    px = proc.pixel_values(images).to(rt.device)
    pb = proc.pad([proc.encode(conv, 1, add_generation_prompt=True)] * rows, side="left")
    tok = proc.tokenizer
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "temperature": None,
          "top_p": None, "top_k": None, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def ours():  # vision + VPG + fusion + prefill + decode, as vlkit.models.generate.generate runs them
        inputs = prepare(model, proc, [conv] * rows, [[im] for im in images], image_inputs={"pixel_values": px})
        with inputs.pop("fused"):
            return model.llm.generate(**inputs, **kw)

    def theirs():
        return llava.generate(input_ids=pb["input_ids"].to(rt.device), attention_mask=pb["attention_mask"].to(
            rt.device), pixel_values=px, **kw)[:, -new_tokens:]

    times: dict[str, list[float]] = {"vlkit": [], "llava": []}
    outs = {}
    with torch.no_grad(), rt.autocast():
        for r in range(reps + 1):  # the first round warms up; then the two in turn
            for name, fn in (("vlkit", ours), ("llava", theirs)):
                sync(rt.device)
                t0 = time.perf_counter()
                outs[name] = fn()
                sync(rt.device)
                if r:
                    times[name].append(time.perf_counter() - t0)
    tps = {k: rows * new_tokens / statistics.median(v) for k, v in times.items()}
    a, b = outs["vlkit"].cpu(), outs["llava"].cpu()
    return {"rows": rows, "vlkit_tokens_per_s": tps["vlkit"], "llava_tokens_per_s": tps["llava"],
            "ratio_vlkit_over_llava": tps["vlkit"] / tps["llava"], "differing_rows": int((a != b).any(1).sum())}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: real on CUDA, tiny elsewhere")
    ap.add_argument("--allow-cpu-real", action="store_true", help="run --shape real without CUDA (hours)")
    ap.add_argument("--params", choices=["fp32", "bf16"], default="fp32", help="weight dtype (fp32: mixed precision)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="autocast dtype")
    ap.add_argument("--batch", type=int, help="rows per training step")
    ap.add_argument("--seq", type=int, help="text tokens per row (after the image's visual tokens)")
    ap.add_argument("--steps", type=int, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (at least 1)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens per row")
    ap.add_argument("--gen-batches", default="1,8", help="generation batch sizes, comma-separated")
    ap.add_argument("--gen-reps", type=int, default=3, help="timed generations per model and batch size")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both models for the training step (generation stays eager; raise --warmup)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, overriding the table")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device, what="--device")
    shape = args.shape or ("real" if dev.type == "cuda" else "tiny")
    if shape == "real" and dev.type != "cuda" and not args.allow_cpu_real:
        ap.error(f"--shape real on {dev.type} would take hours (a 1.4B-parameter VLM); use --shape tiny, run it on a "
                 "CUDA GPU, or pass --allow-cpu-real")
    spec = SHAPES[shape]
    batch, seq, steps, warmup, new_tokens = (getattr(args, k) or spec[k] for k in
                                             ("batch", "seq", "steps", "warmup", "new_tokens"))
    warmup = max(warmup, 1)
    rt = Runtime(dev, resolve_precision(args.precision, dev))
    param_dtype = torch.bfloat16 if args.params == "bf16" else torch.float32
    check_dtype_on(param_dtype, dev, "--params")
    check_dtype_on(rt.autocast_dtype, dev, "--precision")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name) if dev.type == "cuda" else None
    head = {"command": shlex.join(["python", "benchmarks/gpu_step.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(dev),
            "device_name": name, "shape": shape, "params": args.params,
            "autocast": str(rt.autocast_dtype).replace("torch.", "") if rt.autocast_dtype else "none",
            "compile": args.compile, "batch": batch, "seq_text": seq, "steps": steps, "warmup": warmup}
    for k, v in head.items():
        print(f"{k:>12}: {v}")

    meta, _ = build(shape, "meta")  # the counts before any memory is spent
    sizes, counts = Sizes.of(meta), parameter_counts(meta)
    del meta
    print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    seq_len = sizes.visual_tokens + seq
    if seq_len > spec["max_length"]:
        ap.error(f"--seq {seq}: {sizes.visual_tokens} visual + {seq} text tokens exceed the {spec['max_length']} "
                 "positions of this shape")
    flops = train_flops(sizes, batch, seq_len)

    from transformers import LlavaForConditionalGeneration

    transformers.utils.logging.disable_progress_bar()
    model, proc = build(shape, dev)
    model.to(param_dtype)
    with tempfile.TemporaryDirectory() as d:
        with torch.device(dev):  # the stock model export_llava fills is created on the GPU too
            export_llava(model, proc, d)
        llava = LlavaForConditionalGeneration.from_pretrained(d, dtype=param_dtype).to(dev)
    llava.requires_grad_(True)
    llava.model.vision_tower.requires_grad_(False)  # LLaVA stage 2: projector and LLM train
    assert count_parameters(llava, trainable_only=True) == counts["trainable"], "the two models train different sets"

    # generation first, while both models hold the same weights (training moves each on its own)
    model.eval(), llava.eval()
    gen = [generation(model, llava, proc, int(n), new_tokens, args.gen_reps, rt) for n in args.gen_batches.split(",")]

    # a LLaVA stage-2 batch: each row one image (its visual tokens first), then `seq` random text tokens, learned
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.llm.config.vocab_size, (batch, seq_len), generator=g)  # past the special tokens
    ids[:, :sizes.visual_tokens] = model.image_token_id
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    side = model.vision.encoders[0].transform.size
    stock = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    stock = {k: v.to(dev) for k, v in stock.items()}
    ours = dict(stock, images_per_row=torch.ones(batch, dtype=torch.long, device=dev))
    model.train(), llava.train()
    fwd_ours, fwd_llava = (torch.compile(model), torch.compile(llava)) if args.compile else (model, llava)
    timed = time_steps({"vlkit": (model, lambda b: fwd_ours(**b).loss, ours),
                        "llava": (llava, lambda b: fwd_llava(**b).loss, stock)}, steps, warmup, rt)

    total = sum(flops.values())
    train = {}
    for k, t in timed.items():
        step = statistics.median(t["times"])
        train[k] = {"step_s": step, "tokens_per_s": batch * seq_len / step, "tflops_per_s": total / step / 1e12,
                    "mfu": total / step / peak if peak else None, "first_loss": t["first_loss"],
                    "peak_memory_gib": t["own_peak"] / 2 ** 30 if dev.type == "cuda" else None,
                    "process_peak_memory_gib": t["peak"] / 2 ** 30 if dev.type == "cuda" else None}
    result = {**head, "seq_len": seq_len, "image_tokens": sizes.visual_tokens, "parameters": counts,
              "sizes": asdict(sizes), "flops_per_step": total, "flops_terms": flops, "peak_flops": peak,
              "peak_note": None if peak else f"no dense bf16 peak known for {name!r}: MFU n/a (pass --peak-tflops)",
              "attention": {"vlkit": model.llm.config._attn_implementation,
                            "llava": llava.config.text_config._attn_implementation},
              "train": train, "train_step_ratio_vlkit_over_llava": train["vlkit"]["step_s"] / train["llava"]["step_s"],
              "new_tokens": new_tokens, "generate": gen}
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def report(r: dict) -> None:
    def gib(x):
        return "n/a" if x is None else f"{x:.2f} GiB"

    print(f"\ntraining step: {r['batch']} rows x {r['seq_len']} positions ({r['image_tokens']} visual + "
          f"{r['seq_text']} text), {r['flops_per_step'] / 1e12:.4g} TFLOP per step")
    for k, t in r["train"].items():
        mfu = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        print(f"  {k:<6} {1e3 * t['step_s']:9.1f} ms  {t['tokens_per_s']:12,.0f} tok/s  "
              f"{t['tflops_per_s']:9.4g} TFLOP/s  MFU {mfu:>6}  peak {gib(t['peak_memory_gib'])} "
              f"(process {gib(t['process_peak_memory_gib'])})  first loss {t['first_loss']:.4f}")
    print(f"  step time vlkit / llava: {r['train_step_ratio_vlkit_over_llava']:.3f}")
    if r["peak_note"]:
        print(f"  {r['peak_note']}")
    print(f"greedy generation, {r['new_tokens']} new tokens per row:")
    for g in r["generate"]:
        same = "same tokens" if not g["differing_rows"] else \
            f"{g['differing_rows']} of {g['rows']} rows differ (bf16 rounding can flip a near-tied argmax)"
        print(f"  batch {g['rows']:>2}: vlkit {g['vlkit_tokens_per_s']:10,.1f} tok/s  llava "
              f"{g['llava_tokens_per_s']:10,.1f} tok/s  ratio {g['ratio_vlkit_over_llava']:.3f}  {same}")


if __name__ == "__main__":
    main()
