"""`vlkit chat`: a multi-turn conversation with a VLM in the terminal, streamed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from vlkit.data.images import load_image
from vlkit.models.generate import GenerationConfig, stream


class ChatSession:
    def __init__(self, model, processor, gen: GenerationConfig):
        self.model, self.processor, self.gen = model, processor, gen
        self.messages: list[dict] = []
        self.images: list = []
        self.pending: list = []

    @classmethod
    def open(cls, directory: str | Path, **gen) -> "ChatSession":
        from vlkit.models.io import load_vlm

        model, processor = load_vlm(directory)
        return cls(model, processor, GenerationConfig(**gen))

    def attach(self, path: str | Path) -> None:
        """Queue an image (checked now) for the next user message."""
        self.pending.append(load_image(path))

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, text: str) -> Iterator[str]:
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
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
                self.reset()
                out.write("(conversation cleared)\n")
                continue
            if line.startswith("/image "):
                from vlkit.errors import VlkitError

                try:
                    self.attach(line[len("/image "):].strip())
                    out.write(f"(image attached: {len(self.pending)} pending)\n")
                except VlkitError as e:
                    out.write(f"error: {e}\n")
                continue
            for piece in self.ask(line):
                out.write(piece)
                out.flush()
            out.write("\n")
