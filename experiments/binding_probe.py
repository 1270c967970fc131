"""Can a world LLaMA of a given size learn to bind an attribute to the object a question names, and how soon?

The bench's gate asks a world LLaMA to answer >= 95% of held-out questions with the scene written out in its
context (vlkit/experiments/bench.py). The LLaMAs trained so far stop at 0.5-0.6: they answer with a value that
is in the scene, half the time another object's. This probe isolates that skill at any size and step count,
on a GPU as on a CPU:

  data      --scenes world scenes of --objects (seen once an epoch; held-out scenes are others), each a drill:
            the scene in words, then up to --questions of its questions answered in turn
            (vlkit.recipes.lm.drills); the loss sees the answers only
  model     a LLaMA (or OPT) built from scratch (--layers, --hidden, --heads, --mlp), BPE trained on the drills;
            --qk-init scales its query and key projections (sharper attention at the start), --init-std draws
            its weights at another scale than transformers' 0.02, --loss-on all trains on every token of the
            drill, --kinds drills only some question kinds, --listing closes each drill by naming every
            object's colour by its shape and shape by its colour (lm recipe: data.drill_listing),
            --recall-warmup first trains the copy task and the synthetic lookup of experiments/recall_probe.py
            in the world's words, stage by stage until each is learnt (--warmup-until)
  curve     every --eval-every steps: exact-match accuracy on --eval-questions held-out single questions (other
            scenes, same object counts) per question kind, with the share of colour / shape / position answers
            that name another object's value
  attention at the end: for each layer, the head whose attention from the answer position falls most on the
            named object's words (as a share of the attention on all objects' words), against the share a head
            attending to every object alike would give. A head that binds has a share near 1. And the most
            attention any head of the layer gives the question's own word for the object (the shape a colour
            question asks about): the query a binding head needs has to come from there.
  listing   at the end: teacher-forced accuracy on the listing replies' bound words ('the square is' ->
            orange), where the word to look up is next to the answer: the lookup without the fetch

    # 165k parameters on 2-object scenes, ~29 min on 2 CPUs: the binding forms after ~10^4 steps (README)
    python experiments/binding_probe.py --objects 2,2 --questions 3 --scenes 40000 --block 96 --layers 2 \
        --hidden 64 --heads 4 --mlp 172 --batch 32 --lr 3e-3 --warmup 200 --steps 30000 --eval-every 3000 \
        --save runs/probe/two
    # then a curriculum: the same model on the bench's 2-6 objects (position carries over: README)
    python experiments/binding_probe.py --objects 2,6 --questions 3 --scenes 40000 --block 160 --batch 32 \
        --lr 3e-3 --warmup 200 --steps 24000 --eval-every 3000 --init runs/probe/two --save runs/probe/two_six
    # then drill only the kinds that have not formed (held-out questions stay all kinds)
    python experiments/binding_probe.py --objects 2,6 --questions 3 --scenes 40000 --block 160 --batch 32 \
        --lr 3e-3 --warmup 200 --steps 15000 --eval-every 3000 --kinds color,shape --init runs/probe/two_six
    # the bench's size, on a GPU
    python experiments/binding_probe.py --objects 2,6 --steps 100000 --device cuda --batch 64

Writes --json (default runs/binding_probe.json) and prints the curve and the attention table.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def scenes(first_seed: int, n: int, objects: tuple[int, int]):
    from vlkit.world.scene import WorldConfig, generate_scene

    cfg = WorldConfig(min_objects=objects[0], max_objects=objects[1])
    return [generate_scene(first_seed + i, cfg) for i in range(n)]


def heldout_questions(scene_list) -> list[dict]:
    """One question per scene, drawn as the world's VQA task draws it, as a text-only record."""
    from vlkit.data.records import assistant, user
    from vlkit.world.language import caption, vqa

    out = []
    for s in scene_list:
        kind, q, a = vqa(s, np.random.default_rng(s.seed), relations=True)
        out.append({"task": "vqa", "images": ["(scene)"], "messages": [user(f"({caption(s)}) {q}"), assistant(a)],
                    "meta": {"kind": kind, "scene": s.to_dict(), "answer": a}})
    return out


