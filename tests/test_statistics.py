"""Paired tests, bootstrap intervals, Holm's correction, curve interpolation and Spearman on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssah_peft.evaluate import (
    holm_adjust,
    interpolate_at,
    matched_range,
    paired_bootstrap_interval,
    paired_permutation_test,
    prediction_t_test,
    rank_p_value,
    spearman_correlation,
    student_t_cdf,
    two_sample_permutation_test,
    two_sample_shift_interval,
)


def synthetic_runs(rng: np.random.Generator, effect: float, seeds: int = 3, prompts: int = 30, run_sd: float = 0.3):
    """Per-prompt values of a treatment and its control: a shared prompt difficulty, a run offset (what a training
    seed does to every prompt), noise."""
    difficulty = rng.normal(size=prompts)

    def runs(shift: float) -> np.ndarray:
        return difficulty + shift + rng.normal(scale=run_sd, size=(seeds, 1)) + rng.normal(size=(seeds, prompts))

    return runs(effect), runs(0.0)


def rejections(test, replicates: int, level: float = 0.05) -> int:
    return sum(test(i).p_value <= level for i in range(replicates))


def test_permutation_test_detects_known_effect():
    treatment, control = synthetic_runs(np.random.default_rng(0), effect=1.5, seeds=6, prompts=30)
    by_seed = paired_permutation_test(treatment, control)
    assert by_seed.exact and by_seed.units == 6 and by_seed.permutations == 64
    assert by_seed.mean_difference == pytest.approx(float((treatment - control).mean()))
    assert by_seed.p_value == pytest.approx(2 / 64)  # every seed positive: only the identity and its mirror
    assert paired_permutation_test(treatment, control, alternative="greater").p_value == pytest.approx(1 / 64)
    assert paired_permutation_test(treatment, control, alternative="less").p_value == 1.0
    by_prompt = paired_permutation_test(treatment, control, flip="prompts", permutations=1999, seed=1)
    assert not by_prompt.exact and by_prompt.units == 30 and by_prompt.permutations == 1999
    assert by_prompt.p_value == pytest.approx(1 / 2000)  # no flip as extreme: the smallest Monte Carlo p-value


def test_seed_flips_reject_at_nominal_rate_without_effect():
    rng = np.random.default_rng(2)
    count = rejections(lambda i: paired_permutation_test(*synthetic_runs(rng, 0.0, seeds=8, run_sd=1.0)), 400)
    assert 6 <= count <= 30  # exact over 256 sign vectors: 20 expected, binomial sd 4.4


def test_prompt_flips_reject_at_nominal_rate_only_without_run_offsets():
    rng = np.random.default_rng(3)

    def test(i: int, run_sd: float):
        return paired_permutation_test(
            *synthetic_runs(rng, 0.0, run_sd=run_sd), flip="prompts", permutations=199, seed=i
        )

    assert 5 <= rejections(lambda i: test(i, run_sd=0.0), 300) <= 27  # 15 expected, sd 3.8
    # a seed that shifts a whole run is invisible to prompt flips: the test then rejects far above its level
    assert rejections(lambda i: test(i, run_sd=0.5), 300) > 45


def test_two_sample_test_over_runs():
    # chooser runs 3, 4, 5 against controls 0, 1, 2: the most extreme of C(6, 3) = 20 splits, and its mirror
    result = two_sample_permutation_test([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert result.exact and result.permutations == 20 and result.units == 6
    assert result.mean_difference == 3.0
    assert result.p_value == pytest.approx(2 / 20)
    assert two_sample_permutation_test([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], alternative="greater").p_value == 1 / 20
    # a chooser of 3 seeds against 5 random draws x 3 seeds, under the null: at most the nominal rate
    rng = np.random.default_rng(4)
    count = rejections(lambda i: two_sample_permutation_test(rng.normal(size=3), rng.normal(size=15)), 300)
    assert 5 <= count <= 27  # 15 expected over 816 exact splits
    # a chooser whose three runs all beat every control: the top split of 816 (one-sided p = 1/816)
    assert two_sample_permutation_test([2.5, 3.0, 3.5], rng.normal(size=15), alternative="greater").p_value == 1 / 816
    # Monte Carlo beyond the exact limit
    large = two_sample_permutation_test(rng.normal(size=20) + 1, rng.normal(size=20), permutations=999, seed=0)
    assert not large.exact and large.permutations == 999 and large.p_value < 0.01


def test_shift_interval_is_the_tests_own_interval():
    rng = np.random.default_rng(7)
    for effect in (0.0, 0.8, 2.0):
        treatment, control = rng.normal(size=3) + effect, rng.normal(size=15)
        low, high = two_sample_shift_interval(treatment, control)
        estimate = treatment.mean() - control.mean()
        assert low < estimate < high
        # duality: 0 lies outside exactly when the test rejects "no difference" at 5%
        assert (low > 0 or high < 0) == (two_sample_permutation_test(treatment, control).p_value <= 0.05)
        # at each bound the shifted test sits on the level: not rejected just inside, rejected just outside
        for bound, outward in ((low, -1e-6), (high, 1e-6)):
            assert two_sample_permutation_test(treatment - bound, control).p_value > 0.05
            assert two_sample_permutation_test(treatment - bound - outward, control).p_value <= 0.05
        # equivariant: shifting the treatment runs by c shifts the interval by c
        shifted = two_sample_shift_interval(treatment + 5.0, control)
        assert shifted == (pytest.approx(low + 5.0), pytest.approx(high + 5.0))


def test_shift_interval_covers_a_known_shift():
    rng = np.random.default_rng(8)
    covered = sum(
        low <= 1.5 <= high
        for low, high in (two_sample_shift_interval(rng.normal(size=3) + 1.5, rng.normal(size=9)) for _ in range(200))
    )
    assert covered >= 180  # 95% nominal: 190 expected, sd 3.1


def test_shift_interval_is_unbounded_without_enough_runs():
    # 1 chooser against 2 controls: the smallest two-sided p-value is 1/3, so no shift is ever rejected
    assert two_sample_shift_interval([10.0], [0.0, 1.0]) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="confidence"):
        two_sample_shift_interval([1.0], [0.0, 1.0], confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        two_sample_shift_interval([math.nan], [0.0, 1.0])


def test_exact_permutation_test_by_hand():
    # differences 1, 2, 3: of the 8 sign vectors only (+,+,+) and (-,-,-) reach |mean| >= 2
    result = paired_permutation_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert result.exact and result.permutations == 8 and result.units == 3
    assert result.mean_difference == 2.0
    assert result.p_value == pytest.approx(2 / 8)
    assert paired_permutation_test([1.0, 2.0, 3.0], [0.0] * 3, alternative="greater").p_value == pytest.approx(1 / 8)
    # flipping the seeds of a [seeds, prompts] array: row means 1, 2, 3 again
    rows = np.array([[0.0, 2.0], [1.0, 3.0], [3.0, 3.0]])
    by_seed = paired_permutation_test(rows, np.zeros_like(rows))
    assert (by_seed.units, by_seed.p_value) == (3, pytest.approx(2 / 8))
    # flipping its prompts: column means 4/3 and 8/3, the identity and its mirror of 4 sign vectors
    by_prompt = paired_permutation_test(rows, np.zeros_like(rows), flip="prompts")
    assert (by_prompt.units, by_prompt.permutations, by_prompt.p_value) == (2, 4, pytest.approx(2 / 4))


def test_permutation_test_is_reproducible():
    treatment, control = synthetic_runs(np.random.default_rng(4), effect=0.1)
    first = paired_permutation_test(treatment, control, flip="prompts", permutations=499, seed=7)
    assert not first.exact
    assert paired_permutation_test(treatment, control, flip="prompts", permutations=499, seed=7) == first


@pytest.mark.parametrize(
    ("treatment", "control", "kwargs", "message"),
    [
        ([1.0, 2.0], [1.0], {}, "differ in shape"),
        ([], [], {}, "non-empty"),
        ([1.0, math.nan], [0.0, 0.0], {}, "finite"),
        ([1.0], [0.0], {"flip": "cells"}, "flip must be one of"),
        ([1.0], [0.0], {"alternative": "bigger"}, "alternative must be one of"),
        ([1.0], [0.0], {"permutations": 0}, "permutations must be at least 1"),
    ],
)
def test_permutation_test_errors(treatment, control, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_permutation_test(treatment, control, **kwargs)


def test_bootstrap_interval_contains_known_effect():
    treatment, control = synthetic_runs(np.random.default_rng(5), effect=0.8, seeds=5, prompts=60)
    interval = paired_bootstrap_interval(treatment, control, resamples=2000, seed=0)
    assert interval.low < 0.8 < interval.high
    assert interval.excludes_zero()
    assert interval.low < interval.mean_difference < interval.high
    assert interval == paired_bootstrap_interval(treatment, control, resamples=2000, seed=0)


def test_bootstrap_interval_covers_zero_at_nominal_rate_without_effect():
    rng = np.random.default_rng(6)
    covered = sum(
        not paired_bootstrap_interval(rng.normal(size=40), rng.normal(size=40), resamples=500, seed=i).excludes_zero()
        for i in range(200)
    )
    # 95% of 200 = 190 expected; percentile intervals at n = 40 run slightly short
    assert 176 <= covered <= 199


def test_bootstrap_interval_widens_with_run_to_run_variation():
    rng = np.random.default_rng(7)
    differences = rng.normal(size=(4, 50))
    shifted = differences + np.array([[-1.0], [1.0], [-1.0], [1.0]])  # same mean, run offsets
    plain = paired_bootstrap_interval(differences, np.zeros_like(differences), resamples=2000)
    with_runs = paired_bootstrap_interval(shifted, np.zeros_like(shifted), resamples=2000)
    assert with_runs.high - with_runs.low > 1.5 * (plain.high - plain.low)


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]
    assert holm_adjust([]) == []
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        holm_adjust([0.2, 1.5])


def test_interpolation_by_hand():
    task_loss, measure = [3.0, 2.0, 1.0], [0.0, 10.0, 30.0]
    assert interpolate_at(task_loss, measure, 2.5) == pytest.approx(5.0)
    assert interpolate_at(task_loss, measure, 1.25) == pytest.approx(25.0)
    assert interpolate_at(task_loss, measure, 3.0) == 0.0
    assert interpolate_at(task_loss, measure, 1.0) == 30.0
    # a curve that turns back: the first segment that reaches the value
    assert interpolate_at([3.0, 1.0, 2.0], [0.0, 20.0, 0.0], 1.5) == pytest.approx(15.0)
    assert interpolate_at([2.0], [7.0], 2.0) == 7.0


@pytest.mark.parametrize("at", [0.99, 3.01])
def test_interpolation_refuses_to_extrapolate(at):
    with pytest.raises(ValueError, match="refusing to extrapolate"):
        interpolate_at([3.0, 2.0, 1.0], [0.0, 10.0, 30.0], at)


def test_matched_range():
    assert matched_range([[3.0, 2.0, 1.0], [2.5, 1.5], [4.0, 1.2]]) == (1.5, 2.5)
    with pytest.raises(ValueError, match="share no x value"):
        matched_range([[3.0, 2.0], [1.5, 1.0]])


def test_spearman_by_hand():
    # ranks of x with a tie: 1, 2.5, 2.5, 4; centred products 2.25 + 2.25 over sqrt(4.5 * 5)
    assert spearman_correlation([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman_correlation([1, 5, 9], [0.1, 0.2, 7.0]) == pytest.approx(1.0)
    assert spearman_correlation([1, 5, 9], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        spearman_correlation([1, 2, 3], [4, 4, 4])


@pytest.mark.parametrize(
    ("t", "df", "cdf"),
    # the 95% and 97.5% points of printed t tables, and df = 1 (Cauchy: 1/2 + atan(t)/π)
    [(2.015, 5, 0.95), (1.812, 10, 0.95), (2.776, 4, 0.975), (3.182, 3, 0.975), (12.706, 1, 0.975), (1.0, 1, 0.75)],
)
def test_student_t_cdf_against_tables(t, df, cdf):
    assert student_t_cdf(t, df) == pytest.approx(cdf, abs=2e-4)
    assert student_t_cdf(-t, df) == pytest.approx(1 - cdf, abs=2e-4)


def test_student_t_cdf_two_degrees_in_closed_form():
    for t in np.linspace(-6, 6, 25):
        assert student_t_cdf(float(t), 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert student_t_cdf(0.0, 7) == 0.5
    assert student_t_cdf(math.inf, 3) == 1.0
    with pytest.raises(ValueError, match="positive integer"):
        student_t_cdf(1.0, 0)


def test_prediction_t_test_by_hand():
    draws = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, s = sqrt(2.5)
    result = prediction_t_test(-2.0, draws, alternative="less")
    t = -5.0 / (math.sqrt(2.5) * math.sqrt(1.2))
    assert result.t == pytest.approx(t) and result.degrees_of_freedom == 4 and result.difference == -5.0
    assert result.p_value == pytest.approx(student_t_cdf(t, 4))
    assert result.rank_p_value == pytest.approx(1 / 6)  # below every draw: the smallest rank p five draws allow
    assert prediction_t_test(3.0, draws).p_value == pytest.approx(1.0)
    assert prediction_t_test(4.5, draws, alternative="less").rank_p_value == pytest.approx(5 / 6)
    assert rank_p_value(4.5, draws, "less") == pytest.approx(5 / 6)
    assert rank_p_value(6.0, draws, "greater") == pytest.approx(1 / 6)
    assert rank_p_value(3.0, [3.0, 3.0], "two-sided") == pytest.approx(1.0)  # defined for equal draws


def test_prediction_t_test_rejects_at_nominal_rate_without_effect_and_finds_a_known_one():
    rng = np.random.default_rng(5)
    null = sum(
        prediction_t_test(rng.normal(), rng.normal(size=5), alternative="less").p_value <= 0.05 for _ in range(2000)
    )
    assert 70 <= null <= 130  # 100 expected, binomial sd 9.7
    found = sum(
        prediction_t_test(rng.normal() - 6, rng.normal(size=5), alternative="less").p_value <= 0.05 for _ in range(200)
    )
    assert found >= 180


@pytest.mark.parametrize(
    ("value", "draws", "message"),
    [(0.0, [1.0], "at least two"), (0.0, [1.0, 1.0], "all equal"), (math.nan, [1.0, 2.0], "finite")],
)
def test_prediction_t_test_errors(value, draws, message):
    with pytest.raises(ValueError, match=message):
        prediction_t_test(value, draws)
