"""Causal LMs: builders for the tiny world LLMs, loading any HF causal LM, and layer access
across families.

Builders are explicit functions, one per family (torchtune style): a config names the family and
its sizes, the builder makes the HF config and the model. Any other HF causal LM is loaded from a
local directory with `load_llm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, \
    PreTrainedModel, PreTrainedTokenizerBase

from vlkit.config import Section
from vlkit.errors import VlkitError


class LLMConfig(Section):
    """Sizes of a world LLM built from scratch (ignored when a pretrained directory is given)."""

    family: Literal["llama", "opt"] = Field("llama", description="Architecture family.")
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(344, gt=0, description="MLP width (OPT: ffn_dim).")
    max_position_embeddings: int = Field(512, gt=0)
    tie_word_embeddings: bool = Field(False)


def _special_ids(tok: PreTrainedTokenizerBase) -> dict:
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def build_llama(cfg: LLMConfig, tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                     intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=1e-5, **_special_ids(tok))
    return LlamaForCausalLM(hf)


def build_opt(cfg: LLMConfig, tok: PreTrainedTokenizerBase) -> OPTForCausalLM:
    hf = OPTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
                   max_position_embeddings=cfg.max_position_embeddings, word_embed_proj_dim=cfg.hidden_size,
                   do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                   tie_word_embeddings=cfg.tie_word_embeddings, **_special_ids(tok))
    return OPTForCausalLM(hf)


BUILDERS: dict[str, Callable[[LLMConfig, PreTrainedTokenizerBase], PreTrainedModel]] = {
    "llama": build_llama,
    "opt": build_opt,
}


def build_llm(cfg: LLMConfig, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    return BUILDERS[cfg.family](cfg, tok)


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin")


def check_weights(path: Path) -> None:
    """vlkit reads safetensors only, so that loading a directory never runs code hidden in a pickle."""
    if not list(path.glob("*.safetensors")) and any(list(path.glob(g)) for g in PICKLE_WEIGHTS):
        raise VlkitError(f"{path}: this directory holds only pickle weights (e.g. pytorch_model.bin); vlkit loads "
                         "safetensors only: convert them to safetensors first (transformers: "
                         "model.save_pretrained(dir, safe_serialization=True), in an environment you trust)")


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def attention_kwargs(name: str | None) -> dict:
    """transformers' `attn_implementation` for a name (None: its default, sdpa; auto: flash-attention 2 where the
    flash-attn package and a CUDA GPU are there, else sdpa)."""
    if name is None:
        return {}
    import importlib.util

    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if name == "auto":
        name = "flash_attention_2" if flash else "sdpa"
    if name not in ATTENTION:
        raise VlkitError(f"model.llm.attn_implementation: {name!r} is not one of auto, {', '.join(ATTENTION)}")
    if name == "flash_attention_2":
        if not flash:
            raise VlkitError("model.llm.attn_implementation: flash_attention_2 needs the flash-attn package and a "
                             "CUDA GPU; use auto or sdpa")
    return {"attn_implementation": name}


def load_llm(path: str | Path, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
             device: str | torch.device | None = None) -> PreTrainedModel:
    """Load any HF causal LM from a local directory (never from a hub; safetensors only), its weights read straight
    onto `device` (default: the CPU) in `dtype` (None / auto: as stored)."""
    from vlkit.devices import check_dtype_on, resolve_device, resolve_dtype

    path = Path(path)
    if not (path / "config.json").is_file():
        raise VlkitError(f"{path}: no config.json; point to a Hugging Face model directory")
    check_weights(path)
    try:
        dtype = resolve_dtype(dtype, "--dtype")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if device is not None:
            dev = resolve_device(device, what="--device")
            check_dtype_on(dtype, dev, "--dtype")
            kwargs["device_map"] = str(dev)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise VlkitError(f"{path}: cannot load the model ({str(e).splitlines()[0]}); "
                         "check that its weights are complete") from None


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a causal LM across families (LLaMA-like, OPT, GPT-NeoX, GPT-2, ...)."""
    for path in ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h", "transformer.blocks",
                 "model.language_model.layers"):
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise VlkitError(f"{type(model).__name__}: cannot find its decoder layers; add its layout to "
                     "vlkit.models.llm.decoder_layers")


