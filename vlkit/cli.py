"""The `vlkit` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlkit.errors import VlkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="vlkit: compose, train, evaluate, guard and serve vision-language LLMs.")
world_app = typer.Typer(no_args_is_help=True, help="The shapes world: generate datasets and previews.")
app.add_typer(world_app, name="world")


@world_app.command("build")
def world_build(train_scenes: int = typer.Option(4000, help="Scenes in the train split."),
                test_scenes: int = typer.Option(500, help="Scenes in the held-out split."),
                seed: int = typer.Option(0, help="Dataset seed."),
                resolution: int = typer.Option(64, help="Image side in pixels.")):
    """Generate (or find cached) a world dataset and print its directory."""
    from vlkit.world import WorldConfig, WorldData, build

    cfg = WorldData(seed=seed, train_scenes=train_scenes, test_scenes=test_scenes,
                    world=WorldConfig(resolution=resolution))
    typer.echo(build(cfg))


@world_app.command("preview")
def world_preview(out: Path = typer.Option(Path("runs/world_preview.png"), help="PNG to write."),
                  n: int = typer.Option(8, help="How many samples."),
                  seed: int = typer.Option(0, help="Dataset seed."),
                  resolution: int = typer.Option(64, help="Image side in pixels."),
                  tasks: Optional[List[str]] = typer.Option(None, "--task", help="Only these tasks (repeatable).")):
    """Write a contact sheet of world samples with their texts."""
    from vlkit.data.records import load_records
    from vlkit.world import WorldConfig, WorldData, build
    from vlkit.world.preview import preview_records

    root = build(WorldData(seed=seed, train_scenes=max(n, 8), test_scenes=0,
                           world=WorldConfig(resolution=resolution)))
    records = load_records(root / "train.jsonl")
    if tasks:
        records = [r for r in records if r["task"] in tasks]
    # One record per task in turn, so a small sheet shows every task.
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    picked = []
    while len(picked) < n and any(by_task.values()):
        for t in list(by_task):
            if by_task[t] and len(picked) < n:
                picked.append(by_task[t].pop(0))
    typer.echo(preview_records(picked, out, title=f"shapes world (seed {seed}, {resolution}px)"))


@app.command()
def train(config: Path = typer.Argument(..., help="Recipe config (YAML)."),
          overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-3"),
          resume: bool = typer.Option(False, help="Continue from the latest checkpoint in output_dir."),
          overwrite: bool = typer.Option(False, help="Start over even if output_dir has checkpoints.")):
    """Train with a recipe config: vlkit train configs/world/lm_llama_small.yaml train.steps=50"""
    import json

    from vlkit.recipes import load_config

    cfg, run = load_config(config, overrides or [])
    results = run(cfg, resume=resume, overwrite=overwrite)
    typer.echo(json.dumps(results, indent=2))


@app.command("eval")
def evaluate(model: Path = typer.Argument(..., help="A model directory written by vlkit train."),
             benchmark: str = typer.Argument("world", help="world (held-out shapes-world tasks) or demon "
                                             "(a DEMON-format directory, --root; default: mini-DEMON)."),
             root: Optional[Path] = typer.Option(None, help="demon: the benchmark directory (<task>/core/core.json)."),
             out: Optional[Path] = typer.Option(None, help="demon: also write per-instance predictions here (JSON)."),
             seed: int = typer.Option(0, help="World dataset seed of the held-out split."),
             test_scenes: int = typer.Option(500, help="Held-out scenes."),
             max_per_task: Optional[int] = typer.Option(None, help="Records per task (world default: 200; "
                                                         "demon default: all).")):
    """Evaluate on held-out world data (LM: perplexity; CLIP: retrieval R@1; VLM: captioning, VQA,
    grounding and text reading, beside the blind baseline), or on DEMON-format interleaved instructions
    (per-task and per-category scores x100)."""
    import json

    if benchmark == "demon":
        from vlkit.recipes.vpgc import DemonEval, demon_scores
        from vlkit.models.io import load_vlm

        vlm, processor = load_vlm(model)
        result = demon_scores(vlm, processor, DemonEval(root=str(root) if root else None, max_per_task=max_per_task),
                              keep_predictions=out is not None)
        if out is not None:
            from vlkit.fileio import write_json

            write_json(out, result.pop("predictions"))
        typer.echo(json.dumps({"model": str(model), "benchmark": str(root or "mini-DEMON"), **result}, indent=2))
        return
    if benchmark != "world":
        raise VlkitError(f"eval: unknown benchmark {benchmark!r}; choose world or demon")
    from vlkit.eval.simple import evaluate_dir

    typer.echo(json.dumps(evaluate_dir(model, seed=seed, test_scenes=test_scenes,
                                       max_per_task=max_per_task or 200), indent=2))


@app.command()
def chat(model: Optional[Path] = typer.Argument(None, help="A vlkit model directory (or use --url)."),
         url: Optional[str] = typer.Option(None, help="Talk to a running OpenAI-compatible server instead."),
         image: Optional[List[Path]] = typer.Option(None, "--image", help="Image for the first turn (repeatable)."),
         prompt: Optional[str] = typer.Option(None, help="One-shot: answer this and exit."),
         max_new_tokens: int = typer.Option(64, help="Most tokens per answer."),
         temperature: float = typer.Option(0.0, help="0 = greedy."),
         top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
         seed: Optional[int] = typer.Option(None, help="Seed for sampling.")):
    """Talk to a model in the terminal, streaming. In a session: /image PATH attaches an image to the next
    message, /reset starts over, /quit (or Ctrl-D) leaves."""
    from vlkit.chat import ChatSession, RemoteChatSession
    from vlkit.models.generate import GenerationConfig

    if (model is None) == (url is None):
        raise VlkitError("chat: give a model directory or --url of a server, not both")
    if url is not None:
        session = RemoteChatSession(url, GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, seed=seed))
    else:
        session = ChatSession.open(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed)
    for path in image or []:
        session.attach(path)
    if prompt is not None:
        for piece in session.ask(prompt):
            typer.echo(piece, nl=False)
        typer.echo()
        return
    session.repl()


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="Where stages and the report go."),
         fresh: bool = typer.Option(False, help="Retrain every stage even if cached.")):
    """Run the embedded-default pipeline on the shapes world and print a results table."""
    from vlkit.demo import run_demo

    run_demo(out, fresh=fresh)


@app.command()
def guard(model: Path = typer.Argument(..., help="Guard checkpoint directory (Llama Guard or recipe `guard`)."),
          prompt: Optional[str] = typer.Option(None, help="A user prompt to classify."),
          response: Optional[str] = typer.Option(None, help="With --prompt: the reply to classify (Agent)."),
          jsonl: Optional[Path] = typer.Option(None, help="Conversations {id, messages, role?} to classify."),
          taxonomy: Optional[str] = typer.Option(None, help="Built-in name or YAML file (default: the model's)."),
          version: Optional[int] = typer.Option(None, help="Prompt layout 1, 2 or 3 (default: the model's, else 3)."),
          template: Optional[str] = typer.Option(None, help="inst, chat or native (default: the model's, "
                                                 "else inst)."),
          threshold: Optional[float] = typer.Option(None, help="P(unsafe) at or above this is unsafe."),
          out: Optional[Path] = typer.Option(None, help="Write JSONL here instead of standard output.")):
    """Classify a prompt, a response, or a JSONL of conversations; JSONL out: verdict, categories, score."""
    import json

    from vlkit.fileio import atomic_path, read_jsonl
    from vlkit.guard import Guard

    if (prompt is None) == (jsonl is None):
        raise VlkitError("guard: give either --prompt (with an optional --response) or --jsonl")
    if response is not None and prompt is None:
        raise VlkitError("guard: --response needs the --prompt it answers")
    kwargs = {k: v for k, v in {"taxonomy": taxonomy, "version": version, "template": template,
                                "threshold": threshold}.items() if v is not None}
    g = Guard.from_pretrained(model, **kwargs)
    if prompt is not None:
        conv = [{"role": "user", "content": prompt}]
        if response is not None:
            conv.append({"role": "assistant", "content": response})
        items = [("prompt", conv, "Agent" if response is not None else "User")]
    else:
        items = []
        for i, r in enumerate(read_jsonl(jsonl)):
            if not isinstance(r.get("messages"), list) or not r["messages"]:
                raise VlkitError(f"{jsonl}: record {r.get('id', i)}: 'messages' must be a non-empty list")
            role = r.get("role") or ("Agent" if r["messages"][-1].get("role") == "assistant" else "User")
            items.append((r.get("id", i), r["messages"], role))
    verdicts: list = [None] * len(items)
    for role in ("User", "Agent"):  # one batched pass per role judged; output in input order
        where = [k for k, (_, _, r) in enumerate(items) if r == role]
        for k, v in zip(where, g.classify([items[k][1] for k in where], role) if where else []):
            verdicts[k] = v
    text = "".join(json.dumps({"id": rid, "role": role, **v.to_dict()}) + "\n"
                   for (rid, _, role), v in zip(items, verdicts))
    if out is None:
        typer.echo(text, nl=False)
    else:
        with atomic_path(out) as tmp:
            Path(tmp).write_text(text)


@app.command()
def serve(model: Path = typer.Argument(..., help="A vlkit model directory."),
          guard: Optional[Path] = typer.Option(None, help="Guard checkpoint: checks inputs and replies."),
          name: Optional[str] = typer.Option(None, help="Model id in the API (default: from the directory)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port."),
          max_batch: int = typer.Option(16, help="Most requests in one batched generate call."),
          batch_window_ms: float = typer.Option(10.0, help="How long the batcher waits for more requests."),
          no_batching: bool = typer.Option(False, help="Answer requests one at a time."),
          max_tokens: int = typer.Option(512, help="Largest max_tokens a request may ask for."),
          max_images: int = typer.Option(4, help="Images per request."),
          max_pixels: int = typer.Option(4096 * 4096, help="Pixels per image."),
          max_body_bytes: int = typer.Option(8 * 1024 * 1024, help="Request body size."),
          max_in_flight: int = typer.Option(64, help="Requests in flight; more get HTTP 429."),
          timeout: float = typer.Option(120.0, help="Seconds a request may take (HTTP 504 after)."),
          allow_remote_images: bool = typer.Option(False, help="Fetch http(s) image URLs (SSRF risk)."),
          allow_local_images: bool = typer.Option(False, help="Read image paths on this machine.")):
    """Serve a model with an OpenAI-compatible API (POST /v1/chat/completions), a chat page at /."""
    import uvicorn

    from vlkit.serve import Engine, ServeLimits, create_app

    engine = Engine.load(model, name=name, max_batch=max_batch, batch_window_ms=batch_window_ms,
                         batching=not no_batching)
    middleware = None
    if guard is not None:
        from vlkit.guard import Guard, GuardMiddleware

        middleware = GuardMiddleware(Guard.from_pretrained(guard))
    limits = ServeLimits(max_body_bytes=max_body_bytes, max_images=max_images, max_pixels=max_pixels,
                         max_tokens=max_tokens, max_in_flight=max_in_flight, timeout_s=timeout,
                         allow_remote_images=allow_remote_images, allow_local_images=allow_local_images)
    uvicorn.run(create_app(engine, limits, middleware), host=host, port=port, log_level="warning")


@app.command()
def experiment(name: str = typer.Argument(..., help="Which experiment: vpgtrans, guard, vpgc."),
               out: Path = typer.Option(None, help="Where runs and the report go (default runs/NAME)."),
               demo_dir: Path = typer.Option(Path("runs/demo"), "--demo", help="The demo's stages, reused."),
               only: list[str] = typer.Option(None, help="Run only these named runs (repeatable).")) -> None:
    """Reproduce a paper's claim in miniature on the shapes world; writes <out>/report.md."""
    experiments = {"vpgtrans": "vlkit.experiments.vpgtrans", "guard": "vlkit.experiments.guard",
                   "vpgc": "vlkit.experiments.vpgc"}
    if name not in experiments:
        raise VlkitError(f"experiment {name!r} is unknown; choose one of {sorted(experiments)}")
    module = __import__(experiments[name], fromlist=["run_experiment"])
    module.run_experiment(out or Path("runs") / name, demo_dir, only=only or None)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        app()
    except VlkitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
