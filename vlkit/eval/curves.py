"""Training curves and the speed-ups read off them (VPGTrans, section 5: steps to reach a score).

A curve is a list of evaluations: {"step", "samples", "train_seconds", metric: value, ...}.
"""

from __future__ import annotations


def point(offset: dict, at: dict, metrics: dict) -> dict:
    """An evaluation `at` (step, samples, train_seconds) of a stage that started at `offset`, with its metrics."""
    return {"step": offset["step"] + at["step"], "samples": offset["samples"] + at["samples"],
            "train_seconds": offset["train_seconds"] + at["train_seconds"], **metrics}


def eval_curve(history: list[dict], offset: dict | None = None) -> list[dict]:
    """The evaluation records of a trainer's history as curve points ("eval/" dropped from the metric
    names), shifted by `offset` (step, samples, train_seconds of the stages before)."""
    zero = {"step": 0, "samples": 0, "train_seconds": 0.0}
    return [point(offset or zero, h, {k[5:]: v for k, v in h.items() if k.startswith("eval/")})
            for h in history if any(k.startswith("eval/") for k in h)]


def speedup(scratch: list[dict], trans: list[dict], metric: str) -> dict:
    """The paper's speed-up on one metric: the step at which from-scratch reaches its best score, divided by
    the first step at which the transfer exceeds that score; also in samples and optimisation seconds.
    Curves are lists of evaluations with "step", "samples", "train_seconds" and the metric. Where from
    scratch's best is at step 0 (training never improved on it) the ratios are None: undefined."""
    best = max(scratch, key=lambda p: (p[metric], -p["step"]))
    beat = next((p for p in trans if p[metric] > best[metric]), None)
    out = {"metric": metric, "scratch_best": best[metric], "scratch_best_step": best["step"],
           "scratch_final": scratch[-1][metric], "transfer_final": trans[-1][metric],
           "transfer_best": max(p[metric] for p in trans), "transfer_steps": trans[-1]["step"]}
    if beat is None:
        return {**out, "reached": False}
    if best["step"] == 0:  # from scratch never improved on its untrained start: no training to save
        ratio = dict.fromkeys(("step", "samples", "train_seconds"))
    else:
        ratio = {k: best[k] / beat[k] if beat[k] else float("inf") for k in ("step", "samples", "train_seconds")}
    return {**out, "reached": True, "transfer_step": beat["step"], "speedup_steps": ratio["step"],
            "speedup_samples": ratio["samples"], "speedup_seconds": ratio["train_seconds"]}


def times(ratio: float | None) -> str:
    """A speed-up for a report: "4.2x", or what an infinite one means (the transfer was there at step 0),
    or an undefined one (None: from scratch's best is its untrained start)."""
    if ratio is None:
        return "undefined (from scratch best at step 0)"
    return "no steps needed (step 0)" if ratio == float("inf") else f"{ratio:.1f}x"


def steps_to_reach(curve: list[dict], metric: str, value: float) -> int | None:
    """The first evaluated step at which `metric` reaches `value` (None: never)."""
    return next((p["step"] for p in curve if p[metric] >= value), None)
