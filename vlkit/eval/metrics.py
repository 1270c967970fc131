"""Metrics from maintained implementations where they exist: CIDEr (pycocoevalcap), ROUGE-L
(rouge-score); exact match, box IoU and the box-list scores of the SPHINX tasks (detection F1, grounded
caption recall and precision) written here."""

from __future__ import annotations

import re
import string

from vlkit.world.language import labelled_boxes, parse_box, parse_boxes

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


def match_boxes(pred, ref, threshold: float = 0.5, allowed=None) -> list[tuple[int, int]]:
    """One-to-one greedy matching of predicted to reference boxes: pairs (i, j) taken in order of falling IoU
    (ties: lower i, then lower j), each box used at most once, only pairs with IoU >= `threshold` and, when
    given, ``allowed(i, j)`` true."""
    pairs = sorted(((box_iou(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_r, out = set(), set(), []
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i in used_p or j in used_r or (allowed is not None and not allowed(i, j)):
            continue
        used_p.add(i)
        used_r.add(j)
        out.append((i, j))
    return out


def detect_f1(pred: str, ref_boxes, threshold: float = 0.5) -> float:
    """F1 of the boxes in `pred` against `ref_boxes` under `match_boxes`: 2 m / (predicted + reference). A
    prediction without boxes ("none") scores 1 when there are no reference boxes, else 0; boxes where there are
    none score 0."""
    boxes = parse_boxes(pred)
    if not boxes and not ref_boxes:
        return 1.0
    return 2 * len(match_boxes(boxes, ref_boxes, threshold)) / (len(boxes) + len(ref_boxes))


def grounded_scores(pred: str, names: list[str], ref_boxes, threshold: float = 0.5) -> tuple[float, float]:
    """(recall, precision) of a grounded caption. Each box in `pred` is labelled by the text since the previous
    box (`labelled_boxes`); predicted box i and object j match when j's name (e.g. "red circle") appears as whole
    words in i's label and their IoU is >= `threshold`, one to one (`match_boxes`). Recall: matched objects /
    objects; precision: matched boxes / predicted boxes (0 when none is predicted)."""
    pred_pairs = labelled_boxes(pred)
    labels = [f" {normalize_answer(label)} " for label, _ in pred_pairs]
    wanted = [f" {normalize_answer(n)} " for n in names]
    matched = len(match_boxes([b for _, b in pred_pairs], ref_boxes, threshold,
                              allowed=lambda i, j: wanted[j] in labels[i]))
    recall = matched / len(names) if names else float(not pred_pairs)
    precision = matched / len(pred_pairs) if pred_pairs else 0.0
    return recall, precision
