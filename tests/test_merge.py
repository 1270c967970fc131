"""SPHINX weight mixing (`vlkit merge`): the endpoints reproduce each input bit for bit, beta 0.5 is the mean,
`part` mixes only its tensors, plain HF LMs (sharded or not) merge the same way, every mismatch is refused
before anything is written, and the command prints what it mixed or exits 2 with one line."""

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from test_adapter import CONV, perturb
from test_runs import one_line, vlkit as run_vlkit
from test_vlm import LLMS, batch, images, make
from vlkit.errors import VlkitError
from vlkit.models.generate import GenerationConfig, generate
from vlkit.models.io import load_vlm, save_vlm
from vlkit.models.merge import merge


def differing(model, seed):
    """A fine-tune of the base model, as far as merging cares: every weight moved by its own noise."""
    perturb(model, seed=seed, scale=0.05)
    return model


@pytest.fixture(scope="module")
def vlms(tmp_path_factory, tiny_tokenizer):
    """Two fine-tunes (A, B) of one tiny VLM, saved."""
    root = tmp_path_factory.mktemp("merge-vlm")
    for name, seed in (("a", 1), ("b", 2)):
        model, proc = make(tiny_tokenizer)
        save_vlm(differing(model, seed), root / name, proc)
    return root / "a", root / "b"


def tiny_llama(tok, seed, **arch):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**LLMS["llama"], **arch, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    return differing(AutoModelForCausalLM.from_config(cfg).eval(), seed)


def save_lm(model, tok, directory, **kw):
    model.save_pretrained(directory, **kw)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def lms(tmp_path_factory, tiny_tokenizer):
    """Two fine-tunes of one tiny HF LLaMA: A sharded (index + several files), B one file."""
    root = tmp_path_factory.mktemp("merge-lm")
    a = save_lm(tiny_llama(tiny_tokenizer, 1), tiny_tokenizer, root / "a", max_shard_size="50KB")
    b = save_lm(tiny_llama(tiny_tokenizer, 2), tiny_tokenizer, root / "b")
    assert (a / "model.safetensors.index.json").is_file() and len(list(a.glob("*.safetensors"))) > 1
    return a, b


def weights(directory):
    """Every tensor of a directory, one file or sharded."""
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def logits(directory):
    model, proc = load_vlm(directory)
    with torch.no_grad():
        return model(**batch(proc)).logits


