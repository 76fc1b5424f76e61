"""serving/scoring_process.py and serving/shadow.py's buffer: the candidate scores in its own process, at the lowest
priority, and whatever it does (answer, raise, print, hang, die) the worker gets predictions or one ScoringFailed,
never a stuck thread; the buffer is bounded, and a backlog is scored in bounded calls."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from features import HousingFeatures
from names import FEATURES
from serving import scoring_process
from serving.metrics import SHADOW_DROPPED, SHADOW_ERRORS
from serving.prediction_log import PredictionLog
from serving.scoring_process import SCORING_NICE, ScoringFailed, ScoringProcess, ScoringTimedOut
from serving.settings import Settings
from serving.shadow import SHADOW_BATCH_RECORDS, ShadowScorer
from serving.trees import compile_pipeline, predict
from tests.conftest import RIDGE, STORY_CANDIDATES, synthetic_housing
from tests.registry import Exits, Hangs, Prints, RaisesAbove, fitted

pytestmark = pytest.mark.integration  # a child process per test

RECORDS = synthetic_housing(200, seed=4)
NUMERIC, CODES = (part.astype(float) for part in HousingFeatures._split(RECORDS[list(FEATURES)]))


def served(pipeline: Any) -> Any:
    """What ScoringProcess reads of a ServedModel."""
    return SimpleNamespace(pipeline=pipeline, compiled=compile_pipeline(pipeline))


@pytest.fixture
def scorer() -> Iterator[ScoringProcess]:
    process = ScoringProcess()
    yield process
    process.close()


def test_the_child_predicts_exactly_what_the_worker_would_compiled_or_not(scorer):
    for pipeline, compiled in ((fitted(STORY_CANDIDATES["gbdt"]), True), (fitted(RIDGE), False)):
        model = served(pipeline)
        assert (model.compiled is not None) == compiled
        predictions, seconds = scorer.predict(model, NUMERIC, CODES)
        assert np.array_equal(predictions, predict(model.compiled, pipeline, NUMERIC, CODES))
        assert seconds > 0


def test_the_child_runs_at_the_lowest_priority_and_stops_with_its_worker(scorer):
    scorer.predict(served(fitted(RIDGE)), NUMERIC[:1], CODES[:1])
    child = scorer._child
    assert child is not None
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == SCORING_NICE
    scorer.close()
    assert child.poll() is not None  # exited, and reaped


def test_a_model_that_raises_is_one_scoring_failed_and_the_next_batch_is_scored(scorer):
    pipeline = fitted(RIDGE)
    pipeline.steps[-1] = ("model", RaisesAbove(pipeline.named_steps["model"], limit=0.0))
    with pytest.raises(ScoringFailed, match="ValueError: a prediction above 0"):
        scorer.predict(served(pipeline), NUMERIC, CODES)
    healthy = served(fitted(RIDGE))
    assert len(scorer.predict(healthy, NUMERIC, CODES)[0]) == len(NUMERIC)


def test_what_a_model_prints_does_not_corrupt_the_answers(scorer):
    pipeline = fitted(RIDGE)
    pipeline.steps[-1] = ("model", Prints(pipeline.named_steps["model"], limit=np.inf))
    predictions, _ = scorer.predict(served(pipeline), NUMERIC, CODES)
    assert np.array_equal(predictions, fitted(RIDGE).predict(RECORDS[list(FEATURES)]))


def test_a_model_that_hangs_is_stopped_after_the_timeout_and_a_fresh_child_serves_the_next(scorer, monkeypatch):
    monkeypatch.setattr(scoring_process, "SCORE_TIMEOUT_S", 0.5)
    pipeline = fitted(RIDGE)
    pipeline.steps[-1] = ("model", Hangs(pipeline.named_steps["model"], limit=np.inf))
    with pytest.raises(ScoringTimedOut, match=r"no answer in 0\.5 s"):
        scorer.predict(served(pipeline), NUMERIC, CODES)
    assert scorer._child is None  # the stuck one was killed
    assert len(scorer.predict(served(fitted(RIDGE)), NUMERIC, CODES)[0]) == len(NUMERIC)


def test_a_model_that_kills_its_process_is_one_scoring_failed_and_a_fresh_child_serves_the_next(scorer):
    pipeline = fitted(RIDGE)
    pipeline.steps[-1] = ("model", Exits(pipeline.named_steps["model"], limit=np.inf))
    with pytest.raises(ScoringFailed, match="the other end closed the pipe"):
        scorer.predict(served(pipeline), NUMERIC, CODES)
    assert len(scorer.predict(served(fitted(RIDGE)), NUMERIC, CODES)[0]) == len(NUMERIC)


def test_a_model_the_child_cannot_unpickle_is_answered_as_failed_until_the_next_model(scorer):
    unpicklable = served(fitted(RIDGE))
    unpicklable.pipeline.steps[-1] = ("model", NotImportable())
    with pytest.raises(ScoringFailed, match="cannot be loaded in the scoring process"):
        scorer.predict(unpicklable, NUMERIC, CODES)
    assert len(scorer.predict(served(fitted(RIDGE)), NUMERIC, CODES)[0]) == len(NUMERIC)


class NotImportable:
    """Defined in a test module, which the child cannot import by this name."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (b"cno_such_module\nNothing\n.",))


