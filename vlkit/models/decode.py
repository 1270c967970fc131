"""Decoding: a batch of answers, one token per row per step, on a KV cache in preallocated memory.

`Batch.prefill` runs the (fused) prompts once; each `Batch.step` feeds every row its last token. The cache
(`SlabCache`) writes each step's keys and values in place into buffers sized for the whole answer, and attention
reads a view of the filled part: no per-step copy of the cache (transformers' DynamicCache concatenates, which
copies the whole cache at every step). Rows are right-aligned (left padding), so that every row's next token
goes into the same column; `Batch.join` merges two batches (the shorter one padded on the left) and `Batch.keep`
drops rows: a server adds requests to a running batch between steps and lets finished ones leave (issue 26).

`Answer` is one row's answer: its tokens, its text released incrementally (only the new tokens are decoded,
with one earlier chunk as context) and its stop strings, checked on the new text alone; text that could be the
start of a stop string is held back, so a stream never sends what a later stop string takes back.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class SlabLayer(DynamicLayer):
    """One layer's keys and values in buffers of `capacity` positions (grown by doubling when exceeded)."""

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity, self.n = max(int(capacity), 1), 0
        self._k = self._v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.n, self.is_initialized = 0, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.n, key_states.shape[-2]
        if n + t > self._k.shape[2]:
            self.place(self._k.shape[0], max(2 * self._k.shape[2], n + t), [self])
        self._k[:, :, n:n + t] = key_states
        self._v[:, :, n:n + t] = value_states
        self.n = n + t
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]

    def place(self, rows: int, capacity: int, sources: list["SlabLayer"]) -> None:
        """New buffers of `rows` x `capacity` holding every source's rows in turn, right-aligned: each source's
        last filled column lands on the last filled column of the longest."""
        n = max(s.n for s in sources)
        k = self._k.new_zeros((rows, self._k.shape[1], max(capacity, n), self._k.shape[3]))
        v = self._v.new_zeros((rows, self._v.shape[1], k.shape[2], self._v.shape[3]))
        row = 0
        for src in sources:
            b = src._k.shape[0]
            k[row:row + b, :, n - src.n:n], v[row:row + b, :, n - src.n:n] = src._k[:, :, :src.n], src._v[:, :, :src.n]
            row += b
        self._k, self._v, self.n = k, v, n
        self._views()

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def reset(self) -> None:
        self.n, self._k, self._v = 0, None, None
        super().reset()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.n = max(self.n + tokens_to_remove, 0)
            self._views()


class SlabCache(Cache):
    """A cache of `SlabLayer`s (one per decoder layer, created as the model first writes to it)."""

    def __init__(self, capacity: int):
        super().__init__(layer_class_to_replicate=lambda: SlabLayer(capacity))

    def join(self, other: "SlabCache") -> None:
        """Append `other`'s rows below these, both right-aligned to the longer one's length."""
        for mine, theirs in zip(self.layers, other.layers):
            spare = max(mine._k.shape[2] - mine.n, theirs._k.shape[2] - theirs.n)
            mine.place(mine._k.shape[0] + theirs._k.shape[0], max(mine.n, theirs.n) + spare, [mine, theirs])

    def trim_left(self, columns: int) -> None:
        """Forget the first `columns` positions (padding of every row); the buffers are views, nothing is copied."""
        for layer in self.layers:
            layer._k, layer._v = layer._k[:, :, columns:], layer._v[:, :, columns:]
            layer.n -= columns
            layer._views()


def slab_fits(llm) -> bool:
    """Whether every decoder layer of `llm` keeps plain attention keys and values (what SlabCache holds); others
    (linear attention, ...) decode on transformers' own cache, without joins."""
    layers = DynamicCache(config=llm.config).layers
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def _accepts(llm, name: str) -> bool:
    fn = getattr(llm, "get_base_model", lambda: llm)().forward
    return name in inspect.signature(fn).parameters


