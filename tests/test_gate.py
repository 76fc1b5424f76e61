"""The promotion gate (scripts/register.decide) as a specification: which scores promote, and why not."""

import numpy as np
import pytest

from scripts.register import Scores, Verdict, decide, prediction_shift

GATE = {"max_rmse": 60_000, "min_r2": 0.7, "min_improvement": 0.0,
        "reference": {"max_rmse_increase": 0.0, "max_prediction_shift": 0.15}}
PRICES = np.array([100_000.0, 200_000.0, 300_000.0, 400_000.0])


def scores(holdout: float, reference: float | None = None, r2: float = 0.85,
           predictions: np.ndarray = PRICES) -> Scores:
    def metrics(rmse: float) -> dict[str, float]:
        return {"rmse": rmse, "mae": rmse * 0.7, "r2": r2}

    return Scores(metrics(holdout), metrics(holdout if reference is None else reference), predictions)


def verdict(challenger: Scores, champion: Scores | None, **gate: object) -> Verdict:
    return decide(challenger, champion, {**GATE, **gate})


def test_a_first_challenger_that_clears_the_bars_becomes_champion():
    assert verdict(scores(45_000), None) == Verdict(True, "first_champion", verdict(scores(45_000), None).reason)


@pytest.mark.parametrize(
    ("challenger", "check", "reason"),
    [
        (scores(61_000), "holdout_bar", "holdout RMSE 61,000 is above the bar of 60,000"),
        (scores(45_000, r2=0.6), "holdout_bar", "holdout R2 0.6000 is below the bar of 0.7000"),
        (scores(45_000, reference=90_000), "reference_bar", "reference RMSE 90,000 is above the bar of 60,000"),
    ],
)
def test_a_first_challenger_must_clear_the_bars_on_the_holdout_and_on_the_reference_set(challenger, check, reason):
    result = verdict(challenger, None)
    assert (result.passed, result.check) == (False, check)
    assert reason in result.reason


def test_being_better_than_a_bad_champion_is_not_enough():
    assert verdict(scores(61_000), scores(70_000)).check == "holdout_bar"


def test_a_strictly_better_challenger_is_promoted():
    result = verdict(scores(44_000), scores(45_000))
    assert (result.passed, result.check) == (True, "better")
    assert "holdout RMSE 44,000 < champion's 45,000" in result.reason


def test_an_equal_challenger_is_rejected_as_not_better():
    result = verdict(scores(45_000), scores(45_000))
    assert (result.passed, result.check) == (False, "not_better")
    assert result.reason.startswith("not better: holdout RMSE 45,000 is not below the champion's 45,000")


def test_a_worse_challenger_is_rejected_as_not_better():
    assert verdict(scores(45_500, reference=40_000), scores(45_000, reference=40_000)).check == "not_better"


def test_min_improvement_demands_a_margin():
    champion = scores(45_000, reference=40_000)
    assert not verdict(scores(44_800, reference=40_000), champion, min_improvement=0.01).passed  # 0.4% < 1%
    assert verdict(scores(44_000, reference=40_000), champion, min_improvement=0.01).passed


def test_a_challenger_worse_on_the_reference_set_is_rejected_however_good_its_own_holdout():
    # Wrong labels in the upload: the challenger wins on the upload's holdout and loses on the trusted rows.
    result = verdict(scores(20_000, reference=50_000), scores(45_000, reference=40_000))
    assert (result.passed, result.check) == (False, "reference_rmse")
    assert result.reason.startswith("reference set: RMSE 50,000 is worse than the champion's 40,000")
    assert "make promote VERSION=n" in result.reason


def test_predictions_that_move_too_far_from_the_champions_are_rejected():
    moved = scores(40_000, reference=39_000, predictions=PRICES * 1.3)
    result = verdict(moved, scores(45_000, reference=40_000))
    assert (result.passed, result.check) == (False, "prediction_shift")
    assert "predictions moved 30.0% (median)" in result.reason and "limit of 15.0%" in result.reason
    assert verdict(moved, scores(45_000, reference=40_000), reference={**GATE["reference"],
                                                                        "max_prediction_shift": 0.5}).passed


def test_prediction_shift_is_the_median_absolute_relative_change():
    champion = np.array([100.0, 200.0, 400.0])
    assert prediction_shift(np.array([110.0, 180.0, 400.0]), champion) == pytest.approx(0.1)
    assert prediction_shift(champion * 0.5, champion) == pytest.approx(0.5)
