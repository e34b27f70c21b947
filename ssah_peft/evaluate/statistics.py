"""Paired comparisons of runs: sign-flip tests, bootstrap intervals, Holm's correction, matched curves, Spearman.

A chooser and its random control are measured on the same prompts after training with the same seeds, so their
difference is paired by prompt and by seed; pooling the same 36 prompts of three seeds as 108 independent trials
(as a Wilson interval of a pooled rate does) overstates the evidence, and a summary that makes fifty comparisons
finds some "significant" by chance. This module holds the statistics a comparison needs, on arrays of per-prompt
values shaped ``[seeds, prompts]`` (or per-run values, shaped ``[runs]``):

* :func:`paired_permutation_test`: a sign-flip test of the mean difference, flipping whole seeds (runs) or
  whole prompts (all seeds of a prompt together);
* :func:`two_sample_permutation_test`: a chooser's runs against its random controls' runs, runs as the units;
* :func:`two_sample_shift_interval`: the interval of that difference which the same test does not reject;
* :func:`prediction_t_test`: one set's value against the values of independent random draws, when too few draws
  are affordable for their ranks alone (:func:`rank_p_value`) to reach a small p-value (an ablation on a large
  model);
* :func:`paired_bootstrap_interval`: a percentile bootstrap interval of the mean difference, resampling seeds and
  prompts independently, so that both run-to-run and prompt-to-prompt variation widen it;
* :func:`holm_adjust`: Holm's step-down correction of a family of p-values;
* :func:`interpolate_at` and :func:`matched_range`: a measure read off a training curve at a matched task loss;
* :func:`spearman_correlation`: rank agreement of two measures (the refusal margin against the generation ASR).

Every resampling takes a ``seed``, so a report regenerates to the same digits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from .intervals import CONFIDENCE

ArrayLike = Union[Sequence[float], Sequence[Sequence[float]], np.ndarray]

#: Which units a sign-flip test flips together in a ``[seeds, prompts]`` array.
FLIP_UNITS = ("seeds", "prompts")
ALTERNATIVES = ("two-sided", "greater", "less")

#: Permutation tests enumerate every relabelling exactly when there are at most this many (else Monte Carlo).
MAX_EXACT_PERMUTATIONS = 2**16


@dataclass(frozen=True)
class PermutationTest:
    """Result of :func:`paired_permutation_test` or :func:`two_sample_permutation_test`."""

    mean_difference: float
    """Mean of treatment − control (over all cells of a paired test; of the run means of a two-sample test)."""
    p_value: float
    units: int
    """Independent units the test relabels: flipped units, or treatment plus control runs."""
    permutations: int
    """Relabellings evaluated (all of them when ``exact``)."""
    exact: bool


@dataclass(frozen=True)
class BootstrapInterval:
    """Result of :func:`paired_bootstrap_interval`."""

    mean_difference: float
    low: float
    high: float
    confidence: float
    resamples: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_differences(treatment: ArrayLike, control: ArrayLike) -> np.ndarray:
    """``treatment − control`` as a float64 ``[seeds, prompts]`` array (a 1-D input is ``[runs]``, returned as
    ``[runs, 1]``: every run its own unit); raises ``ValueError`` for mismatched shapes, no values or non-finite ones.
    """
    treated, controlled = np.asarray(treatment, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if treated.shape != controlled.shape:
        raise ValueError(f"Paired arrays differ in shape: {treated.shape} and {controlled.shape}")
    if treated.ndim not in (1, 2) or treated.size == 0:
        raise ValueError(f"Expected non-empty [seeds, prompts] or [runs] arrays, got shape {treated.shape}")
    differences = treated - controlled
    if not np.isfinite(differences).all():
        raise ValueError("Paired values must be finite (no NaN or inf).")
    return differences[:, None] if differences.ndim == 1 else differences


def _check_test_options(alternative: str, permutations: int) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")


def _permutation_result(
    observed: float, null: np.ndarray, alternative: str, units: int, exact: bool
) -> PermutationTest:
    """The p-value of ``observed`` among the statistics of the relabellings ``null``: the share as extreme when
    they are all relabellings (the identity among them), else (1 + #{as extreme}) / (1 + len(null)), which never
    reports 0 for a Monte Carlo sample. A relative tolerance counts ties that differ only by float rounding."""
    tolerance = 1e-12 * max(1.0, abs(observed))
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed) - tolerance
    elif alternative == "greater":
        extreme = null >= observed - tolerance
    else:
        extreme = null <= observed + tolerance
    count = int(extreme.sum())
    p_value = count / len(null) if exact else (1 + count) / (1 + len(null))
    return PermutationTest(
        mean_difference=observed, p_value=min(1.0, p_value), units=units, permutations=len(null), exact=exact
    )


def paired_permutation_test(
    treatment: ArrayLike,
    control: ArrayLike,
    *,
    flip: str = "seeds",
    alternative: str = "two-sided",
    permutations: int = 9999,
    seed: int = 0,
) -> PermutationTest:
    """Sign-flip (paired permutation) test of the mean of ``treatment − control``.

    Under the null hypothesis each unit's difference is as likely negative as positive, so the observed mean is
    compared with the means under sign flips of whole units. What a unit is decides what the test generalises
    over:

    * ``flip="seeds"`` (the default; per-run ``[runs]`` arrays always flip runs) flips whole runs, the
      randomisation the experiment performs: valid whatever a training seed does to all prompts at once, but with
      k seeds its smallest two-sided p-value is 2 / 2**k (0.25 at three seeds);
    * ``flip="prompts"`` flips all seeds of a prompt together: prompts are the sampled units. It answers "do
      *these* trained models differ, over prompts like these?" (e.g. one chooser run against one control run). It
      does not see run-to-run variation: when a seed shifts every prompt of a run, it rejects far more often than
      its level (tests/test_statistics.py measures it), so a claim about choosers across training runs needs
      ``"seeds"`` or :func:`two_sample_permutation_test` over independent runs.

    With at most :data:`MAX_EXACT_PERMUTATIONS` sign vectors (or at most ``permutations``) all are enumerated and
    the p-value is exact; otherwise ``permutations`` random sign vectors from ``seed`` are drawn.
    """
    if flip not in FLIP_UNITS:
        raise ValueError(f"flip must be one of {FLIP_UNITS}, got {flip!r}")
    _check_test_options(alternative, permutations)
    differences = paired_differences(treatment, control)
    unit_means = differences.mean(axis=1 if flip == "seeds" or np.ndim(treatment) == 1 else 0)
    units = len(unit_means)
    exact = 2**units <= max(MAX_EXACT_PERMUTATIONS, permutations)
    if exact:
        signs = 1 - 2 * ((np.arange(2**units)[:, None] >> np.arange(units)) & 1)
    else:
        signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(permutations, units))
    return _permutation_result(float(unit_means.mean()), signs @ unit_means / units, alternative, units, exact)


def two_sample_permutation_test(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    alternative: str = "two-sided",
    permutations: int = 9999,
    seed: int = 0,
) -> PermutationTest:
    """Permutation test of mean(treatment) − mean(control) over independent runs (one value per run).

    For a chooser's runs against its random controls' runs (e.g. 3 chooser seeds against 5 random draws × 3
    seeds): under the null hypothesis the chooser is one more random draw, so every split of the pooled runs into
    groups of the same sizes is as likely. All C(n, k) splits are enumerated when there are at most
    :data:`MAX_EXACT_PERMUTATIONS` (or at most ``permutations``); otherwise ``permutations`` random splits from
    ``seed``. Runs are the units, so whatever a seed does to all prompts of a run is inside the null distribution.
    """
    _check_test_options(alternative, permutations)
    treated, controlled = _run_values(treatment, control)
    in_treatment, exact = _splits(len(treated), len(treated) + len(controlled), permutations, seed)
    return _split_test(treated, controlled, in_treatment, alternative, exact)


def _run_values(treatment: Sequence[float], control: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    treated, controlled = np.asarray(treatment, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if treated.ndim != 1 or controlled.ndim != 1 or not len(treated) or not len(controlled):
        raise ValueError("A two-sample test takes two non-empty 1-D sequences of per-run values.")
    if not (np.isfinite(treated).all() and np.isfinite(controlled).all()):
        raise ValueError("Run values must be finite (no NaN or inf).")
    return treated, controlled


def _splits(k: int, n: int, permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """The relabellings of a two-sample test as a ``[splits, n]`` mask of the runs put in the treatment group
    (the first ``k`` runs are the observed treatment), and whether they are all C(n, k) of them."""
    exact = math.comb(n, k) <= max(MAX_EXACT_PERMUTATIONS, permutations)
    if exact:
        chosen = np.array(list(itertools.combinations(range(n), k)))
    else:
        chosen = np.argsort(np.random.default_rng(seed).random((permutations, n)), axis=1)[:, :k]
    in_treatment = np.zeros((len(chosen), n), dtype=bool)
    np.put_along_axis(in_treatment, chosen, True, axis=1)
    return in_treatment, exact


def _split_test(
    treated: np.ndarray, controlled: np.ndarray, in_treatment: np.ndarray, alternative: str, exact: bool
) -> PermutationTest:
    pooled = np.concatenate([treated, controlled])
    k, n = len(treated), len(pooled)
    null = (in_treatment @ pooled) / k - (~in_treatment @ pooled) / (n - k)
    return _permutation_result(float(treated.mean() - controlled.mean()), null, alternative, n, exact)


def two_sample_shift_interval(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    permutations: int = 9999,
    seed: int = 0,
) -> tuple[float, float]:
    """The shifts δ of the treatment runs that :func:`two_sample_permutation_test` (two-sided) does not reject at
    level 1 − ``confidence``: the test's own interval of mean(treatment) − mean(control) (Lehmann's inversion).

    Where the test rejects "no difference", this interval excludes 0, and the other way round, so the interval and
    the p-value in a table agree. Each bound is a crossing of the level found by bisection between the estimate and
    a shift far enough out (the p-value of a mean-difference test falls away from the estimate, though not always
    strictly, so with ties a bound can be one of several crossings close together); a bound is infinite when no
    shift can be rejected (too few runs: with 1 chooser and 2 controls the smallest two-sided p-value is 1/3).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    _check_test_options("two-sided", permutations)
    treated, controlled = _run_values(treatment, control)
    in_treatment, exact = _splits(len(treated), len(treated) + len(controlled), permutations, seed)
    level = 1 - confidence

    def rejected(shift: float) -> bool:
        return _split_test(treated - shift, controlled, in_treatment, "two-sided", exact).p_value <= level

    estimate = float(treated.mean() - controlled.mean())
    # shifted this far, every treatment run lies beyond every control run: the most extreme split there is
    spread = 2 * float(np.ptp(np.concatenate([treated, controlled]))) + 1.0
    bounds = []
    for direction in (-1.0, 1.0):
        outer = estimate + direction * spread
        if not rejected(outer):
            bounds.append(direction * math.inf)
            continue
        inner = estimate
        for _ in range(60):  # the bracket shrinks to ~1e-18 of its width: past float resolution
            middle = (inner + outer) / 2
            inner, outer = (inner, middle) if rejected(middle) else (middle, outer)
        bounds.append(inner)
    return bounds[0], bounds[1]


