"""The `vlkit` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlkit.errors import VlkitError

DEVICE_HELP = "Where the model runs: auto (CUDA when there is one, else CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "Weights and compute dtype: auto (as the checkpoint stores them), fp32, bf16 or fp16."

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="vlkit: compose, train, evaluate, guard and serve vision-language LLMs.")
world_app = typer.Typer(no_args_is_help=True, help="The shapes world: generate datasets and previews.")
app.add_typer(world_app, name="world")
bench_app = typer.Typer(no_args_is_help=True, help="The science bench: the models every experiment builds on.")
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: import LLaVA and ShareGPT data as vlkit records.")
app.add_typer(data_app, name="data")


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
                                                         "demon default: all)."),
             device: str = typer.Option("auto", help=DEVICE_HELP),
             dtype: str = typer.Option("auto", help=DTYPE_HELP)):
    """Evaluate on held-out world data (LM: perplexity; CLIP: retrieval R@1; VLM: captioning, VQA,
    grounding and text reading, beside the blind baseline), or on DEMON-format interleaved instructions
    (per-task and per-category scores x100)."""
    import json

    if benchmark == "demon":
        from vlkit.devices import resolve_device, resolve_dtype
        from vlkit.eval.demon import DemonEval, demon_scores
        from vlkit.models.io import load_vlm

        vlm, processor = load_vlm(model, device=resolve_device(device, what="--device"),
                                  dtype=resolve_dtype(dtype, "--dtype"))
        result = demon_scores(vlm, processor, DemonEval(root=str(root) if root else None, max_per_task=max_per_task),
                              keep_predictions=out is not None)
        if out is not None:
            from vlkit.fileio import write_json

            write_json(out, result.pop("predictions"))
        typer.echo(json.dumps({"model": str(model), "benchmark": str(root or "mini-DEMON"), **result}, indent=2))
        return
    if benchmark != "world":
        raise VlkitError(f"eval: unknown benchmark {benchmark!r}; choose world or demon")
    from vlkit.evaluate import evaluate_dir

    typer.echo(json.dumps(evaluate_dir(model, seed=seed, test_scenes=test_scenes, max_per_task=max_per_task or 200,
                                       device=device, dtype=dtype), indent=2))


EXPERT_HELP = ("Expert model whose text about each image is given to the model as context (LLaMA-Adapter V2 "
               "sec 3.4): caption=DIR (a vlkit model), ocr=world (shapes-world text reader) or NAME=cmd:COMMAND "
               "(run with the image's PNG path appended; stdout is the text). Repeatable.")
TEMPLATE_HELP = "How expert text enters the prompt: world '(TEXT) ' or input '### Input: TEXT' (real checkpoints)."


def experts_of(specs: Optional[List[str]], template: str) -> tuple[list, str]:
    """The experts of --expert specs and the context template named by --expert-template."""
    from vlkit.experts import TEMPLATES, parse_expert

    if template not in TEMPLATES:
        raise VlkitError(f"--expert-template {template!r} is not one of {', '.join(TEMPLATES)}")
    return [parse_expert(s) for s in specs or []], TEMPLATES[template]


@app.command()
def chat(model: Optional[Path] = typer.Argument(None, help="A vlkit model directory (or use --url)."),
         url: Optional[str] = typer.Option(None, help="Talk to a running OpenAI-compatible server instead."),
         image: Optional[List[Path]] = typer.Option(None, "--image", help="Image for the first turn (repeatable)."),
         prompt: Optional[str] = typer.Option(None, help="One-shot: answer this and exit."),
         max_new_tokens: int = typer.Option(64, help="Most tokens per answer."),
         temperature: float = typer.Option(0.0, help="0 = greedy."),
         top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
         seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
         expert: Optional[List[str]] = typer.Option(None, "--expert", help=EXPERT_HELP),
         expert_template: str = typer.Option("world", help=TEMPLATE_HELP),
         device: str = typer.Option("auto", help=DEVICE_HELP),
         dtype: str = typer.Option("auto", help=DTYPE_HELP)):
    """Talk to a model in the terminal, streaming. In a session: /image PATH attaches an image to the next
    message, /reset starts over, /quit (or Ctrl-D) leaves."""
    from vlkit.chat import ChatSession, RemoteChatSession
    from vlkit.devices import resolve_device, resolve_dtype
    from vlkit.models.generate import GenerationConfig

    if (model is None) == (url is None):
        raise VlkitError("chat: give a model directory or --url of a server, not both")
    if url is not None and expert:
        raise VlkitError("chat: --expert runs beside a local model; with --url, start the server with --expert")
    experts, template = experts_of(expert, expert_template)
    if url is not None:
        session = RemoteChatSession(url, GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, seed=seed))
    else:
        session = ChatSession.open(model, experts, template, device=resolve_device(device, what="--device"),
                                   dtype=resolve_dtype(dtype, "--dtype"), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed)
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
    from vlkit.experiments.demo import run_demo

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
          out: Optional[Path] = typer.Option(None, help="Write JSONL here instead of standard output."),
          device: str = typer.Option("auto", help=DEVICE_HELP),
          dtype: str = typer.Option("auto", help=DTYPE_HELP)):
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
    g = Guard.from_pretrained(model, device=device, dtype=dtype, **kwargs)
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
          max_batch: int = typer.Option(16, help="Most requests decoding together (continuous batching: they "
                                        "join and leave between steps)."),
          batch_window_ms: float = typer.Option(10.0, help="How long an idle server waits for more requests "
                                                "before it starts decoding."),
          no_batching: bool = typer.Option(False, help="Answer requests one at a time."),
          visual_cache: int = typer.Option(64, min=0, help="Images whose encoder features are kept (by content "
                                           "hash), so a conversation's images are encoded once; 0: off."),
          max_tokens: int = typer.Option(512, help="Largest max_tokens a request may ask for."),
          max_images: int = typer.Option(4, help="Images per request."),
          max_pixels: int = typer.Option(4096 * 4096, help="Pixels per image."),
          max_body_bytes: int = typer.Option(8 * 1024 * 1024, help="Request body size."),
          max_in_flight: int = typer.Option(64, help="Requests in flight; more get HTTP 429."),
          timeout: float = typer.Option(120.0, help="Seconds a request may take (HTTP 504 after)."),
          allow_remote_images: bool = typer.Option(False, help="Fetch http(s) image URLs (public hosts only, "
                                                   "every redirect checked)."),
          image_host: Optional[List[str]] = typer.Option(None, help="With --allow-remote-images: fetch only from "
                                                         "this host (repeat for more)."),
          allow_local_images: bool = typer.Option(False, help="Read image paths on this machine."),
          api_key: Optional[str] = typer.Option(None, envvar="VLKIT_API_KEY", show_default=False,
                                                help="Require 'Authorization: Bearer <key>' on /v1/* and /metrics "
                                                "(default: $VLKIT_API_KEY; none: open)."),
          expert: Optional[List[str]] = typer.Option(None, "--expert", help=EXPERT_HELP),
          expert_template: str = typer.Option("world", help=TEMPLATE_HELP),
          device: str = typer.Option("auto", help=DEVICE_HELP),
          dtype: str = typer.Option("auto", help=DTYPE_HELP + " The guard runs there too.")):
    """Serve a model with an OpenAI-compatible API (POST /v1/chat/completions), a chat page at /."""
    import uvicorn

    from vlkit.devices import resolve_device, resolve_dtype
    from vlkit.serve import Engine, ServeLimits, create_app

    experts, template = experts_of(expert, expert_template)
    dev, dt = resolve_device(device, what="--device"), resolve_dtype(dtype, "--dtype")
    engine = Engine.load(model, name=name, device=dev, dtype=dt, visual_cache=visual_cache, max_batch=max_batch,
                         batch_window_ms=batch_window_ms, batching=not no_batching, max_queue=max(max_in_flight, 1),
                         experts=experts, template=template)
    middleware = None
    if guard is not None:
        from vlkit.guard import Guard, GuardMiddleware

        middleware = GuardMiddleware(Guard.from_pretrained(guard, device=dev, dtype=dt))
    limits = ServeLimits(max_body_bytes=max_body_bytes, max_images=max_images, max_pixels=max_pixels,
                         max_tokens=max_tokens, max_in_flight=max_in_flight, timeout_s=timeout,
                         allow_remote_images=allow_remote_images, allow_local_images=allow_local_images,
                         image_hosts=list(image_host or []))
    try:  # SIGTERM: in-flight requests get 5 s, then the server stops whatever is stuck
        uvicorn.run(create_app(engine, limits, middleware, api_key=api_key or None), host=host, port=port,
                    log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close(timeout=2)


@app.command()
def ats(game: str = typer.Option(..., help="water, numpath, arithmetic, grass, game24, or all."),
        method: str = typer.Option("ats-bfs", help="io, cot, ats-bfs, ats-dfs or tot."),
        backend: str = typer.Option("local", help="local (a model directory) or openai (OPENAI_BASE_URL, "
                                    "OPENAI_API_KEY)."),
        model: Optional[str] = typer.Option(None, help="local: the model directory; openai: the model id "
                                            "(default: the endpoint's first)."),
        base_url: Optional[str] = typer.Option(None, help="openai: endpoint base URL (default OPENAI_BASE_URL)."),
        split: str = typer.Option("test", help="Instances: test (held out) or train."),
        n: int = typer.Option(20, help="Instances per game (game24 test: rows 900-999 in order)."),
        seed: int = typer.Option(0, help="Seed of the procedural games' instances."),
        max_tokens: int = typer.Option(512, help="Most completion tokens per call."),
        beam: int = typer.Option(3, help="tot: states kept per level."),
        batch_size: int = typer.Option(16, help="local: conversations per generate call."),
        price_prompt: float = typer.Option(0.0, help="Price per million prompt tokens (for cost per solved)."),
        price_completion: float = typer.Option(0.0, help="Price per million completion tokens."),
        out: Optional[Path] = typer.Option(None, help="Per-instance JSONL (default "
                                           "runs/reason/GAME-METHOD-MODEL.jsonl); the summary goes beside it "
                                           "(.summary.json)."),
        device: str = typer.Option("auto", help="local: " + DEVICE_HELP),
        dtype: str = typer.Option("auto", help="local: " + DTYPE_HELP)):
    """Solve puzzle games with a prompting method; writes per-instance JSONL (answer, verdict, tokens, tree
    statistics) and prints a summary table."""
    from vlkit.devices import resolve_device, resolve_dtype
    from vlkit.fileio import write_json, write_jsonl
    from vlkit.reason.backends import make_backend
    from vlkit.reason.games import GAMES, get_game
    from vlkit.reason.runner import run as run_method, summarise, table

    games = list(GAMES.values()) if game == "all" else [get_game(game)]
    answerer = make_backend(backend, model, base_url=base_url, batch_size=batch_size,
                            device=resolve_device(device, what="--device"), dtype=resolve_dtype(dtype, "--dtype"))
    trained = getattr(answerer, "trained_method", None)
    if trained and method == "tot":
        typer.echo(f"note: {model} was fine-tuned on {trained} traces; ToT asks it with propose/value prompts "
                   "it never saw", err=True)
    elif trained and trained != method:
        typer.echo(f"note: {model} was fine-tuned on {trained} traces and is asked with the bare question, as in "
                   f"training; --method {method} decides only how its answer is read", err=True)
    rows = []
    for g in games:
        rows += run_method(g, g.instances(split, n, seed=seed), method, answerer, max_tokens=max_tokens, beam=beam,
                           chunk=batch_size)
    summary = summarise(rows, price_prompt, price_completion)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in answerer.name)
    path = out or Path("runs") / "reason" / f"{game}-{method}-{safe}.jsonl"
    write_jsonl(path, rows)
    write_json(path.with_suffix(".summary.json"), summary)
    typer.echo(table(summary))
    typer.echo(f"wrote {path}")


@app.command("ats-check")
def ats_check(n: int = typer.Option(500, help="Generated instances per procedural game and split."),
              seed: int = typer.Option(0, help="Seed of the procedural games' instances."),
              out: Path = typer.Option(Path("runs/reason/check.json"), help="Where the report goes.")):
    """Check every exact solver against its verifier: generated instances of each game (train and test) and all
    Game of 24 rows; reports which 24 rows are solvable."""
    import json

    from vlkit.fileio import write_json
    from vlkit.reason.check import check_all

    report = check_all(n=n, seed=seed)
    write_json(out, report)
    typer.echo(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "unsolvable"} | (
        {"unsolvable": v["unsolvable"][:20]} if v.get("unsolvable") else {}) for k, v in report.items()}, indent=2))
    if any(v["wrong"] for v in report.values()):
        raise VlkitError(f"a solver's answer failed its verifier; see {out}")


@app.command()
def experiment(name: str = typer.Argument(..., help="Which experiment: vpgtrans, guard, vpgc, ats, adapter, "
                                                "illama, sphinx."),
               out: Path = typer.Option(None, help="Where runs and the report go (default runs/NAME)."),
               demo_dir: Path = typer.Option(Path("runs/demo"), "--demo",
                                             help="The demo's stages, reused (vpgc, adapter, illama, sphinx)."),
               bench: Path = typer.Option(Path("runs/bench"), help="The science bench (vpgtrans; `vlkit bench "
                                          "build`)."),
               seeds: int = typer.Option(3, min=1, help="vpgtrans, vpgc, guard, ats: seeds per headline arm."),
               only: list[str] = typer.Option(None, help="Run only these named runs (repeatable); vpgtrans: a pair "
                                              "(small_to_large, llama_to_opt) or an ablation; sphinx: a part (tiles, "
                                              "mix, merge, instructions).")) -> None:
    """Reproduce a paper's claim in miniature on the shapes world; writes <out>/report.md."""
    experiments = {"vpgtrans": "vlkit.experiments.vpgtrans", "guard": "vlkit.experiments.guard",
                   "vpgc": "vlkit.experiments.vpgc", "ats": "vlkit.experiments.ats",
                   "adapter": "vlkit.experiments.adapter", "illama": "vlkit.experiments.illama",
                   "sphinx": "vlkit.experiments.sphinx"}
    if name not in experiments:
        raise VlkitError(f"experiment {name!r} is unknown; choose one of {sorted(experiments)}")
    module = __import__(experiments[name], fromlist=["run_experiment"])
    if name == "vpgtrans":
        module.run_experiment(out or Path("runs") / name, bench, only=only or None, seeds=seeds)
    elif name in ("vpgc", "guard", "ats"):
        module.run_experiment(out or Path("runs") / name, demo_dir, only=only or None, seeds=seeds)
    else:
        module.run_experiment(out or Path("runs") / name, demo_dir, only=only or None)


