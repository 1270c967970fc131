"""`vlkit chat`: a multi-turn conversation with a VLM in the terminal, streamed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Sequence

from vlkit.data.images import load_image
from vlkit.errors import VlkitError
from vlkit.experts import WORLD_TEMPLATE, Expert, with_context
from vlkit.models.generate import GenerationConfig, stream


class ChatSession:
    """A conversation with a local model. With `experts` (vlkit.experts), each turn's images are first shown to
    them and their text is written into that turn's message as context (`template`; LLaMA-Adapter V2 sec 3.4)."""

    def __init__(self, model, processor, gen: GenerationConfig, experts: Sequence[Expert] = (),
                 template: str = WORLD_TEMPLATE):
        self.model, self.processor, self.gen = model, processor, gen
        self.experts, self.template = list(experts), template
        self.messages: list[dict] = []
        self.images: list = []
        self.pending: list = []

    @classmethod
    def open(cls, directory: str | Path, experts: Sequence[Expert] = (), template: str = WORLD_TEMPLATE,
             device: str = "cpu", dtype: str | None = None, **gen) -> "ChatSession":
        from vlkit.models.io import load_vlm

        model, processor = load_vlm(directory, device=device, dtype=dtype)
        return cls(model, processor, GenerationConfig(**gen), experts, template)

    def attach(self, path: str | Path) -> None:
        """Queue an image (checked now) for the next user message."""
        self.pending.append(load_image(path))

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, text: str) -> Iterator[str]:
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        message = {"role": "user", "content": content}
        if self.experts:  # once per image: the context stays in the history the later turns see
            message = with_context([message], self.pending, self.experts, self.template)[0]
        self.messages.append(message)
        self.images.extend(self.pending)
        self.pending = []
        answer = ""
        try:
            for piece in stream(self.model, self.processor, self.messages, self.images, self.gen):
                answer += piece
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})

    def repl(self, inp=None, out=None) -> None:
        repl(self, inp, out)


class RemoteChatSession(ChatSession):
    """The same conversation against a running OpenAI-compatible server (`vlkit serve`, vLLM, ...)."""

    def __init__(self, url: str, gen: GenerationConfig, model: str | None = None, api_key: str | None = None):
        import openai

        self.client = openai.OpenAI(base_url=url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"),
                                    api_key=api_key or "none", max_retries=0)
        try:
            self.model_name = model or self.client.models.list().data[0].id
        except openai.OpenAIError as e:
            raise VlkitError(f"{url}: no OpenAI-compatible server answers there ({type(e).__name__})") from None
        self.gen = gen
        self.reset()

    def attach(self, path: str | Path) -> None:
        import base64
        import io

        buf = io.BytesIO()
        load_image(path).save(buf, format="PNG")  # checked and normalised here, sent as a data URL
        self.pending.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

    def ask(self, text: str) -> Iterator[str]:
        import openai

        content = [{"type": "image_url", "image_url": {"url": u}} for u in self.pending] + \
            [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.pending = []
        answer = ""
        try:
            chunks = self.client.chat.completions.create(
                model=self.model_name, messages=self.messages, stream=True, max_tokens=self.gen.max_new_tokens,
                temperature=self.gen.temperature, top_p=self.gen.top_p, stop=self.gen.stop or None)
            for c in chunks:
                piece = c.choices[0].delta.content if c.choices else None
                if piece:
                    answer += piece
                    yield piece
        except openai.APIStatusError as e:
            raise VlkitError(f"server: {e.message}") from None
        finally:
            self.messages.append({"role": "assistant", "content": answer.strip()})


def repl(session: ChatSession, inp=None, out=None) -> None:
    """The terminal loop: /image PATH, /reset, /quit."""
    inp, out = inp or sys.stdin, out or sys.stdout
    out.write("vlkit chat: /image PATH, /reset, /quit\n")
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/image "):
            try:
                session.attach(line[len("/image "):].strip())
                out.write(f"(image attached: {len(session.pending)} pending)\n")
            except VlkitError as e:
                out.write(f"error: {e}\n")
            continue
        try:
            for piece in session.ask(line):
                out.write(piece)
                out.flush()
        except VlkitError as e:  # an expert that failed on this turn's image, say: the session goes on
            out.write(f"error: {e}")
        out.write("\n")
