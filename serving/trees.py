"""The served model compiled with Numba: features.HousingFeatures' arithmetic and a HistGradientBoostingRegressor's
trees, one walk for every batch size, checked against the pipeline before it serves.

Why Numba: measured against the same walk in C, ONNX Runtime's TreeEnsemble, treelite's GTIL and scikit-learn on the
champion (docs/results.md, "The compiled predictor"), Numba and C are the fastest and alike, and both reproduce
predict() bit for bit; Numba needs no compiler where the image is built and no second build of the code, at the
price of llvmlite in the image. ONNX Runtime is slower and off in the last bits (it sums in its own order); GTIL is
several times slower.

Exactness. The walk adds the trees' values onto the baseline in scikit-learn's order, so predictions come out
bit-identical; features are computed with numpy's own operations in numpy's order (sums pairwise, as numpy sums
along a row), and the neighbours come from the fitted cKDTree itself, so ties are broken as in training.
`compile_pipeline` returns a CompiledModel only if it reproduces the pipeline on probe rows, else None and a
warning; serving/model.py then falls back to scikit-learn and says so.

No JIT pause. The functions are compiled with explicit signatures when this module is imported, before any model
is loaded, and cached on disk (`cache=True`: next to this file, or in NUMBA_CACHE_DIR, which the image fills when
it is built), so a worker imports them in milliseconds and the first request runs compiled code.
"""

from __future__ import annotations

import logging
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import float64, int32, int64, njit, uint32, uint64, void
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import Pipeline

import features
from features import FloatArray, HousingFeatures
from names import CATEGORIES

log = logging.getLogger("housing.serve")

# One node in 16 bytes, in depth-first order: the left child follows its parent, so a node holds only its right
# child's index. A tree of the champion (37 nodes) fits in ten cache lines. A leaf keeps its value in `value`; a
# categorical split keeps there the set of category codes that go right, as bits.
NODE = np.dtype([("value", "<f8"), ("right", "<i4"), ("feature", "<i2"), ("kind", "<u2")], align=True)
LEAF, MISSING_GOES_LEFT, CATEGORICAL = 1, 2, 4
LOCKSTEP_SHARE = 0.9  # _walk's lanes step together as deep as this share of training samples reach in a tree
LANES = 12  # rows _walk takes through a tree at once, written out there (faster than 8, as fast as 16)
BLOCK_ROWS = 8 * LANES  # rows _walk takes through every tree before the next: 96 rows of ~50 columns, 38 KB
MAX_DIFFERENCE = 1e-6  # |compiled - pipeline| allowed on the probe rows, in USD; the walk aims for 0

# The compiled functions' argument types: C-contiguous arrays, as the methods of CompiledModel pass them.
_NODES = numba.from_dtype(NODE)[::1]
_ROWS = float64[:, ::1]
_VECTOR = float64[::1]
_INDICES = int64[:, ::1]


@njit(float64(_NODES, int32[::1], float64, _ROWS, int64), nogil=True, cache=True)
def _walk_branches(nodes: Any, roots: Any, baseline: float, rows: Any, r: int) -> float:  # pragma: no cover
    """One row through every tree, following its branches: for a row with a missing value (NaN) in a column the
    trees read, which this walk sends where scikit-learn does (missing values go left or right by node)."""
    total = baseline
    for t in range(roots.shape[0]):
        i = roots[t]
        while True:
            node = nodes[i]
            kind = node.kind
            if kind & LEAF:
                total += node.value  # tree after tree, in scikit-learn's order: the same float sums
                break
            x = rows[r, node.feature]
            if np.isnan(x):
                right = (kind & MISSING_GOES_LEFT) == 0
            elif kind & CATEGORICAL:  # x is a category code; the bits are the codes that go right
                right = 0 <= x < 64 and (np.int64(node.value) >> np.int64(x)) & 1 == 1
            else:
                right = x > node.value  # predict()'s `x <= threshold` goes left
            i = node.right if right else i + 1
    return total


@njit(uint64(_VECTOR, uint32[::1], uint32[::1], _ROWS, int64, uint64), nogil=True, cache=True, inline="always")
def _step(thresholds: Any, columns: Any, children: Any, rows: Any, r: int, i: Any) -> Any:  # pragma: no cover
    """A node's child on row r's way: right where the row's value is above the threshold, without a branch."""
    return np.uint64(children[np.uint64(2) * i + np.uint64(rows[r, columns[i]] > thresholds[i])])