def paired_bootstrap_interval(
    treatment: ArrayLike,
    control: ArrayLike,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = 10000,
    seed: int = 0,
) -> BootstrapInterval:
    """Percentile bootstrap interval of the mean of ``treatment − control``.

    A ``[seeds, prompts]`` array is resampled two ways at once (seeds with replacement and, independently,
    prompts with replacement; Owen 2007's pigeonhole bootstrap), so the interval reflects both run-to-run and
    prompt-to-prompt variation; a ``[runs]`` array resamples runs. With three seeds the seed resampling can only
    see three values: the interval is then a lower bound on the uncertainty, which is why claims rest on the
    permutation test.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    differences = paired_differences(treatment, control)
    if np.asarray(treatment).ndim == 1:
        differences = differences.T  # one row of runs: resample the runs, not a single "seed"
    rng = np.random.default_rng(seed)
    seeds, prompts = differences.shape
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples)
    prompt_counts = rng.multinomial(prompts, np.full(prompts, 1 / prompts), size=resamples)
    means = np.einsum("bs,sp,bp->b", seed_counts, differences, prompt_counts) / (seeds * prompts)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return BootstrapInterval(
        mean_difference=float(differences.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in input order: reject hypothesis i at level α iff its value ≤ α.

    Holm (1979): sorted ascending, the k-th smallest p-value (k from 0) is multiplied by (m − k), a running maximum
    keeps the adjusted values in the same order as the raw ones, and values are capped at 1. It controls the
    family-wise error rate under any dependence between the tests.
    """
    values = np.asarray(p_values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError("holm_adjust takes a flat sequence of p-values.")
    if ((values < 0) | (values > 1) | ~np.isfinite(values)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {values.tolist()}")
    order = np.argsort(values, kind="stable")
    m = len(values)
    scaled = np.maximum.accumulate(values[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(scaled, 1.0)
    return adjusted.tolist()


@dataclass(frozen=True)
class PredictionTTest:
    """Result of :func:`prediction_t_test`."""

    difference: float
    """The value minus the draws' mean."""
    t: float
    degrees_of_freedom: int
    p_value: float
    rank_p_value: float
    """The exact rank test's p-value, assuming nothing about the draws' distribution: (1 + #draws as extreme) /
    (1 + draws), never below 1 / (1 + draws)."""


def student_t_cdf(t: float, degrees_of_freedom: int) -> float:
    """P(T ≤ t) of Student's t with an integer number of degrees of freedom, in closed form (Abramowitz & Stegun
    26.7.3-4: finite series in θ = atan(t / √ν)), so no special-function library is needed."""
    nu = degrees_of_freedom
    if nu < 1 or int(nu) != nu:
        raise ValueError(f"degrees_of_freedom must be a positive integer, got {degrees_of_freedom}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(nu))
    cos2 = math.cos(theta) ** 2
    term, series = 1.0, 1.0
    if nu % 2:  # A = (2/π)(θ + sinθ cosθ (1 + (2/3)cos²θ + ... up to cos^(ν-3)θ))
        for k in range(1, (nu - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        inside = (2 / math.pi) * (theta + (math.sin(theta) * math.cos(theta) * series if nu > 1 else 0.0))
    else:  # A = sinθ (1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + ... up to cos^(ν-2)θ)
        for k in range(1, nu // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return 0.5 + math.copysign(inside / 2, t)


def prediction_t_test(value: float, draws: Sequence[float], *, alternative: str = "two-sided") -> PredictionTTest:
    """Is ``value`` one more draw of the distribution the random ``draws`` come from?

    t = (value − mean) / (s · √(1 + 1/n)) has Student's t distribution with n − 1 degrees of freedom when the draws
    and the value are independent draws of one normal distribution (the prediction interval of a new draw).
    ``alternative="less"`` asks whether ``value`` lies below the draws. The normality is an assumption the test
    cannot check on a few draws; :attr:`PredictionTTest.rank_p_value` beside it assumes nothing but is bounded by
    the number of draws (1/6 at five), which is why the t-test is there: on a large model, twenty draws of an
    ablation are not affordable.
    """
    _check_test_options(alternative, 1)
    values = np.asarray(draws, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"prediction_t_test needs at least two draws, got {values.shape}")
    if not (np.isfinite(values).all() and math.isfinite(value)):
        raise ValueError("The value and the draws must be finite.")
    n, spread = len(values), float(values.std(ddof=1))
    difference = float(value - values.mean())
    if spread == 0:
        raise ValueError("The draws are all equal: their spread, and so the t statistic, is undefined.")
    t = difference / (spread * math.sqrt(1 + 1 / n))
    below = student_t_cdf(t, n - 1)
    p_value = {"less": below, "greater": 1 - below, "two-sided": 2 * min(below, 1 - below)}[alternative]
    return PredictionTTest(difference, t, n - 1, min(1.0, p_value), rank_p_value(value, values, alternative))


def rank_p_value(value: float, draws: Sequence[float], alternative: str = "two-sided") -> float:
    """The exact rank test of ``value`` among random ``draws``: (1 + #draws at least as extreme) / (1 + draws),
    extremeness measured from the draws' mean. Assumes nothing about the draws' distribution (unlike
    :func:`prediction_t_test`) and is defined when they are all equal, but never falls below 1 / (1 + draws)."""
    _check_test_options(alternative, 1)
    values = np.asarray(draws, dtype=np.float64)
    if values.ndim != 1 or len(values) < 1:
        raise ValueError(f"rank_p_value needs at least one draw, got {values.shape}")
    centre = values.mean()
    return _permutation_result(float(value - centre), values - centre, alternative, len(values), exact=False).p_value


def _curve(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or len(xs) == 0:
        raise ValueError(f"A curve needs x and y of the same non-empty 1-D shape, got {xs.shape} and {ys.shape}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("A curve's values must be finite.")
    return xs, ys


def interpolate_at(x: Sequence[float], y: Sequence[float], at: float) -> float:
    """The value of the curve through ``(x[i], y[i])`` (points in training order) at ``x == at``, linearly
    interpolated on the first segment that reaches ``at``: the measure when training first reached that task loss.

    Raises ``ValueError`` when ``at`` lies outside the curve's x range: extrapolating a training curve would
    invent a run nobody trained, so such a curve does not take part in a comparison at that value.
    """
    xs, ys = _curve(x, y)
    if not xs.min() <= at <= xs.max():
        raise ValueError(f"{at} lies outside the curve's range [{xs.min()}, {xs.max()}]; refusing to extrapolate")
    if len(xs) == 1:
        return float(ys[0])
    segment = next(i for i in range(len(xs) - 1) if min(xs[i], xs[i + 1]) <= at <= max(xs[i], xs[i + 1]))
    (x0, x1), (y0, y1) = xs[segment : segment + 2], ys[segment : segment + 2]
    return float(y0 if x0 == x1 else y0 + (y1 - y0) * (at - x0) / (x1 - x0))


def matched_range(curve_xs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The x values (task losses) that every curve, given by its x values, reaches: ``(max of minima, min of
    maxima)``. Raises ``ValueError`` when the curves share no x value: no comparison at a matched task loss exists."""
    if not curve_xs or any(len(xs) == 0 for xs in curve_xs):
        raise ValueError("matched_range needs at least one curve, each with at least one point.")
    lows, highs = zip(*((float(np.min(xs)), float(np.max(xs))) for xs in curve_xs))
    low, high = max(lows), min(highs)
    if low > high:
        raise ValueError(f"The curves share no x value (the highest minimum {low} exceeds the lowest maximum {high})")
    return float(low), float(high)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def spearman_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of average ranks (ties share their mean rank)."""
    xs, ys = _curve(x, y)
    if len(xs) < 2:
        raise ValueError("A rank correlation needs at least two points.")
    rx, ry = _average_ranks(xs) - (len(xs) + 1) / 2, _average_ranks(ys) - (len(ys) + 1) / 2
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    if denominator == 0:
        raise ValueError("A rank correlation is undefined when one variable is constant.")
    return float((rx * ry).sum() / denominator)
