"""The compiled model of serving/trees.py: the same features and the same predictions as the pipeline it compiles."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

import train
from features import category_codes
from names import CATEGORICAL_FEATURE, FEATURES, NUMERIC_FEATURES, TARGET
from scripts.split import holdout_mask
from serving.trees import BLOCK_ROWS, LANES, LEAF, CompiledModel, _pairwise_sum, compile_pipeline, probe_arrays
from tests.conftest import GBDT, RIDGE, ROOT, synthetic_housing

EMBEDDED = ROOT / "data" / "embedded" / "housing.csv.gz"  # the sample make retrain uses, shipped in the repository


@pytest.fixture(scope="module")
def embedded_split() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The shipped sample, split into training rows and holdout as the split stage splits it (params.yaml's seed)."""
    frame = pd.read_csv(EMBEDDED)
    holdout = holdout_mask(frame, 0.2, 42)
    return frame[~holdout], frame[holdout]


def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return (frame[list(NUMERIC_FEATURES)].to_numpy(dtype=float, na_value=np.nan),
            category_codes(frame[CATEGORICAL_FEATURE]))


def fitted(spec: dict, frame: pd.DataFrame):
    with threadpool_limits(1, "openmp"):
        return train.build_pipeline(spec).fit(frame[list(FEATURES)], frame[TARGET].to_numpy())


@pytest.mark.parametrize("neighbours", [(4, 16, 64), (8, 32, 128), (200,)], ids=["served", "128", "over 128"])
def test_compiled_features_are_bit_identical_to_training_features_on_the_whole_holdout(embedded_split, neighbours):
    training, holdout = embedded_split
    pipeline = fitted({**GBDT, "features": {"neighbours": list(neighbours)}, "params": {"max_iter": 5}}, training)
    assert len(holdout) > 3000 and holdout["total_bedrooms"].isna().any()
    compiled = CompiledModel(pipeline.steps[0][1], pipeline[-1])
    expected = pipeline.steps[0][1].transform(holdout[list(FEATURES)])
    np.testing.assert_array_equal(compiled.features(*arrays(holdout)), expected)


def test_compiled_model_predicts_exactly_what_the_pipeline_predicts_on_the_whole_holdout(embedded_split,
                                                                                        report_figure):
    training, holdout = embedded_split
    pipeline = fitted({**GBDT, "params": {"max_iter": 200}}, training)
    compiled = compile_pipeline(pipeline)
    assert compiled is not None
    numeric, codes = arrays(holdout)
    started = time.process_time()
    predictions = compiled.predict(numeric, codes)
    report_figure(f"compiled model, 200 trees: {(time.process_time() - started) / len(holdout) * 1e6:.1f} us "
                  f"per record over {len(holdout)} holdout records")
    assert np.array_equal(predictions, pipeline.predict(holdout[list(FEATURES)]))
    assert np.array_equal(compiled.predict(numeric[:1], codes[:1]), predictions[:1])  # one record, as a batch


@pytest.mark.parametrize("spec", [
    GBDT,
    {**GBDT, "params": {"max_iter": 30, "max_leaf_nodes": 127, "min_samples_leaf": 2}},  # deep trees
], ids=["as served", "deep"])
def test_the_walk_sends_missing_values_and_an_unseen_category_where_scikit_learn_does(spec):
    data = synthetic_housing(seed=5)
    data = data[data[CATEGORICAL_FEATURE] != "ISLAND"]  # a category the model never saw
    pipeline = fitted(spec, data)
    compiled = CompiledModel(pipeline.steps[0][1], pipeline[-1])
    rows = compiled.features(*probe_arrays(300))
    rows[::7, 3] = np.nan  # NaN reaches no model from the app; the walk still goes where predict() would
    rows[::5, 20] = np.nan
    assert np.array_equal(compiled.trees(rows), pipeline[-1].predict(rows))


