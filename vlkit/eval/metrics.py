"""Metrics from maintained implementations where they exist: CIDEr (pycocoevalcap), ROUGE-L
(rouge-score); exact match and box IoU written here."""

from __future__ import annotations

import re
import string

from vlkit.world.language import parse_box

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _coco_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider_items(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per-item CIDEr-D with the document frequencies of the whole set; their mean is the corpus score."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return []
    gts = {i: [_coco_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_coco_tokens(p) or "empty"] for i, p in enumerate(predictions)}
    _, scores = Cider().compute_score(gts, res)
    return [float(v) for v in scores]


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (x1, as pycocoevalcap reports it; papers often print x100)."""
    items = cider_items(predictions, references)
    return sum(items) / len(items) if items else 0.0


def rouge_l_items(predictions: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F1 per prediction, best over its references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean ROUGE-L F1, best over each prediction's references."""
    items = rouge_l_items(predictions, references)
    return sum(items) / len(items) if items else 0.0


def box_iou(a, b) -> float:
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(pred: str, ref_box) -> float:
    box = parse_box(pred)
    return box_iou(box, ref_box) if box is not None else 0.0
