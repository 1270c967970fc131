"""The serving engine: a vlkit model, one worker thread, and iteration-level (continuous) batching.

Images are encoded once per conversation rather than once per turn: the vision stack's features of recent
images are kept by content hash (`VisualCache`, `visual_cache` images).

Requests wait in a bounded queue (a full one refuses them: `EngineBusy`). The worker decodes one running batch
(`vlkit.models.decode.Batch`), one token per row per step; between steps, requests that have arrived are
prefilled together and join it (up to `max_batch` rows; an idle worker first waits `batch_window_ms` for company),
and rows that are done leave it: each request ends at its own max_tokens, stop string or end-of-sequence token,
with its own sampling settings and seed, streams included. A model whose fusions act on decoding steps too (an
adapter's gated attention) cannot take rows into a running batch: new requests then wait for it to end.

No request can stop the worker: whatever a step raises fails the requests of that batch (a prefill, those it
was prefilling), and the next are served. A cancelled request (its client went away, or it timed out) leaves
at the next step. `health()` says whether the worker is alive and how long its current step has taken.

With `experts` (vlkit.experts, LLaMA-Adapter V2 sec 3.4), `with_experts` writes their text about a request's
images into its conversation; the app calls it while preparing the request, so that the prompt it counts
against the context is the one generated from.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from vlkit.data.processor import VLProcessor
from vlkit.data.tokenizer import load_tokenizer
from vlkit.experts import WORLD_TEMPLATE, Expert, with_context
from vlkit.models.decode import Batch
from vlkit.models.generate import GenerationConfig, answer, decodes_alone, prefill, prepare
from vlkit.models.io import is_vlm_directory, load_vlm
from vlkit.models.llm import load_llm, position_limit
from vlkit.models.vlm import VisionLanguageModel
from vlkit.serve.visual_cache import VisualCache

log = logging.getLogger(__name__)


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
    waker: Callable[[], None] | None = None  # called from the engine's thread after a stream's piece is queued

    def put(self, item: "str | None | BaseException") -> None:
        """A stream's next piece (None: its end; an exception: its failure), and its reader woken."""
        self.pieces.put(item)
        if self.waker is not None:
            self.waker()

    def cancel(self) -> None:
        """The client is gone: stop generating for it at the next step."""
        self.cancelled.set()

    def resolve(self, result: dict) -> None:
        with contextlib.suppress(InvalidStateError):  # the app gave up on it meanwhile
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if self.streaming:
            self.put(error)
        else:
            with contextlib.suppress(InvalidStateError):
                self.future.set_exception(error)


class EngineBusy(Exception):
    """The engine's queue is full."""


