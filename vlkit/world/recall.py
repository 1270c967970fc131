"""Synthetic recall tasks that form, in a few hundred steps, the lookup a tiny LM needs to answer from its context.

A small LLaMA trained on world conversations alone answers a colour or shape question with some object's value
about half the time: it has not formed the lookup "find the named word in the context, fetch the word bound to
it" (experiments/binding_probe.py). Two synthetic tasks form it on every seed tried (experiments/recall_probe.py,
README): the **copy task** (a random string, a separator, the string again), which forms induction heads, then
the **lookup** ("v1 k1 v2 k2 . k2 -> v2", either order per row), which builds on them. `world_rows` writes both
in the world's own words (shapes as keys, colours as values, and half the rows the other way round), so that the
heads formed there are the ones world questions use; `recipes.lm` runs them as `recall_warmup` stages.

The integer generators use ids PAD, BOS, SEP, IS and then the keys' and values' tokens (SPECIALS onwards).
"""

from __future__ import annotations

import re

import torch

PAD, BOS, SEP, IS = 0, 1, 2, 3
SPECIALS = 4
STAGES = ("copy", "mix:0", "mix:1")  # the curriculum that formed the world's lookup on 4 of 4 seeds
STAGE = re.compile(r"^(copy|(vk|kv|mix):(\d))$")


def parse_stage(stage: str) -> tuple[str, str | None, int]:
    """'copy' or '<order>:<gap>' (order vk, kv or mix; gap 0-9 IS tokens) -> (task, order, gap)."""
    m = STAGE.match(stage)
    if not m:
        raise ValueError(f"recall stage {stage!r}: give 'copy' or '<order>:<gap>' with order vk, kv or mix and a "
                         "gap of 0-9 tokens, e.g. 'mix:0'")
    return ("copy", None, 0) if m.group(1) == "copy" else ("lookup", m.group(2), int(m.group(3)))


def lookup_batch(gen: torch.Generator, n: int, keys: int, values: int, pairs: tuple[int, int], questions: int,
                 order: str, gap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` lookup rows: BOS, `pairs` key-value pairs (distinct keys, values drawn with replacement; 'vk' puts the
    value first, as "a red square" does; 'mix' draws the order per row), SEP, then `questions` queries
    "key [IS]*gap value". ids (n, T); labels (n, T), -100 off the answers; and (n, values) the values each row
    holds (a wrong answer that is one of them took the shortcut)."""
    lo, hi = pairs
    length = 1 + 2 * hi + 1 + questions * (2 + gap)
    ids = torch.full((n, length), PAD, dtype=torch.long)
    answer = torch.zeros((n, length), dtype=torch.bool)
    in_seq = torch.zeros((n, values), dtype=torch.bool)
    counts = torch.randint(lo, hi + 1, (n,), generator=gen)
    for i in range(n):
        m = int(counts[i])
        k = torch.randperm(keys, generator=gen)[:m]
        v = torch.randint(0, values, (m,), generator=gen)
        vk = order == "vk" or (order == "mix" and bool(torch.randint(0, 2, (1,), generator=gen)))
        first, second = (v + SPECIALS + keys, k + SPECIALS) if vk else (k + SPECIALS, v + SPECIALS + keys)
        row = [BOS] + torch.stack([first, second], 1).flatten().tolist() + [SEP]
        for j in torch.randint(0, m, (questions,), generator=gen).tolist():
            row += [int(k[j]) + SPECIALS] + [IS] * gap + [int(v[j]) + SPECIALS + keys]
            answer[i, len(row) - 1] = True
        ids[i, :len(row)] = torch.tensor(row)
        in_seq[i, v] = True
    return ids, torch.where(answer, ids, torch.full_like(ids, -100)), in_seq


def copy_batch(gen: torch.Generator, n: int, tokens: int, length: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """`n` rows of the copy task: BOS, a random string of length in `length` over `tokens` token kinds, SEP, the
    string again; the loss sees the copy from its second token on (the first is not predictable). ids, labels
    as `lookup_batch`, and None (no values to score)."""
    lo, hi = length
    ids = torch.full((n, 2 * hi + 2), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    counts = torch.randint(lo, hi + 1, (n,), generator=gen)
    for i in range(n):
        m = int(counts[i])
        s = torch.randint(SPECIALS, SPECIALS + tokens, (m,), generator=gen)
        ids[i, :2 * m + 2] = torch.cat([torch.tensor([BOS]), s, torch.tensor([SEP]), s])
        labels[i, m + 3:2 * m + 2] = s[1:]
    return ids, labels, None


def word_id(tok, word: str, space: str = " ") -> int:
    """The one token id of `word` as it appears mid-sentence; ValueError when the tokenizer splits it."""
    ids = tok.encode(space + word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {word!r} into {len(ids)} tokens; the recall warm-up needs one token "
                         "per shape and colour word (raise tokenizer.vocab_size)")
    return ids[0]


def world_rows(tok, n: int, seed: int, stage: str = "mix:0", pairs: tuple[int, int] = (2, 6),
               questions: int = 8) -> dict:
    """`n` rows of a recall `stage` written in the world's words: {"input_ids", "labels"}, both (n, T). Keys are
    the shapes and values the colours in half the lookup rows, the other way round in the rest; the separator
    is '.', the gap token 'is', padding the tokenizer's pad and the row opens with its BOS."""
    from vlkit.world.scene import COLORS, SHAPES

    task, order, gap = parse_stage(stage)
    shapes, colors = [word_id(tok, w) for w in SHAPES], [word_id(tok, w) for w in sorted(COLORS)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    specials = [pad, tok.bos_token_id if tok.bos_token_id is not None else pad, word_id(tok, ".", ""),
                word_id(tok, "is")]
    gen = torch.Generator().manual_seed(seed)

    def words(table: list[int], ids, labels):
        t = torch.tensor(table)
        return t[ids], torch.where(labels == -100, labels, t[labels.clamp(min=0)])

    if task == "copy":
        ids, labels = words(specials + shapes + colors, *copy_batch(gen, n, len(shapes) + len(colors), (8, 24))[:2])
        return {"input_ids": ids, "labels": labels}
    parts = []
    for keys, values, m in ((shapes, colors, n - n // 2), (colors, shapes, n // 2)):
        hi = min(pairs[1], len(keys))
        ids, labels, _ = lookup_batch(gen, m, len(keys), len(values), (min(pairs[0], hi), hi), questions, order, gap)
        parts.append(words(specials + keys + values, ids, labels))
    perm = torch.randperm(n, generator=gen)
    return {"input_ids": torch.cat([p[0] for p in parts])[perm], "labels": torch.cat([p[1] for p in parts])[perm]}


@torch.no_grad()
def answer_accuracy(model, rows: dict, batch_size: int = 250) -> float:
    """Exact match of the next-token argmax on the labelled tokens of `rows` (teacher-forced)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for i in range(0, len(rows["input_ids"]), batch_size):
        pred = model(input_ids=rows["input_ids"][i:i + batch_size].to(device)).logits[:, :-1].argmax(-1).cpu()
        target = rows["labels"][i:i + batch_size, 1:]
        mask = target != -100
        right += int(((pred == target) & mask).sum())
        total += int(mask.sum())
    model.train(was_training)
    return right / max(total, 1)
