import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlkit.errors import VlkitError
from vlkit.train import TrainConfig, Trainer
from vlkit.train.checkpoint import load_safetensors
from vlkit.train.schedule import lr_at


class Crash(Exception):
    pass


def tiny_model(seed: int):
    torch.manual_seed(seed)
    # attention dropout draws from the torch RNG, so exact resume also needs the RNG state restored
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.2,
                                        max_position_embeddings=64))


def data():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(4, 50, (40, 3), generator=g)
    return base.repeat(1, 6)  # a random triple repeated: learnable after its first occurrence


def collate(items):
    return {"input_ids": torch.stack(items)}


def loss_fn(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def trainer(out, steps=12, seed=0, **kw):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, save_every=3, log_every=1,
                      progress=False, seed=5, **kw)
    return Trainer(tiny_model(seed), cfg, data(), collate, loss_fn, out)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls(tmp_path):
    t = trainer(tmp_path, steps=40)
    t.fit()
    ls = losses(tmp_path)
    assert sum(ls[-5:]) / 5 < 0.6 * sum(ls[:5]) / 5


def test_killed_run_resumes_to_identical_weights(tmp_path):
    full = trainer(tmp_path / "full")
    full.fit()

    def crash_at_7(step, _metrics):
        if step == 7:  # after step 7's update, between the checkpoints of steps 6 and 9
            raise Crash

    crashed = trainer(tmp_path / "resumed")
    with pytest.raises(Crash):
        crashed.fit(callbacks=[crash_at_7])
    # A new process would rebuild the model from scratch: use a different init to prove it is restored.
    resumed = trainer(tmp_path / "resumed", seed=99)
    resumed.fit(resume=True)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")


def test_a_callback_returning_true_stops_after_an_evaluation_and_a_checkpoint_and_resume_matches(tmp_path):
    full = trainer(tmp_path / "full")
    full.fit()
    evals = []

    def stop_at_5(step, _metrics):
        return step == 5  # between the checkpoints of steps 3 and 6

    cut = trainer(tmp_path / "cut")
    cut.evaluate_fn = lambda m: evals.append(cut.step) or {"x": 1.0}
    cut.fit(callbacks=[stop_at_5])
    assert cut.step == 5 and evals == [5]
    assert (tmp_path / "cut" / "checkpoints" / "step-0000005").is_dir()
    resumed = trainer(tmp_path / "cut", seed=99)
    resumed.fit(resume=True)  # continues from the checkpoint the early stop wrote
    assert resumed.step == 12
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0 and lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(0.55)


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    t = trainer(tmp_path, steps=2, grad_accum=2)
    t.fit()
    assert t.step == 2 and len(losses(tmp_path)) == 2


def test_fresh_run_refuses_to_clobber_checkpoints(tmp_path):
    trainer(tmp_path, steps=3).fit()
    with pytest.raises(VlkitError, match="pass --resume to continue it or --overwrite"):
        trainer(tmp_path, steps=3).fit()
    trainer(tmp_path, steps=3).fit(overwrite=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(VlkitError, match="no checkpoint to resume from"):
        trainer(tmp_path).fit(resume=True)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    trainer(tmp_path, steps=3).fit()
    weights = tmp_path / "checkpoints" / "step-0000003" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(VlkitError, match="trainable.safetensors: corrupt or truncated safetensors"):
        trainer(tmp_path, steps=6).fit(resume=True)


def test_checkpoint_layout_is_safe_to_load(tmp_path):
    trainer(tmp_path, steps=6).fit()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000006"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0000003", "step-0000006"]
    # the optimiser state loads under weights_only (no arbitrary unpickling)
    torch.load(root / "step-0000006" / "optimizer.pt", weights_only=True)


def test_empty_dataset_and_frozen_model_are_errors(tmp_path):
    cfg = TrainConfig(steps=1, progress=False)
    with pytest.raises(VlkitError, match="dataset is empty"):
        Trainer(tiny_model(0), cfg, [], collate, loss_fn, tmp_path)
    m = tiny_model(0).requires_grad_(False)
    with pytest.raises(VlkitError, match="no trainable parameters"):
        Trainer(m, cfg, data(), collate, loss_fn, tmp_path)


def test_two_ranks_under_torchrun(tmp_path):
    """DDP on CPU (gloo): both ranks train, only rank 0 writes (checkpoints and the model, which every rank asks
    for), and a failed write is an error on every rank."""
    import os

    script = tmp_path / "ddp.py"
    script.write_text(f"""
import torch, torch.distributed as dist
import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from test_trainer import tiny_model, data, collate, loss_fn
from vlkit.train import TrainConfig, Trainer
cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, seed=5)
t = Trainer(tiny_model(0), cfg, data(), collate, loss_fn, sys.argv[1])
t.fit()
w = torch.cat([p.detach().flatten() for p in t.model.parameters()])
gathered = [torch.zeros_like(w) for _ in range(2)]
dist.all_gather(gathered, w)
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
from pathlib import Path
def write(tmp):
    (tmp / "weights.txt").write_text("saved")
    with open(Path(sys.argv[1]) / "writers.txt", "a") as f:
        f.write(f"{{dist.get_rank()}}\\n")
t.save_model(Path(sys.argv[1]) / "model", write)
try:
    t.save_model(Path(sys.argv[1]) / "broken", lambda tmp: 1 / 0)
    failed = "none"
except Exception as e:
    failed = type(e).__name__
sys.stdout.write(f"rank {{dist.get_rank()}} ok {{failed}}\\n"); sys.stdout.flush()  # one write: ranks share the pipe
dist.destroy_process_group()
import os; os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort ("terminate called ...")
""")
    res, out = two_ranks(script, tmp_path, timeout=300)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert (out / "writers.txt").read_text() == "0\n" and (out / "model" / "weights.txt").read_text() == "saved"
    assert "rank 0 ok ZeroDivisionError" in res.stdout and "rank 1 ok VlkitError" in res.stdout
    assert not (out / "broken").exists()


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(script, root, timeout: int = 600):
    """`script OUT` under torchrun on 2 CPU ranks (gloo); (the finished process, OUT). gloo on this CPU box aborts a
    rank now and then (SIGABRT, ~1 run in 10): one retry, in a fresh OUT. Both ranks must print " ok"."""
    import os
    import subprocess
    import sys

    for attempt in range(2):
        out = root / f"out{attempt}"
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                              "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)],
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
        if res.returncode == 0 or "exitcode: -6" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr[:3000] + "\n...\n" + res.stderr[-2000:]
    assert res.stdout.count(" ok") == 2
    return res, out


