"""Saving only the trained tensors with a reference to the untouched base (`save_vlm(..., base=...)`): the directory
holds exactly what training changed, loads to the logits of the same model saved whole, and refuses a base that is
gone or changed, in one line."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from test_stock_import import stock_llava
from test_vlm import batch, make
from vlkit.errors import VlkitError
from vlkit.models.io import load_vlm, save_vlm

FIX = "re-save the model without base, or restore"


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits.float()


def stored(d):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


def names(model, group):
    """The state names of a group's tensors (every name of a tied one)."""
    ids = {id(p) for p in model.param_groups()[group]}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def trained(model, group):
    """`group` changed as training would change it (a fixed step, so both saves hold the same numbers)."""
    with torch.no_grad():
        for p in model.param_groups()[group]:
            p.add_(0.25)


@pytest.fixture
def base(tiny_tokenizer, tmp_path):
    """A saved Q-Former model (the base) and, loaded from it, the same model with its projector trained and VPG-C
    added (new tensors, untrained)."""
    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "base", proc)
    model, proc = load_vlm(tmp_path / "base")
    model.add_fusion("vpgc")
    model.set_trainable(["vpg.projector"])
    trained(model, "vpg.projector")
    return tmp_path / "base", model, proc


def test_only_the_trained_and_new_tensors_are_stored_and_load_to_the_whole_models_logits(base, tmp_path):
    d, model, proc = base
    save_vlm(model, tmp_path / "whole", proc)
    save_vlm(model, tmp_path / "trained", proc, base=d)
    assert not [n for n, _ in model.named_buffers() if n in model.state_dict()]  # nothing stored for buffers here
    vpgc = {f"fusions.vpgc.{n}" for n, _ in model.fusion("vpgc").named_parameters()}
    assert vpgc and stored(tmp_path / "trained") == names(model, "vpg.projector") | vpgc
    size = (tmp_path / "trained" / "model.safetensors").stat().st_size
    whole = (tmp_path / "whole" / "model.safetensors").stat().st_size
    assert size < 0.06 * whole, (size, whole)
    ref = json.loads((tmp_path / "trained" / "config.json").read_text())["base"]
    assert ref["path"] == str(d.resolve()) and set(ref["files"]) == {"model.safetensors"} and len(ref["config"]) == 64
    b = batch(proc)
    ours, theirs = load_vlm(tmp_path / "trained")[0], load_vlm(tmp_path / "whole")[0]
    assert torch.equal(logits(ours, b), logits(theirs, b)) and torch.equal(logits(ours, b), logits(model, b))
    assert ours.trainable_groups == ["vpg.projector"]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == names(model, "vpg.projector")
    bf16 = load_vlm(tmp_path / "trained", dtype="bf16")[0]  # the base read in the asked dtype too
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(bf16, b), logits(load_vlm(tmp_path / "whole", dtype="bf16")[0], b))
    # a trained-only model of a trained-only model: its base's base fills the rest
    again, proc = load_vlm(tmp_path / "trained")
    again.set_trainable(["vpgc"])
    trained(again, "vpgc")
    save_vlm(again, tmp_path / "twice", proc, base=tmp_path / "trained")
    assert stored(tmp_path / "twice") == vpgc
    assert torch.equal(logits(load_vlm(tmp_path / "twice")[0], b), logits(again, b))


def test_tied_and_resized_embeddings_are_stored_once_and_stay_tied(tiny_tokenizer, tmp_path):
    model, proc = make(tiny_tokenizer, "opt", "mlp")  # OPT ties its head to its embeddings
    save_vlm(model, tmp_path / "base", proc)
    model, proc = load_vlm(tmp_path / "base")
    model.llm.resize_token_embeddings(model.llm.get_input_embeddings().num_embeddings + 8)  # new shape: stored
    model.set_trainable(["vpg"])
    trained(model, "vpg")
    save_vlm(model, tmp_path / "trained", proc, base=tmp_path / "base")
    embed = names(model, "llm.embeddings")
    assert len(embed) == 2  # the embeddings and the head: one tensor
    assert stored(tmp_path / "trained") == names(model, "vpg") | {min(embed)}
    loaded, _ = load_vlm(tmp_path / "trained")
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight
    b = batch(proc)
    assert torch.equal(logits(loaded, b), logits(model, b))