@app.command()
def merge(a: Path = typer.Argument(..., help="Model A: a vlkit model or a Hugging Face LM directory."),
          b: Path = typer.Argument(..., help="Model B: another fine-tune of A's base, of the same kind."),
          beta: float = typer.Option(..., help="Weight of A, in [0, 1]: theta = beta * A + (1 - beta) * B."),
          out: Path = typer.Option(..., help="Directory to write (neither A nor B)."),
          part: str = typer.Option("all", help="vlkit models: all, llm or vpg (only those tensors are mixed, the "
                                   "rest are A's)."),
          overwrite: bool = typer.Option(False, help="Replace --out if it exists.")) -> None:
    """Mix the weights of two fine-tunes of one base (SPHINX): vlkit merge A B --beta 0.5 --out C"""
    from vlkit.models.merge import merge as merge_models

    typer.echo(merge_models(a, b, beta, out, part=part, overwrite=overwrite).summary())


@app.command()
def export(fmt: str = typer.Argument(..., metavar="FORMAT", help="llava or blip-2 (the stock transformers model)."),
           model: Path = typer.Argument(..., help="A vlkit model directory."),
           out: Path = typer.Argument(..., help="Directory to write (written whole, or not at all)."),
           overwrite: bool = typer.Option(False, help="Replace OUT if it exists.")) -> None:
    """Write a vlkit model as a stock transformers checkpoint: vlkit export llava MODEL OUT"""
    from vlkit.models.export import export_model

    typer.echo(export_model(fmt, model, out, overwrite=overwrite))


