"""How sure a table's figures are: a 95% interval for a mean over seeds, and for the difference of two
means (Welch's t: the seeds of two rows are independent and their spreads need not be equal).

With 3 seeds a t interval is wide (t = 4.30 for 2 degrees of freedom): that is the honest width. A
difference whose interval contains 0 is marked as within noise.
"""
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def mean_interval(values, confidence=CONFIDENCE):
    """(mean, std, low, high): Student's t interval for the mean of `values` (NaN bounds for one value)."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(values) == 0:
        return (math.nan,) * 4
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def difference_interval(values, reference, confidence=CONFIDENCE):
    """(difference of means, low, high) of `values` minus `reference` by Welch's t; NaN bounds when either
    side has fewer than 2 values. Equal constant samples give a zero-width interval at their difference."""
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    b = np.asarray([v for v in reference if not math.isnan(v)], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return (math.nan,) * 3
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, math.nan, math.nan
    if a.std() == 0 and b.std() == 0:
        return difference, difference, difference
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return difference, float(interval.low), float(interval.high)


def within_noise(low, high):
    """An interval that contains 0 (or cannot be computed) does not show a difference."""
    return not (low > 0 or high < 0)
