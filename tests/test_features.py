import numpy as np
import pandas as pd
import pytest

from features import HousingFeatures, bin_indices, category_codes, psi, reference_profile
from names import CATEGORIES, FEATURES, NUMERIC_FEATURES, TARGET
from tests.conftest import synthetic_housing


def fitted(frame: pd.DataFrame, **args) -> HousingFeatures:
    return HousingFeatures(**args).fit(frame[list(FEATURES)], frame[TARGET].to_numpy())


def test_output_has_one_column_per_feature_name(housing_frame):
    for encoding in ("ordinal", "onehot"):
        features = fitted(housing_frame, neighbours=(4, 16), encoding=encoding)
        matrix = features.transform(housing_frame[list(FEATURES)])
        assert matrix.shape == (len(housing_frame), len(features.get_feature_names_out()))
        assert np.isfinite(matrix).all()


def test_missing_bedrooms_are_imputed_from_rooms(housing_frame):
    features = fitted(housing_frame, neighbours=())
    record = housing_frame[list(FEATURES)].head(1).copy()
    record["total_bedrooms"] = np.nan
    names = list(features.get_feature_names_out())
    row = features.transform(record)[0]
    expected = record["total_rooms"].iloc[0] * features.bedrooms_per_room_
    assert row[names.index("total_bedrooms")] == pytest.approx(expected)
    assert 0.1 < features.bedrooms_per_room_ < 0.3


def test_absent_bedrooms_column_equals_null_bedrooms(housing_frame):
    features = fitted(housing_frame)
    with_null = housing_frame[list(FEATURES)].head(5).assign(total_bedrooms=np.nan)
    without = with_null.drop(columns="total_bedrooms")
    np.testing.assert_array_equal(features.transform(with_null), features.transform(without))


def test_training_rows_never_see_their_own_price(housing_frame):
    """Out-of-fold neighbourhood prices on the training rows differ from the in-sample ones."""
    X, y = housing_frame[list(FEATURES)], housing_frame[TARGET].to_numpy()
    features = HousingFeatures(neighbours=(4,))
    out_of_fold = features.fit_transform(X, y)
    in_sample = features.transform(X)
    column = list(features.get_feature_names_out()).index("knn4_log_price")
    assert not np.allclose(out_of_fold[:, column], in_sample[:, column])
    # In sample, a row is its own nearest neighbour: the distance to the first neighbour would be 0.
    distances = features.tree_.query(np.column_stack([X.longitude * np.cos(np.radians(37)), X.latitude]))[0]
    assert (distances == 0).all()


def test_fast_path_equals_dataframe_path(housing_frame):
    features = fitted(housing_frame)
    X = housing_frame[list(FEATURES)].head(50)
    numeric = X[list(NUMERIC_FEATURES)].to_numpy(dtype=float)
    codes = category_codes(X["ocean_proximity"])
    np.testing.assert_array_equal(features.transform_arrays(numeric, codes), features.transform(X))


def test_category_codes_follow_schema_and_unknown_is_nan():
    codes = category_codes(pd.Series([*CATEGORIES, "ATLANTIS"]))
    assert list(codes[:-1]) == list(range(len(CATEGORIES)))
    assert np.isnan(codes[-1])


def test_neighbourhood_features_need_enough_rows(housing_frame):
    with pytest.raises(ValueError, match="more than 64 training rows"):
        fitted(housing_frame.head(10), neighbours=(4, 64))


def window_fractions(field: dict, values) -> np.ndarray:
    counts = np.bincount(bin_indices(field, np.asarray(values, dtype=float)), minlength=len(field["fractions"]))
    return counts / counts.sum()


def test_reference_profile_covers_every_field_and_the_predictions(housing_frame):
    profile = reference_profile(housing_frame[list(FEATURES)], housing_frame[TARGET].to_numpy())
    assert set(profile["fields"]) == set(FEATURES)
    for field in [*profile["fields"].values(), profile["prediction"]]:
        assert sum(field["fractions"]) == pytest.approx(1.0)
    assert profile["fields"]["total_bedrooms"]["fractions"][-1] > 0  # missing values have their own bin


def test_psi_is_low_in_distribution_and_high_after_a_shift():
    train, recent = synthetic_housing(5000, seed=0), synthetic_housing(1000, seed=1)
    profile = reference_profile(train[list(FEATURES)], train[TARGET].to_numpy())
    income = profile["fields"]["median_income"]
    assert psi(income["fractions"], window_fractions(income, recent.median_income)) < 0.1
    assert psi(income["fractions"], window_fractions(income, recent.median_income * 2)) > 0.25
    age = profile["fields"]["housing_median_age"]
    assert psi(age["fractions"], window_fractions(age, recent.housing_median_age)) < 0.1
