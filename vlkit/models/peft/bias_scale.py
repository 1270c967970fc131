"""LLaMA-Adapter V2's unlocked bias, scale and norms (Gao et al. 2023, sec 3.1) as hooks on a frozen LLM.

Every nn.Linear inside the decoder layers gains a bias b (init 0) and a scale s (init 1), in one of two forms:

- ``output`` (the paper's): y = s * (W x + b0 + b), s of shape (out_features,);
- ``input`` (the released chat model's): y = W (s * x) + b0 + b, s of shape (in_features,);

with b of shape (out_features,) and b0 the linear's own bias where it has one (Qwen2's q/k/v). The lm_head and the
embeddings are left alone. The norms are the LLM's own weights, unlocked by the recipe (`llm.norms`); they are only
counted here. At init both forms are exactly the identity. `BiasScale.merge` folds b and s into the weights and
`plain_causal_lm` turns the result into a transformers model that loads without vlkit.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vlkit.errors import VlkitError
from vlkit.models.llm import base_model, decoder_layers, norm_modules

Form = Literal["output", "input"]
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # LLaMA's decoder, differing only in which linears carry a bias
# what a LlamaConfig takes from a Mistral or Qwen2 config to rebuild the same network (head_dim is added apart:
# Qwen2 configs may not state it)
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
                "initializer_range")


def decoder_linears(llm: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, keyed by its path there with dots as underscores
    (`layers_0_self_attn_q_proj`): stable, readable keys for the parameters that belong to it."""
    layers = decoder_layers(base_model(llm))
    return {"layers_" + name.replace(".", "_"): m for name, m in layers.named_modules() if isinstance(m, nn.Linear)}


def scale_width(linear: nn.Linear, form: Form) -> int:
    if form not in ("output", "input"):
        raise VlkitError(f"bias-scale form {form!r}: use 'output' (the paper's) or 'input' (the chat model's)")
    return linear.out_features if form == "output" else linear.in_features


