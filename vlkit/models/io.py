"""Save and load VisionLanguageModels as Hugging Face-style directories; export to stock formats.

A vlkit model directory:
    config.json              {"model_type": "vlkit_vlm", "format": 2, "vlm": {tower, vpg, llm, max_length, fusions}
                             with the encoders' and LLM's configs inlined as `arch`, "image_token_id",
                             "trainable_groups"}
    model.safetensors        all weights, prefixed vision. / vpg. / fusions. / llm.; past `max_shard_size`,
                             transformers' shards: model-0000k-of-0000n.safetensors + model.safetensors.index.json
    processor_config.json    each encoder's transform, image token slots, max_length (+ tokenizer files)

Directories written before format 2 (one tower, VPG-C in a key of its own, feature_layer -1 meaning the
tower's final output) load as they always did. `load_vlm` also reads stock `llava` and `blip-2` directories
(vlkit.models.stock).

Loading builds the model on its device, in its dtype, with its weights left uninitialised (transformers'
`no_init_weights`), then puts each stored tensor in place one at a time: no random-initialisation pass and no
fp32 copy of a bf16 model. Buffers that modules compute rather than store (rotary `inv_freq`, position ids) are
computed by the constructors as usual.

`export_llava` writes a stock `LlavaForConditionalGeneration` directory with its `LlavaProcessor` (MLP VPG,
CLIP or SigLIP encoder); `export_blip2` a stock `Blip2ForConditionalGeneration` (Q-Former VPG, BLIP-2
encoder). Both refuse what the stock model cannot represent, rather than export something that computes
other logits.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from vlkit.version import __version__
from vlkit.config import validate
from vlkit.data.processor import VLProcessor
from vlkit.devices import check_dtype_on, resolve_device, resolve_dtype
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, read_json, write_json
from vlkit.models.llm import arch_of
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.models.weights import INDEX, WEIGHTS

MODEL_TYPE = "vlkit_vlm"
FORMAT = 2
# format 1 -> 2: the one tower became encoder 0 of the vision stack, VPG-C one of the fusions
RENAMED = (("vision.model.", "vision.encoders.0.model."), ("vpgc.", "fusions.vpgc."))
MAX_SHARD_SIZE = "5GB"
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def write_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None,
              max_shard_size: int | str = MAX_SHARD_SIZE, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory's files into `directory` (which exists); `save_vlm` does it atomically. `state`: the
    tensors to store when the model's own are not whole (FSDP's, gathered); default `model.state_dict()`."""
    directory = Path(directory)
    if not model.takes_images:
        raise VlkitError("save: a text-only LM is saved as the HF model it is (model.llm.save_pretrained)")
    cfg = model.config.model_copy(deep=True)
    sources = {"tower": [c.path for c in (cfg.tower if isinstance(cfg.tower, list) else [cfg.tower])],
               "llm": cfg.llm.path}
    cfg.tower = model.vision.saved_config()
    cfg.llm.path, cfg.llm.tokenizer, cfg.llm.arch = None, None, arch_of(model.llm.config)
    cfg.llm.attn_implementation = None  # a runtime choice (flash-attention on the GPU it trained on), not the model's
    write_json(directory / "config.json", {"model_type": MODEL_TYPE, "format": FORMAT,
                                           "vlkit_version": __version__, "vlm": cfg.model_dump(mode="json"),
                                           "image_token_id": model.image_token_id,
                                           "trainable_groups": model.trainable_groups, "sources": sources})
    write_weights(model.state_dict() if state is None else state, directory, max_shard_size)
    if processor is not None:
        processor.save(directory)
    return directory


