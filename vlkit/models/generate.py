"""Generation for VisionLanguageModels: greedy or sampled, batched with left padding, streamed.

The fused prompt (text + visual tokens) is prefilled once as ``inputs_embeds``, inside the context in
which the model's fusions act (`VisionLanguageModel.fused`); every further token reuses the KV cache of
that prefix (Hugging Face's ``generate`` loop on the LLM), so image features are computed once per request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise VlkitError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise VlkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise VlkitError(f"top_p must be in (0, 1], got {self.top_p}")


def prepare(model, processor: VLProcessor, conversations: Sequence[list[dict]], images: Sequence[Sequence],
            image_inputs: dict | None = None) -> dict:
    """Prompts (generation prompt added) left-padded, with fused input embeddings and the context in which the
    model's fusions act on the LLM's passes (`fused`). Images are given as files, PIL images or arrays, or, for
    all of them at once, as model inputs (`image_inputs`: {"pixel_values"} or {"image_features"}, in order)."""
    if len(conversations) != len(images):
        raise VlkitError(f"{len(conversations)} conversations but {len(images)} image lists")
    counts = [len(imgs) for imgs in images]
    # the views each image keeps (a tiled model skipping padded sub-images; None: all of them)
    if image_inputs is not None:
        views = image_inputs["view_mask"].sum(1).tolist() if "view_mask" in image_inputs else None
    else:
        if processor.views_vary:  # decoded once: the view counts and the pixels both read the upright image
            images = [[processor.transforms[0].rgb(im, f"image {k}") for k, im in enumerate(imgs)] for imgs in images]
        views = processor.view_counts([im for imgs in images for im in imgs])
    per_conv = [None if views is None else views[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(counts))]
    encs = [processor.encode(conv, len(imgs), record_id=f"conversation {i}", add_generation_prompt=True, views=v)
            for i, (conv, imgs, v) in enumerate(zip(conversations, images, per_conv))]
    batch = processor.pad(encs, side="left")
    device = next(model.llm.parameters()).device
    flat = [im for i, imgs in enumerate(images) for im in list(imgs)[: encs[i]["num_images"]]]
    if image_inputs is None:
        image_inputs = processor.image_inputs(flat) if flat else {}
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    with torch.no_grad():
        x = model.fusion_inputs(ids, mask, images_per_row=batch["images_per_row"], **image_inputs)
        embeds = model.embed_inputs(x)
    return {"inputs_embeds": embeds, "attention_mask": mask, "fused": model.fused(x)}


def _generate_kwargs(processor: VLProcessor, gen: GenerationConfig) -> dict:
    gen.check()
    tok = processor.tokenizer
    kw = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if gen.temperature > 0:
        kw.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if gen.stop:
        kw.update(stop_strings=list(gen.stop), tokenizer=tok)
    return kw


class Cancelled(StoppingCriteria):
    """Ends the rows whose event is set (a client that went away): they stop at the next step, the others go on."""

    def __init__(self, events: Sequence[threading.Event]):
        self.events = list(events)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([e.is_set() for e in self.events], dtype=torch.bool, device=input_ids.device)


class _Either:
    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _cancellable(kw: dict, events: Sequence[threading.Event] | None) -> dict:
    return {**kw, "stopping_criteria": StoppingCriteriaList([Cancelled(events)])} if events else kw


def trim(text: str, stop: Sequence[str]) -> str:
    cut = min([text.find(s) for s in stop if s and s in text], default=-1)
    return text if cut < 0 else text[:cut]


@torch.no_grad()
def generate(model, processor: VLProcessor, conversations: Sequence[list[dict]], images: Sequence[Sequence],
             gen: GenerationConfig | None = None, image_inputs: dict | None = None,
             return_ids: bool = False, cancelled: Sequence[threading.Event] | None = None) -> list[dict]:
    """Answer a batch of conversations. Returns [{"text", "tokens", "finish_reason"}] per conversation
    (+ "ids", the generated token ids before the end-of-sequence token, with `return_ids`). A row whose
    `cancelled` event is set stops generating at the next step."""
    gen = gen or GenerationConfig()
    kw = _cancellable(_generate_kwargs(processor, gen), cancelled)
    inputs = prepare(model, processor, conversations, images, image_inputs)
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    with inputs.pop("fused"):
        out = model.llm.generate(**inputs, **kw)
    tok = processor.tokenizer
    results = []
    for row in out:
        ids = row.tolist()
        n = len(ids)
        if tok.eos_token_id in ids:
            n = ids.index(tok.eos_token_id)
        text = tok.decode(ids[:n], skip_special_tokens=True)
        stopped = bool(gen.stop) and any(s in text for s in gen.stop)
        finish = "stop" if (n < len(ids) or stopped) else ("length" if len(ids) >= gen.max_new_tokens else "stop")
        results.append({"text": trim(text, gen.stop).strip(), "tokens": n, "finish_reason": finish})
        if return_ids:
            results[-1]["ids"] = ids[:n]
    return results


def stream(model, processor: VLProcessor, conversation: list[dict], images: Sequence,
           gen: GenerationConfig | None = None, cancelled: threading.Event | None = None,
           image_inputs: dict | None = None) -> Iterator[str]:
    """Yield the answer's text as it is generated (one conversation); setting `cancelled` ends it. `image_inputs`:
    the images as model inputs already (as `prepare` takes them)."""
    gen = gen or GenerationConfig()
    halt = threading.Event()  # set when this generator ends early: the generation thread stops at its next step
    kw = _cancellable(_generate_kwargs(processor, gen), [_Either(halt, cancelled)])
    inputs = prepare(model, processor, [conversation], [images], image_inputs)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    error: list[BaseException] = []

    fused = inputs.pop("fused")

    def work():
        try:
            with torch.no_grad(), fused:
                model.llm.generate(**inputs, **kw, streamer=streamer)
        except BaseException as e:  # surfaced in the caller's thread
            error.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    emitted = ""
    try:
        for piece in streamer:
            candidate = emitted + piece
            if gen.stop and any(s in candidate for s in gen.stop):
                rest = trim(candidate, gen.stop)[len(emitted):]
                if rest:
                    yield rest
                break
            emitted = candidate
            if piece:
                yield piece
    finally:  # a stop string, an error or a consumer that went away: no step more than needed
        halt.set()
        thread.join()
    if error:
        raise error[0]
