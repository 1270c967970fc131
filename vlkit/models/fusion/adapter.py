"""`adapter` fusion: LLaMA-Adapter V2 (Gao et al. 2023; V1: Zhang et al. 2023, section 3.1-3.2).

A frozen LLaMA gains a few learnable prompts whose attention is computed apart from the tokens' and
gated per head by tanh(gate), gate 0 at init, so a fresh adapter leaves the logits exactly as they were:

    layer l, queries q (B, H, L, d) of the tokens (RoPE applied), prompt P (B or 1, K, D):
        k, v = that layer's own k_proj(P), v_proj(P)            (no RoPE: the prompts have no position)
        a    = tanh(g_l) * softmax(q k^T / sqrt(d)) v            g_l (H,) zero-init   (V1 Eq. 5-8)
        o_proj input = attention of the tokens + a

Which prompts enter which layer (V2 section 3.3, "early fusion"):
    early  (the paper): the VPG's visual tokens are the prompts of the first `visual_layers` layers, with
           gates of their own; the top `prompt_layers` layers hold K shared adaption prompts, never visual.
    late   (V1 and the released V2 code): no visual layers; each image's M visual tokens are added to the
           adaption prompts of every top layer (needs M = K).
An image takes no token slots in the text. With `bias_scale`, every linear of the LLM also gains a bias and
a scale (vlkit.models.peft.bias_scale, V2 section 3.1). Groups: adapter.prompts, adapter.gates,
adapter.visual_gates, adapter.bias_scale. Attention is reached through each layer's q/k/v/o projections,
so any LLaMA-like family works (LLaMA, Mistral, Mixtral, Qwen2, Qwen3); another is refused by name.

Trainable parameters of V1 on LLaMA-7B (K = 10 prompts in the top 30 of 32 layers, D = 4096, 32 heads):
10 x 30 x 4096 = 1,228,800 prompts + 30 x 32 = 960 gates.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from vlkit.config import Section
from vlkit.errors import VlkitError
from vlkit.models.fusion.base import Fusion, FusionInputs, register_fusion
from vlkit.models.llm import base_model, decoder_layers

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3")  # rotate-half RoPE on q/k, q/k/v/o projections


class AdapterConfig(Section):
    prompt_length: int = Field(10, ge=0, description="K, adaption prompts per top layer (V1: 10).")
    prompt_layers: int | None = Field(None, ge=0, description="Top layers holding prompts (default: all but the "
                                      "visual layers; V1 on LLaMA-7B: 30).")
    fusion: Literal["early", "late"] = Field("early", description="early: visual tokens are the prompts of the "
                                             "first visual_layers layers only (the paper); late: added to every "
                                             "adaption prompt (V1, the released V2 code; needs M = K).")
    visual_layers: int = Field(1, ge=0, description="Early fusion: first layers whose prompts are the visual tokens.")
    bias_scale: Literal["none", "output", "input"] = Field(
        "output", description="Bias and scale on every linear of the LLM: output = the paper's s * (Wx + b); "
        "input = the released chat model's W(s * x) + b; none = V1.")


def llama_like(llm) -> list[nn.Module]:
    """The attention modules of a LLaMA-like causal LM (one per decoder layer), else a VlkitError naming it."""
    base = base_model(llm)
    family = base.config.get_text_config().model_type
    attns = [getattr(layer, "self_attn", None) for layer in decoder_layers(base)]
    if family not in LLAMA_LIKE or any(a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj")) for a in attns):
        raise VlkitError(f"adapter: cannot reach the attention of a {family} LLM (needs a LLaMA-like family: "
                         f"{', '.join(LLAMA_LIKE)})")
    return attns


@register_fusion("adapter")
class Adapter(Fusion):
    Config = AdapterConfig

    def __init__(self, config: AdapterConfig, num_layers: int, width: int, heads: int, visual_tokens: int):
        super().__init__(config)
        early = config.visual_layers if config.fusion == "early" else 0
        top = num_layers - early if config.prompt_layers is None else config.prompt_layers
        if early + top > num_layers:
            raise VlkitError(f"adapter: {early} visual + {top} prompt layers exceed the LLM's {num_layers} layers; "
                             "lower adapter.prompt_layers or adapter.visual_layers")
        if config.fusion == "late" and visual_tokens != config.prompt_length:
            raise VlkitError(f"adapter.fusion late adds each visual token to an adaption prompt: the VPG makes "
                             f"{visual_tokens} tokens, prompt_length is {config.prompt_length}; make them equal")
        self.visual_layer_ids = list(range(early))
        self.prompt_layer_ids = list(range(num_layers - top, num_layers))
        self.prompts = nn.Parameter(torch.randn(top, config.prompt_length, width) * 0.02)
        self.gates = nn.Parameter(torch.zeros(top, heads))
        self.visual_gates = nn.Parameter(torch.zeros(early, heads))
        self.bias_scale = None
        self._pass: dict = {}                      # layer -> (hidden, cos, sin) of the running pass
        self._visual: tuple | None = None          # (B, P, D) visual prompts and their (B, P) mask, while active

    @classmethod
    def build(cls, config: AdapterConfig, model) -> "Adapter":
        attns = llama_like(model.llm)
        text = base_model(model.llm).config.get_text_config()
        fusion = cls(config, len(attns), model.llm_width, text.num_attention_heads, model.vpg.num_tokens)
        if config.bias_scale != "none":
            from vlkit.models.peft.bias_scale import BiasScale

            fusion.bias_scale = BiasScale.build(model.llm, config.bias_scale)
        return fusion

    def attach(self, model) -> None:
        """Hooks on each adapted layer: its attention's input (the queries' source) and its o_proj's input."""
        if any(f.image_slots(model) for f in model.fusions.values() if f is not self):
            raise VlkitError("adapter: visual tokens enter as prompts, not as text tokens; drop the tokens fusion")
        attns = llama_like(model.llm)
        for i in self.visual_layer_ids + self.prompt_layer_ids:
            attns[i].register_forward_pre_hook(self._remember(i), with_kwargs=True)
            attns[i].o_proj.register_forward_pre_hook(self._adapt(i, attns[i]), prepend=True)
        if self.bias_scale is not None:
            self.bias_scale.attach(model.llm)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"adapter.prompts": [self.prompts], "adapter.gates": [self.gates],
                  "adapter.visual_gates": [self.visual_gates]}
        if self.bias_scale is not None:
            groups["adapter.bias_scale"] = list(self.bias_scale.parameters())
        return {k: v for k, v in groups.items() if any(p.numel() for p in v)}

    @contextmanager
    def active(self, x: FusionInputs):
        """Within this block, the rows of `x` see their images' visual tokens (B, P = max images x M, D)."""
        if x.visual is None or not len(x.visual):
            yield
            return
        rows, (n, m, d) = x.input_ids.shape[0], x.visual.shape
        per_row = torch.bincount(x.owner, minlength=rows)
        if self.config.fusion == "late" and int(per_row.max()) > 1:
            raise VlkitError("adapter.fusion late adds one image's tokens to the prompts: a conversation here has "
                             f"{int(per_row.max())} images; use fusion early")
        slot = torch.arange(n, device=x.owner.device) - (torch.cumsum(per_row, 0) - per_row)[x.owner]
        prompts = x.visual.new_zeros(rows, int(per_row.max()) * m, d)
        mask = torch.zeros(rows, prompts.shape[1], dtype=torch.bool, device=prompts.device)
        cols = (slot[:, None] * m + torch.arange(m, device=slot.device)).reshape(-1)
        owner = x.owner.repeat_interleave(m)
        prompts = prompts.index_put((owner, cols), x.visual.reshape(-1, d))
        mask[owner, cols] = True
        self._visual = (prompts, mask)
        try:
            yield
        finally:
            self._visual = None

    # -- the hooks -----------------------------------------------------------------------------------
    def _remember(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            self._pass[layer] = (hidden, cos, sin)
        return hook

    def _adapt(self, layer: int, attn: nn.Module):
        def hook(module, args):
            hidden, cos, sin = self._pass.pop(layer)
            prompts, mask = self._prompts_of(layer)
            if prompts is None:
                return None
            gate = self.visual_gates[layer] if layer in self.visual_layer_ids \
                else self.gates[self.prompt_layer_ids.index(layer)]
            extra = gated_prompt_attention(attn, hidden, cos, sin, prompts.to(hidden.dtype), mask, gate)
            return (args[0] + extra.to(args[0].dtype), *args[1:])
        return hook

    def _prompts_of(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B or 1, P, D) prompts of `layer` in this pass, with a (B, P) mask where some are absent."""
        if layer in self.visual_layer_ids:
            return self._visual if self._visual is not None else (None, None)
        prompts = self.prompts[self.prompt_layer_ids.index(layer)][None]
        if self.config.fusion == "late" and self._visual is not None:
            visual, present = self._visual
            prompts = prompts + visual * present[..., None]  # rows without an image keep the plain prompts
        return prompts, None


def gated_prompt_attention(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           prompts: torch.Tensor, mask: torch.Tensor | None, gate: torch.Tensor) -> torch.Tensor:
    """tanh(gate) * softmax(q k^T / sqrt(d)) v over the prompts, as the o_proj input it adds to: (B, L, H * d).

    hidden (B, L, D) the attention's input; cos/sin (B, L, d) its RoPE; prompts (B or 1, P, D); mask (B, P) or
    None; gate (H,). Prompt keys and values go through the layer's own projections (and q/k norms, if any)."""
    b, length, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(b, length, -1, d).transpose(1, 2)
    k = attn.k_proj(prompts).view(prompts.shape[0], prompts.shape[1], -1, d).transpose(1, 2)
    v = attn.v_proj(prompts).view(prompts.shape[0], prompts.shape[1], -1, d).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + rotate_half(q) * s
    heads = q.shape[1]
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)).float() * getattr(attn, "scaling", d ** -0.5)   # (B, H, L, P)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        empty = ~mask.any(1)
        scores = scores.masked_fill(empty[:, None, None, None], 0.0)  # no prompts: any finite row, gated off below
    weights = torch.softmax(scores, -1).to(q.dtype) * torch.tanh(gate).to(q.dtype)[None, :, None, None]
    if mask is not None:
        weights = weights * (~empty).to(q.dtype)[:, None, None, None]
    return (weights @ v).transpose(1, 2).reshape(b, length, -1)


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """The adapter alone (prompts, gates, bias/scale: a few MB for a 7B LLM) as safetensors, with its settings in
    the file's metadata; `load_adapter` puts it back on a model built with the same settings."""
    from safetensors.torch import save_file

    from vlkit.fileio import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"vlkit_adapter": json.dumps(adapter.settings())})
    return Path(path)


