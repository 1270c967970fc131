"""Expert models at inference (LLaMA-Adapter V2, Gao et al. 2023, sec 3.4).

An expert turns an image into text (a caption, the words written in it); that text is written into the
prompt as context beside the image, as the paper's "### Input:" slot carries a captioner's output. An expert
is anything with a ``name`` and ``__call__(image: PIL.Image.Image) -> str`` (`Expert`); "" says nothing.

    caption=DIR        CaptionExpert: a vlkit VLM directory captions the image (greedy)
    ocr=world          WorldTextReader: reads the word or number written in a shapes-world image
    NAME=cmd:COMMAND   CommandExpert: COMMAND IMAGE.png (no shell); its stripped stdout is the text
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from vlkit.errors import VlkitError

WORLD_TEMPLATE = "({text}) "  # how the world LLMs read a scene told in words (vlkit.recipes.lm.textualize)
INPUT_TEMPLATE = "### Input: {text}\n"  # the paper's Alpaca-style slot, for real checkpoints
TEMPLATES = {"world": WORLD_TEMPLATE, "input": INPUT_TEMPLATE}
SPECS = "caption=DIR (a vlkit model directory), ocr=world (the shapes-world text reader) or NAME=cmd:COMMAND"


@runtime_checkable
class Expert(Protocol):
    name: str

    def __call__(self, image: Image.Image) -> str: ...


def as_image(image) -> Image.Image:
    """A PIL image of a PIL image, a numpy array or an image file."""
    from vlkit.data.images import array_to_image, load_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return array_to_image(image) if isinstance(image, np.ndarray) else load_image(image)


class CaptionExpert:
    """A vlkit VLM as a captioner: its greedy answer to the world's caption prompt."""

    def __init__(self, model_dir: str | Path, name: str = "caption", max_new_tokens: int = 48):
        from vlkit.models.io import load_vlm
        from vlkit.world.dataset import CAPTION_PROMPTS

        self.name, self.prompt, self.max_new_tokens = name, CAPTION_PROMPTS[0], max_new_tokens
        if not (Path(model_dir) / "config.json").is_file():
            raise VlkitError(f"expert {name!r}: {model_dir} is not a vlkit model directory (no config.json); "
                             "give caption=DIR of a saved VLM")
        self.model, self.processor = load_vlm(model_dir)
        self.model.eval()

    def __call__(self, image: Image.Image) -> str:
        from vlkit.data.records import user
        from vlkit.models.generate import GenerationConfig, generate

        gen = GenerationConfig(max_new_tokens=self.max_new_tokens)
        return generate(self.model, self.processor, [[user(None, self.prompt)]], [[image]], gen)[0]["text"]


class WorldTextReader:
    """OCR on the shapes world: the word or number a scene carries (vlkit.world.scene.Text), "" when none.

    Template matching against the world renderer's own drawing of every value a scene may carry (its 20
    words and the numbers 10-99), each at the two half-pixel phases per axis the renderer's 2x supersampling
    places text on: the best normalised cross-correlation (NCC) with the image's grey levels over every
    position wins; its absolute value, so dark text on an object matches as well as light text on the
    background. Below `threshold` nothing is read. Images of another size are resized to `resolution` first.

    Measured (benchmarks/world_text_reader.py, seeds 3 and 4, which no choice here was tuned on): exact match
    1.000 on 1,000 held-out 64 px world images given text wherever it fits (501 words and 230 numbers on the
    background, 161 words and 66 numbers on objects, 42 with no room for text, read ""), and 1.000 on 500
    without text; the lowest score of a correct read was 0.971, the highest of an image without text 0.698;
    about 35 ms an image on a 2-core CPU.
    For a world rendered at R pixels pass resolution=R (128: 1.000 on 100 images, 0.15 s each); resized to
    64 px instead, images read worse (0.71 from 128 px, 0.81 from 448 px; 100 images each).
    """

    def __init__(self, name: str = "ocr", resolution: int = 64, threshold: float = 0.85):
        self.name, self.resolution, self.threshold = name, resolution, threshold

    def __call__(self, image: Image.Image) -> str:
        text, score = self.read(image)
        return text if score >= self.threshold else ""

    def read(self, image: Image.Image) -> tuple[str, float]:
        """The best-matching value and its |NCC| in [0, 1], whatever the threshold."""
        img = as_image(image)
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)
        grey = np.asarray(img.convert("L"), dtype=np.float64)
        values, shapes, spectra = _templates(self.resolution)
        # Every template at every offset at once, by FFT: dots[t, y, x] = sum_ij t[i, j] grey[y + i, x + j].
        # (No BLAS: small matrix products spend more on threads than on arithmetic on a busy machine.)
        dots = np.fft.irfft2(spectra * np.fft.rfft2(grey), s=grey.shape)
        best, text = -1.0, ""
        for (h, w), index in shapes.items():
            s1, s2 = _box_sums(grey, h, w), _box_sums(grey * grey, h, w)
            norm = np.sqrt(np.maximum(s2 - s1 * s1 / (h * w), 1.0))  # of each window less its mean
            ncc = np.abs(dots[index, : s1.shape[0], : s1.shape[1]]) / norm  # templates are zero-mean
            k = np.unravel_index(int(ncc.argmax()), ncc.shape)
            if ncc[k] > best:
                best, text = float(ncc[k]), values[index[k[0]]]
        return text, best


