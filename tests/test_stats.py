"""The uncertainty compare.py states: t intervals for a mean over seeds, Welch intervals for differences."""
import math

import numpy as np
import pytest

from lab.stats import difference_interval, mean_interval, within_noise


def test_mean_interval_is_students_t_over_the_seeds():
    mean, std, low, high = mean_interval([0.50, 0.60, 0.70])
    assert mean == pytest.approx(0.60) and std == pytest.approx(0.10)
    # t(0.975, 2 df) = 4.303: the half-width for 3 seeds is 4.303 * 0.1 / sqrt(3)
    assert (high - low) / 2 == pytest.approx(4.3027 * 0.10 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_interval([0.5])[2]) and mean_interval([0.5])[0] == 0.5
    assert math.isnan(mean_interval([])[0])
    assert mean_interval([0.4, math.nan, 0.6])[0] == pytest.approx(0.5)  # a failed seed is left out


def test_difference_interval_separates_a_real_gap_from_noise():
    rng = np.random.default_rng(0)
    base = 0.30 + 0.01 * rng.standard_normal(3)
    better = 0.50 + 0.01 * rng.standard_normal(3)
    diff, low, high = difference_interval(better, base)
    assert diff == pytest.approx(better.mean() - base.mean()) and 0 < low < diff < high
    assert not within_noise(low, high)
    noisy = 0.31 + 0.10 * rng.standard_normal(3)
    assert within_noise(*difference_interval(noisy, base)[1:])
    assert within_noise(*difference_interval([0.9], base)[1:])  # one seed: no interval, no claim


def test_welch_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(2000):
        a, b = 0.5 + 0.05 * rng.standard_normal(3), 0.4 + 0.02 * rng.standard_normal(4)
        _, low, high = difference_interval(a, b)
        covered += low <= 0.1 <= high
    assert 0.93 <= covered / 2000 <= 0.97
