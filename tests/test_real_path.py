"""The README's "Real checkpoints" path, run command by command at tiny scale: the commands are read from the
README's block, so the documentation cannot drift from what works. Scaled down: a tiny random stock llava
checkpoint, the LLaVA-format fixture, 2 gloo ranks for 8 GPUs, cpu for cuda, a few steps."""

import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from test_trainer import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
TINY = ["train.steps=2", "train.batch_size=1", "train.grad_accum=1", "train.warmup_steps=0", "train.num_workers=1",
        "train.save_every=1", "eval.max_per_task=2", "eval.max_new_tokens=4", "train.progress=false"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Real checkpoints"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def scaled(cmd: str) -> list[str]:
    """A README command as it runs here: 2 ranks on gloo, cpu for cuda, the tiny schedule."""
    args = shlex.split(os.path.expandvars(cmd))
    args = ["cpu" if a == "cuda" else a for a in args]
    if args[0] == "torchrun":
        n = args.index("--nproc_per_node")
        args[n + 1] = "2"
        args = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), *args[1:]]
        args += TINY
    elif args[0] == "vlkit":
        args = [sys.executable, "-m", "vlkit", *args[1:]]
    return args


def run(args, env):
    """torchrun in processes of its own; a `vlkit` command in this process (the same argument parsing, without an
    interpreter's start-up)."""
    if args[:3] == [sys.executable, "-m", "vlkit"]:
        from test_runs import vlkit

        res = vlkit(*args[3:])
    else:
        res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, f"{shlex.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_readme_real_checkpoint_path_runs_end_to_end(tmp_path, tiny_tokenizer):
    from test_stock_import import stock_llava

    commands = readme_commands()
    assert [shlex.split(c)[:3] for c in commands] == [
        ["vlkit", "data", "import"], ["vlkit", "data", "import"], ["torchrun", "--nproc_per_node", "8"],
        ["vlkit", "eval", "$RUN/model"], ["vlkit", "export", "llava"], ["vlkit", "serve", "$RUN/model"]]
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "llava" / "images", data / "images")
    records = json.loads((FIXTURES / "llava" / "pretrain.json").read_text())
    (data / "train.json").write_text(json.dumps(records * 2))  # duplicate ids: the importer keeps the first
    (data / "val.json").write_text(json.dumps(records))
    env = {**os.environ, "DATA": str(data), "CKPT": str(stock_llava(tiny_tokenizer, tmp_path / "llava-hf-stock")),
           "RUN": str(tmp_path / "run"), "DEMON": str(FIXTURES / "demon"), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "VLKIT_CACHE": os.environ.get("VLKIT_CACHE", str(tmp_path / "cache"))}
    os.environ.update({k: env[k] for k in ("DATA", "CKPT", "RUN", "DEMON")})
    try:
        *batch, serve = commands
        for cmd in batch:
            res = run(scaled(cmd), env)
            if " eval " in cmd:
                scores = json.loads(res.stdout)
                assert scores["benchmark"].endswith("demon") and scores["tasks"]
    finally:
        for k in ("DATA", "CKPT", "RUN", "DEMON"):
            os.environ.pop(k, None)
    run_dir = tmp_path / "run"
    summary = json.loads((data / "train.import.json").read_text())
    assert summary["written"] == 3 and summary["skipped"]
    # FSDP wrote sharded checkpoints and one gathered model directory
    assert (run_dir / "checkpoints" / "step-0000002" / "dcp" / ".metadata").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2 and "caption" in json.dumps(results["eval"]["counts"])
    # the export is a stock llava directory: transformers loads it alone, with the vlkit model's logits
    from transformers import LlavaForConditionalGeneration

    from vlkit.models.io import load_vlm

    ours, proc = load_vlm(run_dir / "model")
    theirs = LlavaForConditionalGeneration.from_pretrained(run_dir / "llava-hf").eval()
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it"}]}]
    b = proc.pad([proc.encode(conv, 1, add_generation_prompt=True)])
    px = proc.pixel_values([FIXTURES / "llava" / "images" / "a.png"])
    with torch.no_grad():
        a = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=px).logits
        t = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=px).logits
    assert torch.allclose(a, t, atol=1e-4)
    # serve, in bf16 on the CPU, answering an image question over HTTP
    port = free_port()
    args = scaled(serve.replace("--port 8000", f"--port {port}").replace("$RUN", str(run_dir)))
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            server.kill()
            pytest.fail(f"server did not come up: {server.communicate()[1].decode()[-3000:]}")
        name = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"][0]["id"]
        body = {"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "describe it"}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
