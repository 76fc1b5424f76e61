import numpy as np

from scripts.split import holdout_mask
from tests.conftest import synthetic_housing


def test_holdout_fraction_is_close_to_requested():
    frame = synthetic_housing(5000)
    assert abs(holdout_mask(frame, 0.2, seed=42).mean() - 0.2) < 0.02


def test_rows_keep_their_side_when_data_grows_or_is_reordered():
    frame = synthetic_housing(3000)
    before = holdout_mask(frame.head(2000), 0.2, seed=42)
    after = holdout_mask(frame, 0.2, seed=42)
    np.testing.assert_array_equal(before, after[:2000])
    shuffled = frame.sample(frac=1.0, random_state=1)
    np.testing.assert_array_equal(holdout_mask(shuffled, 0.2, seed=42), after[shuffled.index])


def test_seed_changes_the_split():
    frame = synthetic_housing(2000)
    assert (holdout_mask(frame, 0.2, seed=1) != holdout_mask(frame, 0.2, seed=2)).any()
