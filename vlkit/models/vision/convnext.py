"""ConvNeXt (Liu et al. 2022) read as tokens: what the HF encoder family needs to know about transformers'
``ConvNextModel`` (model_type ``convnext``), whose features are maps, not token sequences.

    pixels (B, 3, S, S) -> stem (stride patch_size) -> stage 1 -> stage 2 (stride 2) -> ... -> map (B, C, h, w)
    tokens: [mean over the grid; the grid row-major]                                       (B, 1 + h * w, C)

The mean leads as a class token would (`special_position = "first"`, one special token), as SPHINX places
it beside its ConvNeXt-XXL grid; `select: patch` drops it. Features are the final stage's map, exactly
``last_hidden_state``: open_clip's timm trunk (SPHINX's ConvNeXt) normalises that map with a LayerNorm over
the channels at every position (its head norm), which HF's ConvNextModel applies only to the pooled mean
(its ``layernorm``, in ``pooler_output``); a converted open_clip tower gives un-normalised tokens here.

``feature_layer`` indexes ``hidden_states``: 0 is the stem's output, i the output of stage i, -1 (the same as
``output``) the last stage; each has its own grid (halved per stage after the first) and width
(``hidden_sizes``). The input side is free (no position embeddings): ``image_size`` in the arch, or the
size a directory's preprocessor_config.json feeds it.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from vlkit.data.transforms import Resize
from vlkit.errors import VlkitError

# ConvNextImageProcessor centre-crops (by crop_pct) below this side and squashes from it up
CROP_BELOW = 384


def arch_defaults(arch: dict) -> dict:
    """An arch as ConvNextConfig needs it: `num_stages` follows `depths` (the config's own default is 4, which
    a 3-stage arch would contradict), and the stage lists agree."""
    arch = dict(arch)
    if "depths" in arch:
        arch.setdefault("num_stages", len(arch["depths"]))
    n = arch.get("num_stages", 4)
    for key in ("hidden_sizes", "depths"):
        if key in arch and len(arch[key]) != n:
            raise VlkitError(f"tower arch (convnext): {key} has {len(arch[key])} entries for {n} stages; give "
                             "hidden_sizes and depths one entry per stage")
    return arch


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    raise VlkitError(f"tower (convnext): {what} {v!r} is neither a side nor (height, width)")


def geometry(config: PretrainedConfig, layer: int | str) -> tuple[int, tuple[int, int]]:
    """(width, grid) of hidden_states[layer] (`output`: the last stage) at the config's image_size."""
    states = config.num_stages + 1  # the stem's output, then every stage's
    i = states - 1 if layer == "output" else layer if layer >= 0 else states + layer
    if not 0 <= i < states:
        raise VlkitError(f"tower.feature_layer: {layer} is not a ConvNeXt hidden state (this one has {states}: the "
                         "stem's output and one per stage; -1 or output is the last stage)")
    size, patch = _pair(config.image_size, "image_size"), _pair(config.patch_size, "patch_size")
    h, w = size[0] // patch[0], size[1] // patch[1]     # the stem: a conv with kernel = stride = patch_size
    for _ in range(max(i - 1, 0)):                      # stages 2.. open with a stride-2, kernel-2 conv
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise VlkitError(f"tower (convnext): image_size {config.image_size} leaves no grid at hidden state {i}; "
                         "feed it larger images or read an earlier stage")
    return config.hidden_sizes[max(i - 1, 0)], (h, w)


def map_tokens(x: torch.Tensor) -> torch.Tensor:
    """A feature map (B, C, h, w) -> (B, 1 + h * w, C): its mean over the grid, then the grid row-major."""
    grid = x.flatten(2).transpose(1, 2)
    return torch.cat([grid.mean(1, keepdim=True), grid], 1)


def input_of(pp: dict, config: PretrainedConfig) -> tuple[int, Resize | None]:
    """The side a directory's processor feeds the model and how it gets there (None: as the processor's flags
    say, see ImageTransform.from_hf). ConvNextImageProcessor below 384 px resizes the shorter side to
    shortest_edge / crop_pct and crops the centre; vlkit's `crop` crops the whole shorter side, which is exact
    at crop_pct 1 and frames a little more of the image below it. A fixed-size processor (height x width, as
    vlkit saves) gives its height; without a processor, the config's image_size."""
    size = pp.get("size")
    if isinstance(size, int):
        return size, None
    if isinstance(size, dict) and "shortest_edge" in size:
        side = int(size["shortest_edge"])
        return side, ("crop" if side < CROP_BELOW else "squash") if "crop_pct" in pp else None
    if isinstance(size, dict) and "height" in size:
        return int(size["height"]), None
    return _pair(config.image_size, "image_size")[0], None