def object_spans(text: str, scene) -> list[tuple[int, int]] | None:
    """Character span of each object's phrase of the detailed caption inside `text`, in scene.ordered() order."""
    from vlkit.world.language import detailed_phrase

    spans, at = [], 0
    for o in scene.ordered():
        phrase = detailed_phrase(o)
        i = text.find(phrase, at)
        if i < 0:
            return None
        spans.append((i, i + len(phrase)))
        at = i + len(phrase)
    return spans


def named_object(record: dict, scene) -> int | None:
    """Index (in scene.ordered()) of the object a colour, shape or position question names."""
    kind, q = record["meta"]["kind"], record["messages"][0]["content"][0]["text"].split(") ")[-1]
    for i, o in enumerate(scene.ordered()):
        if (kind == "color" and q == f"what color is the {o.shape}?") or \
                (kind == "shape" and q == f"what shape is the {o.color} object?") or \
                (kind == "position" and q == f"where is the {o.name}?"):
            return i
    return None


@torch.no_grad()
def binding_attention(model, tok, records: list[dict], limit: int = 200) -> dict:
    """Per layer: the head whose attention from the answer position puts the largest share of its attention on
    objects' words onto the named object's words (mean over questions), and the share of uniform attention."""
    from vlkit.data.tokenizer import render
    from vlkit.eval.world import prompt_and_reference
    from vlkit.world.scene import Scene

    model.eval()
    device = next(model.parameters()).device
    shares, chance, fetch = [], [], []
    for r in records:
        if len(shares) >= limit or r["meta"]["kind"] not in ("color", "shape", "position"):
            continue
        scene = Scene.from_dict(r["meta"]["scene"])
        target = named_object(r, scene)
        prompt, _ = prompt_and_reference(r)
        text = render(tok, prompt, add_generation_prompt=True)
        spans = object_spans(text, scene)
        if target is None or spans is None:
            continue
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
        owner = torch.full((enc["input_ids"].shape[1],), -1)
        o = scene.ordered()[target]
        word = o.color if r["meta"]["kind"] == "shape" else o.shape  # the word by which the question names it
        w0 = text.index(f" {word}", text.index(".)", spans[-1][1])) + 1  # in the question, after the scene
        asked = torch.zeros(len(owner), dtype=torch.bool)  # its tokens (however many the word is cut into)
        for t, (a, b) in enumerate(enc["offset_mapping"][0].tolist()):
            for k, (s, e) in enumerate(spans):
                if s <= a < e and b > a:
                    owner[t] = k
            asked[t] = a < w0 + len(word) and b > w0 and b > a
        out = model(input_ids=enc["input_ids"].to(device), output_attentions=True)
        per_layer, on_word = [], []
        for att in out.attentions:  # (1, heads, q, k)
            w = att[0, :, -1].float().cpu()  # attention of the answer position
            on_objects = w[:, owner >= 0].sum(-1).clamp_min(1e-9)
            per_layer.append(w[:, owner == target].sum(-1) / on_objects)
            on_word.append(w[:, asked].sum(-1))
        shares.append(torch.stack(per_layer))  # (layers, heads)
        fetch.append(torch.stack(on_word))
        chance.append(float((owner == target).sum()) / float((owner >= 0).sum()))
    if not shares:
        return {"n": 0}
    mean = torch.stack(shares).mean(0)
    best = mean.max(-1)
    asked = torch.stack(fetch).mean(0).max(-1).values
    return {"n": len(shares), "uniform_share": sum(chance) / len(chance),
            "layers": [{"layer": i, "head": int(h), "named_share": float(v), "question_word": float(q)}
                       for i, (v, h, q) in enumerate(zip(best.values, best.indices, asked))]}