def _box_sums(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of `a` over every h x w window, (H - h + 1, W - w + 1), from its integral image."""
    c = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


@lru_cache(maxsize=4)
def _templates(resolution: int) -> tuple[list[str], dict[tuple[int, int], np.ndarray], np.ndarray]:
    """Every value the world writes, rendered alone at each phase, cropped to its ink and one pixel above and
    below (none beside: there the edges of a hexagon the text is written on would enter the window), zero
    mean and unit norm: (values, {(h, w): indices of the templates of that shape}, (n, R, R // 2 + 1)
    conjugate spectra of the templates zero-padded to R x R)."""
    from vlkit.world.render import render
    from vlkit.world.scene import TEXT_NUMBERS, WORDS, Scene, Text

    values, shapes, spectra = [], {}, []
    for value in WORDS + tuple(str(n) for n in TEXT_NUMBERS):
        for dx in (0, 1):
            for dy in (0, 1):  # the renderer draws at 2x: half-pixel steps of the final image
                at = (0.5 + dx / (2 * resolution), 0.5 + dy / (2 * resolution))
                g = np.asarray(render(Scene((), Text(value, None, *at)), resolution).convert("L"), np.float64)
                ys, xs = np.nonzero(np.abs(g - g[0, 0]) > 4)
                t = g[ys.min() - 1: ys.max() + 2, xs.min(): xs.max() + 1]
                padded = np.zeros_like(g)
                padded[: t.shape[0], : t.shape[1]] = (t - t.mean()) / np.linalg.norm(t - t.mean())
                shapes.setdefault(t.shape, []).append(len(values))
                values.append(value)
                spectra.append(np.conj(np.fft.rfft2(padded)))
    return values, {k: np.array(v) for k, v in shapes.items()}, np.stack(spectra)


class CommandExpert:
    """Any program as an expert: `command` (split like a shell would, run without one) with the image saved to
    a temporary PNG as its last argument; its stripped standard output is the text."""

    def __init__(self, command: str, name: str = "cmd", timeout: float = 60.0):
        self.command, self.name, self.timeout = command, name, timeout
        self.argv = shlex.split(command)
        if not self.argv:
            raise VlkitError(f"expert {name!r}: the command is empty; give cmd:PROGRAM [ARGS]")

    def __call__(self, image: Image.Image) -> str:
        where = f"expert {self.name!r} (command {self.command!r})"
        with tempfile.TemporaryDirectory(prefix="vlkit-expert-") as tmp:
            path = Path(tmp) / "image.png"
            as_image(image).save(path)
            try:
                done = subprocess.run([*self.argv, str(path)], capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise VlkitError(f"{where} took over {self.timeout:g} s; it was stopped") from None
            except OSError as e:
                raise VlkitError(f"{where} could not start ({e.strerror or e})") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise VlkitError(f"{where} exited with status {done.returncode}" + (f": {last}" if last else ""))
        return done.stdout.strip()


def parse_expert(spec: str) -> Expert:
    """An expert from a CLI spec: caption=DIR, ocr=world or NAME=cmd:COMMAND."""
    name, sep, value = spec.partition("=")
    name = name.strip()
    if sep and name and value.startswith("cmd:") and value[4:].strip():
        return CommandExpert(value[4:], name=name)
    if sep and name == "caption" and value:
        return CaptionExpert(value)
    if sep and name == "ocr" and value == "world":
        return WorldTextReader()
    raise VlkitError(f"expert spec {spec!r} is not one of {SPECS}")


def with_context(messages: list[dict], images: Sequence, experts: Sequence[Expert],
                 template: str = WORLD_TEMPLATE) -> list[dict]:
    """New messages in which each expert's text about each image is written right after that image's
    {"type": "image"} part (at the start of the text part that follows it, if one does), `template` (with
    {text}, and {name} for the expert's) around each non-empty text.
    `images` consume the image parts in order. A conversation without image parts (plain-string contents, a
    text-only LM) takes all of it at the start of its last user message: the experts describe the images in
    its place, as `vlkit.recipes.lm.textualize` does with scene descriptions."""
    out = [{**m, "content": list(m["content"]) if isinstance(m["content"], list) else m["content"]}
           for m in messages]
    if not experts:
        return out
    parts = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    if parts not in (0, len(images)):
        raise VlkitError(f"{parts} image parts but {len(images)} images; give one image per {{'type': 'image'}} part")
    contexts = []
    for image in images:
        pil = as_image(image)
        texts = [(e.name, e(pil).strip()) for e in experts]
        contexts.append("".join(template.format(text=t, name=n) for n, t in texts if t))
    if parts == 0:
        last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
        if last is not None and "".join(contexts):
            c = out[last]["content"]
            lead = "".join(contexts)
            out[last]["content"] = lead + c if isinstance(c, str) else [{"type": "text", "text": lead}, *c]
        return out
    k = 0
    for m in out:
        if not isinstance(m["content"], list):
            continue
        new, carry = [], ""  # an image's context opens the text part after it, or is a part of its own
        for p in m["content"]:
            if carry and p["type"] == "text":
                p, carry = {**p, "text": carry + p["text"]}, ""
            elif carry:
                new.append({"type": "text", "text": carry})
                carry = ""
            new.append(p)
            if p["type"] == "image":
                carry, k = contexts[k], k + 1
        m["content"] = new + ([{"type": "text", "text": carry}] if carry else [])
    return out