def test_a_changed_or_missing_base_is_refused_in_one_line(base, tmp_path):
    d, model, proc = base
    save_vlm(model, tmp_path / "trained", proc, base=d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: the file still reads, its hash does not
    weights.write_bytes(bytes(data))
    with pytest.raises(VlkitError, match=rf"its base {d} changed since the model was saved \(model.safetensors\); "
                       rf"{FIX} {d}") as e:
        load_vlm(tmp_path / "trained")
    assert "\n" not in str(e.value)
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert load_vlm(tmp_path / "trained")  # restored: loads again
    other, _ = load_vlm(d)
    with torch.no_grad():
        other.llm.get_input_embeddings().weight.mul_(2)
    save_vlm(other, d, proc)  # the base re-saved with other weights, its config.json the same
    with pytest.raises(VlkitError, match=r"changed since the model was saved \(model.safetensors\)"):
        load_vlm(tmp_path / "trained")
    other.set_trainable(["vpg"])
    save_vlm(other, d, proc)
    with pytest.raises(VlkitError, match=r"changed since the model was saved \(config.json\)"):
        load_vlm(tmp_path / "trained")
    shutil.rmtree(d)
    with pytest.raises(VlkitError, match=rf"its base {d} is missing \(no config.json there\); {FIX} {d}") as e:
        load_vlm(tmp_path / "trained")
    assert "\n" not in str(e.value)


def test_a_base_the_model_did_not_come_from_is_refused_before_writing(base, tmp_path):
    d, model, proc = base
    with torch.no_grad():
        model.llm.get_input_embeddings().weight[0, 0] += 1  # untrained, yet changed: not the base's any more
    with pytest.raises(VlkitError, match=r"save: llm.model.embed_tokens.weight is not trained yet differs from base"):
        save_vlm(model, tmp_path / "trained", proc, base=d)
    assert not (tmp_path / "trained").exists()
    with pytest.raises(VlkitError, match="is the base the model would refer to"):
        save_vlm(model, d, proc, base=d)
    with pytest.raises(VlkitError, match=r"'lora' holds no tensors now \(LoRA adapters merged"):
        model.set_trainable(["lora"])  # what a merged model reports: its adapters are gone into the LLM
        save_vlm(model, tmp_path / "trained", proc, base=d)


def test_a_stock_llava_base(tiny_tokenizer, tmp_path):
    d = stock_llava(tiny_tokenizer, tmp_path / "llava")
    model, proc = load_vlm(d)
    model.set_trainable(["vpg"])
    trained(model, "vpg")
    save_vlm(model, tmp_path / "whole", proc)
    save_vlm(model, tmp_path / "trained", proc, base=d)
    assert stored(tmp_path / "trained") == names(model, "vpg")
    ref = json.loads((tmp_path / "trained" / "config.json").read_text())["base"]
    assert set(ref["files"]) == {p.name for p in d.glob("*.safetensors")}
    b = batch(proc)
    ours = logits(load_vlm(tmp_path / "trained")[0], b)
    assert torch.equal(ours, logits(load_vlm(tmp_path / "whole")[0], b)) and torch.equal(ours, logits(model, b))


def test_merge_refuses_a_trained_only_directory_naming_its_base(base, tmp_path):
    from vlkit.models.merge import merge

    d, model, proc = base
    save_vlm(model, tmp_path / "trained", proc, base=d)
    save_vlm(model, tmp_path / "whole", proc)
    with pytest.raises(VlkitError, match=rf"merge: {tmp_path / 'trained'} keeps only its trained tensors and refers "
                       rf"to base {d.resolve()} for the rest; load it and save it without base"):
        merge(tmp_path / "whole", tmp_path / "trained", 0.5, tmp_path / "out")


def test_instruct_with_save_trained_only_saves_the_projector_and_refers_to_init(tmp_path, tiny_world, tiny_tokenizer):
    from vlkit.config import load
    from vlkit.recipes.common import config_hash, drop_later_settings
    from vlkit.recipes.instruct import InstructRecipe, run

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "init", proc)
    cfg_w, _ = tiny_world
    overrides = [f"output_dir={tmp_path / 'run'}", f"init={tmp_path / 'init'}", "trainable=[vpg.projector]",
                 f"data.world.seed={cfg_w.seed}", f"data.world.train_scenes={cfg_w.train_scenes}",
                 f"data.world.test_scenes={cfg_w.test_scenes}", "data.tasks=[vqa]", "eval.max_per_task=2",
                 "eval.tasks=[vqa]", "cache_features=false", "train.steps=2", "train.batch_size=4",
                 "train.lr=1e-2", "train.progress=false"]
    whole = load(InstructRecipe, None, overrides)
    cfg = load(InstructRecipe, None, [*overrides, "save_trained_only=true"])
    # the setting's default leaves the run hash as it was before the setting existed; true is another run
    assert "save_trained_only" not in drop_later_settings(whole.model_dump(mode="json"), "instruct")
    assert drop_later_settings(cfg.model_dump(mode="json"), "instruct")["save_trained_only"] is True
    assert config_hash(whole) != config_hash(cfg)
    res = run(cfg)
    d = tmp_path / "run" / "model"
    assert stored(d) == names(model, "vpg.projector")
    assert json.loads((d / "config.json").read_text())["base"]["path"] == str((tmp_path / "init").resolve())
    loaded, _ = load_vlm(d)
    after = loaded.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, after[k])}
    assert changed == names(model, "vpg.projector") and res["model_dir"] == str(d)
    with pytest.raises(VlkitError, match="save_trained_only: the LoRA adapters are merged into the LLM's weights"):
        load(InstructRecipe, None, [*overrides, "save_trained_only=true", "lora.r=4"])
