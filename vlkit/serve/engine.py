"""The serving engine: a vlkit model, one worker thread, and dynamic batching.

Images are encoded once per conversation rather than once per turn: the vision stack's features of recent
images are kept by content hash (`VisualCache`, `visual_cache` images).

Requests wait in a bounded queue (a full one refuses them: `EngineBusy`); the worker takes what has arrived
within `batch_window_ms` (up to `max_batch`), groups requests that sample alike (temperature, top_p, seed),
and answers each group in ONE batched generate call (left padding). Per-request limits are applied to each
answer afterwards: its own max_tokens and stop strings cut its text, so requests with different settings
still share the forward passes. Streaming requests run alone, token by token.

No request can stop the worker: whatever one raises fails that request (and the batch it shared), and the
next is served. A cancelled request (its client went away, or it timed out) stops generating at the next
step. `health()` says whether the worker is alive and how long it has been busy with one batch.

With `experts` (vlkit.experts, LLaMA-Adapter V2 sec 3.4), `with_experts` writes their text about a request's
images into its conversation; the app calls it while preparing the request, so that the prompt it counts
against the context is the one generated from.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import load_tokenizer
from vlkit.experts import WORLD_TEMPLATE, Expert, with_context
from vlkit.models.generate import GenerationConfig, generate, stream, trim
from vlkit.models.io import is_vlm_directory, load_vlm
from vlkit.models.llm import load_llm, position_limit
from vlkit.models.vlm import VisionLanguageModel
from vlkit.serve.visual_cache import VisualCache


def text_only(path: Path, device="cpu", dtype=None):
    """A plain HF causal LM, served as a model without eyes."""
    tok = load_tokenizer(path)
    llm = load_llm(path, dtype, device=device)
    model = VisionLanguageModel.text_only(llm)
    return model, VLProcessor.for_model(tok, model, position_limit(llm) or 2048)


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, processor, name) of a vlkit model directory (or a stock llava / blip-2 one) or a plain HF
    causal-LM directory (text only), on `device` in `dtype` (None / "auto": as stored); the name is the
    directory's, or its run's for a `<run>/model` directory."""
    path = Path(path).resolve()
    if is_vlm_directory(path):
        model, processor = load_vlm(path, device=device, dtype=dtype)
    else:
        model, processor = text_only(path, device, dtype)
    return model.eval(), processor, (path.parent.name if path.name == "model" else path.name)


@dataclass
class Request:
    conversation: list[dict]
    images: list
    gen: GenerationConfig
    streaming: bool = False
    future: Future = field(default_factory=Future)
    pieces: "queue.Queue[str | None | BaseException]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: stop generating for it at the next step."""
        self.cancelled.set()

    def fail(self, error: BaseException) -> None:
        if self.streaming:
            self.pieces.put(error)
        elif not self.future.done():
            self.future.set_exception(error)


class EngineBusy(Exception):
    """The engine's queue is full."""


