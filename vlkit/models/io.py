"""Save and load VisionLanguageModels as Hugging Face-style directories (stock exports: vlkit.models.export).

A vlkit model directory:
    config.json              {"model_type": "vlkit_vlm", "format": 2, "vlm": {tower, vpg, llm, max_length, fusions}
                             with the encoders' and LLM's configs inlined as `arch`, "image_token_id",
                             "trainable_groups"}
    model.safetensors        all weights, prefixed vision. / vpg. / fusions. / llm.; past `max_shard_size`,
                             transformers' shards: model-0000k-of-0000n.safetensors + model.safetensors.index.json
    processor_config.json    each encoder's transform, image token slots, max_length (+ tokenizer files)

Saved with a `base` (a directory `load_vlm` reads, the one the model was loaded from), the weights hold only what
training can have changed, and config.json says where the rest is:
    "base": {"path": <absolute path>, "files": {<weight file>: <sha256>}, "config": <sha256 of its config.json>}
Stored: every tensor of the trainable groups, every buffer (small; training may update one without training it),
and every tensor the base does not hold in the same shape and dtype (a fusion added since, resized embeddings; a
tensor tied to others counts as held when the base holds it under any of its names). What the base holds is read
from its safetensors headers (a vlkit base that keeps only its trained tensors: over its own base's), and for a
stock llava / blip-2 base from its import on the CPU (transformers maps the files; no weight is converted). Before
writing, the first row of every tensor left to the base is compared with the base's: a model that was not loaded
from this base (or whose untrained tensors changed, as merged LoRA adapters change the LLM's) is refused. Loading
checks the base's hashes (sha256 reads about 1 GB/s on one core: a 14 GB base adds some 15 s to a save and to each
load), reads each tensor the model has from the base in the asked device and dtype, then the directory's own.

Directories written before format 2 (one tower, VPG-C in a key of its own, feature_layer -1 meaning the
tower's final output) load as they always did. `load_vlm` also reads stock `llava` and `blip-2` directories
(vlkit.models.stock).

Loading builds the model on its device, in its dtype, with its weights left uninitialised (transformers'
`no_init_weights`), then puts each stored tensor in place one at a time: no random-initialisation pass and no
fp32 copy of a bf16 model. Buffers that modules compute rather than store (rotary `inv_freq`, position ids) are
computed by the constructors as usual.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import PreTrainedModel

from vlkit.version import __version__
from vlkit.config import validate
from vlkit.data.processor import VLProcessor
from vlkit.devices import check_dtype_on, resolve_device, resolve_dtype
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, file_hash, read_json, write_json
from vlkit.models.llm import arch_of
from vlkit.models.vlm import VisionLanguageModel, VLMConfig
from vlkit.models.weights import INDEX, WEIGHTS, open_files

MODEL_TYPE = "vlkit_vlm"
FORMAT = 2
# format 1 -> 2: the one tower became encoder 0 of the vision stack, VPG-C one of the fusions
RENAMED = (("vision.model.", "vision.encoders.0.model."), ("vpgc.", "fusions.vpgc."))
MAX_SHARD_SIZE = "5GB"
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SAFETENSORS_DTYPES = {**STORED_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
BASE = "base"  # config.json key of a directory that keeps only its trained tensors


def write_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None,
              max_shard_size: int | str = MAX_SHARD_SIZE, state: dict[str, torch.Tensor] | None = None,
              base: str | Path | None = None) -> Path:
    """Write a model directory's files into `directory` (which exists); `save_vlm` does it atomically. `state`: the
    tensors to store when the model's own are not whole (FSDP's, gathered); default `model.state_dict()`. `base`:
    the directory the model was loaded from; store only what training changed, referring to it (module docstring)."""
    directory = Path(directory)
    if not model.takes_images:
        raise VlkitError("save: a text-only LM is saved as the HF model it is (model.llm.save_pretrained)")
    state = model.state_dict() if state is None else state
    reference = None
    if base is not None:  # everything about the base is checked before anything is written
        reference, state = trained_only(model, state, Path(base).resolve())
    cfg = model.config.model_copy(deep=True)
    sources = {"tower": [c.path for c in (cfg.tower if isinstance(cfg.tower, list) else [cfg.tower])],
               "llm": cfg.llm.path}
    cfg.tower = model.vision.saved_config()
    cfg.llm.path, cfg.llm.tokenizer, cfg.llm.arch = None, None, arch_of(model.llm.config)
    cfg.llm.attn_implementation = None  # a runtime choice (flash-attention on the GPU it trained on), not the model's
    meta = {"model_type": MODEL_TYPE, "format": FORMAT, "vlkit_version": __version__,
            "vlm": cfg.model_dump(mode="json"), "image_token_id": model.image_token_id,
            "trainable_groups": model.trainable_groups, "sources": sources}
    write_json(directory / "config.json", meta if reference is None else {**meta, BASE: reference})
    write_weights(state, directory, max_shard_size)
    if processor is not None:
        processor.save(directory)
    return directory


def save_vlm(model: VisionLanguageModel, directory: str | Path, processor: VLProcessor | None = None,
             max_shard_size: int | str = MAX_SHARD_SIZE, base: str | Path | None = None) -> Path:
    """Write the model directory whole or not at all (a crash leaves what was there); `base`: see `write_vlm`."""
    check_base_outside(base, directory)
    with atomic_dir(directory) as tmp:
        write_vlm(model, tmp, processor, max_shard_size, base=base)
    return Path(directory)


# -- saving only the trained tensors -----------------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    """One tensor of a model directory (or of its base) under vlkit's name, read when asked: `key` in `path`."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    read: Callable[[], torch.Tensor]
    first_row: Callable[[], torch.Tensor]
    mapped: bool  # read() may give a view of a mapped file: the model is given a copy of its own


