"""A Llama Guard-style classifier around any HF causal LM.

score   = P(first generated token is the first token of "unsafe") after the prompt, a softmax over the
          whole vocabulary at the last prompt position (one forward pass per batch), as Llama Guard defines it;
verdict = fails closed: "safe" only when the answer is exactly "safe" (any case, spacing, a final full stop)
          AND the score is below the threshold; an answer that says unsafe is "unsafe" whatever the score,
          a "safe" answer with a score at or above the threshold is "unsafe", anything else is "error" (never
          "safe"). Without generation (`generate=False`) the score alone decides;
categories = the codes after "unsafe" (its second line, or the rest of its line), parsed tolerantly ("S1, s2").
Batched with left padding; generation reuses the prompt's KV cache (HF generate).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from vlkit.data.tokenizer import load_tokenizer
from vlkit.errors import VlkitError
from vlkit.guard.prompt import Role, build_prompt
from vlkit.guard.taxonomy import Taxonomy, load_taxonomy
from vlkit.models.llm import load_llm


@dataclass
class Verdict:
    verdict: Literal["safe", "unsafe", "error"]
    score: float
    categories: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    raw: str = ""
    error: str | None = None

    @property
    def blocked(self) -> bool:
        return self.verdict != "safe"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_answer(text: str, taxonomy: Taxonomy) -> tuple[str, list[str], str | None]:
    """("safe"|"unsafe"|"error", codes, error message). "safe" is an answer that is exactly safe (any case,
    spacing, a final full stop) and nothing else; one whose first word is unsafe (any case) is "unsafe", with the
    codes that follow it; everything else is "error"."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "error", [], "empty answer"
    first = lines[0].lower()
    if first.rstrip(".").strip() == "safe":
        if len(lines) > 1:
            return "error", [], "'safe' followed by more text"
        return "safe", [], None
    word = re.match(r"[a-z]+", first)
    if word is None or word.group() != "unsafe":
        return "error", [], f"first line is {lines[0][:40]!r}, not 'safe' or 'unsafe'"
    rest = " ".join([lines[0][len("unsafe"):], *lines[1:2]])
    codes = [c for c in re.split(r"[\s,;:.]+", rest.upper()) if c]
    known = {c.upper(): c for c in taxonomy.codes()}
    unknown = [c for c in codes if c not in known]
    if unknown:
        return "error", [], f"unknown category code(s) {unknown[:3]}"
    return "unsafe", list(dict.fromkeys(known[c] for c in codes)), None


def check_threshold(threshold, where: str = "guard threshold") -> float:
    """A threshold is a finite number in [0, 1] (0 blocks everything; NaN or 2.0 would let every unsafe score pass)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0 <= threshold <= 1:
        raise VlkitError(f"{where}: {threshold!r} is not a probability in [0, 1]; set it to, e.g., 0.5")
    return float(threshold)


def first_token(tokenizer, prompt: str, word: str) -> int:
    """The first token the model would generate to start `word` right after `prompt`."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(base), len(full)) and base[k] == full[k]:
        k += 1
    if k >= len(full):
        raise VlkitError(f"guard: the tokenizer cannot express {word!r} after the prompt")
    return full[k]