def two_stream_trainer(out, steps=6, order="joint", weights=(1.0, 2.0)):
    """Stream `a` updates the embeddings only, stream `b` the first layer's attention only; both see the whole
    model in the loss, so each would move the other's group without the streams' groups."""
    from vlkit.train import Stream

    model = tiny_model(0)
    a = list(model.model.embed_tokens.parameters())
    b = list(model.model.layers[0].self_attn.parameters())
    model.requires_grad_(False)
    for p in a + b:
        p.requires_grad_(True)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, progress=False, seed=5)
    streams = [Stream("a", data(), collate, weights[0], a), Stream("b", data()[:, :9], collate, weights[1], b)]
    return Trainer(model, cfg, None, collate, loss_fn, out, streams=streams, order=order), a, b


def test_a_step_of_one_stream_leaves_the_other_group_bitwise_unchanged(tmp_path):
    t, a, b = two_stream_trainer(tmp_path, steps=1, weights=(1.0, 0.5))
    assert t.plan == [0]
    before_a, before_b = [p.detach().clone() for p in a], [p.detach().clone() for p in b]
    t.fit()
    assert all(torch.equal(p, q) for p, q in zip(b, before_b))      # stream b's group: not one bit moved
    assert not all(torch.equal(p, q) for p, q in zip(a, before_a))  # stream a's did
    t, a, b = two_stream_trainer(tmp_path / "2", steps=2, weights=(1.0, 1.0))
    assert t.plan == [0, 1]
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/a" in rows[0] and "loss/b" in rows[1] and "loss/b" not in rows[0]


def test_stream_plans_follow_the_weights():
    from vlkit.train.trainer import stream_plan

    joint = stream_plan([1, 2], 9)
    assert joint.count(0) == 3 and joint.count(1) == 6
    assert all(abs(joint[:n].count(1) - 2 * n / 3) <= 1 for n in range(1, 10))  # interleaved, not in blocks
    assert stream_plan([1, 2], 9, "sequential") == [0] * 3 + [1] * 6
    assert stream_plan([1], 4) == [0, 0, 0, 0]


def test_two_streams_resume_exactly(tmp_path):
    t, _, _ = two_stream_trainer(tmp_path / "full", steps=6)
    t.fit()
    want = {k: v.clone() for k, v in t.model.state_dict().items()}
    t, _, _ = two_stream_trainer(tmp_path / "cut", steps=6)
    t.cfg = t.cfg.model_copy(update={"save_every": 3})

    def crash(step, _):
        if step == 4:
            raise Crash
    with pytest.raises(Crash):
        t.fit(callbacks=[crash])
    t, _, _ = two_stream_trainer(tmp_path / "cut", steps=6)
    t.fit(resume=True)
    assert all(torch.equal(want[k], v) for k, v in t.model.state_dict().items())


def test_bf16_training_keeps_fp32_master_weights_and_fp32_training_upcasts(tmp_path):
    m = tiny_model(0).to(torch.bfloat16)
    m.model.embed_tokens.requires_grad_(False)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=0, progress=False, precision="bf16", device="cpu")
    t = Trainer(m, cfg, data(), collate, loss_fn, tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16  # frozen: stays as stored
    assert all(v.dtype == torch.float32 for g in t.optimizer.param_groups for v in g["params"])
    t.fit()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # trained in fp32, handed back in the dtype it came in: evaluation and saving see one dtype
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert load_safetensors(tmp_path / "bf16" / "checkpoints" / "step-0000003" / "trainable.safetensors")[
        "lm_head.weight"].dtype == torch.float32  # the checkpoint keeps the fp32 master weights
    m32 = tiny_model(0).to(torch.bfloat16)
    Trainer(m32, cfg.model_copy(update={"precision": "fp32"}), data(), collate, loss_fn, tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in [*m32.parameters(), *m32.buffers()] if t.is_floating_point())


def test_fp16_scales_the_loss_skips_overflowed_steps_and_resumes_the_scale(tmp_path):
    t = trainer(tmp_path, steps=4, precision="fp16", device="cpu")
    assert t.scaler is not None and t.scaler.get_scale() == 65536.0
    before = [p.detach().clone() for p in t.model.parameters()]
    hook = t.model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # every step's gradients overflow

    def stop_at_1(step, _):
        if step == 1:
            raise Crash
    with pytest.raises(Crash):
        t.fit(callbacks=[stop_at_1])
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))  # the overflowed step was skipped
    assert t.scaler.get_scale() == 32768.0  # and the scale halved
    t.save()
    resumed = trainer(tmp_path, steps=4, precision="fp16", device="cpu")
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == 32768.0 and resumed.step == 4  # restored (a fresh one: 65536)
    assert not all(torch.equal(a, b) for a, b in zip(before, resumed.model.parameters()))
