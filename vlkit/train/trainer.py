"""The training loop every recipe shares.

A recipe hands the trainer a model whose trainable parameters are already chosen (by group name),
a dataset (anything with ``len`` and ``[]``), a collate function and a loss function. The trainer
owns the rest: data order, AdamW, warm-up + cosine, accumulation, clipping, autocast, progress,
the JSONL metrics log, periodic evaluation and atomic checkpoints with exact resume.

Several data streams (`Stream`) can share one run, each with its own parameters (LLaMA-Adapter V2's joint
training of disjoint groups): every step draws its batch from one stream, chosen by the streams' weights
(`joint`: interleaved by weighted round-robin; `sequential`: each stream's share of the steps in turn), and
updates only that stream's parameters; the others keep no gradient, so AdamW leaves them bitwise as they were.

Data order is a pure function of (seed, epoch): the permutation of epoch e comes from a generator
seeded with ``seed * 1_000_003 + e`` (stream k > 0: + k * 7_919), so a resumed run sees exactly the batches
it would have seen. With ``train.batch_by_task`` (LLaMA2-Accessory's sampler for SPHINX) every optimiser step
draws from one task: the same generator shuffles each task's examples, cuts them into whole steps (batch_size x
grad_accum x ranks) and shuffles the steps of all tasks together.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from vlkit.console import bar as progress_bar
from vlkit.errors import VlkitError
from vlkit.fileio import write_text
from vlkit.train.checkpoint import checkpoint_name, clean_temporaries, latest_checkpoint, load_checkpoint, publish, \
    trainable_state, write_checkpoint, write_sharded_checkpoint
from vlkit.train.config import TrainConfig
from vlkit.train.distributed import checkpoint_activations, full_state, is_sharded, no_sync, save_once, \
    save_together, wrap
from vlkit.train.runtime import Runtime, make_runtime, seed_everything
from vlkit.train.schedule import lr_at

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[nn.Module], dict[str, float]]
StepCallback = Callable[[int, dict[str, float]], "bool | None"]  # True: stop after this step (see Trainer.fit)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def master_weights(model: nn.Module, compute_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype]]:
    """Trainable parameters in fp32, whatever the checkpoint stored (transformers keeps a bf16 checkpoint in
    bf16): AdamW's updates and state then have fp32 precision while autocast computes in `compute_dtype`. Without
    autocast (fp32 training) every floating parameter and buffer is fp32, frozen ones too. Returns the trained
    parameters that changed dtype, with the one they had (`Trainer.fit` gives it back at the end, so that the
    model leaves training in one dtype, as it came)."""
    if compute_dtype is None:
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*model.parameters(), *model.buffers()]):
            model.float()
        return []
    moved = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            moved.append((name, p.dtype))
            p.data = p.data.float()
    return moved


class _Sampler:
    """`Trainer._micro_batches` of one stream as a DataLoader batch sampler."""

    def __init__(self, trainer: "Trainer", stream: int):
        self.trainer, self.stream = trainer, stream

    def __iter__(self):
        return self.trainer._micro_batches(self.stream)

    def __len__(self) -> int:
        t = self.trainer
        return t.cfg.grad_accum * sum(1 for s in range(t.step, t.cfg.steps) if t.plan[s] == self.stream)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases and other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass
class Stream:
    """One data stream of a run: its examples, how they are batched, its share of the steps (`weight`) and the
    parameters its steps update (None: every trainable one)."""

    name: str
    dataset: Sequence
    collate: Callable[[list], Any]
    weight: float = 1.0
    params: Sequence[nn.Parameter] | None = None


def stream_plan(weights: Sequence[float], steps: int, order: Literal["joint", "sequential"] = "joint") -> list[int]:
    """The stream of each step. joint: smooth weighted round-robin (over any window the counts follow the weights
    to within one step); sequential: stream 0's share of the steps, then stream 1's, ..."""
    total = float(sum(weights))
    if order == "sequential":
        ends = [round(steps * sum(weights[:k + 1]) / total) for k in range(len(weights))]
        return [next(k for k, end in enumerate(ends) if s < end) for s in range(steps)]
    credit, plan = [0.0] * len(weights), []
    for _ in range(steps):
        credit = [c + w for c, w in zip(credit, weights)]
        k = max(range(len(weights)), key=lambda i: credit[i])
        credit[k] -= total
        plan.append(k)
    return plan


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, dataset: Sequence | None, collate: Callable[[list], Any],
                 loss_fn: LossFn, out_dir: str | Path, evaluate: EvalFn | None = None,
                 runtime: Runtime | None = None, run_config: dict | None = None, desc: str = "train",
                 on_start: Callable[[], None] | None = None, streams: Sequence[Stream] | None = None,
                 order: Literal["joint", "sequential"] = "joint"):
        self.streams = list(streams) if streams else [Stream("train", dataset, collate)]
        for st in self.streams:
            if len(st.dataset) == 0:
                what = "training dataset" if streams is None else f"training stream {st.name!r}"
                raise VlkitError(f"{out_dir}: the {what} is empty; check the data section of the config")
            if st.weight <= 0:
                raise VlkitError(f"{out_dir}: stream {st.name!r} has weight {st.weight}; give it a positive weight")
        self.plan = stream_plan([st.weight for st in self.streams], cfg.steps, order)
        self._nth = [0] * cfg.steps  # how many earlier steps drew from the same stream
        seen = [0] * len(self.streams)
        for s, k in enumerate(self.plan):
            self._nth[s], seen[k] = seen[k], seen[k] + 1
        self.cfg = cfg
        self.rt = runtime or make_runtime(cfg.device, cfg.precision, cfg.num_threads)
        if cfg.precision == "fp16" and self.rt.distributed and cfg.parallel == "fsdp":
            raise VlkitError(f"{out_dir}: train.precision=fp16 with train.parallel=fsdp is not supported (its loss "
                             "scaling needs a sharded GradScaler); use bf16, or parallel=ddp")
        self.model = model.to(self.rt.device)
        self._stored_dtypes = master_weights(model, self.rt.autocast_dtype)
        if streams and len(streams) > 1 and self.rt.distributed and cfg.parallel == "fsdp":
            raise VlkitError(f"{out_dir}: several data streams with train.parallel=fsdp are not supported (a stream "
                             "updates its own parameters, which sharding replaces); use parallel=ddp")
        self._by_task = [self._group_by_task(st, out_dir) for st in self.streams] if cfg.batch_by_task else None
        self._epoch_steps: dict[int, tuple[int, list[list[int]]]] = {}  # stream -> (epoch, its steps' indices)
        if not any(p.requires_grad for p in model.parameters()):
            raise VlkitError(f"{out_dir}: no trainable parameters; choose at least one trainable group")
        self.loss_fn, self.evaluate_fn = loss_fn, evaluate
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.run_config = run_config or {}
        self.desc = desc
        self.on_start = on_start
        if cfg.activation_checkpointing:
            checkpoint_activations(model)
        # a stream's step leaves the other streams' parameters without gradients: DDP must expect that
        self.wrapped = wrap(model, self.rt, cfg.parallel, self.rt.autocast_dtype,
                            unused_parameters=len(self.streams) > 1)
        self.sharded = is_sharded(model)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        # fp16 overflows where bf16 does not: scale the loss, skip the steps whose gradients overflowed
        self.scaler = torch.amp.GradScaler(self.rt.device.type) if self.rt.autocast_dtype is torch.float16 else None
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # stream -> (epoch, its permutation of examples)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0  # optimisation time only (no evaluation, no checkpointing)

    # -- data order ---------------------------------------------------------------------------
    def batches_per_epoch(self, stream: int = 0) -> int:
        if self._by_task is not None:
            return self.cfg.grad_accum * sum(len(v) // self._step_size() for v in self._by_task[stream].values())
        per_rank = len(self.streams[stream].dataset) // self.rt.world_size
        return max(1, per_rank // self.cfg.batch_size)

    def _step_size(self) -> int:
        """Examples per optimiser step over every rank."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.rt.world_size

    def _group_by_task(self, stream: Stream, out_dir) -> dict:
        """task -> the indices of its examples (train.batch_by_task), tasks in order of first appearance."""
        tasks = getattr(stream.dataset, "tasks", None)
        if tasks is None or len(tasks) != len(stream.dataset):
            raise VlkitError(f"{out_dir}: train.batch_by_task needs a dataset that says each example's task "
                             f"(stream {stream.name!r} does not); set train.batch_by_task=false")
        by_task: dict = {}
        for i, t in enumerate(tasks):
            by_task.setdefault(t, []).append(i)
        small = [t for t, v in by_task.items() if len(v) < self._step_size()]
        if len(small) == len(by_task):
            raise VlkitError(f"{out_dir}: train.batch_by_task: no task of stream {stream.name!r} has a step's worth "
                             f"({self._step_size()}) of examples; lower train.batch_size or set batch_by_task=false")
        if small:
            warnings.warn(f"train.batch_by_task: task(s) {small} of stream {stream.name!r} have fewer examples than "
                          f"one step ({self._step_size()}) and are left out", stacklevel=3)
        return by_task

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        """The generator of (epoch, stream)'s data order: a pure function of the seed, so resumes see the same."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch + stream * 7_919)

    def _task_steps(self, epoch: int, stream: int) -> list[list[int]]:
        """The steps of `epoch` (every rank's indices of each), each from one task, in their shuffled order."""
        cached = self._epoch_steps.get(stream)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        g = self._generator(epoch, stream)
        n, steps = self._step_size(), []
        for idx in self._by_task[stream].values():
            perm = torch.randperm(len(idx), generator=g).tolist()
            steps += [[idx[i] for i in perm[j:j + n]] for j in range(0, len(idx) - n + 1, n)]
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        self._epoch_steps[stream] = (epoch, steps)
        return steps

    def _batch_indices(self, micro: int, stream: int = 0) -> list[int]:
        """Indices of micro-batch `micro` of `stream`'s own data order."""
        epoch, pos = divmod(micro, self.batches_per_epoch(stream))
        if self._by_task is not None:  # micro-batch k of a step: the k-th slice of that step's examples
            step, k = divmod(pos, self.cfg.grad_accum)
            n = self.cfg.batch_size * self.rt.world_size
            return self._task_steps(epoch, stream)[step][k * n:(k + 1) * n][self.rt.rank::self.rt.world_size]
        cached = self._perms.get(stream)
        if cached is None or cached[0] != epoch:
            g = self._generator(epoch, stream)
            cached = (epoch, torch.randperm(len(self.streams[stream].dataset), generator=g)[
                self.rt.rank::self.rt.world_size])
            self._perms[stream] = cached
        start = pos * self.cfg.batch_size
        return cached[1][start:start + self.cfg.batch_size].tolist()

    def _micro_batches(self, stream: int):
        """The index lists of `stream`'s micro-batches from this step to the end, in the order the loop takes
        them (a DataLoader's batch sampler: workers read, decode and collate ahead)."""
        for s in range(self.step, self.cfg.steps):
            if self.plan[s] == stream:
                for k in range(self.cfg.grad_accum):
                    yield self._batch_indices(self._nth[s] * self.cfg.grad_accum + k, stream)

    def _loaders(self) -> list:
        """One iterator of collated batches per stream, from this step on."""
        from torch.utils.data import DataLoader

        cfg, out = self.cfg, []
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.rt.device.type == "cuda"
        for k, st in enumerate(self.streams):
            workers = {"num_workers": cfg.num_workers, "prefetch_factor": cfg.prefetch_factor} \
                if cfg.num_workers else {}
            # its own generator: making the iterator draws a worker seed, which must not move the global RNG that
            # dropout draws from (a resumed run would diverge from an uninterrupted one)
            g = self._generator(self.step, k)
            out.append(iter(DataLoader(st.dataset, batch_sampler=_Sampler(self, k), collate_fn=st.collate,
                                       pin_memory=pin, generator=g, **workers)))
        return out

    # -- loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False,
            callbacks: Sequence[StepCallback] = ()) -> dict[str, float]:
        """Train to cfg.steps. `resume` continues from the latest checkpoint; a fresh run refuses to
        start over existing checkpoints unless `overwrite`. Each callback runs after every step; one that
        returns True on any rank ends training there on every rank, after a final evaluation and checkpoint."""
        cfg = self.cfg
        seed_everything(cfg.seed + self.rt.rank)
        if self.rt.is_main:
            clean_temporaries(self.ckpt_root)
        if resume:
            ckpt = latest_checkpoint(self.ckpt_root)
            if ckpt is None:
                raise VlkitError(f"{self.ckpt_root}: no checkpoint to resume from; run without --resume")
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.rt.rank)
            micro = self.cfg.batch_size * self.rt.world_size
            saved = (state.get("micro_batch", micro), state.get("grad_accum", self.cfg.grad_accum))
            if saved != (micro, self.cfg.grad_accum):  # the data order is a function of both
                raise VlkitError(f"{ckpt}: written with micro-batches of {saved[0]} examples over every rank "
                                 f"(batch_size x ranks) and grad_accum {saved[1]}; this run has {micro} and "
                                 f"{self.cfg.grad_accum}: on {self.rt.world_size} rank(s) set train.batch_size="
                                 f"{saved[0] // self.rt.world_size} and train.grad_accum={saved[1]}")
            if (ckpt / "trainable.safetensors").is_file() and self.sharded:
                raise VlkitError(f"{ckpt}: written by one process or DDP (whole tensors, optimiser state by "
                                 "position); resume it with train.parallel=ddp")
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            self.step = state["step"]
            self.history = state.get("history", [])
            self.train_seconds = state.get("train_seconds", 0.0)
            self._truncate_log(self.step)
        elif self.rt.is_main:
            if latest_checkpoint(self.ckpt_root) is not None and not overwrite:
                raise VlkitError(f"{self.out_dir}: holds checkpoints of an earlier run; pass --resume to continue "
                                 "it or --overwrite to start over")
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.on_start is not None and self.rt.is_main:
            self.on_start()  # every input is validated by now: the run may be recorded
        if self.step >= cfg.steps:  # resumed after the final checkpoint: the run had finished
            self._restore_dtypes()
            return self._final_eval()
        self.model.train()
        bar = progress_bar(total=cfg.steps, initial=self.step, desc=self.desc,
                           enabled=cfg.progress if self.rt.is_main else False)
        window_t, window_n, window_tok = time.perf_counter(), 0, 0
        last_eval: dict[str, float] = {}
        loaders = self._loaders()
        try:
            while self.step < cfg.steps:
                t_step = time.perf_counter()
                lr = lr_at(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                           min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, extra_sum = 0.0, {}
                sk = self.plan[self.step]
                stream = self.streams[sk]
                for k in range(cfg.grad_accum):
                    micro = self._nth[self.step] * cfg.grad_accum + k
                    window_n += len(self._batch_indices(micro, sk))
                    batch = to_device(next(loaders[sk]), self.rt.device)
                    with no_sync(self.wrapped, last=k == cfg.grad_accum - 1):
                        with self.rt.autocast():
                            out = self.loss_fn(self.wrapped, batch)
                        loss, extra = out if isinstance(out, tuple) else (out, {})
                        if not self._finite_everywhere(loss):
                            raise VlkitError(f"{self.out_dir}: loss became {loss.item()} at step {self.step}; "
                                             "lower train.lr or check the data")
                        scaled = loss / cfg.grad_accum
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    loss_sum += loss.item() / cfg.grad_accum
                    for key, v in extra.items():
                        extra_sum[key] = extra_sum.get(key, 0.0) + float(v)
                    window_tok += int(extra.get("tokens", 0))
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                if stream.params is not None:  # this stream's step updates its own group only
                    own = {id(p) for p in stream.params}
                    for p in trainable:
                        if id(p) not in own:
                            p.grad = None
                    trainable = [p for p in trainable if id(p) in own]
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if self.scaler is not None:  # skips the update when the gradients overflowed, then rescales
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.train_seconds += time.perf_counter() - t_step
                loss_sum = self._mean_over_ranks(loss_sum)
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                metrics = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": float(gnorm)}
                metrics.update({k: v / cfg.grad_accum for k, v in extra_sum.items() if k != "tokens"})
                if len(self.streams) > 1:
                    metrics[f"loss/{stream.name}"] = loss_sum
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - window_t
                    metrics["samples_per_s"] = window_n * self.rt.world_size / max(dt, 1e-9)
                    if window_tok:
                        metrics["tokens_per_s"] = window_tok * self.rt.world_size / max(dt, 1e-9)
                    window_t, window_n, window_tok = time.perf_counter(), 0, 0
                    self._log(metrics)
                    bar.set_postfix(loss=f"{loss_sum:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
                final = self.step == cfg.steps
                evaluated = self.evaluate_fn and ((cfg.eval_every and self.step % cfg.eval_every == 0) or final)
                if evaluated:
                    last_eval = self.run_eval()
                saved = (cfg.save_every and self.step % cfg.save_every == 0) or final
                if saved:
                    self.save()
                if self._any_rank(any([bool(cb(self.step, metrics)) for cb in callbacks])) and not final:
                    if self.evaluate_fn and not evaluated:
                        last_eval = self.run_eval()
                    if not saved:
                        self.save()
                    break
        finally:
            bar.close()
        self._restore_dtypes()
        return last_eval

    def _restore_dtypes(self) -> None:
        """The trained parameters back in the dtype the model came in (see `master_weights`); a sharded model's
        are cast when gathered (`model_state`)."""
        if self.sharded:
            return
        params = dict(self.model.named_parameters())
        for name, dtype in self._stored_dtypes:
            params[name].data = params[name].data.to(dtype)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks stop together, none waits in a collective)."""
        ok = torch.isfinite(loss.detach()).all().to(torch.float32)
        if self.rt.distributed:
            import torch.distributed as dist

            ok = ok.to(self.rt.device if self.rt.device.type == "cuda" else "cpu")
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (so that all ranks stop at the same step)."""
        if not self.rt.distributed:
            return flag
        return self._mean_over_ranks(float(flag)) > 0

    def _mean_over_ranks(self, value: float) -> float:
        """The loss of the global batch (ranks' micro-batch losses averaged), as one process would log it."""
        if not self.rt.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.rt.device if self.rt.device.type == "cuda"
                         else "cpu")
        dist.all_reduce(t)
        return float(t) / self.rt.world_size

    def _final_eval(self) -> dict[str, float]:
        """The evaluation at the last step, from the history when it was logged there, else run now."""
        last = self.history[-1] if self.history else {}
        if self.evaluate_fn is None:
            return {}
        if last.get("step") == self.step and any(k.startswith("eval/") for k in last):
            return {k[5:]: v for k, v in last.items() if k.startswith("eval/")}
        return self.run_eval()

    def run_eval(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.rt.autocast():
            result = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
        self.model.train()
        samples = self.step * self.cfg.batch_size * self.cfg.grad_accum * self.rt.world_size
        record = {"step": self.step, "samples": samples, "train_seconds": round(self.train_seconds, 3),
                  **{f"eval/{k}": v for k, v in result.items()}}
        self.history.append(record)
        self._log(record)
        return result

    def save(self) -> Path:
        """A checkpoint of this step: every rank takes part; rank 0 writes it, or under FSDP every rank its
        shards."""
        name = checkpoint_name(self.step)
        extra = {"config": self.run_config, "history": self.history, "train_seconds": self.train_seconds,
                 "micro_batch": self.cfg.batch_size * self.rt.world_size, "grad_accum": self.cfg.grad_accum,
                 "world_size": self.rt.world_size}
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()
        then = lambda: publish(self.ckpt_root, name, self.cfg.keep_checkpoints)  # noqa: E731
        if self.sharded:
            return save_together(self.rt, self.ckpt_root / name, lambda tmp: write_sharded_checkpoint(
                tmp, self.step, self.model, self.optimizer, extra, self.rt.rank), then=then)
        trainable, opt = trainable_state(self.model), self.optimizer.state_dict()
        return save_once(self.rt, self.ckpt_root / name,
                         lambda tmp: write_checkpoint(tmp, self.step, trainable, opt, extra), then=then)

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP: every tensor of the model gathered on rank 0's CPU, for writing the model (collective:
        every rank calls it). Otherwise None: the model's own state_dict is whole."""
        state = full_state(self.model, self.rt)
        if state is not None:
            for name, dtype in self._stored_dtypes:
                if name in state:
                    state[name] = state[name].to(dtype)
        return state

    def save_model(self, directory: str | Path, write: Callable[[Path], None]) -> Path:
        """The trained model as a directory: every rank calls this, `write(tmp)` runs once (rank 0)."""
        return save_once(self.rt, directory, write)

    # -- metrics log ------------------------------------------------------------------------------
    def _log(self, record: dict[str, float]) -> None:
        if not self.rt.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if not self.rt.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by the kill that ended the run
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        write_text(path, "".join(line + "\n" for line in keep))