def _file_tensors(files: list[tuple[Path, object, bool]], rename=None) -> dict[str, Stored]:
    """The tensors of opened safetensors files (`weights.open_files`), by model name (`rename`: of a format-1 key)."""
    out = {}
    for path, handle, mapped in files:
        for key in handle.keys():
            piece = handle.get_slice(key)
            shape = tuple(piece.get_shape())
            read = partial(_read, handle, key, path)
            out[rename(key) if rename else key] = Stored(path, key, shape, SAFETENSORS_DTYPES.get(piece.get_dtype()),
                                                         read, (lambda p=piece: p[:1]) if shape else read, mapped)
    return out


def _read(handle, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise VlkitError(f"{path}: corrupt, truncated or mismatched weights ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None


def stored_tensors(directory: Path) -> dict[str, Stored]:
    """Every tensor a model directory provides, by vlkit name, none read yet: a vlkit directory's files (over its
    base's, after checking the base against the hashes it recorded), a stock directory's import on the CPU as
    stored (transformers maps its files)."""
    meta = read_json(directory / "config.json")
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        stock, _ = load_vlm(directory)  # refuses what is neither a vlkit nor a stock directory
        return {n: Stored(directory, n, tuple(t.shape), t.dtype, lambda t=t: t, lambda t=t: t[:1] if t.dim() else t,
                          True) for n, t in stock.state_dict().items()}
    below = stored_tensors(check_base(directory, meta[BASE])) if BASE in meta else {}
    return {**below, **_file_tensors(open_files(directory), _renamed if meta.get("format", 1) < FORMAT else None)}


def weight_files(directory: Path) -> list[str]:
    """The files a directory's weights are read from, relative to it: model.safetensors, or the index and the shards
    it lists (none opened: a changed file is reported as changed, not as corrupt)."""
    index = directory / INDEX
    if not index.is_file():
        return [WEIGHTS]
    meta = read_json(index)
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    return [INDEX, *sorted(set(map(str, weight_map.values())))] if isinstance(weight_map, dict) else [INDEX]


def _sha256(path: Path) -> str:
    return file_hash(path, length=64)


def base_reference(directory: Path) -> dict:
    """What a trained-only directory records of its base: absolute path, sha256 of each weight file and config.json."""
    missing = [name for name in ["config.json", *weight_files(directory)] if not (directory / name).is_file()]
    if missing:
        raise VlkitError(f"save: base {directory} has no {missing[0]}; pass a model directory load_vlm reads")
    return {"path": str(directory), "files": {name: _sha256(directory / name) for name in weight_files(directory)},
            "config": _sha256(directory / "config.json")}


def check_base(directory: Path, reference) -> Path:
    """The base a trained-only `directory` refers to, after checking it is there with the hashes recorded."""
    if not (isinstance(reference, dict) and isinstance(reference.get("path"), str)
            and isinstance(reference.get("files"), dict) and isinstance(reference.get("config"), str)):
        raise VlkitError(f"{directory / 'config.json'}: key {BASE!r} is not {{path, files, config}}; re-save the model")
    base = Path(reference["path"])
    fix = f"re-save the model without base, or restore {base}"
    if not (base / "config.json").is_file():
        raise VlkitError(f"{directory}: its base {base} is missing (no config.json there); {fix}")
    changed = "config.json" if _sha256(base / "config.json") != reference["config"] else None
    for name, digest in reference["files"].items():
        if changed is None and not (base / name).is_file():
            changed = f"{name} is missing"
        elif changed is None and _sha256(base / name) != digest:
            changed = name
    now = weight_files(base) if changed is None else []
    if changed is None and sorted(now) != sorted(reference["files"]):
        changed = f"its weights are now in {', '.join(now)}"
    if changed is not None:
        raise VlkitError(f"{directory}: its base {base} changed since the model was saved ({changed}); {fix}")
    return base


def check_base_outside(base: str | Path | None, directory: str | Path) -> None:
    """A trained-only model cannot replace its own base (the tensors it leaves out would go with it)."""
    if base is not None and Path(base).resolve() == Path(directory).resolve():
        raise VlkitError(f"save: {directory} is the base the model would refer to; write the model elsewhere or save "
                         "it without base")


def trained_only(model: VisionLanguageModel, state: dict[str, torch.Tensor], base: Path
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The base's reference and the part of `state` the base does not provide (module docstring)."""
    groups = model.param_groups()
    empty = [g for g in model.trainable_groups if not groups.get(g)]
    if empty:
        raise VlkitError(f"save with base: the trainable group {empty[0]!r} holds no tensors now (LoRA adapters "
                         "merged into the LLM's weights?), so what training changed is not known; save the model "
                         "without base")
    trained_ids = {id(p) for g in model.trainable_groups for p in groups[g]}
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in trained_ids}
    trained |= {n for n, _ in model.named_buffers(remove_duplicate=False) if n in state}
    lost = sorted(trained - state.keys())
    if lost:
        raise VlkitError(f"save with base: the state to write has no {lost[0]}, a trained tensor; save the model "
                         "without base")
    reference, held = base_reference(base), stored_tensors(base)
    tensors: dict[tuple, list[str]] = {}
    for name, t in state.items():
        tensors.setdefault(_identity(t), []).append(name)
    kept, left, retyped = set(), {}, []
    for names in tensors.values():
        t = state[names[0]]
        same = [n for n in names if n in held and held[n].shape == tuple(t.shape) and held[n].dtype == t.dtype]
        if trained & set(names) or not same:
            kept.update(names)
            retyped += [n for n in names if n in held and held[n].shape == tuple(t.shape) and n not in trained]
        else:
            left[same[0]] = t
    for name, t in left.items():  # a spot check that the model came from this base: each tensor's first row
        ours = t.detach()[:1] if t.dim() else t.detach()
        if not torch.equal(ours.cpu(), held[name].first_row()):
            raise VlkitError(f"save: {name} is not trained yet differs from base {base}'s; pass the directory the "
                             "model was loaded from as base, or save the model without base")
    if retyped:
        warnings.warn(f"save with base: {len(retyped)} untrained tensors (e.g. {retyped[0]}) are stored because their "
                      "dtype is not the base's (the model was cast after loading)", stacklevel=3)
    return reference, {n: t for n, t in state.items() if n in kept}


def _identity(t: torch.Tensor) -> tuple:
    """What makes two state entries one tensor (tied embeddings)."""
    return t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()


def write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """`state` as model.safetensors, or, past `max_shard_size` bytes, as transformers shards it: files of at most that
    size (a larger tensor alone in one) named model-0000k-of-0000n.safetensors, listed in model.safetensors.index.json.
    A tensor under several names (tied embeddings) is stored once, under the first name in sorted order, as
    safetensors' `save_model` does; loading fills the others through the tie."""
    limit = shard_bytes(max_shard_size)
    names: dict[tuple, list[str]] = {}
    for name, t in state.items():
        names.setdefault(_identity(t), []).append(name)
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
    # a missing or corrupt file, or a base that changed, fails before the build
    tensors = _file_tensors(open_files(directory), _renamed if old else None)
    base = stored_tensors(check_base(directory, meta[BASE])) if BASE in meta else None
    try:
        with empty_modules(device, dtype or _stored_dtype({**(base or {}), **tensors})):
            model = VisionLanguageModel.build(cfg, image_token_id=meta["image_token_id"])
        tie_weights(model)
    except (ValueError, TypeError, KeyError) as e:
        raise VlkitError(f"{where}: cannot build the model it describes ({str(e).splitlines()[0][:160]}); "
                         "re-save the model") from None
    _load_weights(model, directory, tensors, dtype, base)
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


def _stored_dtype(tensors: dict[str, Stored]) -> torch.dtype:
    """The dtype most of the stored floating tensors have (the model is built in it when no dtype is asked)."""
    counts: dict[torch.dtype, int] = {}
    for s in tensors.values():
        if s.dtype in STORED_DTYPES.values():
            counts[s.dtype] = counts.get(s.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _load_weights(model: torch.nn.Module, directory: Path, tensors: dict[str, Stored], dtype: torch.dtype | None,
                  base: dict[str, Stored] | None = None) -> None:
    """Every stored tensor into its place, one at a time (read on the CPU, moved to the model's device, where it
    replaces the empty one): floating tensors in `dtype` (None: as stored), integer and bool ones as stored. First
    the `base`'s tensors the model has in the same shape and the directory does not hold, then the directory's. A
    name left out of both is fine only where it shares its tensor with one in them (tied embeddings: safetensors
    stores a shared tensor once)."""
    targets = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    below = {n: s for n, s in (base or {}).items() if n not in tensors and n in targets
             and s.shape == tuple(targets[n].shape)}  # the rest of the base: tensors this model replaced or dropped
    with torch.no_grad():
        for name, s in [*below.items(), *tensors.items()]:
            target = targets.get(name)
            if target is None:
                raise VlkitError(f"{s.path}: mismatched weights (unexpected {s.key}); re-save the model")
            t = s.read()
            if t.shape != target.shape:
                raise VlkitError(f"{s.path}: mismatched weights ({s.key} is {list(t.shape)}, the model's "
                                 f"{list(target.shape)}); re-save the model")
            moved = t.to(target.device, dtype if dtype is not None and t.is_floating_point() else None)
            # a view of a mapped file would change with the file (truncated: crash): the model owns its memory
            target.data = moved.clone() if moved is t and s.mapped else moved
            filled.add(id(target))
    missing = [k for k, t in targets.items() if id(t) not in filled]
    if missing and base is not None:
        raise VlkitError(f"{directory}: weights {missing[:3]} are neither in its files nor in its base (config.json's "
                         f"{BASE}); re-save the model without base")
    if missing:
        raise VlkitError(f"{directory}: missing weights {missing[:3]}; the model directory is incomplete")


def _renamed(key: str) -> str:
    for old, new in RENAMED:
        if key.startswith(old):
            return new + key[len(old):]
    return key