@njit(float64(int32[::1], float64, _VECTOR, uint32[::1], uint32[::1], _VECTOR, uint32[::1], _ROWS, int64),
      nogil=True, cache=True)
def _walk_row(roots: Any, baseline: float, thresholds: Any, columns: Any, children: Any, leaf_values: Any,
              group_depths: Any, rows: Any, r: int) -> float:  # pragma: no cover  # compiled
    """One row (without NaN) through every tree, LANES trees at once in lockstep, as _walk takes LANES rows through
    one tree: for a single record, and the rows left over after _walk's last full group of lanes. The leaf values
    are added tree after tree, in scikit-learn's order."""
    total = baseline
    count = roots.shape[0]
    full = count - count % LANES
    for t in range(0, full, LANES):
        i0, i1, i2, i3 = np.uint64(roots[t]), np.uint64(roots[t + 1]), np.uint64(roots[t + 2]), np.uint64(
            roots[t + 3])
        i4, i5, i6, i7 = np.uint64(roots[t + 4]), np.uint64(roots[t + 5]), np.uint64(roots[t + 6]), np.uint64(
            roots[t + 7])
        i8, i9, i10, i11 = np.uint64(roots[t + 8]), np.uint64(roots[t + 9]), np.uint64(roots[t + 10]), np.uint64(
            roots[t + 11])
        for _ in range(group_depths[t // LANES]):
            i0 = _step(thresholds, columns, children, rows, r, i0)
            i1 = _step(thresholds, columns, children, rows, r, i1)
            i2 = _step(thresholds, columns, children, rows, r, i2)
            i3 = _step(thresholds, columns, children, rows, r, i3)
            i4 = _step(thresholds, columns, children, rows, r, i4)
            i5 = _step(thresholds, columns, children, rows, r, i5)
            i6 = _step(thresholds, columns, children, rows, r, i6)
            i7 = _step(thresholds, columns, children, rows, r, i7)
            i8 = _step(thresholds, columns, children, rows, r, i8)
            i9 = _step(thresholds, columns, children, rows, r, i9)
            i10 = _step(thresholds, columns, children, rows, r, i10)
            i11 = _step(thresholds, columns, children, rows, r, i11)
        # The few trees whose leaf is deeper (a leaf is its own left child) go on one by one.
        while children[np.uint64(2) * i0] != i0:
            i0 = _step(thresholds, columns, children, rows, r, i0)
        while children[np.uint64(2) * i1] != i1:
            i1 = _step(thresholds, columns, children, rows, r, i1)
        while children[np.uint64(2) * i2] != i2:
            i2 = _step(thresholds, columns, children, rows, r, i2)
        while children[np.uint64(2) * i3] != i3:
            i3 = _step(thresholds, columns, children, rows, r, i3)
        while children[np.uint64(2) * i4] != i4:
            i4 = _step(thresholds, columns, children, rows, r, i4)
        while children[np.uint64(2) * i5] != i5:
            i5 = _step(thresholds, columns, children, rows, r, i5)
        while children[np.uint64(2) * i6] != i6:
            i6 = _step(thresholds, columns, children, rows, r, i6)
        while children[np.uint64(2) * i7] != i7:
            i7 = _step(thresholds, columns, children, rows, r, i7)
        while children[np.uint64(2) * i8] != i8:
            i8 = _step(thresholds, columns, children, rows, r, i8)
        while children[np.uint64(2) * i9] != i9:
            i9 = _step(thresholds, columns, children, rows, r, i9)
        while children[np.uint64(2) * i10] != i10:
            i10 = _step(thresholds, columns, children, rows, r, i10)
        while children[np.uint64(2) * i11] != i11:
            i11 = _step(thresholds, columns, children, rows, r, i11)
        total += leaf_values[i0]
        total += leaf_values[i1]
        total += leaf_values[i2]
        total += leaf_values[i3]
        total += leaf_values[i4]
        total += leaf_values[i5]
        total += leaf_values[i6]
        total += leaf_values[i7]
        total += leaf_values[i8]
        total += leaf_values[i9]
        total += leaf_values[i10]
        total += leaf_values[i11]
    for t in range(full, count):
        i = np.uint64(roots[t])
        while children[np.uint64(2) * i] != i:
            i = _step(thresholds, columns, children, rows, r, i)
        total += leaf_values[i]
    return total


@njit(void(_NODES, int32[::1], float64, _VECTOR, uint32[::1], uint32[::1], _VECTOR, uint32[::1], uint32[::1],
           uint32[::1], _ROWS, _VECTOR), nogil=True, cache=True)
def _walk(nodes: Any, roots: Any, baseline: float, thresholds: Any, columns: Any, children: Any, leaf_values: Any,
          depths: Any, group_depths: Any, columns_read: Any, rows: Any, out: Any) -> None:  # pragma: no cover
    """Every row through every tree, tree by tree over blocks of BLOCK_ROWS rows (a block stays in the cache while
    every tree passes it), LANES rows at once in lockstep. The lanes take the tree's lockstep depth in steps together,
    each step without a branch: `children[2 * i + (x > threshold)]` (a leaf is its own two children), so no
    mispredicted branch stalls the walk and the lanes' loads overlap; the few lanes deeper than that (one in ten
    training samples) then finish one by one. The rows left over after a block's last full group of lanes go
    through _walk_row, and rows with NaN in a column the trees read through _walk_branches. Either way a row's sum
    is the baseline plus its trees' leaf values in scikit-learn's order: bit-identical to predict().

    `rows` holds the model's feature columns, then one 0/1 column per kind of categorical split (whether the row's
    category goes right), which the steps compare with 0.5. Releases the GIL, so serving/app.py's threads walk
    chunks of a large batch in parallel."""
    count = rows.shape[0]
    for start in range(0, count, BLOCK_ROWS):
        end = min(count, start + BLOCK_ROWS)
        full = end - (end - start) % LANES
        for r in range(start, full):
            out[r] = baseline
        for t in range(roots.shape[0]):
            root = np.uint64(roots[t])
            depth = depths[t]
            for g in range(start, full, LANES):
                i0 = i1 = i2 = i3 = i4 = i5 = i6 = i7 = i8 = i9 = i10 = i11 = root
                for _ in range(depth):
                    c0 = np.uint64(rows[g + 0, columns[i0]] > thresholds[i0])
                    c1 = np.uint64(rows[g + 1, columns[i1]] > thresholds[i1])
                    c2 = np.uint64(rows[g + 2, columns[i2]] > thresholds[i2])
                    c3 = np.uint64(rows[g + 3, columns[i3]] > thresholds[i3])
                    c4 = np.uint64(rows[g + 4, columns[i4]] > thresholds[i4])
                    c5 = np.uint64(rows[g + 5, columns[i5]] > thresholds[i5])
                    c6 = np.uint64(rows[g + 6, columns[i6]] > thresholds[i6])
                    c7 = np.uint64(rows[g + 7, columns[i7]] > thresholds[i7])
                    c8 = np.uint64(rows[g + 8, columns[i8]] > thresholds[i8])
                    c9 = np.uint64(rows[g + 9, columns[i9]] > thresholds[i9])
                    c10 = np.uint64(rows[g + 10, columns[i10]] > thresholds[i10])
                    c11 = np.uint64(rows[g + 11, columns[i11]] > thresholds[i11])
                    i0 = np.uint64(children[np.uint64(2) * i0 + c0])
                    i1 = np.uint64(children[np.uint64(2) * i1 + c1])
                    i2 = np.uint64(children[np.uint64(2) * i2 + c2])
                    i3 = np.uint64(children[np.uint64(2) * i3 + c3])
                    i4 = np.uint64(children[np.uint64(2) * i4 + c4])
                    i5 = np.uint64(children[np.uint64(2) * i5 + c5])
                    i6 = np.uint64(children[np.uint64(2) * i6 + c6])
                    i7 = np.uint64(children[np.uint64(2) * i7 + c7])
                    i8 = np.uint64(children[np.uint64(2) * i8 + c8])
                    i9 = np.uint64(children[np.uint64(2) * i9 + c9])
                    i10 = np.uint64(children[np.uint64(2) * i10 + c10])
                    i11 = np.uint64(children[np.uint64(2) * i11 + c11])
                # The few lanes not at a leaf yet (a leaf is its own left child) go on one by one.
                while children[np.uint64(2) * i0] != i0:
                    i0 = _step(thresholds, columns, children, rows, g + 0, i0)
                while children[np.uint64(2) * i1] != i1:
                    i1 = _step(thresholds, columns, children, rows, g + 1, i1)
                while children[np.uint64(2) * i2] != i2:
                    i2 = _step(thresholds, columns, children, rows, g + 2, i2)
                while children[np.uint64(2) * i3] != i3:
                    i3 = _step(thresholds, columns, children, rows, g + 3, i3)
                while children[np.uint64(2) * i4] != i4:
                    i4 = _step(thresholds, columns, children, rows, g + 4, i4)
                while children[np.uint64(2) * i5] != i5:
                    i5 = _step(thresholds, columns, children, rows, g + 5, i5)
                while children[np.uint64(2) * i6] != i6:
                    i6 = _step(thresholds, columns, children, rows, g + 6, i6)
                while children[np.uint64(2) * i7] != i7:
                    i7 = _step(thresholds, columns, children, rows, g + 7, i7)
                while children[np.uint64(2) * i8] != i8:
                    i8 = _step(thresholds, columns, children, rows, g + 8, i8)
                while children[np.uint64(2) * i9] != i9:
                    i9 = _step(thresholds, columns, children, rows, g + 9, i9)
                while children[np.uint64(2) * i10] != i10:
                    i10 = _step(thresholds, columns, children, rows, g + 10, i10)
                while children[np.uint64(2) * i11] != i11:
                    i11 = _step(thresholds, columns, children, rows, g + 11, i11)
                out[g + 0] += leaf_values[i0]
                out[g + 1] += leaf_values[i1]
                out[g + 2] += leaf_values[i2]
                out[g + 3] += leaf_values[i3]
                out[g + 4] += leaf_values[i4]
                out[g + 5] += leaf_values[i5]
                out[g + 6] += leaf_values[i6]
                out[g + 7] += leaf_values[i7]
                out[g + 8] += leaf_values[i8]
                out[g + 9] += leaf_values[i9]
                out[g + 10] += leaf_values[i10]
                out[g + 11] += leaf_values[i11]
        for r in range(start, end):
            missing = False
            for column in columns_read:
                missing |= np.isnan(rows[r, column])
            if missing:
                out[r] = _walk_branches(nodes, roots, baseline, rows, r)
            elif r >= full:
                out[r] = _walk_row(roots, baseline, thresholds, columns, children, leaf_values, group_depths, rows, r)


@njit(void(_VECTOR, int64[::1], int64[::1], int64, _ROWS), nogil=True, cache=True)
def _category_columns(codes: Any, right_sets: Any, missing_right: Any, width: int,
                      out: Any) -> None:  # pragma: no cover  # compiled
    """The 0/1 columns _walk compares in place of categorical splits: 1 where the row's category code goes right
    (a code in the split's set; NaN where missing values go; any other code left, as in _walk_branches)."""
    for r in range(codes.shape[0]):
        x = codes[r]
        for k in range(right_sets.shape[0]):
            if np.isnan(x):
                right = missing_right[k] == 1
            else:
                right = 0 <= x < 64 and (right_sets[k] >> np.int64(x)) & 1 == 1
            out[r, width + k] = 1.0 if right else 0.0


@njit(float64(_VECTOR), nogil=True, cache=True)
def _pairwise_sum(values: Any) -> float:  # pragma: no cover  # compiled
    """numpy's sum of a contiguous row (pairwise_sum in numpy's loops_utils.h), for the same float result: eight
    running sums over blocks of up to 128 values, halves of longer runs added recursively."""
    n = values.shape[0]
    if n < 8:
        total = -0.0
        for i in range(n):
            total += values[i]
        return 0.0 + total  # the reduction starts from add's identity
    if n <= 128:
        r0, r1, r2, r3 = values[0], values[1], values[2], values[3]
        r4, r5, r6, r7 = values[4], values[5], values[6], values[7]
        i = 8
        while i < n - n % 8:
            r0 += values[i]
            r1 += values[i + 1]
            r2 += values[i + 2]
            r3 += values[i + 3]
            r4 += values[i + 4]
            r5 += values[i + 5]
            r6 += values[i + 6]
            r7 += values[i + 7]
            i += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            total += values[i]
            i += 1
        return float(0.0 + total)
    half = n // 2
    half -= half % 8
    return float(_pairwise_sum(values[:half]) + _pairwise_sum(values[half:]))


@njit(void(_ROWS, _VECTOR, _ROWS, _INDICES, _VECTOR, _VECTOR, int32[::1], float64, _VECTOR, _VECTOR, _VECTOR,
           _VECTOR, float64, _ROWS), nogil=True, cache=True)
def _features(numeric: Any, codes: Any, distances: Any, indices: Any, log_target: Any, income: Any,
              neighbours: Any, bedrooms_per_room: float, rotation_cos: Any, rotation_sin: Any, city_lon: Any,
              city_lat: Any, lon_scale: float, out: Any) -> None:  # pragma: no cover  # compiled
    """HousingFeatures._assemble and _neighbourhood for the ordinal encoding, one record at a time, each value by
    the same operations in the same order as numpy's (see the tests: bit-identical on a whole holdout)."""
    prices = np.empty(indices.shape[1])
    for r in range(numeric.shape[0]):
        lon, lat = numeric[r, 0], numeric[r, 1]
        rooms, bedrooms, population, households = numeric[r, 3], numeric[r, 4], numeric[r, 5], numeric[r, 6]
        if np.isnan(bedrooms):
            bedrooms = rooms * bedrooms_per_room
        out[r, 0] = codes[r]
        for c in range(8):
            out[r, 1 + c] = numeric[r, c]
        out[r, 5] = bedrooms
        households = max(households, 1.0)
        out[r, 9] = rooms / households
        out[r, 10] = bedrooms / max(rooms, 1.0)
        out[r, 11] = population / households
        column = 12
        for a in range(rotation_cos.shape[0]):
            out[r, column] = lon * rotation_cos[a] + lat * rotation_sin[a]
            column += 1
        for c in range(city_lon.shape[0]):
            out[r, column] = np.hypot((lon - city_lon[c]) * lon_scale, lat - city_lat[c])
            column += 1
        for k in neighbours:
            for j in range(k):
                prices[j] = log_target[indices[r, j]]
            mean = _pairwise_sum(prices[:k]) / k
            for j in range(k):  # numpy's var: the squared deviations from the mean, summed alike
                deviation = prices[j] - mean
                prices[j] = deviation * deviation
            out[r, column] = mean
            out[r, column + 1] = np.sqrt(_pairwise_sum(prices[:k]) / k)
            for j in range(k):
                prices[j] = income[indices[r, j]]
            out[r, column + 2] = _pairwise_sum(prices[:k]) / k
            out[r, column + 3] = distances[r, k - 1]
            column += 4


class CompiledModel:
    """A pipeline of features.HousingFeatures (ordinal encoding, neighbourhood features) and one
    HistGradientBoostingRegressor, predicted by the compiled functions above. Reads scikit-learn's private tree
    arrays: use it only as compile_pipeline returns it, checked."""

    def __init__(self, housing: HousingFeatures, model: HistGradientBoostingRegressor) -> None:
        if housing.encoding != "ordinal" or not housing.neighbours:
            raise ValueError("compiled features need the ordinal encoding and neighbourhood features")
        self.housing = housing
        self.neighbours = np.asarray(housing.neighbours, dtype=np.int32)
        self.width = len(housing.get_feature_names_out())
        # The constants exactly as features.py computes them, so the products are the same floats.
        self.rotation_cos = np.array([np.cos(np.radians(a)) for a in features._ROTATIONS_DEG])
        self.rotation_sin = np.array([np.sin(np.radians(a)) for a in features._ROTATIONS_DEG])
        self.city_lon = np.array([lon for lon, _ in features._CITIES.values()])
        self.city_lat = np.array([lat for _, lat in features._CITIES.values()])
        self.nodes, self.roots, samples = _lay_out(model)
        self.baseline = float(model._baseline_prediction.item())
        (self.thresholds, self.columns, self.children, self.leaf_values, self.depths, self.right_sets,
         self.missing_right) = _lockstep(self.nodes, self.roots, samples, self.width)
        # _walk_row's lockstep depth for each group of LANES trees: the deepest of theirs.
        groups = len(self.roots) // LANES
        self.group_depths = self.depths[:groups * LANES].reshape(groups, LANES).max(axis=1, initial=0).astype(np.uint32)
        # The columns whose NaN _walk_branches handles: those of numeric splits (the 0/1 columns are never NaN).
        self.columns_read = np.unique(self.nodes["feature"][self.nodes["kind"] & (LEAF | CATEGORICAL) == 0]).astype(
            np.uint32)

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    def features(self, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        return self._walkable(numeric, codes)[:, :self.width]

    def _walkable(self, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        """The features, then _walk's categorical columns."""
        housing = self.housing
        numeric, codes = np.ascontiguousarray(numeric, dtype=float), np.ascontiguousarray(codes, dtype=float)
        distances, indices = housing.tree_.query(features._coordinates(numeric),
                                                 k=list(range(1, int(self.neighbours.max()) + 1)))
        out = np.empty((len(numeric), self.width + len(self.right_sets)))
        _features(numeric, codes, np.ascontiguousarray(distances), np.ascontiguousarray(indices, dtype=np.int64),
                  housing.log_target_, housing.income_, self.neighbours, float(housing.bedrooms_per_room_),
                  self.rotation_cos, self.rotation_sin, self.city_lon, self.city_lat, features._LON_SCALE, out)
        _category_columns(codes, self.right_sets, self.missing_right, self.width, out)
        return out

    def trees(self, rows: FloatArray) -> FloatArray:
        """The trees' prediction for rows of features (`width` columns)."""
        walkable = np.empty((len(rows), self.width + len(self.right_sets)))
        walkable[:, :self.width] = rows
        _category_columns(np.ascontiguousarray(walkable[:, 0]), self.right_sets, self.missing_right, self.width,
                          walkable)
        return self._walk(walkable)

    def _walk(self, walkable: FloatArray) -> FloatArray:
        out = np.empty(len(walkable))
        _walk(self.nodes, self.roots, self.baseline, self.thresholds, self.columns, self.children, self.leaf_values,
              self.depths, self.group_depths, self.columns_read, walkable, out)
        return out

    def predict(self, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        return self._walk(self._walkable(numeric, codes))


def _lockstep(nodes: npt.NDArray[Any], roots: npt.NDArray[np.int32], samples: FloatArray, width: int) -> tuple[
        FloatArray, npt.NDArray[np.uint32], npt.NDArray[np.uint32], FloatArray, npt.NDArray[np.uint32],
        npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """_walk's arrays, from the nodes: each node's threshold and the column it compares, its two children (a leaf:
    itself twice), the leaves' values (0 elsewhere), each tree's lockstep depth (LOCKSTEP_SHARE of the training
    samples reach their leaf within it); and one (set of codes that go right, whether missing goes right) per
    categorical column, in the order of the columns after `width`."""
    count = len(nodes)
    index = np.arange(count, dtype=np.uint32)
    leaf = nodes["kind"] & LEAF != 0
    categorical = ~leaf & (nodes["kind"] & CATEGORICAL != 0)
    missing_right = (nodes["kind"] & MISSING_GOES_LEFT == 0).astype(np.int64)
    splits = sorted({(int(nodes["value"][i]), int(missing_right[i])) for i in np.flatnonzero(categorical)})
    column_of = {split: width + k for k, split in enumerate(splits)}
    thresholds = np.where(leaf, 0.0, np.where(categorical, 0.5, nodes["value"]))  # a leaf's: unused
    columns = np.where(leaf, 0, nodes["feature"]).astype(np.uint32)
    for i in np.flatnonzero(categorical):
        columns[i] = column_of[(int(nodes["value"][i]), int(missing_right[i]))]
    children = np.empty(2 * count, dtype=np.uint32)
    children[0::2] = np.where(leaf, index, index + 1)
    children[1::2] = np.where(leaf, index, nodes["right"].astype(np.uint32))
    depth = np.zeros(count, dtype=np.uint32)  # depth-first: a parent comes before its children
    for i in np.flatnonzero(~leaf):
        depth[i + 1] = depth[nodes["right"][i]] = depth[i] + 1
    depths = np.empty(len(roots), dtype=np.uint32)
    for t, (first, end) in enumerate(zip(roots, [*roots[1:], count], strict=True)):
        leaves = np.flatnonzero(leaf[first:end]) + first
        leaves = leaves[np.argsort(depth[leaves], kind="stable")]
        reached = np.cumsum(samples[leaves]) / max(float(samples[leaves].sum()), 1.0)
        depths[t] = depth[leaves[min(int(np.searchsorted(reached, LOCKSTEP_SHARE)), len(leaves) - 1)]]
    return (thresholds, columns, children, np.where(leaf, nodes["value"], 0.0), depths,
            np.array([bits for bits, _ in splits], dtype=np.int64),
            np.array([right for _, right in splits], dtype=np.int64))


def _lay_out(model: HistGradientBoostingRegressor) -> tuple[npt.NDArray[Any], npt.NDArray[np.int32], FloatArray]:
    """The trees' nodes in NODE records, depth-first, tree after tree; where each tree starts; and how many training
    samples reached each node."""
    trees = [tree for (tree,) in model._predictors]
    every = np.concatenate([tree.nodes for tree in trees])
    categorical = np.flatnonzero(every["is_categorical"])
    right_codes = _category_goes_right(model, trees, every, categorical) @ (1 << np.arange(len(CATEGORIES)))
    codes_of = dict(zip(categorical.tolist(), right_codes.tolist(), strict=True))
    records: list[tuple[float, int, int, int]] = []
    samples: list[float] = []
    roots = []
    first = 0  # index in `every` of this tree's first node
    for tree in trees:
        roots.append(len(records))
        stack = [0]  # sklearn's node indices within the tree; depth-first, left before right
        parents: dict[int, int] = {}  # sklearn's index of a right child -> our index of its parent
        while stack:
            i = stack.pop()
            if i in parents:
                value, _, feature, kind = records[parents[i]]
                records[parents[i]] = (value, len(records), feature, kind)
            node = tree.nodes[i]
            samples.append(float(node["count"]))
            if node["is_leaf"]:
                records.append((float(node["value"]), 0, 0, LEAF))
                continue
            kind = MISSING_GOES_LEFT if node["missing_go_to_left"] else 0
            value = float(node["num_threshold"])
            if node["is_categorical"]:
                kind |= CATEGORICAL
                value = float(codes_of[first + i])
            parents[int(node["right"])] = len(records)
            records.append((value, 0, int(node["feature_idx"]), kind))
            stack += [int(node["right"]), int(node["left"])]
        first += len(tree.nodes)
    return np.array(records, dtype=NODE), np.array(roots, dtype=np.int32), np.array(samples)


def _category_goes_right(model: HistGradientBoostingRegressor, trees: list[Any], nodes: npt.NDArray[Any],
                         categorical: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
    """Whether a row goes right at each categorical split, by category code (0 or 1): shape (splits, categories)."""
    goes_right = np.zeros((len(categorical), len(CATEGORIES)), dtype=np.int64)
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


def compile_pipeline(pipeline: Pipeline, probes: tuple[FloatArray, FloatArray] | None = None) -> CompiledModel | None:
    """The pipeline compiled, if it predicts within MAX_DIFFERENCE of the pipeline's own on the probe rows (random
    districts unless given); None, with a warning saying why, if it is not of the shape compiled here or differs."""
    steps = [step for _, step in pipeline.steps]
    if len(steps) != 2 or not isinstance(steps[0], HousingFeatures) \
            or not isinstance(steps[1], HistGradientBoostingRegressor):
        log.warning("serving with scikit-learn: the compiled path takes HousingFeatures then one "
                    "HistGradientBoostingRegressor, not %s", " then ".join(type(step).__name__ for step in steps))
        return None
    numeric, codes = probes if probes is not None else probe_arrays()
    try:
        compiled = CompiledModel(steps[0], steps[1])
        difference = float(np.max(np.abs(compiled.predict(numeric, codes)
                                          - pipeline[1:].predict(steps[0].transform_arrays(numeric, codes)))))
    except Exception:  # a speed-up only: whatever fails, scikit-learn still serves
        log.exception("serving with scikit-learn: the model cannot be compiled")
        return None
    if not difference <= MAX_DIFFERENCE:  # NaN too
        log.warning("serving with scikit-learn: the compiled model differs from the pipeline by up to %.3g on %d "
                    "probe rows (at most %g allowed)", difference, len(numeric), MAX_DIFFERENCE)
        return None
    return compiled


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


def predict(compiled: CompiledModel | None, pipeline: Pipeline, numeric: FloatArray, codes: FloatArray) -> FloatArray:
    """A served model's predictions from the arrays: compiled when compile_pipeline allowed it; else the pipeline's
    first step's array path, then scikit-learn, without the pipeline's pandas input handling."""
    if compiled is not None:
        return compiled.predict(numeric, codes)
    predictions: FloatArray = pipeline[1:].predict(pipeline.steps[0][1].transform_arrays(numeric, codes))
    return predictions