class Guard:
    def __init__(self, model, tokenizer, taxonomy: Taxonomy | str = "llama-guard-3", version: int = 3,
                 template: Literal["inst", "chat", "native"] = "inst", threshold: float = 0.5,
                 max_new_tokens: int = 16):
        self.model, self.tok = model.eval(), tokenizer
        self.taxonomy = load_taxonomy(taxonomy) if isinstance(taxonomy, (str, Path)) else taxonomy
        self.version, self.template = version, template
        self.threshold = check_threshold(threshold)
        self.max_new_tokens = max_new_tokens
        probe = self.prompt([{"role": "user", "content": "hello"}], "User")
        self.unsafe_id = first_token(tokenizer, probe, "unsafe")
        self.safe_id = first_token(tokenizer, probe, "safe")
        if self.unsafe_id == self.safe_id:
            raise VlkitError("guard: 'safe' and 'unsafe' start with the same token for this tokenizer, so P(unsafe) "
                             "cannot be read from the first token; use a checkpoint whose tokenizer splits them apart")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
                        **kwargs) -> "Guard":
        """A guard from a local directory: a real Llama Guard checkpoint or one trained with recipe `guard`
        (its guard_config.json gives taxonomy, version and template defaults), on `device` in `dtype` (None /
        "auto": as stored)."""
        from vlkit.fileio import read_json

        path = Path(path)
        settings = read_json(path / "guard_config.json") if (path / "guard_config.json").is_file() else {}
        if not isinstance(settings, dict):
            raise VlkitError(f"{path / 'guard_config.json'}: expected a JSON object of guard settings")
        if "threshold" in settings:
            check_threshold(settings["threshold"], f"{path / 'guard_config.json'}: threshold")
        if settings.get("version", 3) not in (1, 2, 3) or settings.get("template", "inst") not in ("inst", "chat",
                                                                                                  "native"):
            raise VlkitError(f"{path / 'guard_config.json'}: version must be 1, 2 or 3 and template inst, chat or "
                             "native")
        if "taxonomy" in settings and "taxonomy" not in kwargs:
            try:
                kwargs["taxonomy"] = Taxonomy.model_validate(settings["taxonomy"])
            except ValueError as e:
                raise VlkitError(f"{path / 'guard_config.json'}: taxonomy is malformed ({str(e).splitlines()[0]})") \
                    from None
        for k in ("version", "template", "threshold"):
            if k in settings and k not in kwargs:
                kwargs[k] = settings[k]
        model = load_llm(path, dtype, device=device)
        return cls(model, load_tokenizer(path), **kwargs)

    def prompt(self, conversation: list[dict], role: Role = "User") -> str:
        return build_prompt(conversation, self.taxonomy, role, self.version, self.template, self.tok)

    @torch.no_grad()
    def classify(self, conversations: list[list[dict]], role: Role = "User", batch_size: int = 8,
                 generate: bool = True) -> list[Verdict]:
        """Verdicts for conversations judged at `role` ("User": the prompt; "Agent": the last reply)."""
        out: list[Verdict] = []
        for i in range(0, len(conversations), batch_size):
            prompts = [self.prompt(c, role) for c in conversations[i:i + batch_size]]
            out.extend(self._batch(prompts, generate))
        return out

    def _batch(self, prompts: list[str], generate: bool) -> list[Verdict]:
        device = next(self.model.parameters()).device
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        finally:
            self.tok.padding_side = side
        if not generate:
            logits = self.model(**enc).logits[:, -1].float()
            return [Verdict("unsafe" if self._over(s) else "safe", s) for s in self._p_unsafe(logits)]
        gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
        scores = self._p_unsafe(gen.scores[0].float())
        texts = self.tok.batch_decode(gen.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [self.decide(text, s) for s, text in zip(scores, texts)]

    def _p_unsafe(self, logits: torch.Tensor) -> list[float]:
        return torch.softmax(logits, -1)[:, self.unsafe_id].tolist()

    def _over(self, score: float) -> bool:
        """At or above the threshold; a score that is not a number (fp16 overflow) counts as over: fail closed."""
        return not math.isfinite(score) or score >= self.threshold

    def decide(self, text: str, score: float) -> Verdict:
        """The verdict of an answer and its P(unsafe): safe only if both say safe (fails closed)."""
        said, codes, err = parse_answer(text, self.taxonomy)
        if said == "error":
            return Verdict("error", score, raw=text, error=err)
        if said == "unsafe" or self._over(score):
            names = [self.taxonomy.by_code(c).name for c in codes]
            return Verdict("unsafe", score, codes, names, text, error=err)
        return Verdict("safe", score, raw=text)


class GuardMiddleware:
    """What serving calls around generation: check the user's input, then the model's reply."""

    def __init__(self, guard: Guard, check_inputs: bool = True, check_outputs: bool = True):
        self.guard, self.check_inputs, self.check_outputs = guard, check_inputs, check_outputs

    def check_input(self, conversation: list[dict]) -> Verdict | None:
        return self.guard.classify([conversation], "User")[0] if self.check_inputs else None

    def check_output(self, conversation: list[dict], reply: str) -> Verdict | None:
        if not self.check_outputs:
            return None
        return self.guard.classify([conversation + [{"role": "assistant", "content": reply}]], "Agent")[0]
