"""SPHINX weight mixing (Lin et al. 2023, "the joint mixing of weights"): one model from two fine-tunes of one base.

    theta = beta * theta_A + (1 - beta) * theta_B,     beta in [0, 1]

Works on two vlkit model directories (`vlkit.models.io`; `part` may restrict the mixing to the ``llm.`` or
``vpg.`` tensors, every other tensor is A's) or on two Hugging Face model directories (config.json,
safetensors weights, one file or sharded with ``model.safetensors.index.json``, tokenizer files). It works on
the safetensors files, tensor by tensor, so memory holds one output file plus one tensor of A and B.

Before anything is written it checks, naming the directory and the first thing that differs:
- both directories hold models of the same kind (vlkit or Hugging Face);
- neither is a vlkit model that keeps only its trained tensors (config.json's `base`: the rest is elsewhere);
- the same architecture: config.json equal, keys that do not change the computation (`IGNORED`) aside;
- the same tensors: names, shapes and dtypes;
- the same tokenizer (its files' contents) and, for vlkit models, the same processor_config.json;
- integer and bool tensors (buffers) to be mixed are equal in A and B;
- beta in [0, 1]; `out` is neither A nor B (nor holds them) and, if it exists, `overwrite` is given.

Floating tensors are mixed in float32 (float64 stays float64) and cast back to their dtype; at beta = 1 the
output is A's tensors as they are, at beta = 0 B's, bit for bit. The output is A's non-weight files (config,
tokenizer, processor) with the mixed weights in A's layout and ``merge.json``, which says what was mixed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlkit.version import __version__
from vlkit.errors import VlkitError
from vlkit.fileio import atomic_dir, read_json, write_json
from vlkit.models.io import BASE, MODEL_TYPE
from vlkit.models.weights import INDEX, Weights

PROVENANCE = "merge.json"
# part -> the prefix of the tensors it mixes (vlkit models only)
PARTS = {"all": "", "llm": "llm.", "vpg": "vpg."}
# config keys, at any depth, that record where or how a model was saved rather than what it computes
IGNORED = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
           "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}
# ... and top-level keys of a vlkit config.json of the same kind (the trainable groups only matter to training)
IGNORED_VLM = {"vlkit_version", "sources", "trainable_groups"}
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "*.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*")
NOT_COPIED = ("*.safetensors", "*.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf",
              PROVENANCE, ".*")


@dataclass
class MergeReport:
    out: str
    a: str
    b: str
    beta: float
    part: str
    kind: str
    mixed_tensors: int
    mixed_parameters: int
    kept_tensors: int  # outside `part`: A's, as they are

    def summary(self) -> str:
        what = "every tensor" if self.part == "all" else f"the {self.part}.* tensors"
        kept = f"; {self.kept_tensors} other tensors are A's" if self.kept_tensors else ""
        return (f"mixed {what} of {self.kind} models: {self.mixed_tensors} tensors, {self.mixed_parameters:,} "
                f"parameters, theta = {self.beta:g} * A + {1 - self.beta:g} * B{kept}; wrote {self.out}")


def merge(a: str | Path, b: str | Path, beta: float, out: str | Path, part: str = "all",
          overwrite: bool = False) -> MergeReport:
    """Write `out` = beta * A + (1 - beta) * B (SPHINX), after the checks in the module docstring."""
    a, b, out = Path(a), Path(b), Path(out)
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails too
        raise VlkitError(f"merge: beta must be in [0, 1] (the weight of A), got {beta!r}")
    beta = value
    if part not in PARTS:
        raise VlkitError(f"merge: part {part!r} is not one of {', '.join(PARTS)}")
    config_a, config_b = _config(a), _config(b)
    kind = "vlkit" if config_a.get("model_type") == MODEL_TYPE else "Hugging Face"
    if (config_b.get("model_type") == MODEL_TYPE) != (kind == "vlkit"):
        raise VlkitError(f"merge: {b} is not a {kind} model like {a}; merge two of one kind")
    if part != "all" and kind != "vlkit":
        raise VlkitError(f"merge: part {part!r} needs vlkit models; {a} is a Hugging Face model, merged whole "
                         "(part all)")
    for side in (a, b):
        if out.resolve() == side.resolve() or out.resolve() in side.resolve().parents:
            raise VlkitError(f"merge: out {out} would replace the input {side}; choose another directory")
    if out.exists() and not overwrite:
        raise VlkitError(f"merge: out {out} exists; pass overwrite (--overwrite) to replace it")
    _same_config(a, b, config_a, config_b, IGNORED_VLM if kind == "vlkit" else set())
    weights_a, weights_b = Weights(a), Weights(b)
    _same_tensors(weights_a, weights_b)
    _same_files(a, b, TOKENIZER_FILES, "tokenizer", "merge fine-tunes that share one tokenizer")
    if kind == "vlkit":
        _same_files(a, b, ("processor_config.json",), "processor config", "merge models with one image processor")
    prefix = PARTS[part]
    mixed = [k for k in weights_a.where if k.startswith(prefix)]
    if not mixed:
        raise VlkitError(f"{a}: holds no {part} tensors (names starting {prefix!r}) to mix; choose another --part")
    _same_buffers(weights_a, weights_b, mixed)

    parameters, mixed = 0, set(mixed)
    with atomic_dir(out) as tmp:
        for name in sorted(p.name for p in a.iterdir()):
            if (a / name).is_file() and not any(fnmatch.fnmatch(name, pat) for pat in NOT_COPIED):
                (tmp / name).write_bytes((a / name).read_bytes())
        if (a / INDEX).is_file():
            (tmp / INDEX).write_bytes((a / INDEX).read_bytes())
        for file, names in weights_a.by_file().items():
            tensors = {}
            for k in names:
                if k in mixed:
                    tensors[k] = mix(weights_a.get(k), weights_b.get(k), beta)
                    parameters += tensors[k].numel() if tensors[k].is_floating_point() else 0
                else:
                    tensors[k] = weights_a.get(k)
            save_file(tensors, str(tmp / file), metadata=weights_a.files[file].metadata())
        report = MergeReport(out=str(out), a=str(a.resolve()), b=str(b.resolve()), beta=beta, part=part,
                             kind=kind, mixed_tensors=len(mixed), mixed_parameters=parameters,
                             kept_tensors=len(weights_a.where) - len(mixed))
        write_json(tmp / PROVENANCE, {
            "method": "SPHINX weight mixing (Lin et al. 2023)", "formula": "beta * A + (1 - beta) * B",
            "mixed": "every tensor" if part == "all" else f"only the {prefix}* tensors",
            "from_a": "every non-weight file (config, tokenizer, processor)"
                      + ("" if part == "all" else ", every other tensor"),
            "vlkit_version": __version__, **asdict(report)})
    return report


def mix(x_a: torch.Tensor, x_b: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * x_a + (1 - beta) * x_b in float32 (at least), cast back; the endpoints are the inputs as they are.
    A tensor that is not floating is A's (the checks saw it equal in B)."""
    if beta == 1 or not x_a.is_floating_point():
        return x_a
    if beta == 0:
        return x_b
    acc = torch.promote_types(x_a.dtype, torch.float32)
    return (beta * x_a.to(acc) + (1 - beta) * x_b.to(acc)).to(x_a.dtype)


