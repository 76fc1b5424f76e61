"""A HistGradientBoostingRegressor's trees, flattened into arrays: the fast path for small batches."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import Pipeline

from features import CATEGORIES, FloatArray

log = logging.getLogger("housing.serve")

# Where FlatTrees and sklearn's predict() cross for the 1,400-tree champion, with one OpenMP thread as serving runs
# it (measured 2026-12-03, best of 7, FlatTrees vs sklearn: 96 rows 18.6 vs 22.7 ms, 128 rows 26.0 vs 25.4 ms,
# 256 rows 70 vs 33 ms). Above it sklearn's predict() wins.
FLAT_TREES_MAX_ROWS = 128


class FlatTrees:
    """A HistGradientBoostingRegressor's trees as flat arrays, walked all at once, one tree level per numpy step.

    For a few rows, sklearn's predict() is nearly all fixed cost: input checks, then a Python call per tree (~14 ms
    for one row through the champion's 1,400 trees); walking all trees together takes ~0.15 ms. Beyond
    FLAT_TREES_MAX_ROWS rows sklearn is the faster one. This reads sklearn's private tree arrays, so `flatten` only
    returns one that reproduces predict() bit for bit on probe rows. Input: rows without NaN; if some split is
    categorical, column 0 holds the category code, as features.HousingFeatures makes it for the ordinal encoding.
    """

    def __init__(self, model: HistGradientBoostingRegressor) -> None:
        trees = [tree for (tree,) in model._predictors]
        nodes = np.concatenate([tree.nodes for tree in trees])
        sizes = [len(tree.nodes) for tree in trees]
        self.roots = np.cumsum([0, *sizes[:-1]])
        root_of_node = np.repeat(self.roots, sizes)
        itself = np.arange(len(nodes))
        leaf = nodes["is_leaf"].astype(bool)
        # Node i's children are at 2i (left) and 2i + 1 (right). A leaf is its own child, so after `depth` steps
        # every walk rests on its leaf.
        self.children = np.column_stack([np.where(leaf, itself, nodes["left"] + root_of_node),
                                         np.where(leaf, itself, nodes["right"] + root_of_node)]).ravel()
        self.feature = nodes["feature_idx"].astype(np.intp)
        self.threshold = nodes["num_threshold"].copy()
        # A categorical split becomes a numeric one on an extra column, which predict() fills with 1.0 where the
        # row's category goes right.
        categorical = np.flatnonzero(nodes["is_categorical"])
        self.category_goes_right = _category_goes_right(model, trees, nodes, categorical).astype(float)
        self.feature[categorical] = model.n_features_in_ + np.arange(len(categorical))
        self.threshold[categorical] = 0.5
        self.value = nodes["value"]
        self.depth = int(nodes["depth"].max())
        self.baseline = float(model._baseline_prediction.item())

    def predict(self, X: FloatArray) -> FloatArray:
        if len(self.category_goes_right):
            X = np.concatenate([X, self.category_goes_right[:, X[:, 0].astype(np.intp)].T], axis=1)
        values = X.ravel()
        row_starts = (np.arange(len(X)) * X.shape[1])[:, None]
        node = np.broadcast_to(self.roots, (len(X), len(self.roots)))
        for _ in range(self.depth):
            node = self.children[2 * node + (values[row_starts + self.feature[node]] > self.threshold[node])]
        # Added tree by tree onto the baseline, in sklearn's order, so that the floats come out identical.
        leaves = np.column_stack([np.full(len(X), self.baseline), self.value[node]])
        return np.cumsum(leaves, axis=1)[:, -1]


def _category_goes_right(model: HistGradientBoostingRegressor, trees: list[Any], nodes: npt.NDArray[Any],
                         categorical: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Whether a row goes right at each categorical split, by category code: shape (splits, categories)."""
    goes_right = np.zeros((len(categorical), len(CATEGORIES)), dtype=bool)
    if not categorical.size:
        return goes_right
    if list(np.flatnonzero(model.is_categorical_)) != [0]:
        raise ValueError("only column 0 may be categorical")
    seen = model._preprocessor.named_transformers_["encoder"].categories_[0]  # codes seen in training, sorted
    known, _ = model._bin_mapper.make_known_categories_bitsets()
    bitset_counts = [len(tree.raw_left_cat_bitsets) for tree in trees]
    first_bitset = np.repeat(np.cumsum([0, *bitset_counts[:-1]]), [len(tree.nodes) for tree in trees])
    left_sets = np.concatenate([tree.raw_left_cat_bitsets for tree in trees])
    left_sets = left_sets[(nodes["bitset_idx"] + first_bitset)[categorical]]
    missing_right = ~nodes["missing_go_to_left"][categorical].astype(bool)
    for code in range(len(CATEGORIES)):
        bins = np.flatnonzero(seen == code)
        if not bins.size:  # a category unseen in training goes where missing values go
            goes_right[:, code] = missing_right
            continue
        word, bit = divmod(int(bins[0]), 32)
        in_left = (left_sets[:, word] >> bit) & 1 == 1
        is_known = (known[0, word] >> bit) & 1 == 1
        goes_right[:, code] = ~in_left & (is_known | missing_right)
    return goes_right


def flatten(pipeline: Pipeline) -> FlatTrees | None:
    """FlatTrees for a pipeline that ends in one HistGradientBoostingRegressor, if they predict exactly alike."""
    tail = pipeline[1:]
    if len(tail) != 1 or not isinstance(tail[0], HistGradientBoostingRegressor):
        return None
    try:
        trees = FlatTrees(tail[0])
        probes = pipeline.steps[0][1].transform_arrays(*probe_arrays())
        exact = np.array_equal(trees.predict(probes), tail.predict(probes))
    except Exception:  # an optional speed-up: whatever fails, predict() still serves
        log.exception("serving with sklearn's predict(): cannot flatten the trees")
        return None
    if not exact:
        log.warning("serving with sklearn's predict(): flattened trees disagree with it on probe rows")
        return None
    return trees


def probe_arrays(rows: int = 500) -> tuple[FloatArray, FloatArray]:
    """Random districts across California: every category, some without total_bedrooms."""
    rng = np.random.default_rng(0)
    households = rng.uniform(1, 5000, rows)
    rooms = households * rng.uniform(1, 10, rows)
    bedrooms = np.where(rng.random(rows) < 0.1, np.nan, rooms * rng.uniform(0.1, 0.4, rows))
    numeric = np.column_stack([rng.uniform(-124.4, -114.3, rows), rng.uniform(32.5, 42.0, rows),
                               rng.integers(1, 53, rows), rooms, bedrooms, households * rng.uniform(1, 5, rows),
                               households, rng.uniform(0.5, 15, rows)])
    return numeric, rng.integers(0, len(CATEGORIES), rows).astype(float)