@pytest.fixture(scope="module")
def deep_and_shallow() -> tuple[Any, CompiledModel]:
    """A model whose trees run from a few levels to many (so lanes finish at every depth), with its compiled form."""
    pipeline = fitted({**GBDT, "params": {"max_iter": 80, "max_leaf_nodes": 63, "min_samples_leaf": 3}},
                      synthetic_housing(rows=3000, seed=7))
    compiled = compile_pipeline(pipeline)
    assert compiled is not None
    assert compiled.depths.min() < compiled.depths.max()  # lockstep depths differ between trees
    return pipeline, compiled


# Around the lane group (LANES), the block (BLOCK_ROWS) and serving/app.py's two chunks of a large batch.
@pytest.mark.parametrize("rows", [1, 7, LANES - 1, LANES, LANES + 1, BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 1, 1000,
                                  10_003])
def test_every_batch_size_predicts_exactly_what_the_pipeline_predicts(deep_and_shallow, rows):
    pipeline, compiled = deep_and_shallow
    numeric, codes = probe_arrays(rows)
    expected = pipeline[1:].predict(pipeline.steps[0][1].transform_arrays(numeric, codes))
    assert np.array_equal(compiled.predict(numeric, codes), expected)
    halves = np.array_split(np.arange(rows), 2)  # as serving/app.py splits a batch over its threads
    assert np.array_equal(np.concatenate([compiled.predict(numeric[half], codes[half]) for half in halves]), expected)


def test_rows_with_missing_values_among_the_lanes_predict_exactly_what_the_pipeline_predicts(deep_and_shallow):
    pipeline, compiled = deep_and_shallow
    rows = compiled.features(*probe_arrays(2 * BLOCK_ROWS + 5))
    rows[3::LANES + 1, 3] = np.nan  # rows in every position of a lane group, in each block and among the leftovers
    rows[[0, LANES - 1, BLOCK_ROWS, len(rows) - 1], 7] = np.nan
    rows[5::97, 0] = np.nan  # no category: where missing values go, through the 0/1 columns or the branches
    assert np.array_equal(compiled.trees(rows), pipeline[-1].predict(rows))


def test_nodes_are_laid_out_depth_first_with_each_left_child_after_its_parent():
    pipeline = fitted(GBDT, synthetic_housing(seed=1))
    compiled = CompiledModel(pipeline.steps[0][1], pipeline[-1])
    trees = [tree for (tree,) in pipeline[-1]._predictors]
    assert compiled.node_count == sum(len(tree.nodes) for tree in trees) and compiled.nodes.itemsize == 16
    first = trees[0].nodes
    assert compiled.nodes[1]["value"] == first[first[0]["left"]]["num_threshold"] or compiled.nodes[1]["kind"] & LEAF
    assert compiled.nodes[compiled.nodes[0]["right"]]["feature"] == first[first[0]["right"]]["feature_idx"]


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 127, 128, 129, 200, 300])
def test_pairwise_sum_adds_up_as_numpy_does(length):
    values = np.random.default_rng(length).normal(12.0, 0.7, length)
    assert _pairwise_sum(values) == np.add.reduce(values)


def test_a_pipeline_of_another_shape_is_not_compiled_and_says_why(caplog):
    caplog.set_level(logging.WARNING, "housing.serve")
    assert compile_pipeline(fitted(RIDGE, synthetic_housing(seed=2))) is None
    assert "not HousingFeatures then StandardScaler then Ridge" in caplog.text


def test_a_compiled_model_that_differs_from_the_pipeline_is_refused_loudly(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "housing.serve")
    pipeline = fitted(GBDT, synthetic_housing(seed=3))
    monkeypatch.setattr(CompiledModel, "_walk",
                        lambda self, walkable: pipeline[-1].predict(walkable[:, :self.width]) + 0.01)
    assert compile_pipeline(pipeline) is None
    assert "differs from the pipeline by up to 0.01 on 500 probe rows" in caplog.text