# -- what is written ----------------------------------------------------------------------------------------
def test_vlm_endpoints_reproduce_each_input_exactly(vlms, tmp_path):
    a, b = vlms
    for beta, source in ((1.0, a), (0, b)):
        out = tmp_path / f"beta{beta}"
        report = merge(a, b, beta, out)
        want, got = weights(source), weights(out)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert torch.equal(logits(out), logits(source))
        assert report.mixed_tensors == len(want) and report.kept_tensors == 0
    assert not torch.equal(logits(a), logits(b))  # the two inputs really differ
    assert (tmp_path / "beta1.0" / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()


def test_vlm_half_is_the_mean_and_loads_and_generates(vlms, tmp_path):
    a, b = vlms
    report = merge(a, b, 0.5, tmp_path / "c")
    wa, wb, got = weights(a), weights(b), weights(tmp_path / "c")
    # 0.5 * x + 0.5 * y rounds once, as (x + y) / 2 does: exactly equal in float32
    assert all(torch.equal(got[k], (wa[k] + wb[k]) / 2) for k in wa)
    assert report.mixed_parameters == sum(v.numel() for v in wa.values())
    merged, proc = load_vlm(tmp_path / "c")
    mean, _ = load_vlm(a)
    mean.load_state_dict({k: (wa[k] + wb[k]) / 2 for k in wa})
    gen = GenerationConfig(max_new_tokens=5)
    out = generate(merged, proc, [CONV[:1]], [images(1)], gen, return_ids=True)[0]
    assert out["tokens"] >= 1 and out["ids"] == generate(mean, proc, [CONV[:1]], [images(1)], gen,
                                                          return_ids=True)[0]["ids"]
    for name in ("config.json", "processor_config.json", "tokenizer.json"):
        assert (tmp_path / "c" / name).read_bytes() == (a / name).read_bytes()
    note = json.loads((tmp_path / "c" / "merge.json").read_text())
    assert (note["a"], note["b"], note["beta"], note["part"]) == (str(a), str(b), 0.5, "all")


@pytest.mark.parametrize("part", ["llm", "vpg"])
def test_part_mixes_only_its_tensors(vlms, tmp_path, part):
    a, b = vlms
    report = merge(a, b, 0.25, tmp_path / "c", part=part)
    wa, wb, got = weights(a), weights(b), weights(tmp_path / "c")
    inside = [k for k in wa if k.startswith(part + ".")]
    assert inside and report.mixed_tensors == len(inside) and report.kept_tensors == len(wa) - len(inside)
    for k in wa:
        if k in inside:
            assert torch.allclose(got[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-7, rtol=0)
            assert not torch.equal(got[k], wa[k])
        else:
            assert torch.equal(got[k], wa[k])
    note = json.loads((tmp_path / "c" / "merge.json").read_text())
    assert note["part"] == part and note["mixed"] == f"only the {part}.* tensors" and "every other tensor" in \
        note["from_a"]


def test_hf_lms_merge_sharded_or_not_and_load(lms, tmp_path):
    a, b = lms
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    loaded = {}
    for name, directory in (("a", a), ("b", b)):
        loaded[name] = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    for beta, want in ((1, "a"), (0, "b"), (0.5, None)):
        out = merge(a, b, beta, tmp_path / f"c{beta}").out
        assert (tmp_path / f"c{beta}" / "model.safetensors.index.json").is_file()  # A's layout
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        got, sa, sb = model.state_dict(), loaded["a"].state_dict(), loaded["b"].state_dict()
        expect = {k: sa[k] if want == "a" else sb[k] if want == "b" else (sa[k] + sb[k]) / 2 for k in sa}
        assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)
        if want:
            with torch.no_grad():
                assert torch.equal(model(ids).logits, loaded[want](ids).logits)
    assert (tmp_path / "c1" / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


# -- what is refused ----------------------------------------------------------------------------------------
def other_layers(vlms, lms, tok, tmp):
    return lms[0], save_lm(tiny_llama(tok, 2, num_hidden_layers=3), tok, tmp / "three"), {}


def other_vpg(vlms, lms, tok, tmp):
    model, proc = make(tok, vpg="mlp")
    return vlms[0], save_vlm(model, tmp / "mlp", proc), {}


def other_tokenizer(vlms, lms, tok, tmp):
    shutil.copytree(vlms[1], tmp / "tok")
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp / "tok")
    return vlms[0], tmp / "tok", {}


def other_shape(vlms, lms, tok, tmp):
    shutil.copytree(vlms[1], tmp / "shape")
    state = load_file(tmp / "shape" / "model.safetensors")
    name = min(k for k in state if k.startswith("vpg."))
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    save_file(state, tmp / "shape" / "model.safetensors")
    return vlms[0], tmp / "shape", {}


def other_dtype(vlms, lms, tok, tmp):  # the config's dtype key is ignored; the tensors' dtypes are not
    return lms[1], save_lm(tiny_llama(tok, 2).to(torch.bfloat16), tok, tmp / "bf16"), {}


def other_processor(vlms, lms, tok, tmp):
    shutil.copytree(vlms[1], tmp / "proc")
    cfg = json.loads((tmp / "proc" / "processor_config.json").read_text())
    (tmp / "proc" / "processor_config.json").write_text(json.dumps({**cfg, "max_length": 64}))
    return vlms[0], tmp / "proc", {}


def other_buffer(vlms, lms, tok, tmp):
    for name, value in (("x", 2), ("y", 3)):
        shutil.copytree(lms[1], tmp / name)
        state = load_file(tmp / name / "model.safetensors")
        save_file({**state, "model.counter": torch.tensor([1, value])}, tmp / name / "model.safetensors",
                  metadata={"format": "pt"})
    return tmp / "x", tmp / "y", {}


REFUSALS = {
    "architecture": (other_layers, ("three has another architecture than {a}: config.json num_hidden_layers is 3, "
                                    "not 2")),
    "vpg kind": (other_vpg, "mlp has another architecture than {a}: config.json vlm.vpg.kind is 'mlp', not 'qformer'"),
    "tokenizer": (other_tokenizer, "tok: tokenizer differs from {a}'s (tokenizer.json)"),
    "shape": (other_shape, "shape: tensor 'vpg."),
    "dtype": (other_dtype, "bf16: tensor 'lm_head.weight' is BF16"),
    "processor": (other_processor, "proc: processor config differs from {a}'s (processor_config.json)"),
    "int buffer": (other_buffer, "y: the I64 tensor 'model.counter' differs from {a}'s and cannot be mixed"),
    "kind": (lambda vlms, lms, tok, tmp: (vlms[0], lms[1], {}), "{b} is not a vlkit model like {a}"),
    "beta below": (lambda vlms, lms, tok, tmp: (*vlms, {"beta": -0.1}),
                   "beta must be in [0, 1] (the weight of A), got -0.1"),
    "beta above": (lambda vlms, lms, tok, tmp: (*vlms, {"beta": 1.5}), "beta must be in [0, 1]"),
    "beta nan": (lambda vlms, lms, tok, tmp: (*vlms, {"beta": math.nan}), "beta must be in [0, 1]"),
    "beta not a number": (lambda vlms, lms, tok, tmp: (*vlms, {"beta": "half"}), "got 'half'"),
    "part": (lambda vlms, lms, tok, tmp: (*vlms, {"part": "vision"}), "part 'vision' is not one of all, llm, vpg"),
    "part of an LM": (lambda vlms, lms, tok, tmp: (*lms, {"part": "llm"}), "part 'llm' needs vlkit models"),
    "out is A": (lambda vlms, lms, tok, tmp: (*vlms, {"out": vlms[0]}), "out {a} would replace the input {a}"),
    "out holds A and B": (lambda vlms, lms, tok, tmp: (*vlms, {"out": vlms[1].parent, "overwrite": True}),
                    "would replace the input {a}"),
    "missing": (lambda vlms, lms, tok, tmp: (vlms[0], tmp / "nowhere", {}), "{b} is not a directory"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_mismatches_are_refused_before_anything_is_written(vlms, lms, tiny_tokenizer, tmp_path, case):
    build, message = REFUSALS[case]
    a, b, kw = build(vlms, lms, tiny_tokenizer, tmp_path)
    kw = {"beta": 0.5, "out": tmp_path / "out", **kw}
    before = {p: p.read_bytes() for p in (*a.iterdir(), *(b.iterdir() if b.is_dir() else ()))}
    with pytest.raises(VlkitError) as e:
        merge(a, b, **kw)
    assert message.format(a=a, b=b) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and {p: p.read_bytes() for p in before} == before


def test_an_existing_out_needs_overwrite(vlms, tmp_path):
    a, b = vlms
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(VlkitError, match="exists; pass overwrite"):
        merge(a, b, 0.5, tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
    merge(a, b, 1, tmp_path / "c", overwrite=True)
    assert not (tmp_path / "c" / "keep.txt").exists()
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()


# -- the command --------------------------------------------------------------------------------------------
def test_cli_prints_what_it_mixed_and_refuses_in_one_line(vlms, tmp_path):
    from typer.testing import CliRunner

    from vlkit.cli import app

    a, b = vlms
    llm = {k: v for k, v in weights(a).items() if k.startswith("llm.")}
    res = CliRunner().invoke(app, ["merge", str(a), str(b), "--beta", "0.5", "--out", str(tmp_path / "c"),
                                   "--part", "llm"])
    assert res.exit_code == 0, res.output
    assert (f"mixed the llm.* tensors of vlkit models: {len(llm)} tensors, "
            f"{sum(v.numel() for v in llm.values()):,} parameters, theta = 0.5 * A + 0.5 * B") in res.output
    assert json.loads((tmp_path / "c" / "merge.json").read_text())["part"] == "llm"
    bad = run_vlkit("merge", a, b, "--beta", "0.5", "--out", tmp_path / "c")  # exists, no --overwrite
    assert one_line(bad)[0], bad.stderr
    assert f"error: merge: out {tmp_path / 'c'} exists; pass overwrite (--overwrite) to replace it" in bad.stderr
