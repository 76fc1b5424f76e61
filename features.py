"""What training and serving must agree on: the input schema and the feature engineering.

`HousingFeatures` turns raw records (exactly the fields `/predict` receives) into the model's feature
matrix. It is the first step of every logged pipeline, so a registered model accepts raw records and
the serving app never re-implements a transformation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import KFold

from names import CATEGORICAL_FEATURE, CATEGORIES, FEATURES, NUMERIC_FEATURES

FloatArray = npt.NDArray[np.float64]  # records as the model takes them: NUMERIC_FEATURES, category codes, predictions

_CATEGORY_INDEX = pd.Index(CATEGORIES)
_LON, _LAT, _AGE, _ROOMS, _BEDROOMS, _POPULATION, _HOUSEHOLDS, _INCOME = range(len(NUMERIC_FEATURES))

# Degrees of longitude are shorter than degrees of latitude at California's latitudes.
_LON_SCALE = float(np.cos(np.radians(37.0)))
_CITIES = {
    "los_angeles": (-118.24, 34.05),
    "san_francisco": (-122.42, 37.77),
    "san_diego": (-117.16, 32.72),
    "san_jose": (-121.89, 37.34),
    "sacramento": (-121.49, 38.58),
}
_ROTATIONS_DEG = (15, 30, 45, 60)


def category_codes(values: pd.Series | np.ndarray) -> np.ndarray:
    """Index of each value in CATEGORIES as float, NaN for anything unknown."""
    codes = _CATEGORY_INDEX.get_indexer(np.asarray(values, dtype=object))
    return np.where(codes >= 0, codes, np.nan)


class HousingFeatures(TransformerMixin, BaseEstimator):
    """Raw housing records -> engineered feature matrix.

    Adds per-household ratios, rotated coordinates, distances to the big cities, and neighbourhood
    statistics from the training rows nearest to each district (mean log price, spread, mean income,
    distance to the k-th neighbour). On the training rows the neighbourhood price statistics are
    computed out-of-fold, so a row never sees its own target.

    `encoding="ordinal"` puts the ocean_proximity code in column 0 (for models with native categorical
    support); `"onehot"` appends one indicator column per category (for linear models).
    """

    def __init__(self, neighbours: tuple[int, ...] = (4, 16, 64), folds: int = 10,
                 encoding: str = "ordinal", random_state: int = 0):
        self.neighbours = neighbours
        self.folds = folds
        self.encoding = encoding
        self.random_state = random_state

    def fit(self, X: pd.DataFrame, y: np.ndarray | None = None) -> HousingFeatures:
        numeric, _ = self._split(X)
        rooms, bedrooms = numeric[:, _ROOMS], numeric[:, _BEDROOMS]
        known = ~np.isnan(bedrooms) & (rooms > 0)
        self.bedrooms_per_room_ = float(np.median(bedrooms[known] / rooms[known])) if known.any() else 0.2
        if self.neighbours:
            if y is None:
                raise ValueError("HousingFeatures needs the target to build neighbourhood features")
            if len(numeric) <= max(self.neighbours):
                raise ValueError(f"need more than {max(self.neighbours)} training rows for the "
                                 f"neighbourhood features, got {len(numeric)}")
            self.tree_ = cKDTree(_coordinates(numeric))
            self.log_target_ = np.log(np.asarray(y, dtype=float))
            self.income_ = numeric[:, _INCOME].copy()
        self.feature_names_ = self._feature_names()
        self.n_features_in_ = len(FEATURES)
        return self

    def fit_transform(self, X: pd.DataFrame, y: np.ndarray | None = None, **fit_params: Any) -> np.ndarray:
        self.fit(X, y)
        numeric, codes = self._split(X)
        if not self.neighbours:
            return self._assemble(numeric, codes, None)
        log_target = self.log_target_
        neighbourhood = np.empty((len(numeric), 4 * len(self.neighbours)))
        folds = KFold(self.folds, shuffle=True, random_state=self.random_state)
        for fit_rows, out_rows in folds.split(numeric):
            tree = cKDTree(_coordinates(numeric[fit_rows]))
            neighbourhood[out_rows] = _neighbourhood(
                tree, log_target[fit_rows], numeric[fit_rows, _INCOME], numeric[out_rows], self.neighbours)
        return self._assemble(numeric, codes, neighbourhood)

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        return self.transform_arrays(*self._split(X))

    def transform_arrays(self, numeric: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Fast path for callers that already hold NUMERIC_FEATURES as floats and category codes."""
        neighbourhood = None
        if self.neighbours:
            neighbourhood = _neighbourhood(self.tree_, self.log_target_, self.income_, numeric, self.neighbours)
        return self._assemble(numeric, codes, neighbourhood)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(self.feature_names_, dtype=object)

    @staticmethod
    def _split(X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        numeric = X.reindex(columns=list(NUMERIC_FEATURES)).to_numpy(dtype=float, na_value=np.nan)
        return numeric, category_codes(X[CATEGORICAL_FEATURE])

    def _assemble(self, numeric: np.ndarray, codes: np.ndarray, neighbourhood: np.ndarray | None) -> np.ndarray:
        numeric = numeric.copy()
        bedrooms = numeric[:, _BEDROOMS]
        missing = np.isnan(bedrooms)
        bedrooms[missing] = numeric[missing, _ROOMS] * self.bedrooms_per_room_
        households = np.maximum(numeric[:, _HOUSEHOLDS], 1.0)
        lon, lat = numeric[:, _LON], numeric[:, _LAT]
        columns = [
            numeric,
            (numeric[:, _ROOMS] / households)[:, None],
            (bedrooms / np.maximum(numeric[:, _ROOMS], 1.0))[:, None],
            (numeric[:, _POPULATION] / households)[:, None],
            np.column_stack([lon * np.cos(np.radians(a)) + lat * np.sin(np.radians(a)) for a in _ROTATIONS_DEG]),
            np.column_stack([np.hypot((lon - c_lon) * _LON_SCALE, lat - c_lat) for c_lon, c_lat in _CITIES.values()]),
        ]
        if neighbourhood is not None:
            columns.append(neighbourhood)
        if self.encoding == "onehot":
            columns.append(codes[:, None] == np.arange(len(CATEGORIES))[None, :])
        else:
            columns.insert(0, codes[:, None])
        return np.column_stack(columns).astype(float)

    def _feature_names(self) -> list[str]:
        names = [
            *NUMERIC_FEATURES, "rooms_per_household", "bedrooms_per_room", "population_per_household",
            *(f"rotated_{a}" for a in _ROTATIONS_DEG), *(f"distance_{city}" for city in _CITIES),
        ]
        for k in self.neighbours:
            names += [f"knn{k}_log_price", f"knn{k}_log_price_std", f"knn{k}_income", f"knn{k}_distance"]
        if self.encoding == "onehot":
            return names + [f"{CATEGORICAL_FEATURE}={c}" for c in CATEGORIES]
        return [CATEGORICAL_FEATURE, *names]


def _coordinates(numeric: np.ndarray) -> np.ndarray:
    return np.column_stack([numeric[:, _LON] * _LON_SCALE, numeric[:, _LAT]])


def _neighbourhood(tree: cKDTree, log_target: np.ndarray, income: np.ndarray, numeric: np.ndarray,
                   neighbours: tuple[int, ...]) -> np.ndarray:
    distance, index = tree.query(_coordinates(numeric), k=list(range(1, max(neighbours) + 1)))
    columns = []
    for k in neighbours:
        prices = log_target[index[:, :k]]
        columns += [prices.mean(axis=1), prices.std(axis=1), income[index[:, :k]].mean(axis=1), distance[:, k - 1]]
    return np.column_stack(columns)


# Drift: the serving app compares recent inputs and predictions with the training data through the
# Population Stability Index over bins fixed at training time (deciles of each numeric field, one bin per
# category, missing values in a bin of their own).
PROFILE_BINS = 10
PROFILE_FILE = "reference_profile.json"  # stored with every model, in MLflow's extra_files/
PSI_FLOOR = 1e-4  # empty bins would make the log-ratio infinite


class NumericProfile(TypedDict):
    edges: list[float]
    fractions: list[float]  # one per bin (len(edges) + 1), then one for missing values


class CategoryProfile(TypedDict):
    categories: list[str]
    fractions: list[float]  # one per category, then one for unknown categories


class ReferenceProfile(TypedDict):
    fields: dict[str, Any]  # a NumericProfile for each of NUMERIC_FEATURES, a CategoryProfile for CATEGORICAL_FEATURE
    prediction: NumericProfile
    rows: int


def _numeric_profile(values: np.ndarray) -> NumericProfile:
    present = values[~np.isnan(values)]
    edges: list[float] = np.unique(np.quantile(present, np.linspace(0, 1, PROFILE_BINS + 1)[1:-1])).tolist()
    bins = bin_indices({"edges": edges}, values)
    return {"edges": edges, "fractions": (np.bincount(bins, minlength=len(edges) + 2) / len(values)).tolist()}


def reference_profile(X: pd.DataFrame, predictions: np.ndarray) -> ReferenceProfile:
    """Bins and their training-time frequencies for every input field and for the predictions."""
    numeric = X.reindex(columns=list(NUMERIC_FEATURES)).to_numpy(dtype=float, na_value=np.nan)
    fields: dict[str, Any] = {name: _numeric_profile(numeric[:, i]) for i, name in enumerate(NUMERIC_FEATURES)}
    codes = category_codes(X[CATEGORICAL_FEATURE])
    fields[CATEGORICAL_FEATURE] = CategoryProfile(categories=list(CATEGORIES), fractions=(
        np.bincount(np.where(np.isnan(codes), len(CATEGORIES), codes).astype(int), minlength=len(CATEGORIES) + 1)
        / len(codes)).tolist())
    return {"fields": fields, "prediction": _numeric_profile(np.asarray(predictions, dtype=float)), "rows": len(X)}


def bin_indices(profile: Mapping[str, Any], values: np.ndarray) -> np.ndarray:
    """Bin of each value: 0..len(edges) by the edges; len(edges) + 1 for missing values."""
    values = np.asarray(values, dtype=float)
    return np.where(np.isnan(values), len(profile["edges"]) + 1, np.searchsorted(profile["edges"], values, "right"))


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """Population Stability Index of observed bin fractions against expected ones (0 = same distribution)."""
    expected = np.maximum(np.asarray(expected, dtype=float), PSI_FLOOR)
    observed = np.maximum(np.asarray(observed, dtype=float), PSI_FLOOR)
    return float(np.sum((observed - expected) * np.log(observed / expected)))