@torch.no_grad()
def listing_accuracy(model, tok, scene_list, seed: int = 0) -> dict:
    """Teacher-forced accuracy on the words a listing reply binds (vlkit.recipes.lm.listings): the colour after
    'the square is', the shape after 'the red object is a', per kind, on held-out scenes. Here the word to look up
    sits next to the answer, so this is the lookup alone, without the fetch of the question's word."""
    from vlkit.data.records import assistant, user
    from vlkit.data.tokenizer import render
    from vlkit.recipes.lm import LISTING_PROMPTS, listings
    from vlkit.world.language import caption

    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[int]] = {"color": [], "shape": []}
    bound = {"color": re.compile(r"the \w+ is (\w+)"), "shape": re.compile(r"the \w+ object is an? (\w+)")}
    for s in scene_list:
        for q, reply in listings(s, np.random.default_rng([seed, s.seed])):
            kind = "color" if q == LISTING_PROMPTS[0] else "shape"
            text = render(tok, [user(f"({caption(s)}) {q}"), assistant(reply)])
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
            ids, spans = enc["input_ids"][0], enc["offset_mapping"][0].tolist()
            pred = model(input_ids=enc["input_ids"].to(device)).logits[0].argmax(-1).cpu()
            start = text.rindex(reply)
            for m in bound[kind].finditer(reply):
                at = start + m.start(1)  # the word's first character: scored on the token that holds it
                t = next(i for i, (x, y) in enumerate(spans) if x <= at < y)
                hits[kind].append(int(pred[t - 1] == ids[t]))
    return {k: {"n": len(v), "acc": float(np.mean(v)) if v else float("nan")} for k, v in hits.items()}


@torch.no_grad()
def reinit(model, std: float) -> int:
    """Draw every linear and embedding weight of a fresh model again from N(0, std) (biases 0), as transformers
    does with `initializer_range` (0.02 by default, a width-768 choice: at width 64 it leaves attention logits
    near 0 and the softmax's gradients small); returns how many weights were drawn."""
    n = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            n += 1
    model.config.initializer_range = std
    return n


@torch.no_grad()
def scale_qk(model, factor: float) -> int:
    """Multiply every attention layer's query and key projection weights by `factor` (LLaMA and OPT name them
    q_proj and k_proj); returns how many were scaled."""
    n = 0
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj")) and isinstance(module, torch.nn.Linear):
            module.weight.mul_(factor)
            n += 1
    return n