class Spy(ScoringProcess):
    """The real scoring process, noting how many records each call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def predict(self, model: Any, numeric: Any, codes: Any) -> Any:
        self.calls.append(len(numeric))
        return super().predict(model, numeric, codes)


def test_the_shadow_buffer_drops_beyond_its_bound_and_a_backlog_is_scored_in_bounded_calls(tmp_path):
    candidate = served(fitted(RIDGE))
    candidate.ref, candidate.label = SimpleNamespace(version="7"), {"name": "housing", "version": "7"}
    log = PredictionLog(Settings(prediction_log_dir=tmp_path))
    shadow = ShadowScorer(SimpleNamespace(shadow=candidate), log, max_pending_records=5_000)
    shadow._scorer = spy = Spy()
    dropped = SHADOW_DROPPED.labels("7")._value.get()
    try:
        for index in range(5_001):  # one more than the bound
            row = index % len(NUMERIC)
            shadow.offer(NUMERIC[row:row + 1], CODES[row:row + 1], np.ones(1), [f"r{index}/0"], "/predict")
        assert SHADOW_DROPPED.labels("7")._value.get() - dropped == 1
        shadow._drain()
        assert spy.calls == [SHADOW_BATCH_RECORDS, SHADOW_BATCH_RECORDS, 1_000]
        shadow.offer(NUMERIC[:3], CODES[:3], np.ones(3), ["a/0", "a/1", "a/2"], "/predict")  # room again
        shadow._drain()
        assert spy.calls[-1] == 3
    finally:
        spy.close()


class TimesOut(ScoringProcess):
    def predict(self, model: Any, numeric: Any, codes: Any) -> Any:
        raise ScoringTimedOut("the scoring process gave no answer in 30 s")


def test_a_batch_the_child_did_not_answer_in_time_counts_as_dropped_not_as_the_candidates_error(tmp_path):
    candidate = served(fitted(RIDGE))
    candidate.ref, candidate.label = SimpleNamespace(version="8"), {"name": "housing", "version": "8"}
    shadow = ShadowScorer(SimpleNamespace(shadow=candidate), PredictionLog(Settings(prediction_log_dir=tmp_path)))
    shadow._scorer = TimesOut()  # a starved child: the real one's timeout is covered above
    dropped, errors = SHADOW_DROPPED.labels("8")._value.get(), SHADOW_ERRORS.labels("8")._value.get()
    shadow.offer(NUMERIC[:3], CODES[:3], np.ones(3), ["t/0", "t/1", "t/2"], "/predict")
    shadow._drain()
    assert SHADOW_DROPPED.labels("8")._value.get() - dropped == 3
    assert SHADOW_ERRORS.labels("8")._value.get() == errors
