"""Recipe `ats`: fine-tune a causal LM on gold search traces of the puzzle games (ATS paper, Sec. 4.3).

The paper fine-tunes LLaMA-2 on ATS-BFS / ATS-DFS responses collected from GPT-4 and compares with
CoT-tuned models. Here the exact solvers write the traces (`vlkit.reason.traces`), so the three
formats show the same solutions: `data.format` picks CoT, ATS-BFS or ATS-DFS; everything else (model
size, data, steps) is shared, and the tokenizer is trained on all three formats at once so that token
counts compare. Loss only on the answer (the trace). After training, held-out instances of each game
are solved with greedy decoding and judged by the games' verifiers. A model directory is saved with
`reason.json`, so `vlkit ats --backend local --model <out>/model` asks it as it was taught.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from vlkit.config import Section
from vlkit.data.processor import pad_encodings
from vlkit.data.tokenizer import TokenizerConfig, encode_chat, load_tokenizer, train_bpe
from vlkit.errors import VlkitError
from vlkit.fileio import write_json
from vlkit.models.llm import LLMConfig, build_llm, count_parameters
from vlkit.recipes.common import finish, prepare_output
from vlkit.train import TrainConfig, Trainer
from vlkit.train.runtime import seed_everything

FORMATS = ("cot", "ats-bfs", "ats-dfs")


class ATSTokenizer(TokenizerConfig):
    split_digits: bool = Field(True, description="Every digit its own token (training only): the games are "
                               "arithmetic, which a tiny model learns digit by digit far more easily.")


class ATSData(Section):
    games: list[str] = Field(["water", "numpath", "arithmetic", "grass", "game24"],
                             description="Games to train and evaluate on (vlkit.reason.games).")
    format: Literal["cot", "ats-bfs", "ats-dfs"] = Field("ats-bfs", description="The trace format taught.")
    train_per_game: int = Field(500, gt=0, description="Training instances per game (game24: rows outside 900-999; "
                                "arithmetic has about 730 train puzzles in all, water about 960).")
    seed: int = Field(0, description="Seed of the procedural games' instances and of the traces' random choices.")
    bfs_width: int = Field(2, gt=0, description="ATS-BFS traces: nodes listed per level.")
    dfs_detours: int = Field(1, ge=0, description="ATS-DFS traces: wrong turns taken (and stepped back from).")
    max_length: int = Field(512, gt=16, description="Tokens per example; longer examples are left out (counted).")


class ATSEval(Section):
    test_per_game: int | dict[str, int] = Field(50, description="Held-out instances per game (game24: rows "
                                                "900-...), or {game: count} (games not named: 50; a larger count "
                                                "extends the same instances). The procedural arithmetic and water "
                                                "games hold about 120 distinct test instances each.")

    @field_validator("test_per_game")
    @classmethod
    def _counts(cls, v):
        counts = v.values() if isinstance(v, dict) else [v]
        if any(c < 0 for c in counts):
            raise ValueError(f"test_per_game: counts must be >= 0, got {v}")
        return v

    def count(self, game: str) -> int:
        return self.test_per_game.get(game, 50) if isinstance(self.test_per_game, dict) else self.test_per_game
    max_new_tokens: int = Field(640, gt=0, description="Most tokens per answer.")
    batch_size: int = Field(25, gt=0, description="Questions per generate call.")


class ATSRecipe(Section):
    recipe: Literal["ats"] = "ats"
    output_dir: str = Field("runs/ats_bfs", description="Where the model, logs and results go.")
    data: ATSData = Field(default_factory=ATSData)
    tokenizer: ATSTokenizer = Field(default_factory=lambda: ATSTokenizer(vocab_size=1024))
    model: LLMConfig = Field(default_factory=lambda: LLMConfig(max_position_embeddings=1024))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: ATSEval = Field(default_factory=ATSEval)


def trace_examples(data: ATSData, formats: list[str]) -> dict[str, list[dict]]:
    """{format: [{game, id, messages}]}: gold traces of the training instances in each format (deterministic).
    Instances are generated and solved once; every format writes the same solution."""
    from vlkit.reason.games import get_game
    from vlkit.reason.methods import build_messages
    from vlkit.reason.traces import gold_trace

    out: dict[str, list[dict]] = {fmt: [] for fmt in formats}
    for name in data.games:
        game = get_game(name)
        for inst in game.instances("train", data.train_per_game, seed=data.seed):
            path, question = game.solve(inst), build_messages(game, inst, "io", style="tuned")
            for fmt in formats:
                rng = random.Random(f"{data.seed}:{fmt}:{inst['id']}")
                trace = gold_trace(game, inst, fmt, rng, width=data.bfs_width, detours=data.dfs_detours, path=path)
                out[fmt].append({"game": name, "id": inst["id"],
                                 "messages": question + [{"role": "assistant", "content": trace}]})
    return out


class TraceDataset:
    def __init__(self, examples: list[dict], tok, max_length: int):
        self.items, self.dropped = [], 0
        for ex in examples:
            enc = encode_chat(tok, ex["messages"])
            if len(enc["input_ids"]) > max_length:
                self.dropped += 1
                continue
            self.items.append((enc["input_ids"], enc["labels"]))
        self.pad = tok.pad_token_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items):  # padded to the batch's longest, not to max_length
        return pad_encodings([{"input_ids": a, "labels": b} for a, b in items], self.pad)


def sft_loss(model, batch):
    out = model(**batch)
    return out.loss, {"tokens": int((batch["labels"] != -100).sum())}


def evaluate(model_dir: Path, cfg: ATSRecipe, progress: bool | None = None) -> dict:
    """Solve held-out instances of each game with the saved model; accuracy and tokens per answer."""
    from vlkit.reason.backends import LocalBackend
    from vlkit.reason.games import get_game
    from vlkit.reason.runner import run as run_method, summarise

    backend = LocalBackend(model_dir, batch_size=cfg.eval.batch_size)
    rows = []
    for name in cfg.data.games:
        game = get_game(name)
        rows += run_method(game, game.instances("test", cfg.eval.count(name), seed=cfg.data.seed),
                           cfg.data.format, backend, max_tokens=cfg.eval.max_new_tokens,
                           chunk=cfg.eval.batch_size, progress=progress)
    return {"summary": summarise(rows), "rows": rows}


def run(cfg: ATSRecipe, resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> dict:
    out = Path(cfg.output_dir)
    record = prepare_output(cfg, out, resume, overwrite)
    # the tokenizer is trained on all formats (same data config, same tokenizer): token counts compare
    formats = [cfg.data.format] if cfg.tokenizer.path else list(FORMATS)
    traces = trace_examples(cfg.data, formats)
    examples = traces[cfg.data.format]
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        texts = [m["content"] for exs in traces.values() for ex in exs for m in ex["messages"]]
        tok = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.style, cfg.tokenizer.split_digits)
    dataset = TraceDataset(examples, tok, cfg.data.max_length)
    if len(dataset) == 0:
        raise VlkitError(f"{out}: every training trace is longer than data.max_length={cfg.data.max_length}; "
                         "raise it")
    seed_everything(cfg.train.seed)
    model = build_llm(cfg.model, tok)
    trainer = Trainer(model, cfg.train, dataset, dataset.collate, sft_loss, out,
                      run_config=cfg.model_dump(mode="json"), desc=f"ats {cfg.data.format}", on_start=record)
    trainer.fit(resume=resume, overwrite=overwrite)
    model_dir = out / "model"
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "reason.json", {"method": cfg.data.format, "style": "tuned", "games": cfg.data.games})

    trainer.save_model(model_dir, write)
    results = {"recipe": "ats", "format": cfg.data.format, "params": count_parameters(model),
               "train_examples": len(dataset), "dropped_too_long": dataset.dropped,
               "train_tokens": sum(len(ids) for ids, _ in dataset.items), "steps": cfg.train.steps,
               "train_seconds": round(trainer.train_seconds, 1), "model_dir": str(model_dir)}
    if any(cfg.eval.count(g) for g in cfg.data.games):
        ev = evaluate(model_dir, cfg, progress)
        write_json(out / "eval_rows.json", ev["rows"])
        results["eval"] = ev["summary"]
    return finish(out, results)