@bench_app.command("build")
def bench_build(out: Path = typer.Option(Path("runs/bench"), help="Where the bench models go."),
                only: list[str] = typer.Option(None, help="Build only these stages (repeatable): lm_small, lm_large, "
                                               "lm_opt, vit."),
                fresh: bool = typer.Option(False, help="Retrain every stage, cached or not."),
                strict: bool = typer.Option(True, help="Exit non-zero when a model misses its gate.")) -> None:
    """Train (or reuse) the bench models and check their gates; writes <out>/bench.json and report.md."""
    from vlkit.experiments.bench import build_bench

    summary = build_bench(out, only=only or None, fresh=fresh)
    if strict and not summary["passed"]:
        raise VlkitError(f"bench build: a model missed its gate; see {out / 'report.md'}")


@data_app.command("import")
def data_import(fmt: str = typer.Argument(..., metavar="FORMAT", help="llava or sharegpt."),
                source: Path = typer.Argument(..., metavar="FILE", help="The data: a JSON array of records or JSONL."),
                out: Path = typer.Option(..., help="Records JSONL to write; the summary goes beside it "
                                         "(records.jsonl -> records.import.json)."),
                images: Optional[Path] = typer.Option(None, help="Folder the image paths are relative to "
                                                      "(default: the input's folder)."),
                task: Optional[str] = typer.Option(None, help="Task name of the records (default: FORMAT)."),
                check_images: bool = typer.Option(True, help="Skip records whose image file is missing."),
                overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
                progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", show_default=False,
                                                        help="Progress bar (default: when stderr is a terminal).")
                ) -> None:
    """Convert LLaVA or ShareGPT conversations to vlkit records, streaming; prints what was written and what was
    skipped, by reason: vlkit data import llava llava_v1_5_mix665k.json --images data --out records.jsonl"""
    from vlkit.data.importers import import_file, summary_text

    typer.echo(summary_text(import_file(fmt, source, out, images=images, task=task, check_images=check_images,
                                        overwrite=overwrite, progress=progress)))


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
