"""Tokenizers: train a byte-level BPE on world text; chat template; assistant-only label masks.

Any Hugging Face fast tokenizer loaded from a local directory works the same way: it gets the
``<image>`` token and, when it has no chat template, vlkit's default one. Label masks are computed
from the template itself (render the conversation with and without each assistant turn; the
characters between are that turn), so they are right for any template that renders conversations
prefix-consistently, which is checked.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Iterable, Literal

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlkit.config import Section
from vlkit.errors import VlkitError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# Vicuna-style turns. Image parts render as <image>; the processor later expands each into the
# VPG's N image tokens. `{% generation %}` marks assistant text for tools that use
# return_assistant_tokens_mask; vlkit itself derives masks from prefixes (works for any template).
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}" + IMAGE_TOKEN + "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}USER: {{ render(message['content']) }}{{ '\\n' }}"
    "{%- else -%}ASSISTANT:{% generation %} {{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


class TokenizerConfig(Section):
    """A tokenizer to load, or to train on the recipe's text when `path` is empty."""

    path: str | None = Field(None, description="Local HF tokenizer directory; empty: train a BPE.")
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary size (training only).")
    style: Literal["llama", "opt"] = Field(
        "llama", description="llama: no prefix space; opt: GPT-2-style prefix space. Gives different "
        "tokenizations, as between real families.")


def train_bpe(texts: Iterable[str], vocab_size: int = 512, style: str = "llama",
              split_digits: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, wrapped as an HF fast tokenizer with chat template. `split_digits`:
    every digit its own token (as LLaMA does), so that arithmetic is learnt digit by digit."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=(style == "opt"))
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    # <pad> 0, <s> 1, <image> 2, </s> 3: keep eos != 2 (CLIP's text tower treats eos id 2 as legacy).
    specials = ["<pad>", "<s>", IMAGE_TOKEN, "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=4096)
    return prepare_tokenizer(fast)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give any tokenizer what vlkit needs: the image token, a pad token and a chat template."""
    if not tok.is_fast:
        raise VlkitError(f"{tok.name_or_path}: vlkit needs a fast tokenizer (tokenizer.json); convert it first")
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise VlkitError(f"{path}: tokenizer directory not found; train one or fix the path")
    try:
        cls = AutoTokenizer
        tcfg = path / "tokenizer_config.json"
        fast = ("PreTrainedTokenizerFast", "TokenizersBackend")
        if tcfg.is_file() and json.loads(tcfg.read_text()).get("tokenizer_class") in fast:
            cls = PreTrainedTokenizerFast  # skips AutoConfig (a vlkit model's config.json is no HF model type)
        tok = cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise VlkitError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    return prepare_tokenizer(tok)


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def render(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tok, messages[:i], add_generation_prompt=True)
        through = full if i == len(messages) - 1 else render(tok, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise VlkitError(f"{tok.name_or_path}: the chat template does not render conversations "
                             "prefix-consistently, so assistant turns cannot be located; use vlkit's default template")
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[dict], max_length: int | None = None) -> dict:
    """Token ids and labels of a conversation; labels are -100 except on assistant turns.

    Returns {"input_ids": list[int], "labels": list[int], "truncated": bool}.
    """
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(tid if inside else IGNORE_INDEX)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}
