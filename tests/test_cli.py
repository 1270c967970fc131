"""The `vlkit` command as a user runs it: subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys


def vlkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ}, cwd=cwd)


def tiny_lm_config(tmp_path, world) -> tuple:
    """A 4-step tiny LLaMA run on the tiny world: (config file, its output_dir)."""
    out, conf, w = tmp_path / "lm", tmp_path / "lm.yaml", world
    conf.write_text(f"""recipe: lm
output_dir: {out}
data: {{world: {{seed: {w.seed}, train_scenes: {w.train_scenes}, test_scenes: {w.test_scenes}}}, block_size: 32}}
tokenizer: {{vocab_size: 350}}
model: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
train: {{steps: 4, batch_size: 8, save_every: 2, progress: false}}
""")
    return conf, out


def test_train_resume_eval_and_corrupt_weights(tmp_path, tiny_world):
    cfg, _ = tiny_world
    conf, out = tiny_lm_config(tmp_path, cfg)
    res = vlkit("train", conf)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == 4
    again = vlkit("train", conf)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    more = vlkit("train", conf, "train.steps=6", "--resume")
    assert more.returncode == 2 and "different config" in more.stderr  # steps changed: refuse to mix runs
    res = vlkit("eval", out / "model", "--seed", cfg.seed, "--test-scenes", cfg.test_scenes)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["heldout_ppl"] > 1
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    res = vlkit("eval", out / "model")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and str(out / "model") in res.stderr


def test_world_preview(tmp_path):
    res = vlkit("world", "preview", "--out", tmp_path / "sheet.png", "--n", 6)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sheet.png").stat().st_size > 10_000


def test_bench_build_names_an_unknown_stage_and_the_ones_there_are(tmp_path):
    r = vlkit("bench", "build", "--out", tmp_path / "bench", "--only", "lm_huge")
    assert r.returncode == 2 and "unknown stage(s) ['lm_huge']" in r.stderr and "lm_small" in r.stderr
    assert not (tmp_path / "bench").exists()  # nothing written
