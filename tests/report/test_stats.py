"""Paired differences over seeds (lm.report.stats): each variant against the baseline of the same seed, judged by
the 95% Student-t interval of the mean difference, with a bootstrap interval beside it."""
from __future__ import annotations

import numpy as np
import pytest

from lm.report.stats import MIN_SEEDS, bootstrap_interval, compare, paired, paired_cells, t_interval


def _records(values: dict[str, list[float]]) -> list[dict]:
    return [dict(label=label, seed=seed, eval_loss=v) for label, vs in values.items() for seed, v in enumerate(vs)]


def test_differences_are_paired_by_seed():
    # Seed 2 is a hard seed for both: unpaired, B's spread (0.5) would swamp its steady -0.1.
    d = paired(_records({"base": [2.0, 2.1, 2.5], "B": [1.9, 2.0, 2.4], "C": [2.05, 2.0, 2.55]}), "base")
    assert set(d) == {"B", "C"}
    assert d["B"]["mean"] == pytest.approx(-0.1) and d["B"]["ci"] == pytest.approx((-0.1, -0.1))
    assert (d["B"]["lo"], d["B"]["hi"]) == pytest.approx((-0.1, -0.1)) and d["B"]["n"] == 3 and not d["B"]["tie"]
    assert d["C"]["tie"] and (d["C"]["lo"], d["C"]["hi"]) == pytest.approx((-0.1, 0.05))
    assert d["B"]["rel"] == pytest.approx(-0.1 / 2.2) and not d["B"]["enough"]
    assert paired_cells(d["B"]) == ["-0.1000 (-4.55%)", "[-0.1000, -0.1000]", "[-0.1000, -0.1000]", "lower",
                                    f"3 < {MIN_SEEDS}"]
    assert paired_cells(d["C"])[3] == "tie"


def test_the_t_interval_is_students():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653.
    lo, hi = t_interval(np.array([1.0, 2.0, 3.0]))
    assert (lo, hi) == pytest.approx((2 - 4.302653 / np.sqrt(3), 2 + 4.302653 / np.sqrt(3)), abs=1e-6)
    # Five seeds: t(0.975, 4) = 2.776445.
    d = np.array([0.1, 0.3, 0.2, 0.4, 0.0])
    half = 2.776445 * d.std(ddof=1) / np.sqrt(5)
    assert t_interval(d) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-6)
    assert t_interval(np.array([0.5])) is None and bootstrap_interval(np.array([0.5])) is None


def test_one_sign_over_three_seeds_is_not_a_difference():
    """All three seeds above 0, but too spread for the t-interval: a tie, where the range rule called it real."""
    p = compare([0.01, 0.05, 0.2], 2.0)
    assert min(p["diffs"]) > 0 and p["tie"] and p["ci"][0] < 0 < p["ci"][1]
    # The same values five times tighter around their mean separate.
    assert not compare([0.09, 0.095, 0.10, 0.085, 0.092], 2.0)["tie"]
    # One seed: no interval, a tie.
    one = compare([0.3], 2.0)
    assert one["tie"] and one["ci"] is None and paired_cells(one)[1:4] == ["—", "—", "tie"]


def test_a_true_zero_effect_is_called_about_5_percent_of_the_time():
    """Under a zero effect the t rule calls a difference at its 5% level with 3 seeds; one shared sign would
    call it 25% of the time."""
    rng = np.random.default_rng(1)
    draws = rng.normal(size=(20_000, 3))
    called = [not (lo <= 0 <= hi) for lo, hi in map(t_interval, draws)]
    same_sign = np.mean(np.all(draws > 0, axis=1) | np.all(draws < 0, axis=1))
    assert 0.04 < np.mean(called) < 0.06 and 0.23 < same_sign < 0.27


def test_the_bootstrap_interval_is_fixed_and_inside_the_observed_range():
    d = np.array([0.3, -0.1, 0.2, 0.05, 0.15])
    lo, hi = bootstrap_interval(d)
    assert bootstrap_interval(d) == (lo, hi)  # a fixed resampling seed: the same runs give the same report
    assert d.min() <= lo < d.mean() < hi <= d.max()
    tl, th = t_interval(d)
    assert tl < lo and hi < th  # with 5 seeds the percentile bootstrap is the narrower


def test_a_seed_missing_for_a_variant_is_left_out():
    d = paired(_records({"base": [2.0, 2.1], "B": [1.9]}), "base")
    assert d["B"]["n"] == 1 and d["B"]["mean"] == pytest.approx(-0.1) and d["B"]["rel"] == pytest.approx(-0.05)
