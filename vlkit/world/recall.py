"""Synthetic recall tasks that form, in a few hundred steps, the lookup a tiny LM needs to answer from its context.

A small LLaMA trained on world conversations alone answers a colour or shape question with some object's value
about half the time: it has not formed the lookup "find the named word in the context, fetch the word bound to
it" (experiments/binding_probe.py). Two synthetic tasks form it on every seed tried (experiments/recall_probe.py,
README): the **copy task** (a random string, a separator, the string again), which forms induction heads, then
the **lookup** ("v1 k1 v2 k2 . k2 -> v2", either order per row), which builds on them. `world_rows` writes both
in the world's own words (shapes as keys, colours as values, and half the rows the other way round), so that the
heads formed there are the ones world questions use; `recipes.lm` runs them as `recall_warmup` stages.

Three more stages, written in world words only, practise what the drills alone leave near chance in a 3-layer LM
(README; measured there: count and where form and carry over but cost the colour lookup, relation does not form):
**count** ("red circle blue circle green star . circles two stars one squares zero": how often a shape is named,
asked by the plural as the world asks), **where** ("circle top left square right . square right circle top
left": each shape's region, one or two words) and **relation** ("circle top left square right . circle left of
square yes": two objects' regions fetched and compared, asked only where the regions decide it, as the world asks).

The integer generators use ids PAD, BOS, SEP, IS and then the keys' and values' tokens (SPECIALS onwards).
"""

from __future__ import annotations

import re

import torch

PAD, BOS, SEP, IS = 0, 1, 2, 3
SPECIALS = 4
STAGES = ("copy", "mix:0", "mix:1")  # the curriculum that formed the world's lookup on 4 of 4 seeds
STAGE = re.compile(r"^(?:(copy)|(count|where|relation)(?::([2-9]))?|(vk|kv|mix):(\d))$")


def parse_stage(stage: str) -> tuple[str, str | None, int]:
    """'copy'; 'count', 'where' or 'relation', each with ':<most>' objects per row (2-9) or the warm-up's
    `pairs`; or '<order>:<gap>' (order vk, kv or mix; gap 0-9 IS tokens) -> (task, order, gap or most; 0 where
    not given)."""
    m = STAGE.match(stage)
    if not m:
        raise ValueError(f"recall stage {stage!r}: give 'copy', 'count', 'where' or 'relation' (optionally "
                         "':<most objects>', 2-9, e.g. 'relation:2'), or '<order>:<gap>' with order vk, kv or mix "
                         "and a gap of 0-9 tokens, e.g. 'mix:0'")
    if m.group(1):
        return "copy", None, 0
    if m.group(2):
        return m.group(2), None, int(m.group(3) or 0)
    return "lookup", m.group(4), int(m.group(5))


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


def count_words(gen: torch.Generator, pairs: tuple[int, int], questions: int) -> list[tuple[str, bool]]:
    """One count row in words, each flagged when the loss scores it: `pairs` colour-shape objects drawn from a
    few shapes (so that counts reach past one), '.', then `questions` queries "shapes count" (the plural, as "how
    many circles are there?" asks), half of a shape the row names and half of any shape (zero when absent)."""
    from vlkit.world.language import NUMBERS
    from vlkit.world.scene import COLORS, SHAPES, plural

    colors = sorted(COLORS)
    m = int(torch.randint(pairs[0], pairs[1] + 1, (1,), generator=gen))
    kinds = torch.randperm(len(SHAPES), generator=gen)[:int(torch.randint(1, min(m, len(SHAPES)) + 1, (1,),
                                                                          generator=gen))]
    shapes = [SHAPES[int(kinds[int(i)])] for i in torch.randint(0, len(kinds), (m,), generator=gen)]
    words = [(w, False) for s in shapes for w in (colors[int(torch.randint(0, len(colors), (1,), generator=gen))], s)]
    words.append((".", False))
    for _ in range(questions):
        present = bool(torch.randint(0, 2, (1,), generator=gen))
        pool = shapes if present else SHAPES
        s = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
        words += [(plural(s), False), (NUMBERS[shapes.count(s)], True)]
    return words


