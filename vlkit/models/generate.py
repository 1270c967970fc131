"""Generation for VisionLanguageModels: greedy or sampled, batched with left padding, streamed.

The fused prompt (text + visual tokens) is prefilled once as ``inputs_embeds``, inside the context in
which the model's fusions act (`VisionLanguageModel.fused`); every further token reuses the KV cache of
that prefix (vlkit's decoding loop, `vlkit.models.decode`: a preallocated cache, stop strings checked on the
new text alone), so image features are computed once per request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from vlkit.data.features import as_batch, as_list
from vlkit.data.processor import VLProcessor
from vlkit.errors import VlkitError
from vlkit.models.decode import Answer, Batch
from vlkit.models.fusion.base import Fusion


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever the model says (benchmarks; vLLM's option)

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
    kept = [sum(counts[:i]) + j for i, enc in enumerate(encs) for j in range(enc["num_images"])]
    if image_inputs is None:
        flat = [im for imgs in images for im in imgs]
        image_inputs = processor.image_inputs([flat[k] for k in kept]) if kept else {}
    elif len(kept) < sum(counts):  # a conversation cut to fit kept only its first images: so do their inputs
        image_inputs = {name: as_batch([part[kept] for part in as_list(value)])
                        for name, value in image_inputs.items()}
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    with torch.no_grad():
        x = model.fusion_inputs(ids, mask, images_per_row=batch["images_per_row"], **image_inputs)
        embeds = model.embed_inputs(x)
    return {"inputs_embeds": embeds, "attention_mask": mask, "fused": model.fused(x)}


def end_tokens(model, processor: VLProcessor) -> tuple[int, ...]:
    """The ids that end an answer: the tokenizer's end-of-sequence token and those of the LLM's generation config
    (Llama 3's <|eot_id|> beside <|end_of_text|>, ...)."""
    extra = getattr(getattr(model.base_llm, "generation_config", None), "eos_token_id", None)
    ids = {processor.tokenizer.eos_token_id, *(extra if isinstance(extra, (list, tuple)) else [extra])}
    return tuple(sorted(i for i in ids if i is not None))


def answer(model, processor: VLProcessor, gen: GenerationConfig, row: int = 0,
           cancelled: threading.Event | None = None, text: bool = False, tag=None) -> Answer:
    """The `Answer` `gen` asks for, as row `row` of a batch (a seed seeds row 0; row i samples from seed + i)."""
    gen.check()
    return Answer(processor.tokenizer, gen.max_new_tokens, gen.stop, gen.temperature, gen.top_p,
                  None if gen.seed is None else gen.seed + row, cancelled, text, gen.ignore_eos, tag,
                  end_tokens(model, processor))


def prefill(model, processor: VLProcessor, inputs: dict, rows: list[Answer], fused=None) -> tuple[Batch, list[str]]:
    """`prepare`d prompts run once (inside `fused`, when given) and each row's first token taken: (batch, the
    text each row released)."""
    return Batch.prefill(model.llm, rows, inputs["inputs_embeds"], inputs["attention_mask"], fused,
                         processor.tokenizer.pad_token_id)


def decodes_alone(model) -> bool:
    """Whether a decoding step needs none of the model's fusions (they act on the prompt's pass alone), so that
    rows can join and leave a running batch."""
    return all(type(f).active is Fusion.active or f.prefill_only for f in model.fusions.values())


@torch.no_grad()
def generate(model, processor: VLProcessor, conversations: Sequence[list[dict]], images: Sequence[Sequence],
             gen: GenerationConfig | None = None, image_inputs: dict | None = None,
             return_ids: bool = False, cancelled: Sequence[threading.Event] | None = None) -> list[dict]:
    """Answer a batch of conversations. Returns [{"text", "tokens", "finish_reason"}] per conversation
    (+ "ids", the generated token ids before the end-of-sequence token, with `return_ids`). A row whose
    `cancelled` event is set stops generating at the next step. Rows stay in the batch until all are done (as
    transformers' generate keeps them), so every row's numbers are those of one fixed batch."""
    gen = gen or GenerationConfig()
    rows = [answer(model, processor, gen, i, None if cancelled is None else cancelled[i])
            for i in range(len(conversations))]
    inputs = prepare(model, processor, conversations, images, image_inputs)
    with inputs.pop("fused"):  # the fusions act on every pass (an adapter's gated attention, at every step)
        batch, _ = prefill(model, processor, inputs, rows)
        while not batch.done:
            batch.step()
    return [{**a.result(), **({"ids": list(a.ids)} if return_ids else {})} for a in rows]


def stream(model, processor: VLProcessor, conversation: list[dict], images: Sequence,
           gen: GenerationConfig | None = None, cancelled: threading.Event | None = None,
           image_inputs: dict | None = None) -> Iterator[str]:
    """Yield the answer's text as it is generated (one conversation); setting `cancelled` ends it. `image_inputs`:
    the images as model inputs already (as `prepare` takes them). The pieces joined are the whole answer's text."""
    gen = gen or GenerationConfig()
    rows = [answer(model, processor, gen, cancelled=cancelled, text=True)]
    inputs = prepare(model, processor, [conversation], [images], image_inputs)
    with inputs.pop("fused"):
        batch, (piece,) = prefill(model, processor, inputs, rows)
        while True:
            if piece:
                yield piece
            if batch.done:
                break
            (piece,) = batch.step()
