"""vlkit model directories through transformers' Auto classes, without trust_remote_code:

    import vlkit
    AutoConfig.from_pretrained(d)       # VlkitConfig: config.json's keys as attributes (vlm, image_token_id, ...)
    AutoModel.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda:0")   # the VisionLanguageModel

AutoModel returns the VisionLanguageModel that `load_vlm` returns (its own forward, groups and processor at
`VLProcessor.load(d)`), not a PreTrainedModel: dressing it as one would promise save_pretrained, generate and
device maps that it does not keep. It takes a dtype and one device; anything else is refused in one line.

`import vlkit` registers these when transformers loads its auto modules (vlkit/__init__.py), so that importing
vlkit stays cheap. This module must not import vlkit's models at the top: it runs while transformers' auto
modules are still being imported.
"""

from __future__ import annotations

from pathlib import Path

from transformers.configuration_utils import PretrainedConfig

from vlkit.errors import VlkitError

MODEL_TYPE = "vlkit_vlm"  # vlkit.models.io.MODEL_TYPE (see above for why it is not imported)
# what AutoModel.from_pretrained passes along on its own, meaningless for a local vlkit directory
AUTO_KWARGS = {"_from_auto", "trust_remote_code", "adapter_kwargs", "revision", "code_revision", "local_files_only",
               "cache_dir", "force_download", "proxies", "token", "subfolder"}


class VlkitConfig(PretrainedConfig):
    """A vlkit model directory's config.json, as transformers reads configs."""

    model_type = MODEL_TYPE


class VlkitModel:
    """What AutoModel finds for model_type vlkit_vlm: `from_pretrained` is `load_vlm`."""

    config_class = VlkitConfig

    @classmethod
    def from_pretrained(cls, path: str | Path, *args, config=None, dtype=None, torch_dtype=None, device_map=None,
                        **kwargs):
        from vlkit.models.io import load_vlm

        extra = sorted(k for k, v in kwargs.items() if k not in AUTO_KWARGS or k == "subfolder" and v)
        if args or extra:
            raise VlkitError(f"AutoModel.from_pretrained({path}): a vlkit model takes dtype and device_map only, not "
                             f"{extra or 'positional arguments'}; load it with vlkit.models.io.load_vlm")
        if not Path(path).is_dir():
            raise VlkitError(f"{path}: not a local directory; vlkit models load from disk")
        model, _ = load_vlm(path, device=one_device(device_map), dtype=dtype if dtype is not None else torch_dtype)
        return model


def one_device(device_map):
    """transformers' device_map as the one device vlkit loads onto: None (cpu), a device, a CUDA index, or
    {"": device}; "auto" is vlkit's auto (CUDA when there is one)."""
    import torch

    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return f"cuda:{device_map}"
    if isinstance(device_map, (str, torch.device)):
        return device_map
    raise VlkitError(f"device_map: {device_map!r} splits the model; vlkit loads a model onto one device "
                     "(device_map='cpu', 'cuda:0', 'auto' or {'': device})")


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, VlkitConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModel

    register_config()  # again: AutoModel reads configs through AutoConfig
    AutoModel.register(VlkitConfig, VlkitModel, exist_ok=True)