def load_adapter(model, path: str | Path) -> Adapter:
    """Load `save_adapter`'s file into `model`'s adapter fusion (added with the file's settings if it has none)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            settings = json.loads((f.metadata() or {}).get("vlkit_adapter", "null"))
        state = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise VlkitError(f"{path}: not an adapter file ({str(e).splitlines()[0][:120]}); write it with "
                         "save_adapter") from None
    if not isinstance(settings, dict) or settings.get("kind") != "adapter":
        raise VlkitError(f"{path}: no adapter settings in its metadata; write it with save_adapter")
    if "adapter" not in model.fusions:
        model.add_fusion("adapter", **{k: v for k, v in settings.items() if k != "kind"})
    adapter = model.fusion("adapter")
    if adapter.settings() != settings:
        raise VlkitError(f"{path}: written for adapter settings {settings}, the model's are {adapter.settings()}")
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise VlkitError(f"{path}: does not fit this model's adapter ({str(e).splitlines()[0][:160]})") from None
    return adapter


def merged_llm(model):
    """The LLM with the adapter's bias and scale folded into its weights, as a plain transformers causal LM
    (`save_pretrained` it and `AutoModelForCausalLM` loads it, with the same logits as the LLM under the
    bias/scale hooks). The prompts act through attention and have no counterpart in a stock checkpoint. The
    model's own LLM is changed in place: its bias/scale is the identity afterwards."""
    from vlkit.models.peft.bias_scale import plain_causal_lm

    adapter = model.fusion("adapter")
    if adapter.bias_scale is None:
        raise VlkitError("merge: this adapter has no bias/scale (bias_scale: none); the LLM is unchanged already")
    adapter.bias_scale.merge(model.llm)
    return plain_causal_lm(model.llm)
