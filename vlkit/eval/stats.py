"""Measurement beyond the noise: the one helper every experiment report uses.

* `interval(items)`: the mean of per-item scores with a bootstrap 95% interval (items resampled);
* `paired(a, b)`: the difference b - a of two systems scored on the *same* items, with a paired
  bootstrap 95% interval (the same resampled items for both) and the share of resamples in which b
  does not beat a (a one-sided bootstrap p-value);
* `metric_interval(fn, y, s)` / `paired_metric(fn, y, a, b)`: the same for a figure that is not a mean of
  per-item scores (AUPRC, F1): rows resampled, the figure recomputed on each resample;
* `over_seeds(values)`: mean, standard deviation, min and max of one figure over seeds;
* `mean_curve(curves, metric)`: seed-averaged training curves (steps all seeds evaluated), from which
  speed-ups are read (`vlkit.eval.curves.speedup` takes them as they are);
* `fmt` / `fmt_paired`: how a report prints them ("0.412 [0.391, 0.433]").

Resampling is seeded, so a report is a pure function of its scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _resample_index(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def interval(items: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"mean", "lo", "hi", "n", "se"}: the mean of per-item scores and its percentile-bootstrap interval."""
    x = np.asarray(items, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"interval needs a non-empty list of per-item scores, got shape {x.shape}")
    means = x[_resample_index(len(x), resamples, seed)].mean(axis=1)
    lo, hi = _bounds(means, level)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(len(x)), "se": float(means.std(ddof=1))}


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
           seed: int = 0) -> dict:
    """b - a on the same items: {"diff", "lo", "hi", "n", "se" (bootstrap standard error), "p_not_better", "a",
    "b"}.

    `p_not_better` is the share of resamples in which b - a <= 0: small means b beats a beyond the noise."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"paired needs two equally long lists of per-item scores, got {x.shape} and {y.shape}")
    d = y - x
    diffs = d[_resample_index(len(d), resamples, seed)].mean(axis=1)
    lo, hi = _bounds(diffs, level)
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "n": int(len(d)), "se": float(diffs.std(ddof=1)),
            "p_not_better": float(np.mean(diffs <= 0)), "a": float(x.mean()), "b": float(y.mean())}


def metric_interval(fn: Callable[[np.ndarray, np.ndarray], float], y: Sequence, s: Sequence, level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """{"value", "lo", "hi", "n", "se"}: `fn(y, s)` (labels, scores; e.g. sklearn's average_precision_score) and
    its percentile-bootstrap interval over rows. Resamples in which fn is undefined (one class only) are skipped."""
    yv, sv = np.asarray(y), np.asarray(s, dtype=float)
    if yv.shape != sv.shape or yv.ndim != 1 or len(yv) == 0:
        raise ValueError(f"metric_interval needs equally long labels and scores, got {yv.shape} and {sv.shape}")
    vals = np.array([v for v in (_defined(fn, yv[i], sv[i]) for i in _resample_index(len(yv), resamples, seed))
                     if v is not None])
    lo, hi = _bounds(vals, level)
    return {"value": float(fn(yv, sv)), "lo": lo, "hi": hi, "n": int(len(yv)), "se": float(vals.std(ddof=1))}


def paired_metric(fn: Callable[[np.ndarray, np.ndarray], float], y: Sequence, a: Sequence, b: Sequence,
                  level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """fn(y, b) - fn(y, a) for two systems' scores of the same rows, the same resampled rows for both: {"diff",
    "lo", "hi", "n", "se", "p_not_better", "a", "b"} as `paired`."""
    yv, av, bv = np.asarray(y), np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (yv.shape == av.shape == bv.shape) or yv.ndim != 1 or len(yv) == 0:
        raise ValueError(f"paired_metric needs equally long labels and scores, got {yv.shape}, {av.shape}, {bv.shape}")
    diffs = []
    for i in _resample_index(len(yv), resamples, seed):
        va, vb = _defined(fn, yv[i], av[i]), _defined(fn, yv[i], bv[i])
        if va is not None and vb is not None:
            diffs.append(vb - va)
    d = np.array(diffs)
    lo, hi = _bounds(d, level)
    fa, fb = float(fn(yv, av)), float(fn(yv, bv))
    return {"diff": fb - fa, "lo": lo, "hi": hi, "n": int(len(yv)), "se": float(d.std(ddof=1)),
            "p_not_better": float(np.mean(d <= 0)), "a": fa, "b": fb}


def _defined(fn, y: np.ndarray, s: np.ndarray) -> float | None:
    return float(fn(y, s)) if 0 < int(np.sum(y)) < len(y) else None


def paired_over_seeds(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], level: float = LEVEL,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """b - a where each system ran once per seed on the same items: per item, the difference averaged over
    the seeds (seed k of a paired with seed k of b), then the paired bootstrap over items. Items, not
    (seed, item) pairs, are resampled: the same item under three seeds is one item, not three."""
    if not a or len(a) != len(b):
        raise ValueError(f"paired_over_seeds needs the same number of seeds on both sides, got {len(a)} and {len(b)}")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"paired_over_seeds needs seeds x items score arrays of one shape, got {x.shape} and "
                         f"{y.shape}")
    out = paired(x.mean(axis=0), y.mean(axis=0), level, resamples, seed)
    return {**out, "seeds": int(x.shape[0])}


def over_seeds(values: Sequence[float]) -> dict:
    """{"mean", "std", "min", "max", "n"} of one figure measured once per seed (std: 0 for one seed)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        raise ValueError("over_seeds needs at least one value")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(len(x))}


def mean_curve(curves: Sequence[list[dict]], metrics: Sequence[str]) -> list[dict]:
    """The seed average of training curves: at each step every curve evaluated, the mean of each metric and
    of samples and train_seconds (curves as `vlkit.eval.curves` defines them)."""
    if not curves:
        raise ValueError("mean_curve needs at least one curve")
    by_step = [{p["step"]: p for p in c} for c in curves]
    common = sorted(set.intersection(*(set(s) for s in by_step)))
    out = []
    for step in common:
        pts = [s[step] for s in by_step]
        row = {"step": step, "seeds": len(pts)}
        for k in ("samples", "train_seconds", *metrics):
            vals = [p[k] for p in pts if p.get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def fmt(ci: dict, digits: int = 3) -> str:
    """'0.412 [0.391, 0.433]' for an interval; '0.412 ± 0.010 (3 seeds)' for over_seeds."""
    if "lo" in ci:
        centre = ci["mean"] if "mean" in ci else ci["value"] if "value" in ci else ci["diff"]
        return f"{centre:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
    return f"{ci['mean']:.{digits}f} ± {ci['std']:.{digits}f} ({ci['n']} seed{'s' if ci['n'] != 1 else ''})"


def fmt_paired(p: dict, digits: int = 3) -> str:
    """'+0.021 [+0.008, +0.034]' for a paired difference."""
    return f"{p['diff']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]"


def verdict(p: dict, higher_is_better: bool = True) -> str:
    """'holds' when the interval of b - a excludes 0 in the claimed direction, 'reversed' when it excludes 0
    the other way, else 'not shown (within noise)'."""
    lo, hi = (p["lo"], p["hi"]) if higher_is_better else (-p["hi"], -p["lo"])
    if lo > 0:
        return "holds"
    if hi < 0:
        return "reversed"
    return "not shown (within noise)"