class EngineStopped(Exception):
    """The engine's worker has ended (closed, or failed): it answers nothing more."""


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
        self.steps = self.rows_stepped = self.prefills = self.largest_batch = 0  # (for tests and benchmarks)
        self.step_seconds = 0.0  # spent in decoding steps
        self.failures = 0  # steps, prefills or context closes that raised (the worker went on)
        self._alone = decodes_alone(self.model)  # rows may join and leave a running batch
        self._context: contextlib.ExitStack | None = None
        self._busy_since: float | None = None
        self._stop = threading.Event()
        self._stopped = False  # the worker has ended: set, and the inbox drained, under _lock
        self._lock = threading.Lock()
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
        with self._lock:  # the worker, ending, drains the inbox under it: nothing is queued after that
            if self._stopped or self._stop.is_set():
                raise EngineStopped("the engine has stopped; restart the server")
            try:
                self.inbox.put_nowait(req)
            except queue.Full:
                raise EngineBusy(f"{self.inbox.maxsize} requests are queued") from None
        return req

    def health(self) -> dict:
        """{"alive": the worker runs, "busy_s": seconds spent on the current step (0 between), "queued": n}."""
        since = self._busy_since
        return {"alive": self._thread.is_alive(), "busy_s": 0.0 if since is None else time.monotonic() - since,
                "queued": self.inbox.qsize()}

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    # -- worker ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        running: Batch | None = None
        try:
            while not self._stop.is_set():
                try:
                    running = self._admit(running)
                    if running is None:
                        continue
                    self._busy_since = time.monotonic()
                    self.steps += 1
                    self.rows_stepped += len(running.answers)
                    self.largest_batch = max(self.largest_batch, len(running.answers))
                    pieces = running.step()
                    self.step_seconds += time.monotonic() - self._busy_since
                    running = self._deliver(running, pieces)
                except BaseException as e:  # noqa: BLE001 (nothing a request does may end the worker)
                    self.failures += 1
                    log.exception("engine step failed; its %d requests were failed", len(running.answers) if running
                                  is not None else 0)
                    self._fail_unanswered(running, e)
                    running = self._end()
                finally:
                    self._busy_since = None
        finally:  # closed, or (a bug) the worker itself failed: nothing running or queued is left waiting
            stopped = EngineStopped("the engine stopped before answering")
            with contextlib.suppress(BaseException):
                self._fail_unanswered(running, stopped)
            self._end()
            with self._lock:
                self._stopped = True
                while True:
                    try:
                        r = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    with contextlib.suppress(BaseException):
                        r.fail(stopped)

    @staticmethod
    def _fail_unanswered(running: "Batch | None", error: BaseException) -> None:
        """Fail the batch's requests not yet answered (a batch whose rows cannot leave keeps answered ones)."""
        for a in running.answers if running is not None else []:
            if not a.tag.future.done():
                a.tag.fail(error)

    def _admit(self, running: Batch | None) -> Batch | None:
        """Requests that have arrived, prefilled together, joined to the running batch (or starting one)."""
        room = self.max_batch - (len(running.answers) if running is not None else 0)
        if room <= 0 or (running is not None and not (running.joinable and self._alone)):
            return running
        new = self._arrived(room, wait=running is None)
        if not new:
            return running
        self._busy_since = time.monotonic()
        try:
            batch, pieces = self._prefill(new)
        except BaseException as e:  # noqa: BLE001 (fails the requests it was prefilling, not the running ones)
            self.failures += 1
            log.exception("engine prefill failed; its %d requests were failed", len(new))
            for r in new:
                r.fail(e)
            return running if running is not None else self._end()
        self.prefills += 1
        try:
            batch = self._deliver(batch, pieces)
            if running is None or batch is None:
                return running if batch is None else batch
            running.join(batch)
        except BaseException as e:  # the new requests fail here, the running ones (their batch in doubt) after
            for r in new:
                r.fail(e)
            raise
        return running

    def _arrived(self, room: int, wait: bool) -> list[Request]:
        """Up to `room` queued requests not cancelled; an idle worker waits for the first, then `batch_window_ms`."""
        out: list[Request] = []
        deadline = None
        while len(out) < room:
            try:
                if wait and not out:
                    r = self.inbox.get(timeout=0.1)
                    deadline = time.monotonic() + self.window
                elif deadline is not None and deadline > time.monotonic():
                    r = self.inbox.get(timeout=deadline - time.monotonic())
                else:
                    r = self.inbox.get_nowait()
            except queue.Empty:
                break
            if r.cancelled.is_set() or r.future.cancelled():
                r.put(None)  # a stream's reader, if still there, ends at once
                continue
            out.append(r)
        return out

    def _prefill(self, new: list[Request]) -> tuple[Batch, list[str]]:
        rows = [answer(self.model, self.processor, r.gen, cancelled=r.cancelled, text=r.streaming, tag=r) for r in new]
        inputs = prepare(self.model, self.processor, [r.conversation for r in new], [r.images for r in new],
                         self.visual.inputs([im for r in new for im in r.images]))
        fused = inputs.pop("fused")
        if not self._alone:  # the fusions act on every step of this batch: their context stays open until it ends
            self._context = contextlib.ExitStack()
            self._context.enter_context(fused)
            fused = None
        with torch.no_grad():
            return prefill(self.model, self.processor, inputs, rows, fused)

    def _deliver(self, batch: Batch, pieces: list[str]) -> Batch | None:
        """Send each row's new text; answer the rows that are done and let them leave (a batch whose rows cannot
        leave, an adapter's or one on transformers' own cache, feeds them padding until all are done). None: the
        batch ended."""
        keep = []
        for i, (a, piece) in enumerate(zip(batch.answers, pieces)):
            r: Request = a.tag
            if r.streaming and piece:
                r.put(piece)
            if not a.done:
                keep.append(i)
            elif not r.future.done():
                r.resolve(a.result())
                if r.streaming:
                    r.put(None)
        if not keep:
            return self._end()
        if len(keep) < len(batch.answers) and batch.joinable and self._alone:
            batch.keep(keep)
        return batch

    def _end(self) -> None:
        """The running batch is over: close the fusions' context it held open, if any (a failure to is logged:
        the worker goes on). Returns None (no batch)."""
        if self._context is not None:
            context, self._context = self._context, None
            try:
                context.close()
            except BaseException:  # noqa: BLE001 (raised here, in the worker's failure path, it would end it)
                self.failures += 1
                log.exception("closing a batch's fused context failed")
