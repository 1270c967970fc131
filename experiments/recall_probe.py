"""How soon does a small LLaMA learn associative recall, the skill the bench's context-VQA gate rests on?

The bench LLaMAs answer world questions with a value that is in the scene, half the time another object's
(experiments/binding_probe.py, README). This probe strips the world away: a sequence of --pairs key-value pairs
(a value, then its key, as "a red square" puts the colour before the shape; --order kv puts the key first),
then --questions queries "key [IS] -> value" (--gap 1 puts an IS token between key and answer, as "what color
is the square?" does; --gap 0 is a pure induction layout). Keys are distinct within a sequence, values are drawn
with replacement. The loss sees the answers only (--loss-on all: every token). Nothing else can solve it: a
model that has not formed the lookup can only answer with a value of the sequence (the shortcut), and the
curve reports that share of its errors.

    # the world's sizes: 8 shapes, 8 colours, 2-6 objects (about 1 minute per 1000 steps on 2 CPUs)
    python experiments/recall_probe.py --keys 8 --values 8 --pairs 2,6 --steps 3000
    # a larger key space, as associative-recall benchmarks use
    python experiments/recall_probe.py --keys 64 --values 64 --pairs 2,6 --steps 3000
    # the curriculum that forms the world's lookup from every seed tried (README): the copy task first, then the
    # lookup with either order per sequence, then (if wanted) the world's order alone
    python experiments/recall_probe.py --task repeat --steps 1000 --until 0.97 --save runs/rp/repeat
    python experiments/recall_probe.py --init runs/rp/repeat --order mix --questions 8 --warmup 50 --until 0.97

Writes --json (default runs/recall_probe.json) with the curve and the command, and prints the curve.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from vlkit.fileio import atomic_dir, write_json
from vlkit.world.recall import BOS, PAD, SEP, SPECIALS, copy_batch, lookup_batch

def make_model(args, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=256, initializer_range=args.init_std, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=SEP, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def evaluate(model, ids, labels, in_seq, keys: int) -> dict:
    """Exact-match accuracy on the answers, and the share of wrong answers that are another value of the row."""
    model.eval()
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    pred = logits.argmax(-1)
    right = (pred == target) & mask
    wrong = mask & ~right
    if in_seq is None:  # the copy task: no other values to score
        model.train()
        return {"acc": float(right.sum() / mask.sum()), "n": int(mask.sum()), "wrong_in_sequence": float("nan")}
    value = pred - SPECIALS - keys
    is_value = (value >= 0) & (value < in_seq.shape[1])
    rows = torch.arange(ids.shape[0])[:, None].expand_as(pred)
    other = wrong & is_value & in_seq[rows, value.clamp(0, in_seq.shape[1] - 1)]
    model.train()
    n_wrong = int(wrong.sum())
    return {"acc": float(right.sum() / mask.sum()), "n": int(mask.sum()),
            "wrong_in_sequence": float(other.sum()) / n_wrong if n_wrong else 0.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("recall", "repeat"), default="recall",
                   help="repeat: the copy task of --length over the keys' and values' tokens (forms induction "
                   "heads; then --init a recall run from it)")
    p.add_argument("--length", default="8,24", help="fewest,most tokens of a --task repeat string")
    p.add_argument("--keys", type=int, default=8, help="key vocabulary (the world's 8 shapes)")
    p.add_argument("--values", type=int, default=8, help="value vocabulary (the world's 8 colours)")
    p.add_argument("--pairs", default="2,6", help="fewest,most pairs per sequence (the bench's 2-6 objects)")
    p.add_argument("--questions", type=int, default=3, help="queries per sequence")
    p.add_argument("--order", choices=("vk", "kv", "mix"), default="vk",
                   help="vk: value before key, as 'red square'; mix: either, drawn per sequence")
    p.add_argument("--gap", type=int, default=1, help="IS tokens between a query's key and answer (the world's "
                   "'what color is the square? ASSISTANT:' puts about 5 tokens there)")
    p.add_argument("--loss-on", choices=("answers", "all"), default="answers")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=172)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--until", type=float, help="stop at the first evaluation whose accuracy reaches this")
    p.add_argument("--eval-rows", type=int, default=1000, help="held-out sequences (x --questions answers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--init", help="start from this saved model (--save of an earlier run; same --keys and --values)")
    p.add_argument("--save", help="write the trained model here (a Hugging Face directory)")
    p.add_argument("--json", default="runs/recall_probe.json")
    args = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.pairs.split(","))
    except ValueError:
        p.error(f"--pairs {args.pairs!r}: give fewest,most, e.g. 2,6")
    if not 1 <= lo <= hi <= args.keys:
        p.error(f"--pairs {args.pairs!r}: need 1 <= fewest <= most <= --keys ({args.keys}), since keys are distinct")
    try:
        length = tuple(int(x) for x in args.length.split(","))
        if len(length) != 2 or not 2 <= length[0] <= length[1]:
            raise ValueError
    except ValueError:
        p.error(f"--length {args.length!r}: give fewest,most with 2 <= fewest <= most, e.g. 8,24")
    if args.gap < 0:
        p.error(f"--gap {args.gap}: give a number of tokens >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "repeat":
        def make(gen, n):
            return copy_batch(gen, n, args.keys + args.values, length)
    else:
        def make(gen, n):
            return lookup_batch(gen, n, args.keys, args.values, (lo, hi), args.questions, args.order, args.gap)
    vocab = SPECIALS + args.keys + args.values
    if args.init:
        from transformers import LlamaForCausalLM

        if not (Path(args.init) / "config.json").is_file():
            p.error(f"--init {args.init}: no config.json there; give a directory an earlier --save wrote")
        model = LlamaForCausalLM.from_pretrained(args.init)
        if model.config.vocab_size != vocab:
            p.error(f"--init {args.init}: its vocabulary is {model.config.vocab_size} tokens, --keys {args.keys} "
                    f"--values {args.values} need {vocab}")
    else:
        model = make_model(args, vocab)
    held = make(torch.Generator().manual_seed(10**6 + args.seed), args.eval_rows)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        ids, labels, _ = make(gen, args.batch)
        if args.loss_on == "all":
            labels = torch.where(ids == PAD, torch.full_like(ids, -100), ids)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "loss": round(loss.item(), 4), **evaluate(model, *held, keys=args.keys),
                     "seconds": round(time.time() - start, 1)}
            curve.append(point)
            print(f"step {step:6d}  loss {point['loss']:.3f}  acc {point['acc']:.3f}  "
                  f"wrong-in-sequence {point['wrong_in_sequence']:.2f}  {point['seconds']:.0f}s", flush=True)
            if args.until is not None and point["acc"] >= args.until:
                break
    out = {"command": shlex.join(["python", "experiments/recall_probe.py", *(argv if argv is not None else
                                                                              sys.argv[1:])]),
           "args": vars(args), "parameters": sum(t.numel() for t in model.parameters()), "curve": curve,
           "final": curve[-1]}
    if args.save:
        with atomic_dir(args.save) as tmp:
            model.save_pretrained(tmp)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