def placed(gen: torch.Generator, pairs: tuple[int, int]) -> tuple[list[str], list[tuple[int, int]]]:
    """`pairs` (at least 2) distinct shapes, each in a (row, column) cell of the world's 3x3 regions."""
    from vlkit.world.scene import SHAPES

    m = max(2, int(torch.randint(pairs[0], pairs[1] + 1, (1,), generator=gen)))
    shapes = [SHAPES[int(i)] for i in torch.randperm(len(SHAPES), generator=gen)[:m]]
    return shapes, [(int(v) // 3, int(v) % 3) for v in torch.randint(0, 9, (m,), generator=gen)]


def placed_words(shapes: list[str], cells: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    from vlkit.world.scene import REGIONS

    return [(w, False) for s, (r, c) in zip(shapes, cells) for w in (s, *REGIONS[r][c].split())] + [(".", False)]


def where_words(gen: torch.Generator, pairs: tuple[int, int], questions: int) -> list[tuple[str, bool]]:
    """One where row in words, flagged as `count_words`: `pairs` shapes each followed by its region ('placed'),
    '.', then `questions` queries "shape region", every word of the region scored."""
    from vlkit.world.scene import REGIONS

    shapes, cells = placed(gen, pairs)
    words = placed_words(shapes, cells)
    for i in torch.randint(0, len(shapes), (questions,), generator=gen).tolist():
        r, c = cells[i]
        words += [(shapes[i], False), *((w, True) for w in REGIONS[r][c].split())]
    return words


def relation_words(gen: torch.Generator, pairs: tuple[int, int], questions: int) -> list[tuple[str, bool]]:
    """One relation row in words, flagged as `count_words`: `pairs` shapes each with its region ('placed'), '.',
    then `questions` queries "shape relation shape yes|no" over pairs that the regions decide
    (vlkit.world.language.decided_relations), the relation drawn among those decided (so yes and no are equally
    likely)."""
    from vlkit.world.language import decided_relations
    from vlkit.world.scene import Obj

    shapes, cells = placed(gen, pairs)
    objs = [Obj(shape=s, color="red", size="small", cx=(c + 0.5) / 3, cy=(r + 0.5) / 3)
            for s, (r, c) in zip(shapes, cells)]
    words = placed_words(shapes, cells)
    m = len(shapes)
    asked = [(i, j) for i in range(m) for j in range(m) if i != j and decided_relations(objs[i], objs[j])]
    for _ in range(questions if asked else 0):
        i, j = asked[int(torch.randint(0, len(asked), (1,), generator=gen))]
        options = decided_relations(objs[i], objs[j])
        rel, truth = options[int(torch.randint(0, len(options), (1,), generator=gen))]
        words += [(shapes[i], False), *((w, False) for w in rel.split()), (shapes[j], False),
                  ("yes" if truth else "no", True)]
    return words


TEXT_STAGES = {"count": count_words, "where": where_words, "relation": relation_words}


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
    if task in TEXT_STAGES:  # parse_stage's third figure is then the most objects a row (0: pairs')
        most = min(gap, pairs[1]) if gap else pairs[1]
        return text_rows(tok, n, seed, TEXT_STAGES[task], (min(pairs[0], most), most), questions)
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


def text_rows(tok, n: int, seed: int, words, pairs: tuple[int, int], questions: int) -> dict:
    """`n` rows of `words` (a generator of flagged words, e.g. `count_words`), one token per word (BOS first,
    padded): {"input_ids", "labels"} as `world_rows`."""
    gen = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else pad
    ids_of: dict[str, int] = {}
    rows = []
    for _ in range(n):
        row = words(gen, pairs, questions)
        for w, _ in row:
            if w not in ids_of:
                ids_of[w] = word_id(tok, w, "" if w == "." else " ")
        rows.append([(bos, False)] + [(ids_of[w], scored) for w, scored in row])
    length = max(len(r) for r in rows)
    ids = torch.full((n, length), pad, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor([t for t, _ in r])
        labels[i, :len(r)] = torch.tensor([t if scored else -100 for t, scored in r])
    return {"input_ids": ids, "labels": labels}


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