def line(step: int, point: dict) -> str:
    kinds = " ".join(f"{k[5:]} {v:.2f}" for k, v in point.items() if k.startswith("kind/"))
    return (f"step {step:>6}: context VQA {point['context_vqa']:.3f} | {kinds} | "
            f"another object's value {point['another_object']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", default="2,6", help="fewest,most objects per scene (default 2,6, the bench's)")
    p.add_argument("--questions", type=int, default=99, help="questions per drill (default: all a scene has)")
    p.add_argument("--kinds", help="drill only these question kinds, comma-separated (default: all), e.g. "
                   "color,shape; the held-out questions stay all kinds")
    p.add_argument("--listing", action="store_true", help="close each drill by naming every object's colour by "
                   "its shape and shape by its colour (lm recipe: data.drill_listing)")
    p.add_argument("--scenes", type=int, default=10000, help="train scenes (drills)")
    p.add_argument("--block", type=int, default=256, help="tokens per training row (whole drills, padded)")
    p.add_argument("--family", choices=("llama", "opt"), default="llama")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=344)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-questions", type=int, default=400)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--loss-on", choices=("assistant", "all"), default="assistant",
                   help="tokens the loss sees: the answers only, or every token of the drill")
    p.add_argument("--qk-init", type=float, default=1.0, help="scale the fresh model's query and key projections "
                   "by this factor: sharper attention at the start, larger gradients through the softmax")
    p.add_argument("--init-std", type=float, help="draw the fresh model's weights from N(0, this) instead of "
                   "transformers' 0.02 (e.g. 1/sqrt(hidden))")
    p.add_argument("--recall-warmup", type=int, default=0, help="first train up to this many steps on each of "
                   "three synthetic tasks of experiments/recall_probe.py in the world's words, each until its "
                   "held-out accuracy reaches --warmup-until: the copy task, then the shape <-> colour lookup "
                   "with either order per row, without and then with 'is' between key and answer (the curriculum "
                   "that formed the synthetic lookup from every seed tried, README); then the drills")
    p.add_argument("--recall-keep", type=float, default=0.0, help="share of the drill training's rows that are "
                   "rows of the warm-up's last stage (lm recipe: recall_warmup.keep), so that the lookup is not "
                   "overwritten")
    p.add_argument("--warmup-until", type=float, default=0.95, help="held-out accuracy that ends a warm-up stage")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--save", help="write the trained model and its tokenizer here (a Hugging Face directory)")
    p.add_argument("--init", help="start from this saved model (its tokenizer and sizes; --layers ... --vocab are "
                   "ignored): e.g. a curriculum, 2-object scenes first, then 2-6")
    p.add_argument("--json", default="runs/binding_probe.json")
    a = p.parse_args(argv)
    try:
        lo, hi = (int(v) for v in a.objects.split(","))
        if not 1 <= lo <= hi <= 6:
            raise ValueError
    except ValueError:
        p.error(f"--objects {a.objects!r}: give fewest,most with 1 <= fewest <= most <= 6, e.g. 2,6")
    from vlkit.world.language import VQA_KINDS

    kinds = tuple(a.kinds.split(",")) if a.kinds else None
    if kinds and not set(kinds) <= set(VQA_KINDS):
        p.error(f"--kinds {a.kinds!r}: choose from {','.join(VQA_KINDS)}")
    if a.init and a.qk_init != 1.0:
        p.error("--qk-init scales a fresh model's attention; it does not apply with --init")
    if a.init and a.init_std is not None:
        p.error("--init-std draws a fresh model's weights; it does not apply with --init")
    if a.recall_warmup < 0:
        p.error(f"--recall-warmup {a.recall_warmup}: give a number of steps >= 0")
    if not 0 < a.warmup_until <= 1:
        p.error(f"--warmup-until {a.warmup_until}: give an accuracy in (0, 1], e.g. 0.95")
    if a.init_std is not None and not a.init_std > 0:
        p.error(f"--init-std {a.init_std}: give a standard deviation > 0, e.g. 0.1")

    from vlkit.models.llm import LLMConfig, build_llm, count_parameters
    from vlkit.errors import VlkitError
    from vlkit.recipes.lm import (Blocks, RecallWarmup, bpe_texts, collate_blocks, context_vqa, drills, lm_loss,
                                  pack, recall_warmup, with_recall)
    from vlkit.data.tokenizer import train_bpe
    from vlkit.fileio import write_json
    from vlkit.train import TrainConfig, Trainer
    from vlkit.train.runtime import seed_everything
    from vlkit.world.scene import Scene

    t0 = time.perf_counter()
    train = [{"meta": {"scene": s.to_dict()}} for s in scenes(1_000_000 + a.seed * 10_000_000, a.scenes, (lo, hi))]
    train = drills(train, a.questions, relations=True, seed=a.seed, kinds=kinds, listing=a.listing)
    test = heldout_questions(scenes(900_000, a.eval_questions, (lo, hi)))
    seed_everything(a.seed)
    if a.init:
        from vlkit.data.tokenizer import load_tokenizer
        from vlkit.models.llm import load_llm

        tok, model = load_tokenizer(a.init), load_llm(a.init)
    else:
        tok = train_bpe(bpe_texts(train), a.vocab, "llama")
        model = build_llm(LLMConfig(family=a.family, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                                    intermediate_size=a.mlp), tok)
        if a.init_std is not None:
            reinit(model, a.init_std)
        scale_qk(model, a.qk_init)
    blocks = pack(tok, train, a.block, loss_on=a.loss_on, whole=True)
    warm: list = []
    if a.recall_warmup:
        wcfg = TrainConfig(steps=a.recall_warmup, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup, seed=a.seed,
                           device=a.device, weight_decay=a.weight_decay, num_threads=a.threads, progress=False)
        try:
            warm = recall_warmup(model, tok, RecallWarmup(max_steps=a.recall_warmup, until=a.warmup_until,
                                                          pairs=(lo, hi)), wcfg, "--recall-warmup",
                                 lambda text: print(text, flush=True))
        except VlkitError as e:
            raise SystemExit(str(e)) from None
    drill_rows = len(blocks["input_ids"])
    try:
        blocks = with_recall(tok, RecallWarmup(keep=a.recall_keep, pairs=(lo, hi)), blocks, a.seed, "--recall-keep")
    except (VlkitError, ValueError) as e:
        raise SystemExit(str(e)) from None
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup, schedule=a.schedule,
                      eval_every=a.eval_every, log_every=max(1, a.eval_every), seed=a.seed, device=a.device,
                      weight_decay=a.weight_decay, num_threads=a.threads)
    text_only = lambda r: r["messages"]  # noqa: E731  (held-out records already carry the scene in words)

    last: dict = {}  # the latest full evaluation and its step: the final figure when training ends on one

    def evaluate(m):
        c = context_vqa(m, tok, test, len(test), describe=text_only)
        last.update(step=trainer.step, result=c)
        point = {"context_vqa": c["acc"], **{f"kind/{k}": v for k, v in c["per_kind"].items()},
                 "another_object": (c["wrong_object"] or {}).get("another_object", float("nan"))}
        print(line(trainer.step, point), flush=True)  # the curve as it comes: runs may take hours
        return point

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, cfg, Blocks(blocks), collate_blocks, lm_loss, out, evaluate=evaluate,
                          desc="binding probe")
        trainer.fit()
        curve = [{k.removeprefix("eval/"): v for k, v in h.items() if k == "step" or k.startswith("eval/")}
                 for h in trainer.history if "eval/context_vqa" in h]
    recall_after = None  # the last warm-up stage's held-out lookup after the drills: kept or overwritten
    if warm:
        from vlkit.world.recall import STAGES, answer_accuracy, world_rows

        recall_after = answer_accuracy(model, world_rows(tok, 1000, 10**6 + a.seed + len(STAGES) - 1, STAGES[-1],
                                                         (lo, hi)))
        print(f"the warm-up's lookup ({STAGES[-1]}) after the drills: held-out {recall_after:.3f}", flush=True)
    if a.save:
        trainer.save_model(Path(a.save), lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                                     tok.save_pretrained(tmp)))
    final = last["result"] if last.get("step") == trainer.step else context_vqa(model, tok, test, len(test),
                                                                                 describe=text_only)
    model.set_attn_implementation("eager")  # attention weights are returned by the eager kernel only
    attention = binding_attention(model, tok, test)
    listed = listing_accuracy(model, tok, [Scene.from_dict(r["meta"]["scene"]) for r in test], a.seed)
    args = argv if argv is not None else sys.argv[1:]
    result = {"command": "python experiments/binding_probe.py " + shlex.join(args),
              "args": vars(a), "params": count_parameters(model), "train_rows": len(blocks["input_ids"]),
              "drill_rows": drill_rows,
              "answer_tokens_per_row": float((blocks["labels"] != -100).sum(1).float().mean()),
              "recall_warmup": warm, "recall_keep": a.recall_keep, "recall_after": recall_after, "curve": curve,
              "final": {k: final[k] for k in ("acc", "lo", "hi", "n", "per_kind", "wrong_object")},
              "attention": attention, "listing": listed, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(Path(a.json), result)
    print(f"{result['params']:,} parameters, {len(blocks['input_ids']):,} drills, {result['seconds']:.0f} s")
    print(f"final: {final['acc']:.3f} [{final['lo']:.3f}, {final['hi']:.3f}] on {final['n']} held-out questions")
    if attention["n"]:
        print(f"attention from the answer position onto the named object's words (uniform: "
              f"{attention['uniform_share']:.2f}, {attention['n']} questions):")
        for la in attention["layers"]:
            print(f"  layer {la['layer']}: best head {la['head']} puts {la['named_share']:.2f} there; the head that "
                  f"looks most at the question's word for the object gives it {la['question_word']:.2f}")
    print("listing replies, teacher-forced (the lookup with the looked-up word next to the answer): " +
          ", ".join(f"{k} {v['acc']:.2f} of {v['n']}" for k, v in listed.items()))
    print(json.dumps({"json": a.json}))
    return result


if __name__ == "__main__":
    main()