def save_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None,
             max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write the model directory whole or not at all (a crash leaves what was there)."""
    with atomic_dir(directory) as tmp:
        write_vlm(model, tmp, processor, max_shard_size)
    return Path(directory)


def write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """`state` as model.safetensors, or, past `max_shard_size` bytes, as transformers shards it: files of at most that
    size (a larger tensor alone in one) named model-0000k-of-0000n.safetensors, listed in model.safetensors.index.json.
    A tensor under several names (tied embeddings) is stored once, under the first name in sorted order, as
    safetensors' `save_model` does; loading fills the others through the tie."""
    limit = shard_bytes(max_shard_size)
    names: dict[tuple, list[str]] = {}
    for name, t in state.items():
        names.setdefault((t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()),
                         []).append(name)
    kept = {min(group) for group in names.values()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if name not in kept:
            continue
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += n
    for old in [directory / WEIGHTS, directory / INDEX, *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # a directory written before in the other layout
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS), metadata={"format": "pt"})
        return
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, shard in zip(files, shards):
        save_file(shard, str(directory / file), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    write_json(directory / INDEX, {"metadata": {"total_size": total},
                                   "weight_map": {k: file for file, shard in zip(files, shards) for k in shard}})


def shard_bytes(size: int | str) -> int:
    """A shard size as transformers writes it ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30, or an int) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?B\s*", size.upper()) if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if m is None or float(m[1]) <= 0:
        raise VlkitError(f"max_shard_size: {size!r} is not a size; use bytes or e.g. '5GB', '500MB'")
    power = "KMGT".index(m[2]) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def _upgrade(meta: dict, processor: VLProcessor) -> dict:
    """A format-1 config as format 2 says it: feature_layer -1 was the tower's final output, and the tower's
    normalisation was the processor's."""
    vlm = dict(meta["vlm"])
    if not isinstance(vlm.get("tower"), dict) or not processor.config.transforms:
        return vlm  # not what format 1 wrote: validation names what is wrong
    tower = dict(vlm["tower"])
    if tower.get("feature_layer") == -1:
        tower["feature_layer"] = "output"
    t = processor.config.transforms[0]
    tower["image_mean"] = tower.get("image_mean") or t.mean
    tower["image_std"] = tower.get("image_std") or t.std
    vlm["tower"] = tower
    return vlm


def is_vlm_directory(directory: str | Path) -> bool:
    """Whether `load_vlm` reads this directory: a vlkit model, or a stock checkpoint vlkit imports."""
    from vlkit.models.stock import IMPORTERS

    config = Path(directory) / "config.json"
    meta = read_json(config) if config.is_file() else None
    return isinstance(meta, dict) and (meta.get("model_type") == MODEL_TYPE or meta.get("model_type") in IMPORTERS)


def load_vlm(directory: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
             ) -> tuple[VisionLanguageModel, VLProcessor]:
    """Load a vlkit model directory (or a stock llava / blip-2 one) onto `device` (auto, cpu, cuda:N, ...) in `dtype`
    (None or auto: as stored; fp32, bf16, fp16: floating tensors in that dtype, integer and bool ones as stored);
    trainable groups are restored, everything else stays frozen."""
    directory = Path(directory)
    device = resolve_device(device, what="device")
    dtype = resolve_dtype(dtype, what="dtype")
    check_dtype_on(dtype, device)
    meta = read_json(directory / "config.json")
    where = directory / "config.json"
    from vlkit.models.stock import IMPORTERS

    if isinstance(meta, dict) and meta.get("model_type") in IMPORTERS:
        return IMPORTERS[meta["model_type"]](directory, device, dtype)
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        kind = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
        raise VlkitError(f"{directory}: not a vlkit model (config.json model_type is {kind!r})")
    for key, kind in (("vlm", dict), ("image_token_id", int), ("trainable_groups", list), ("format", int)):
        if key in meta and not isinstance(meta[key], kind) or key in ("vlm", "image_token_id") and key not in meta:
            raise VlkitError(f"{where}: key {key!r} is missing or not a {kind.__name__}; re-save the model")
    old = meta.get("format", 1) < FORMAT
    if not old:
        cfg = validate(VLMConfig, meta["vlm"], f"{where} (vlm)")
    processor = VLProcessor.load(directory)
    if old:
        cfg = validate(VLMConfig, _upgrade(meta, processor), f"{where} (vlm)")
    files = _open_weights(directory)  # a missing or corrupt file fails before the build
    try:
        with empty_modules(device, dtype or _stored_dtype(files)):
            model = VisionLanguageModel.build(cfg, image_token_id=meta["image_token_id"])
        tie_weights(model)
    except (ValueError, TypeError, KeyError) as e:
        raise VlkitError(f"{where}: cannot build the model it describes ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None
    _load_weights(model, files, dtype, _renamed if old else None)
    model.set_trainable(meta.get("trainable_groups", []))
    return model.to(device).eval(), processor


@contextlib.contextmanager
def empty_modules(device: torch.device, dtype: torch.dtype):
    """Modules built in here are on `device`, floating tensors in `dtype`, weights uninitialised (torch's and
    transformers' init functions do nothing): for loading, which fills every weight next. Tied weights are tied on
    `tie_weights` (transformers ties them in the init step this skips)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    kept = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(kept)


def tie_weights(model: torch.nn.Module) -> None:
    """Tie what each transformers model inside `model` ties (its embeddings and head, as its config says)."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.tie_weights()


def _open_weights(directory: Path) -> list[tuple[Path, object, bool]]:
    """The directory's safetensors files, opened (headers read, no tensor yet): model.safetensors, or the shards its
    model.safetensors.index.json lists; each with whether its tensors are views of the mapped file (safetensors
    before 0.8, which cannot read them into memory of their own with pread)."""
    index = directory / INDEX
    weight_map = None
    if index.is_file():
        meta = read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise VlkitError(f"{index}: no weight_map; re-save the model")
    files = []
    for name in sorted(set(weight_map.values())) if weight_map else [WEIGHTS]:
        path = directory / str(name)
        if not path.is_file():
            raise VlkitError(f"{path}: weights file not found; the model directory is incomplete")
        try:
            try:
                handle, mapped = safe_open(str(path), "pt", backend="pread"), False
            except TypeError:
                handle, mapped = safe_open(str(path), "pt"), True
        except (SafetensorError, OSError) as e:
            raise VlkitError(f"{path}: corrupt, truncated or mismatched weights ({str(e).splitlines()[0][:160]}); "
                             "re-save the model") from None
        stray = [k for k in handle.keys() if weight_map is not None and weight_map.get(k) != name]
        if stray:
            raise VlkitError(f"{index}: does not place {stray[0]} in {name}, which holds it; re-save the model")
        files.append((path, handle, mapped))
    return files


def _stored_dtype(files: list[tuple[Path, object, bool]]) -> torch.dtype:
    """The dtype most of the stored floating tensors have (the model is built in it when no dtype is asked)."""
    counts: dict[torch.dtype, int] = {}
    for _, handle, _ in files:
        for k in handle.keys():
            dt = STORED_DTYPES.get(handle.get_slice(k).get_dtype())
            if dt is not None:
                counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _load_weights(model: torch.nn.Module, files: list[tuple[Path, object, bool]], dtype: torch.dtype | None,
                  rename=None) -> None:
    """Every stored tensor into its place, one at a time (read on the CPU, moved to the model's device, where it
    replaces the empty one): floating tensors in `dtype` (None: as stored), integer and bool ones as stored. A name
    left out of the files is fine only where it shares its tensor with one in them (tied embeddings: safetensors
    stores a shared tensor once)."""
    targets = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    with torch.no_grad():
        for path, handle, mapped in files:
            for key in handle.keys():
                name = rename(key) if rename else key
                target = targets.get(name)
                if target is None:
                    raise VlkitError(f"{path}: mismatched weights (unexpected {key}); re-save the model")
                try:
                    t = handle.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise VlkitError(f"{path}: corrupt, truncated or mismatched weights "
                                     f"({str(e).splitlines()[0][:160]}); re-save the model") from None
                if t.shape != target.shape:
                    raise VlkitError(f"{path}: mismatched weights ({key} is {list(t.shape)}, the model's "
                                     f"{list(target.shape)}); re-save the model")
                moved = t.to(target.device, dtype if dtype is not None and t.is_floating_point() else None)
                # a view of a mapped file would change with the file (truncated: crash): the model owns its memory
                target.data = moved.clone() if moved is t and mapped else moved
                filled.add(id(target))
    missing = [k for k, t in targets.items() if id(t) not in filled]
    if missing:
        raise VlkitError(f"{files[0][0].parent}: missing weights {missing[:3]}; the model directory is incomplete")


def _renamed(key: str) -> str:
    for old, new in RENAMED:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# -- stock exports ----------------------------------------------------------------------------------------
def _check_fusions(model: VisionLanguageModel, fmt: str) -> None:
    for kind, fusion in model.fusions.items():
        if fmt not in fusion.exports:
            raise VlkitError(f"export {fmt}: the {kind} fusion has no counterpart in a stock {fmt} checkpoint; "
                             "export a model without it")


def _single_encoder(model: VisionLanguageModel, fmt: str):
    if model.vision.mixer is not None or model.tiled:
        raise VlkitError(f"export {fmt}: a stock {fmt} checkpoint has no encoder mixing or sub-images; export a model "
                         "without model.mix and model.tiles")
    if len(model.vision.encoders) != 1 or not hasattr(model.vision.encoders[0], "hf_config"):
        raise VlkitError(f"export {fmt}: needs one transformers vision encoder; this model's stack has "
                         f"{[e.kind for e in model.vision.encoders]}")
    return model.vision.encoders[0]


def _base(causal_lm):
    return getattr(causal_lm, causal_lm.base_model_prefix)


def export_llava(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `llava` checkpoint (transformers' LlavaForConditionalGeneration) and its LlavaProcessor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlkit.models.vpg.mlp import MLPVPG

    if not isinstance(model.vpg, MLPVPG):
        raise VlkitError("export llava: needs an mlp VPG (LLaVA's projector); this model's VPG is "
                         f"{type(model.vpg).__name__}")
    _check_fusions(model, "llava")
    enc = _single_encoder(model, "llava")
    tower_type = enc.hf_config.model_type
    if tower_type not in ("clip_vision_model", "siglip_vision_model"):
        raise VlkitError(f"export llava: needs a CLIP or SigLIP encoder, not {tower_type}")
    layer = enc.cfg.feature_layer
    if layer == "output":  # llava reads hidden_states[i]; CLIP's final output is hidden_states[-1]
        if tower_type != "clip_vision_model":
            raise VlkitError("export llava: llava reads hidden_states[i], not SigLIP's post-layernorm output; set "
                             "tower.feature_layer to an index (-1 for the last layer) and retrain")
        layer = -1
    # llava's "default" strategy drops exactly one leading token (CLIP's class token); "full" keeps all
    strategy = "default" if enc.num_special == 1 and enc.cfg.select == "patch" else "full"
    if enc.cfg.select == "patch" and enc.num_special not in (0, 1):
        raise VlkitError(f"export llava: the encoder has {enc.num_special} special tokens, llava drops one")
    text = model.llm.config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        raise VlkitError(f"export llava: the LLM ({text.model_type}) caps its logits (final_logit_softcapping={cap}), "
                         "which LlavaForConditionalGeneration's head does not do; the export would change every logit")
    # Untied in the export: llava's weight-tying map assumes LLaMA-style module names (not OPT's); the
    # head gets a copy of the embedding matrix, which computes the same logits.
    text_config = {**text.to_dict(), "tie_word_embeddings": False}
    cfg = LlavaConfig(vision_config=enc.hf_config.to_dict(), text_config=text_config,
                      image_token_index=model.image_token_id, projector_hidden_act=model.vpg.act_name,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      image_seq_length=model.image_slots, multimodal_projector_bias=True, tie_word_embeddings=False)
    llava = LlavaForConditionalGeneration(cfg).eval()
    inner = llava.model if hasattr(llava, "model") and hasattr(llava.model, "vision_tower") else llava
    inner.vision_tower.load_state_dict(enc.model.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(model.vpg.linear_1.state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(model.vpg.linear_2.state_dict())
    lm = inner.language_model
    if hasattr(lm, "lm_head"):  # older transformers: the full causal LM
        lm.load_state_dict(model.llm.state_dict())
    else:
        lm.load_state_dict(_base(model.llm).state_dict())
        llava.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    stock = LlavaProcessor(image_processor=enc.transform.hf_image_processor(), tokenizer=processor.tokenizer,
                           patch_size=enc.hf_config.patch_size, vision_feature_select_strategy=strategy,
                           num_additional_image_tokens=enc.num_special, image_token="<image>",
                           chat_template=processor.tokenizer.chat_template)
    return _write_export(llava, stock, directory)


def export_blip2(model: VisionLanguageModel, processor: VLProcessor, directory: str | Path) -> Path:
    """Write a stock `blip-2` checkpoint (transformers' Blip2ForConditionalGeneration)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from vlkit.models.vpg.qformer import QFormerVPG

    if not isinstance(model.vpg, QFormerVPG):
        raise VlkitError(f"export blip-2: needs a qformer VPG, not {type(model.vpg).__name__}")
    _check_fusions(model, "blip-2")
    enc = _single_encoder(model, "blip-2")
    if enc.hf_config.model_type != "blip_2_vision_model":
        raise VlkitError("export blip-2: needs a BLIP-2 vision tower (blip_2_vision_model), not "
                         f"{enc.hf_config.model_type}")
    if enc.cfg.feature_layer != "output" or enc.cfg.select != "full":
        raise VlkitError("export blip-2: BLIP-2 reads the tower's final output with every token; "
                         "set tower.feature_layer=output and tower.select=full")
    cfg = Blip2Config(vision_config=enc.hf_config.to_dict(), qformer_config=model.vpg.config.to_dict(),
                      text_config=model.llm.config.to_dict(), num_query_tokens=model.image_slots,
                      image_token_index=model.image_token_id)
    blip = Blip2ForConditionalGeneration(cfg).eval()
    blip.vision_model.load_state_dict(enc.model.state_dict())
    with torch.no_grad():
        blip.query_tokens.copy_(model.vpg.query_tokens)
    blip.qformer.load_state_dict(model.vpg.qformer.state_dict())
    blip.language_projection.load_state_dict(model.vpg.projector.state_dict())
    blip.language_model.load_state_dict(model.llm.state_dict())
    return _write_export(blip, None, directory, processor, enc.transform)


def _write_export(hf_model, stock_processor, directory: str | Path, processor: VLProcessor | None = None,
                  transform=None) -> Path:
    """A stock transformers directory: weights plus the processor (or tokenizer and image processor), atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        if stock_processor is not None:
            stock_processor.save_pretrained(tmp)
        else:
            processor.tokenizer.save_pretrained(tmp)
            transform.hf_image_processor().save_pretrained(tmp)
    return directory


EXPORTS = {"llava": export_llava, "blip-2": export_blip2}


def export_model(fmt: str, model_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`vlkit export FORMAT MODEL OUT`: the vlkit model in `model_dir` as a stock `fmt` directory, atomically."""
    if fmt not in EXPORTS:
        raise VlkitError(f"export: unknown format {fmt!r}; choose {' or '.join(EXPORTS)}")
    out = Path(out)
    if out.resolve() == Path(model_dir).resolve():
        raise VlkitError(f"export: {out} is the model itself; write the export elsewhere")
    if out.exists() and not overwrite:
        raise VlkitError(f"export: {out} exists; pass --overwrite to replace it")
    model, processor = load_vlm(model_dir)
    return EXPORTS[fmt](model, processor, out)
