"""Uncertainty of the numbers the reports print: Wilson intervals for rates, mean ± sd over seeds.

Safety claims here rest on small samples (36 harmful prompts: one prompt moves the ASR by 2.8 points), so a rate
is never reported without its 95% interval. The Wilson score interval is used because it stays inside [0, 1] and
keeps its coverage at rates near 0 or 1 and at small n, where the normal ("Wald") interval collapses to a point.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

#: Confidence level of every interval the project reports.
CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate ``successes / n``, as ``(low, high)``.

    Wilson (1927): the rates p whose normal test against the observed rate does not reject at ``confidence``,
    p = (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n).
    """
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise TypeError(f"successes and n must be whole numbers, got {successes!r} and {n!r}")
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    rate = successes / n
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    # the exact bounds at 0 and n successes are 0 and 1; floating point may miss them by an ulp
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1) of per-seed results; the sd of a single value is 0."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def format_rate(successes: int, n: int) -> str:
    """A rate with its 95% Wilson interval, e.g. ``0.250 [0.138, 0.411]``."""
    low, high = wilson_interval(successes, n)
    return f"{successes / n:.3f} [{low:.3f}, {high:.3f}]"
