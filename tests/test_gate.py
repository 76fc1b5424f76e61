import pytest

from scripts.register import decide

GATE = {"max_rmse": 60_000, "min_r2": 0.7, "tolerance": 0.01}


def metrics(rmse: float, r2: float = 0.85) -> dict[str, float]:
    return {"rmse": rmse, "mae": rmse * 0.7, "r2": r2}


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "reason"),
    [
        (metrics(45_000), None, True, "no champion yet"),
        (metrics(61_000), None, False, "holdout RMSE 61,000 is above the bar of 60,000"),
        (metrics(45_000, r2=0.6), None, False, "holdout R2 0.6000 is below the bar of 0.7000"),
        (metrics(61_000), metrics(70_000), False, "above the bar"),  # better than a bad champion is not enough
        (metrics(44_000), metrics(45_000), True, "44,000 <= champion's 45,000"),
        (metrics(45_000), metrics(45_000), True, "<= champion's"),
        (metrics(45_400), metrics(45_000), True, "tolerance 1.0%"),  # within tolerance
        (metrics(45_500), metrics(45_000), False, "worse than the champion's 45,000 on the same rows"),
    ],
)
def test_gate(challenger, champion, promote, reason):
    decision, why = decide(challenger, champion, GATE)
    assert decision is promote
    assert reason in why