# -- checks ------------------------------------------------------------------------------------------------
def _config(directory: Path) -> dict:
    if not directory.is_dir():
        raise VlkitError(f"merge: {directory} is not a directory; give a model directory")
    config = read_json(directory / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise VlkitError(f"merge: {directory / 'config.json'} has no model_type; give a model directory")
    if config["model_type"] == MODEL_TYPE and BASE in config:  # its files hold the trained tensors only
        base = config[BASE].get("path") if isinstance(config[BASE], dict) else config[BASE]
        raise VlkitError(f"merge: {directory} keeps only its trained tensors and refers to base {base} for the rest; "
                         "load it and save it without base, then merge that")
    return config


def _canonical(obj, top: set[str] = frozenset()):
    """`obj` without the keys in IGNORED (at any depth) and `top` (at the top)."""
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items() if k not in IGNORED and k not in top}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def _difference(x, y, key: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted) at which `x` and `y` differ, with both values; None when equal."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            if k not in x or k not in y:
                return f"{key}{k}", x.get(k, "(missing)"), y.get(k, "(missing)")
            found = _difference(x[k], y[k], f"{key}{k}.")
            if found:
                return found
        return None
    return None if x == y else (key.rstrip("."), x, y)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_config(a: Path, b: Path, config_a: dict, config_b: dict, top: set[str]) -> None:
    found = _difference(_canonical(config_a, top), _canonical(config_b, top))
    if found:
        key, va, vb = found
        raise VlkitError(f"merge: {b} has another architecture than {a}: config.json {key} is {_short(vb)}, not "
                         f"{_short(va)}; mix fine-tunes of one base model")


def _same_tensors(wa: Weights, wb: Weights) -> None:
    for name in sorted(set(wa.where) | set(wb.where)):
        if name not in wb.where or name not in wa.where:
            has, lacks = (wa, wb) if name not in wb.where else (wb, wa)
            raise VlkitError(f"merge: {has.directory} has a tensor {name!r} that {lacks.directory} has not; "
                             "mix fine-tunes of one base model")
        (shape_a, dtype_a), (shape_b, dtype_b) = wa.spec(name), wb.spec(name)
        if (shape_a, dtype_a) != (shape_b, dtype_b):
            raise VlkitError(f"merge: {wb.directory}: tensor {name!r} is {dtype_b} {shape_b}, in {wa.directory} "
                             f"{dtype_a} {shape_a}; mix fine-tunes of one base model saved in one dtype")


def _same_files(a: Path, b: Path, patterns: tuple[str, ...], what: str, remedy: str) -> None:
    """The files matching `patterns` are the same in `a` and `b` (JSON files compared as JSON, IGNORED aside)."""
    def names(d: Path) -> set[str]:
        return {p.name for p in d.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)}

    in_a, in_b = names(a), names(b)
    if in_a != in_b:
        odd = min(in_a ^ in_b)
        raise VlkitError(f"merge: {b}: {what} differs from {a}'s ({odd} is in only one of them); {remedy}")
    for name in sorted(in_a):
        if name.endswith(".json"):
            same = _canonical(read_json(a / name)) == _canonical(read_json(b / name))
        else:
            same = (a / name).read_bytes() == (b / name).read_bytes()
        if not same:
            raise VlkitError(f"merge: {b}: {what} differs from {a}'s ({name}); {remedy}")


def _same_buffers(wa: Weights, wb: Weights, names: list[str]) -> None:
    """Integer and bool tensors have no mean: each must be the same in A and B."""
    for name in names:
        if not wa.spec(name)[1].startswith(("F", "BF")) and not torch.equal(wa.get(name), wb.get(name)):
            raise VlkitError(f"merge: {wb.directory}: the {wa.spec(name)[1]} tensor {name!r} differs from "
                             f"{wa.directory}'s and cannot be mixed; mix fine-tunes that share it")