class Engine:
    def __init__(self, model, processor, name: str, max_batch: int = 16, batch_window_ms: float = 10.0,
                 batching: bool = True, max_queue: int = 256, experts: Sequence[Expert] = (),
                 template: str = WORLD_TEMPLATE, visual_cache: int = 64):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.visual = VisualCache(self.model, processor, visual_cache)  # a conversation's images encoded once
        self.experts, self.template = list(experts), template
        self.max_batch = max_batch if batching else 1
        self.window = batch_window_ms / 1000 if batching else 0.0
        self.inbox: "queue.Queue[Request]" = queue.Queue(maxsize=max_queue)
        self.batches: list[int] = []  # sizes of the batches run (for tests and benchmarks)
        self.failures = 0  # batches that raised (each failed its requests; the worker went on)
        self._busy_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlkit-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, device: str = "cpu", dtype: str | None = None,
             **kwargs) -> "Engine":
        """A vlkit model directory, or a plain HF causal-LM directory (text only), on `device` in `dtype`. Served as
        `name` (default: the directory's name, or its run's name for a `<run>/model` directory)."""
        model, processor, default = load_model(path, device, dtype)
        return cls(model, processor, name or default, **kwargs)

    @property
    def takes_images(self) -> bool:
        return self.model.takes_images

    def with_experts(self, conversation: list[dict], images: list) -> list[dict]:
        """The request's conversation with this engine's experts' text about its images written in as context
        (LLaMA-Adapter V2 sec 3.4); unchanged without experts. Run before the prompt is counted and queued."""
        return with_context(conversation, images, self.experts, self.template) if self.experts else conversation

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, conversation: list[dict], images: list) -> int:
        """Tokens of the prompt, each image taking the views it keeps (a tiled model skipping padded sub-images)."""
        return len(self.processor.encode(conversation, len(images), add_generation_prompt=True, truncate=False,
                                         views=self.processor.view_counts(images) if images else None)["input_ids"])

    # -- API ---------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        try:
            self.inbox.put_nowait(req)
        except queue.Full:
            raise EngineBusy(f"{self.inbox.maxsize} requests are queued") from None
        return req

    def health(self) -> dict:
        """{"alive": the worker runs, "busy_s": seconds spent on the current batch (0 when idle), "queued": n}."""
        since = self._busy_since
        return {"alive": self._thread.is_alive(), "busy_s": 0.0 if since is None else time.monotonic() - since,
                "queued": self.inbox.qsize()}

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    # -- worker ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            try:
                self._busy_since = time.monotonic()
                if first.cancelled.is_set() or first.future.cancelled():
                    first.pieces.put(None)  # a stream's reader, if still there, ends at once
                    continue
                if first.streaming:
                    self._stream(first)
                    continue
                more, streams = self._gather()
                batch += more + streams
                groups: dict[tuple, list[Request]] = {}
                for r in [first, *more]:
                    groups.setdefault((r.gen.temperature, r.gen.top_p, r.gen.seed), []).append(r)
                for group in groups.values():
                    self._run(group)
                for r in streams:  # arrived while the batch was gathered: served right after it
                    self._stream(r)
            except BaseException as e:  # noqa: BLE001 (nothing a request does may end the worker)
                self.failures += 1
                for r in batch:
                    r.fail(e)
            finally:
                self._busy_since = None

    def _gather(self) -> tuple[list[Request], list[Request]]:
        """What else arrives within the batch window: (requests to batch, streaming requests for after)."""
        more, streams, deadline = [], [], time.monotonic() + self.window
        while len(more) + 1 < self.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self.inbox.get(timeout=max(left, 0)) if left > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if nxt.cancelled.is_set():
                continue
            (streams if nxt.streaming else more).append(nxt)
        return more, streams

    def _run(self, group: list[Request]) -> None:
        group = [r for r in group if not r.cancelled.is_set()]
        if not group:
            return
        self.batches.append(len(group))
        longest = max(r.gen.max_new_tokens for r in group)
        shared = GenerationConfig(max_new_tokens=longest, temperature=group[0].gen.temperature,
                                  top_p=group[0].gen.top_p, seed=group[0].gen.seed)
        try:
            with torch.no_grad():
                outs = generate(self.model, self.processor, [r.conversation for r in group],
                                [r.images for r in group], shared, return_ids=True,
                                cancelled=[r.cancelled for r in group],
                                image_inputs=self.visual.inputs([im for r in group for im in r.images]))
        except BaseException as e:  # every waiting request learns of it
            self.failures += 1
            for r in group:
                r.fail(e)
            return
        tok = self.processor.tokenizer
        for r, out in zip(group, outs):
            ids = out["ids"]
            if len(ids) > r.gen.max_new_tokens:  # this request's own budget
                ids, finish = ids[: r.gen.max_new_tokens], "length"
            else:  # without stop strings, the shared call says "stop" only at the end-of-sequence token
                finish = out["finish_reason"]
            text = tok.decode(ids, skip_special_tokens=True)
            if any(s and s in text for s in r.gen.stop):
                text, finish = trim(text, r.gen.stop), "stop"
            if not r.future.done():
                r.future.set_result({"text": text.strip(), "tokens": len(ids), "finish_reason": finish})

    def _stream(self, r: Request) -> None:
        if r.cancelled.is_set():
            r.pieces.put(None)
            return
        self.batches.append(1)
        try:
            for piece in stream(self.model, self.processor, r.conversation, r.images, r.gen, cancelled=r.cancelled,
                                image_inputs=self.visual.inputs(list(r.images))):
                r.pieces.put(piece)
            r.pieces.put(None)
        except BaseException as e:  # noqa: BLE001 (reported in the stream)
            self.failures += 1
            r.pieces.put(e)
