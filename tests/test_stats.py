"""The shared measurement helper: intervals, paired bootstrap, seeds, seed-averaged curves."""

import numpy as np
import pytest

from vlkit.eval import stats


def test_interval_covers_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    small = stats.interval(rng.random(50) < 0.6)
    large = stats.interval(rng.random(2000) < 0.6)
    for ci in (small, large):
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert (large["hi"] - large["lo"]) < 0.5 * (small["hi"] - small["lo"])  # ~1/sqrt(40) as wide
    binomial_se = (large["mean"] * (1 - large["mean"]) / 2000) ** 0.5
    assert abs(large["se"] - binomial_se) < 0.003  # bootstrap SE ~ binomial SE
    assert large["lo"] < 0.6 < large["hi"]


def test_paired_bootstrap_sees_a_small_consistent_gain_an_unpaired_view_would_miss():
    rng = np.random.default_rng(0)
    hard = rng.random(1000)  # item difficulty dominates the variance
    a = hard
    b = hard + 0.01  # b is better on every item by a tiny margin
    p = stats.paired(a, b)
    assert p["diff"] == pytest.approx(0.01)
    assert p["lo"] > 0 and p["p_not_better"] == 0.0
    assert stats.verdict(p) == "holds"
    assert stats.verdict(stats.paired(b, a)) == "reversed"
    # unpaired intervals of the two systems overlap completely
    ia, ib = stats.interval(a), stats.interval(b)
    assert ib["lo"] < ia["hi"]


def test_paired_bootstrap_of_noise_is_within_noise():
    rng = np.random.default_rng(3)
    a, b = rng.random(500) < 0.5, rng.random(500) < 0.5
    p = stats.paired(a, b)
    assert p["lo"] < 0 < p["hi"]
    assert stats.verdict(p) == "not shown (within noise)"
    assert stats.fmt_paired(p).startswith(("+", "-"))


def test_paired_refuses_unequal_items():
    with pytest.raises(ValueError, match="equally long"):
        stats.paired([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="non-empty"):
        stats.interval([])


def test_over_seeds_and_formatting():
    s = stats.over_seeds([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert stats.fmt(s) == "0.600 ± 0.100 (3 seeds)"
    assert stats.over_seeds([0.4])["std"] == 0.0
    assert stats.fmt({"mean": 0.41234, "lo": 0.4, "hi": 0.42}) == "0.412 [0.400, 0.420]"


def test_mean_curve_averages_the_steps_every_seed_evaluated():
    c1 = [{"step": 0, "samples": 0, "train_seconds": 0.0, "m": 0.1}, {"step": 10, "samples": 80, "train_seconds": 1.0,
                                                                      "m": 0.5}, {"step": 20, "samples": 160,
                                                                                  "train_seconds": 2.0, "m": 0.7}]
    c2 = [{"step": 0, "samples": 0, "train_seconds": 0.0, "m": 0.3}, {"step": 10, "samples": 80, "train_seconds": 3.0,
                                                                      "m": 0.3}]
    avg = stats.mean_curve([c1, c2], ["m"])
    assert [p["step"] for p in avg] == [0, 10]
    assert avg[1]["m"] == pytest.approx(0.4) and avg[1]["train_seconds"] == pytest.approx(2.0)
    assert avg[0]["seeds"] == 2


def test_paired_over_seeds_resamples_items_not_seed_copies_of_them():
    rng = np.random.default_rng(5)
    hard = rng.random(400)
    effect = rng.normal(0.02, 0.1, 400)  # how much b helps differs by item, and the same under every seed
    a = [hard + rng.normal(0, 0.01, 400) for _ in range(3)]
    b = [hard + effect + rng.normal(0, 0.01, 400) for _ in range(3)]
    p = stats.paired_over_seeds(a, b)
    assert p["n"] == 400 and p["seeds"] == 3
    flat = stats.paired(np.concatenate(a), np.concatenate(b))  # 1,200 "items": an interval too narrow
    assert (flat["hi"] - flat["lo"]) < 0.7 * (p["hi"] - p["lo"])  # ~1/sqrt(3) as wide
    with pytest.raises(ValueError, match="same number of seeds"):
        stats.paired_over_seeds(a, b[:2])


def test_publish_writes_results_with_provenance_and_the_report(tmp_path):
    import json
    import time

    from rich.console import Console

    from vlkit.experiments import publish

    def report(s, chart):
        return f"# r\n{s['x']} {chart} {s['provenance']['commit'] is not None}\n"

    s = publish(tmp_path, {"x": 1}, {"stage": 2.04}, time.perf_counter(), lambda s: "chart.png", report,
                Console(quiet=True))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seconds"]["stage"] == 2.0 and "total" in saved["seconds"] and saved["provenance"]["machine"]
    assert (tmp_path / "report.md").read_text() == "# r\n1 chart.png True\n" and s == saved


def test_a_figure_that_is_not_a_mean_gets_its_interval_by_resampling_rows():
    from sklearn.metrics import average_precision_score as ap

    from vlkit.eval.stats import metric_interval, paired_metric

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = rng.uniform(size=400)
    sharp = y + 0.5 * rng.uniform(size=400)  # ranks every positive first
    ci = metric_interval(ap, y, sharp)
    assert ci["value"] == 1.0 and ci["lo"] == pytest.approx(1.0) and ci["n"] == 400
    blind = metric_interval(ap, y, noise)
    assert blind["lo"] < y.mean() < blind["hi"]  # a random score's AUPRC is the base rate
    p = paired_metric(ap, y, noise, sharp)
    assert p["diff"] == 1.0 - blind["value"] and p["lo"] > 0.3 and p["p_not_better"] == 0.0
    assert paired_metric(ap, y, noise, noise)["diff"] == 0.0
    with pytest.raises(ValueError, match="equally long"):
        paired_metric(ap, y, noise, sharp[:10])
