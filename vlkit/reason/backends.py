"""Where completions come from: a local model (any HF causal LM or vlkit model directory, batched) or any
OpenAI-compatible chat endpoint. Every call reports its prompt and completion tokens.

Local token counts come from the model's own tokenizer and chat template (the exact prompt that was
run); endpoint counts are the server's `usage` field (None when a server does not send it).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from vlkit.errors import VlkitError
from vlkit.fileio import read_json

TRAINED_AS = "reason.json"  # written by the `ats` recipe into its model directory: how the model was taught


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None  # set when the call failed (the text is then empty)


class Backend(Protocol):
    name: str
    style: str  # "prompted" or "tuned": how questions should be put to this model

    def complete(self, conversations: Sequence[list[dict]], max_tokens: int,
                 temperature: float = 0.0) -> list[Completion]: ...


class LocalBackend:
    """A model directory on this machine: a vlkit VLM (text-only use) or a plain HF causal LM. Conversations are
    answered in batches of `batch_size` (left padding, one generate call per batch)."""

    def __init__(self, path: str | Path, batch_size: int = 16, device: str = "cpu", dtype: str | None = None):
        from vlkit.serve.engine import load_model

        path = Path(path)
        if not path.is_dir():
            raise VlkitError(f"{path}: model directory not found; give a vlkit model or HF causal-LM directory")
        self.model, self.processor, self.name = load_model(path, device, dtype)
        self.batch_size = batch_size
        trained = read_json(path / TRAINED_AS) if (path / TRAINED_AS).is_file() else {}
        self.style = trained.get("style", "prompted")
        self.trained_method = trained.get("method")

    def complete(self, conversations, max_tokens, temperature=0.0) -> list[Completion]:
        from vlkit.models.generate import GenerationConfig, generate

        out = []
        ctx = self.processor.config.max_length
        for i in range(0, len(conversations), self.batch_size):
            chunk = list(conversations[i:i + self.batch_size])
            lengths = [len(self.processor.encode(c, 0, add_generation_prompt=True, truncate=False)["input_ids"])
                       for c in chunk]
            room = ctx - max(lengths)
            if room < 1:
                out += [Completion("", n, 0, error=f"prompt of {n} tokens fills the context of {ctx}")
                        for n in lengths]
                continue
            gen = GenerationConfig(max_new_tokens=min(max_tokens, room), temperature=temperature, seed=0)
            for n, r in zip(lengths, generate(self.model, self.processor, chunk, [[] for _ in chunk], gen)):
                out.append(Completion(r["text"], n, r["tokens"]))
        return out


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint. Base URL and key from the arguments or the environment
    (OPENAI_BASE_URL, OPENAI_API_KEY); the model from the argument, else the endpoint's first listed model."""

    style = "prompted"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 4, timeout: float = 300.0):
        try:
            import openai
        except ImportError:
            raise VlkitError("the OpenAI-compatible backend needs the openai package: pip install 'vlkit[openai]'") \
                from None
        self._openai = openai
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise VlkitError("OPENAI_BASE_URL is not set; export the endpoint's base URL (e.g. "
                             "http://127.0.0.1:8000/v1) or pass --base-url")
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=2)
        self.base_url, self.concurrency = base_url, concurrency
        try:
            self.name = model or self.client.models.list().data[0].id
        except (openai.APIError, IndexError) as e:
            raise VlkitError(f"{base_url}: cannot list models ({type(e).__name__}: {e}); pass --model") from None

    def _one(self, messages: list[dict], max_tokens: int, temperature: float) -> Completion:
        try:
            r = self.client.chat.completions.create(model=self.name, messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature)
        except self._openai.APIConnectionError as e:
            raise VlkitError(f"{self.base_url}: cannot connect ({e}); is the server running?") from None
        except self._openai.APIStatusError as e:  # this request failed (e.g. too long): record it, go on
            return Completion("", None, None, error=f"HTTP {e.status_code}: {str(e)[:200]}")
        usage = r.usage
        return Completion(r.choices[0].message.content or "", getattr(usage, "prompt_tokens", None),
                          getattr(usage, "completion_tokens", None))

    def complete(self, conversations, max_tokens, temperature=0.0) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens, temperature), conversations))


def make_backend(kind: str, model: str | None, base_url: str | None = None, batch_size: int = 16,
                 device: str = "cpu", dtype: str | None = None) -> Backend:
    if kind == "local":
        if not model:
            raise VlkitError("--backend local needs --model DIR (a vlkit model or HF causal-LM directory)")
        return LocalBackend(model, batch_size=batch_size, device=device, dtype=dtype)
    if kind == "openai":
        return OpenAIBackend(model, base_url=base_url)
    raise VlkitError(f"unknown backend {kind!r}; choose local or openai")