class BiasScale(nn.Module):
    """A bias (out_features,) and a scale ((out_features,) or (in_features,), by `form`) for each decoder linear,
    applied by hooks (sec 3.1). The parameters live here, as `biases.<key>` and `scales.<key>` with the keys of
    `decoder_linears`, so the LLM's own `state_dict()` keys never change."""

    def __init__(self, linears: dict[str, nn.Linear], form: Form = "output"):
        super().__init__()
        self.form = form
        self.biases = nn.ParameterDict({k: nn.Parameter(torch.zeros(m.out_features, device=m.weight.device,
                                                                    dtype=m.weight.dtype)) for k, m in linears.items()})
        self.scales = nn.ParameterDict({k: nn.Parameter(torch.ones(scale_width(m, form), device=m.weight.device,
                                                                   dtype=m.weight.dtype)) for k, m in linears.items()})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def build(cls, llm: nn.Module, form: Form = "output") -> BiasScale:
        """Identity-initialised parameters for every linear in `llm`'s decoder layers (not yet attached)."""
        return cls(decoder_linears(llm), form)

    def bias_params(self) -> list[nn.Parameter]:
        return list(self.biases.values())

    def scale_params(self) -> list[nn.Parameter]:
        return list(self.scales.values())

    def _linears(self, llm: nn.Module) -> dict[str, nn.Linear]:
        linears = decoder_linears(llm)
        if linears.keys() != self.biases.keys():
            odd = sorted(linears.keys() ^ self.biases.keys())[0]
            raise VlkitError(f"{type(base_model(llm)).__name__}: its decoder linears differ from the ones this "
                             f"bias-scale module was built for (at {odd}); build it from this LLM")
        return linears

    def attach(self, llm: nn.Module) -> BiasScale:
        """Hook every decoder linear of `llm` (moving the hooks if already attached elsewhere)."""
        self.detach()
        for key, linear in self._linears(llm).items():
            if self.form == "input":
                self._handles.append(linear.register_forward_pre_hook(self._scale_input(key)))
            self._handles.append(linear.register_forward_hook(self._shift_output(key)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # `.to(x)` casts to the activation's dtype and device, so the hooks follow autocast and bf16 LLMs
    def _scale_input(self, key: str):
        def hook(_, args):  # args[0]: (..., in_features)
            return (args[0] * self.scales[key].to(args[0]), *args[1:])
        return hook

    def _shift_output(self, key: str):
        def hook(_, args, out):  # out: (..., out_features)
            out = out + self.biases[key].to(out)
            return out * self.scales[key].to(out) if self.form == "output" else out
        return hook

    @torch.no_grad()
    def merge(self, llm: nn.Module) -> None:
        """Fold into `llm`'s weights in place and remove the hooks. Output form: W' = diag(s) W, b' = s (b0 + b);
        input form: W' = W diag(s), b' = b0 + b. A linear without a bias gains one. This module is reset to the
        identity afterwards, so merging twice changes nothing."""
        for key, linear in self._linears(llm).items():
            w = linear.weight  # (out_features, in_features)
            b, s = self.biases[key].to(w), self.scales[key].to(w)
            bias = b + (0 if linear.bias is None else linear.bias)  # always a new tensor
            if self.form == "output":
                w.mul_(s[:, None])
                bias = bias * s
            else:
                w.mul_(s[None, :])
            if linear.bias is None:
                linear.bias = nn.Parameter(bias, requires_grad=w.requires_grad)
            else:
                linear.bias.copy_(bias)
        for p in self.bias_params():
            p.zero_()
        for p in self.scale_params():
            p.fill_(1)
        self.detach()


def active_sliding_window(cfg) -> int | None:
    """The attention window a LLaMA decoder cannot express (None where attention is full for every length the
    model is made for). Qwen2 keeps `sliding_window` set but off unless `use_sliding_window`."""
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return window if window is not None and window < cfg.max_position_embeddings else None


def plain_causal_lm(llm: nn.Module) -> PreTrainedModel:
    """A merged LLaMA-like LM as a plain `LlamaForCausalLM` whose config puts a bias on every decoder linear, so
    `save_pretrained` + `AutoModelForCausalLM.from_pretrained` give its logits without vlkit. Mistral and Qwen2
    configs cannot state a bias on o_proj or the MLP, so they become a LLaMA of the same sizes (the keys are the
    same). The result shares its tensors with `llm`."""
    model = base_model(llm)
    cfg = model.config
    kind = cfg.model_type
    if kind not in LLAMA_LIKE:
        raise VlkitError(f"{kind}: only LLaMA-like models ({', '.join(LLAMA_LIKE)}) can be written as a plain "
                         "transformers model with merged bias and scale; keep the adapter file instead of merging")
    if (window := active_sliding_window(cfg)) is not None:
        raise VlkitError(f"{kind}: its attention uses a sliding window of {window} tokens, which a LLaMA config "
                         "cannot express; keep the adapter file instead of merging")
    unmerged = [k for k, m in decoder_linears(model).items() if m.bias is None]
    if unmerged:
        raise VlkitError(f"{kind}: decoder linear {unmerged[0]} has no bias; call BiasScale.merge(llm) first")
    if isinstance(cfg, LlamaConfig):
        new = copy.deepcopy(cfg)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        new = LlamaConfig(head_dim=head_dim, **{k: copy.deepcopy(getattr(cfg, k)) for k in LLAMA_FIELDS})
    new.attention_bias = new.mlp_bias = True
    with torch.device("meta"):  # no random init: every weight comes from `model`
        plain = LlamaForCausalLM(new)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    # the rotary frequencies are a non-persistent buffer, so they are computed, not loaded
    plain.model.rotary_emb = LlamaRotaryEmbedding(new).to(model.get_input_embeddings().weight.device)
    if new.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.train(model.training)


def trainable_counts(llm: nn.Module, form: Form = "output") -> dict[str, int]:
    """What bias, scale and norm tuning trains (sec 3.1), counted from shapes without allocating (works on the
    meta device): {"scales", "biases", "norms", "total"}."""
    linears = decoder_linears(llm).values()
    scales = sum(scale_width(m, form) for m in linears)
    biases = sum(m.out_features for m in linears)
    norms = sum(p.numel() for m in norm_modules(base_model(llm)) for p in m.parameters(recurse=False))
    return {"scales": scales, "biases": biases, "norms": norms, "total": scales + biases + norms}