class Answer:
    """One row's answer: tokens in, text out (incrementally), ended by an `eos` token (default: the tokenizer's;
    none with `ignore_eos`, as vLLM's), a stop string, its length or `cancelled`. `finish` is None while it runs,
    then "stop" or "length" ("cancelled" for a cancelled one). `text`: decode as it goes (streams; stop strings
    always do), else once at the end."""

    def __init__(self, tokenizer, max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, cancelled: threading.Event | None = None,
                 text: bool = True, ignore_eos: bool = False, tag=None, eos: Sequence[int] | None = None):
        self.tokenizer, self.max_new_tokens, self.tag = tokenizer, max_new_tokens, tag  # tag: the caller's
        self.stop = [s for s in stop if s]
        self.temperature, self.top_p, self.cancelled = temperature, top_p, cancelled
        self.generator = None
        if temperature > 0:  # each answer samples from its own generator: the same seed, the same answer
            self.generator = torch.Generator().manual_seed(
                seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,))))
        self.eos = frozenset() if ignore_eos else frozenset([tokenizer.eos_token_id] if eos is None else eos)
        self.ids: list[int] = []
        self.finish: str | None = None
        self._text = text or bool(self.stop)  # decode as it goes (streams, stop strings) or once at the end
        self._window, self._read, self._seen = 0, 0, ""  # incremental decoding: ids[window:read] gave `_seen`
        self.text, self._sent = "", 0

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, token: int) -> str:
        """Take the next token; returns the text it releases ("" while held back)."""
        if token in self.eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= self.max_new_tokens:
                self.finish = "length"
            elif self.cancelled is not None and self.cancelled.is_set():
                self.finish = "cancelled"
        if self._text:
            full = self.tokenizer.decode(self.ids[self._window:], skip_special_tokens=True)
            if self.done or not full.endswith("\ufffd"):  # not in a character's bytes (at the end: what there is)
                start = len(self.text)
                self.text += full[len(self._seen):]
                self._window, self._read = self._read, len(self.ids)
                self._seen = self.tokenizer.decode(self.ids[self._window:], skip_special_tokens=True)
                cut = self._stop_at(start)
                if cut is not None:
                    self.text, self.finish = self.text[:cut], "stop"
        return self._release(len(self.text) if self.done else len(self.text) - self._held())

    def _stop_at(self, start: int) -> int | None:
        """Where the earliest stop string begins, if one ends in the text from `start` on."""
        if not self.stop:
            return None
        lo = max(start - max(map(len, self.stop)) + 1, 0)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that could begin a stop string (not sent yet)."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)

    def _release(self, upto: int) -> str:
        piece = self.text[self._sent:max(upto, self._sent)]
        self._sent = max(upto, self._sent)
        return piece

    def final_text(self) -> str:
        """The whole answer's text (decoded once, in full, when it was not decoded as it went)."""
        return self.text if self._text else self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def result(self) -> dict:
        """{"text" (stripped), "tokens" (generated, end token excluded), "finish_reason" ("stop" or "length")}."""
        return {"text": self.final_text().strip(), "tokens": len(self.ids),
                "finish_reason": "stop" if self.finish == "cancelled" else self.finish}


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most likely tokens whose probability reaches top_p."""
    order = logits.argsort(descending=True)
    mass = logits[order].softmax(-1).cumsum(-1)
    drop = mass - logits[order].softmax(-1) >= top_p  # the tokens after the nucleus is full
    drop[0] = False
    return logits.index_fill(0, order[drop], float("-inf"))


def choose(logits: torch.Tensor, answers: Sequence[Answer]) -> torch.Tensor:
    """Each row's next token: the argmax for greedy rows, a sample (temperature, top_p, the row's generator)
    for the others."""
    tokens = logits.argmax(-1)
    for i, a in enumerate(answers):
        if a.temperature > 0 and not a.done:
            row = logits[i].float() / a.temperature
            if a.top_p < 1:
                row = _top_p(row, a.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1).cpu(), 1, generator=a.generator)[0]
    return tokens


class Batch:
    """Answers decoding together: the cache (right-aligned rows), attention mask, next positions, last tokens."""

    def __init__(self, llm, answers: list[Answer], cache, mask: torch.Tensor, positions: torch.Tensor,
                 pad_token_id: int, spare: int = 0):
        self.llm, self.answers, self.cache = llm, answers, cache
        self.positions, self.pad = positions, pad_token_id
        self.last = positions.new_full((len(answers),), pad_token_id)
        self.joinable = isinstance(cache, SlabCache)
        self._keep = {"logits_to_keep": 1} if _accepts(llm, "logits_to_keep") else {}
        self.set_mask(mask, spare)

    def set_mask(self, mask: torch.Tensor, spare: int) -> None:
        """The attention mask (rows x columns so far), in a buffer with `spare` columns of ones to come."""
        self._mask = mask.new_ones((mask.shape[0], mask.shape[1] + max(spare, 1)))
        self._mask[:, :mask.shape[1]] = mask
        self.mask = self._mask[:, :mask.shape[1]]

    @classmethod
    @torch.no_grad()
    def prefill(cls, llm, answers: list[Answer], inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                fused: contextlib.AbstractContextManager | None = None,
                pad_token_id: int = 0) -> tuple["Batch", list[str]]:
        """Run the prompts (left-padded) once, inside `fused` (the model's fusions), and take each row's first
        token. Returns the batch and the text each answer released."""
        length = attention_mask.shape[1]
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 1)
        capacity = length + max(a.max_new_tokens for a in answers)
        cache = SlabCache(capacity) if slab_fits(llm) else DynamicCache(config=llm.config)
        batch = cls(llm, answers, cache, attention_mask, positions[:, -1], pad_token_id, capacity - length)
        with fused or contextlib.nullcontext():
            out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                      past_key_values=cache, use_cache=True, **batch._keep)
        return batch, batch._take(out.logits[:, -1])

    @property
    def done(self) -> bool:
        return all(a.done for a in self.answers)

    @torch.no_grad()
    def step(self) -> list[str]:
        """One token for every row (finished rows are fed padding, as transformers does); the text each released."""
        self.mask = self._grown_mask()
        out = self.llm(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                       past_key_values=self.cache, use_cache=True)
        return self._take(out.logits[:, -1])

    def _grown_mask(self) -> torch.Tensor:
        n = self.mask.shape[1]
        if n + 1 > self._mask.shape[1]:
            self.set_mask(self.mask, n)
        return self._mask[:, :n + 1]

    def _take(self, logits: torch.Tensor) -> list[str]:
        tokens = choose(logits, self.answers)
        pieces = []
        for i, (a, t) in enumerate(zip(self.answers, tokens.tolist())):
            if a.done:
                tokens[i] = self.pad
                pieces.append("")
            else:
                pieces.append(a.push(t))
        self.last = tokens
        self.positions = self.positions + 1
        return pieces

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows go on (finished ones leave); leading columns that are padding in every row go too."""
        if not self.joinable:
            raise ValueError("rows cannot leave this batch (the model's cache is not a SlabCache)")
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.answers = [self.answers[i] for i in rows]
        self.cache.batch_select_indices(index)
        self.positions, self.last = self.positions[index], self.last[index]
        mask, spare = self.mask[index], self._mask.shape[1] - self.mask.shape[1]
        pad = int((mask.sum(0) == 0).long().cumprod(0).sum()) if self.answers else 0  # padding every row starts with
        if pad:
            self.cache.trim_left(pad)
            mask = mask[:, pad:]
        self.set_mask(mask, spare)

    def join(self, other: "Batch") -> None:
        """Decode `other`'s rows with these from the next step on (both right-aligned)."""
        if not (self.joinable and other.joinable):
            raise ValueError("these batches cannot be joined (the model's cache is not a SlabCache)")
        n, m = self.mask.shape[1], other.mask.shape[1]
        width = max(n, m)
        mask = self.mask.new_zeros((len(self.answers) + len(other.answers), width))
        mask[:len(self.answers), width - n:] = self.mask
        mask[len(self.answers):, width - m:] = other.mask
        self.cache.join(other.cache)
        self.answers = self.answers + other.answers
        self.set_mask(mask, max(self._mask.shape[1] - n, other._mask.shape[1] - m))
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