def base_model(llm: nn.Module) -> PreTrainedModel:
    """The HF causal LM itself, under a peft wrapper if there is one."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def norm_modules(llm: nn.Module) -> list[nn.Module]:
    """The normalisation layers of a causal LM, found by structure: leaf modules whose every parameter is a vector
    (LayerNorm, RMSNorm and each family's variants: a weight and maybe a bias of one width). Linear layers,
    embeddings and attention blocks all hold matrices, so none of them qualifies."""
    return [m for m in llm.modules() if not list(m.children()) and list(m.parameters(recurse=False))
            and all(p.ndim == 1 for p in m.parameters(recurse=False))]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter weights of peft LoRA layers (found by module type, not by parameter name)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    out = []
    for m in module.modules():
        if isinstance(m, LoraLayer):
            for d in (m.lora_A, m.lora_B):
                out += [p for sub in d.values() for p in sub.parameters()]
    return out


def llm_groups(llm: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The LLM's named trainable groups: llm (all of it), llm.embeddings, llm.head, llm.norms, lora."""
    base = base_model(llm)
    head = base.get_output_embeddings()
    lora = lora_parameters(llm)
    lora_ids = {id(p) for p in lora}
    return {"llm": [p for p in llm.parameters() if id(p) not in lora_ids],
            "llm.embeddings": list(base.get_input_embeddings().parameters()),
            "llm.head": list(head.parameters()) if head is not None else [],
            "llm.norms": [p for m in norm_modules(base) for p in m.parameters(recurse=False)],
            "lora": lora}


# Families whose causal-LM logits are exactly `lm_head(decoder(x).last_hidden_state)` (Gemma-2 then caps them):
# for these the loss can be computed at the supervised positions alone (`supervised_loss`)
SPARSE_LOSS_FAMILIES = {"llama", "mistral", "qwen2", "opt", "gemma2"}
LOSS_CHUNK = 1024  # supervised positions whose logits are computed at once (and recomputed in the backward pass)


def supervised_loss(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor, num_items_in_batch=None, chunk: int | None = LOSS_CHUNK,
                    **kwargs) -> torch.Tensor | None:
    """The causal LM's next-token loss with the head applied only where a label is supervised: the decoder runs
    over every position, but of the (B, T, vocab) logits only the (n, vocab) rows of the n supervised positions
    are computed, `chunk` rows at a time under activation checkpointing, so a 32k-150k vocabulary never
    materialises for the whole batch. Equal to transformers' loss (mean over supervised tokens, or their sum over
    `num_items_in_batch`) up to float summation order. None for a family not in SPARSE_LOSS_FAMILIES."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = base_model(llm)
    if base.config.model_type not in SPARSE_LOSS_FAMILIES:
        return None
    hidden = base.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False,
                                **kwargs).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    h, y = hidden[:, :-1][keep], target[keep]
    head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)

    def part(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits.float(), y, reduction="sum")

    if chunk and len(y) > chunk:
        total = sum(checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                    for i in range(0, len(y), chunk))
    else:
        total = part(h, y)
    return total / (num_items_in_batch if num_items_in_batch is not None else keep.sum())


def position_limit(llm: nn.Module) -> int | None:
    """The longest sequence the LLM's position embeddings cover (None: no stated limit)."""
    return getattr(base_model(llm).config.get_text_config(), "max_position_embeddings", None)


def arch_of(hf_config) -> dict:
    """An HF config as the `arch` dict a saved vlkit model keeps: what rebuilds the module, without file names."""
    d = hf_config.to_dict()
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return d


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
