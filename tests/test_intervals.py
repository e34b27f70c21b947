"""Interval maths, checked against values computed independently (closed form by hand, and a brute-force search)."""

from __future__ import annotations

import math

import pytest

from ssah_peft.evaluate import format_rate, mean_sd, wilson_interval


def brute_force_wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The rates p whose score test |p̂ - p| <= z·sqrt(p(1-p)/n) accepts, found on a fine grid (independent of the
    closed form)."""
    rate = successes / n
    accepted = [
        p / 200000 for p in range(200001) if abs(rate - p / 200000) <= z * math.sqrt(p / 200000 * (1 - p / 200000) / n)
    ]
    return min(accepted), max(accepted)


@pytest.mark.parametrize("successes,n", [(0, 36), (1, 36), (18, 36), (35, 36), (36, 36), (3, 10), (90, 108)])
def test_wilson_matches_the_score_test_it_inverts(successes: int, n: int) -> None:
    low, high = wilson_interval(successes, n)
    expected_low, expected_high = brute_force_wilson(successes, n)
    assert low == pytest.approx(expected_low, abs=2e-5)
    assert high == pytest.approx(expected_high, abs=2e-5)
    assert 0.0 <= low <= successes / n <= high <= 1.0


def test_wilson_known_values_and_edges() -> None:
    # 9 of 36 (ASR 0.25), worked by hand from the closed form with z = 1.959964
    low, high = wilson_interval(9, 36)
    assert (round(low, 4), round(high, 4)) == (0.1375, 0.4107)
    assert wilson_interval(0, 36)[0] == 0.0 and wilson_interval(36, 36)[1] == 1.0
    wider = wilson_interval(9, 36, confidence=0.99)
    assert wider[0] < low and wider[1] > high
    assert format_rate(9, 36) == "0.250 [0.138, 0.411]"


@pytest.mark.parametrize(
    "successes,n,error", [(5, 0, ValueError), (7, 6, ValueError), (-1, 6, ValueError), (1.5, 6, TypeError)]
)
def test_wilson_rejects_impossible_counts(successes, n, error) -> None:
    with pytest.raises(error):
        wilson_interval(successes, n)


def test_mean_sd_uses_the_sample_sd() -> None:
    mean, sd = mean_sd([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and sd == pytest.approx(0.1)
    assert mean_sd([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])
