"""Data parallelism on CPU (gloo, 2 ranks under torchrun): FSDP2 and DDP give the loss curve of one process taking
the same global batch, sharded checkpoints resume exactly, and a 2-rank checkpoint resumes on 1 rank."""

import json
import os
import shutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlkit.errors import VlkitError
from test_trainer import two_ranks as two_ranks_run
from vlkit.train import TrainConfig, Trainer

HERE = os.path.dirname(__file__)


def model(seed: int = 0):
    """No dropout: ranks draw different dropout masks than one process would, which is not what is compared."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    m.model.embed_tokens.requires_grad_(False)  # a frozen part inside the root unit
    return m


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 50, (48, 3), generator=g).repeat(1, 4)


def collate(items):
    return {"input_ids": torch.stack(items)}


def loss_fn(m, batch):
    return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def make(out, batch_size, steps=6, parallel="ddp", grad_accum=1, moved=False):
    """`moved`: the trained parameters start elsewhere (a resumed run must restore them; frozen ones, rebuilt by a
    recipe from its sources, are the same)."""
    m = model()
    if moved:
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_steps=1,
                      save_every=2, keep_checkpoints=5, log_every=1, progress=False, seed=5, parallel=parallel,
                      precision="fp32", device="cpu")
    return Trainer(m, cfg, data(), collate, loss_fn, out)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(t):
    state = t.model_state()
    if state is None:
        state = {k: v.detach() for k, v in t.model.state_dict().items()}
    return state


SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
from pathlib import Path
from test_parallel import make, weights
root = Path(sys.argv[1])
class Crash(Exception):
    pass
def crash_at_3(step, _):
    if step == 3:
        raise Crash
results = {{}}
for name, parallel, accum, bs in (("fsdp", "fsdp", 1, 4), ("ddp", "ddp", 2, 2)):
    t = make(root / name, bs, parallel=parallel, grad_accum=accum)
    t.fit()
    w = weights(t)
    if dist.get_rank() == 0:
        torch.save(w, root / f"{{name}}.pt")
    if parallel == "fsdp":
        crashed = make(root / "fsdp_resumed", bs, parallel=parallel)
        try:
            crashed.fit(callbacks=[crash_at_3])
        except Crash:
            pass
        resumed = make(root / "fsdp_resumed", bs, parallel=parallel, moved=True)  # restored, not re-initialised
        resumed.fit(resume=True)
        w = weights(resumed)
        if dist.get_rank() == 0:
            torch.save(w, root / "fsdp_resumed.pt")
from test_trainer import two_stream_trainer  # each stream's steps leave the other's group without gradients
t, a, b = two_stream_trainer(root / "streams", steps=4)
t.fit()
w = torch.cat([p.detach().flatten() for p in t.model.parameters()])
both = [torch.zeros_like(w) for _ in range(2)]
dist.all_gather(both, w)
assert torch.equal(both[0], both[1]), "two-stream DDP ranks diverged"
sys.stdout.write(f"rank {{dist.get_rank()}} ok\\n"); sys.stdout.flush()
dist.destroy_process_group()
import os; os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    script = root / "run.py"
    script.write_text(SCRIPT.format(here=HERE))
    return two_ranks_run(script, root)[1]


def close(a: dict, b: dict, tol=1e-5):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (k, (a[k] - b[k]).abs().max())


def test_fsdp_two_ranks_follow_one_process_and_resume_exactly(two_ranks, tmp_path):
    one = make(tmp_path / "one", batch_size=8)
    one.fit()
    assert losses(two_ranks / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    close(torch.load(two_ranks / "fsdp.pt", weights_only=True), weights(one))
    # the sharded checkpoint: torch.distributed.checkpoint files, each rank's RNG
    ckpt = two_ranks / "fsdp" / "checkpoints" / "step-0000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng-1.safetensors").is_file()
    # killed at step 3, resumed from step 2's checkpoint into a model initialised differently: identical
    full = torch.load(two_ranks / "fsdp.pt", weights_only=True)
    resumed = torch.load(two_ranks / "fsdp_resumed.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert losses(two_ranks / "fsdp_resumed") == losses(two_ranks / "fsdp")


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    one = make(tmp_path / "one", batch_size=8)
    one.fit()
    out = tmp_path / "from_two"
    shutil.copytree(two_ranks / "fsdp", out)
    (out / "checkpoints" / "latest").write_text("step-0000004\n")
    t = make(out, batch_size=8, moved=True)
    t.fit(resume=True)
    close(weights(t), weights(one))
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    # the same checkpoint with another global batch is refused, naming what to set
    shutil.copytree(two_ranks / "fsdp", tmp_path / "wrong")
    with pytest.raises(VlkitError, match="micro-batches of 8 examples .* train.batch_size=8 and train.grad_accum=1"):
        make(tmp_path / "wrong", batch_size=4).fit(resume=True)


def test_ddp_with_accumulation_follows_one_process_and_resumes_on_one_rank(two_ranks, tmp_path):
    one = make(tmp_path / "one", batch_size=4, grad_accum=2)  # 2 ranks x 2 rows x 2 micro-batches = 8 per step
    one.fit()
    assert losses(two_ranks / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    close(torch.load(two_ranks / "ddp.pt", weights_only=True), weights(one))
    out = tmp_path / "ddp"
    shutil.copytree(two_ranks / "ddp", out)
    (out / "checkpoints" / "latest").write_text("step-0000002\n")
    t = make(out, batch_size=4, grad_accum=2, moved=True)
    t.fit(resume=True)
    close(weights(t), weights(one))


def test_no_sync_skips_the_all_reduce_on_all_but_the_last_micro_batch():
    from vlkit.train.distributed import no_sync

    calls = []

    class FakeDDP(torch.nn.Module):
        def no_sync(self):
            calls.append("no_sync")
            return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    w = FakeDDP()
    for k in range(3):
        with no_sync(w, last=k == 2):
            pass
    assert calls == ["no_sync", "no_sync"]


def test_a_checkpoint_of_one_process_is_refused_under_fsdp_in_one_line(tmp_path):
    """Whole tensors and an optimiser state keyed by position do not load into shards: say what to do."""
    t = make(tmp_path, batch_size=8, steps=2)
    t.fit()
    t.sharded = True  # what a 2-rank FSDP trainer is; the refusal comes before any collective
    with pytest.raises(VlkitError, match="resume it with train.parallel=ddp"):
        t.fit(resume=True)
