"""The served model: loaded from the registry, checked before it serves, kept, and replaced when the registry moves."""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import mlflow.sklearn
import numpy as np
import orjson
import pandas as pd
from mlflow.models import Model
from sklearn.pipeline import Pipeline

from features import FEATURES, OPTIONAL_FEATURES, PROFILE_FILE, FloatArray
from serving.background import BackgroundThread
from serving.drift import DriftWindow
from serving.metrics import LAST_RELOAD, MODEL_INFO, MODEL_LOADED, RELOADS, ReloadResult
from serving.registry import ModelRef, Registry
from serving.schema import SMOKE_RECORDS, to_arrays
from serving.settings import Settings
from serving.trees import FLAT_TREES_MAX_ROWS, FlatTrees, flatten

log = logging.getLogger("housing.serve")

RETRY_S = 5  # how soon to look again while no model is loaded; also the Retry-After of a 503
REFERENCE_PROFILE = Path("extra_files", PROFILE_FILE)  # in the model directory, from train.log_pipeline


class ModelLabel(TypedDict):
    """How answers and the prediction log name the model."""

    name: str
    version: str | None


@dataclass(frozen=True)
class ServedModel:
    ref: ModelRef
    name: str
    requested: dict[str, str]  # {"alias": ...} or {"stage": ...}; empty for MODEL_URI
    pipeline: Pipeline
    trees: FlatTrees | None
    drift: DriftWindow | None  # None: the model came without a reference profile
    run_id: str | None
    metrics: dict[str, float]
    loaded_at: datetime

    @property
    def label(self) -> ModelLabel:
        return {"name": self.name, "version": self.ref.version}

    def predict(self, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        """The pipeline's predictions, minus its pandas input handling: the first step's array fast path."""
        features: FloatArray = self.pipeline.steps[0][1].transform_arrays(numeric, codes)
        if self.trees is not None and len(features) <= FLAT_TREES_MAX_ROWS and not np.isnan(features).any():
            return self.trees.predict(features)
        predictions: FloatArray = self.pipeline[1:].predict(features)
        return predictions

    def describe(self) -> dict[str, object]:
        return {**self.label, **self.requested, "uri": self.ref.uri, "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "metrics": self.metrics}


class ModelRefused(Exception):
    pass


def load(ref: ModelRef, settings: Settings, registry: Registry) -> ServedModel:
    """Download, check and load the model; raise unless it is fit to serve."""
    with tempfile.TemporaryDirectory(prefix="housing-model-") as scratch:
        local = registry.download(ref, scratch)
        metadata = Model.load(local)
        check_schema(metadata)
        pipeline = mlflow.sklearn.load_model(local)
        drift = drift_window(ref, Path(local) / REFERENCE_PROFILE, settings.drift_window)
    if not hasattr(pipeline.steps[0][1], "transform_arrays"):
        raise ModelRefused("the first pipeline step is not features.HousingFeatures")
    model = ServedModel(ref=ref, name=settings.model_name, requested=requested_model(settings), pipeline=pipeline,
                        trees=flatten(pipeline), drift=drift, run_id=metadata.run_id,
                        metrics=registry.training_metrics(metadata.run_id), loaded_at=datetime.now(UTC))
    smoke_test(model)
    return model


def drift_window(ref: ModelRef, profile: Path, size: int) -> DriftWindow | None:
    """An empty drift window against the model's reference profile; None, logged, without a usable profile."""
    if not profile.is_file():
        log.warning("drift is not measured for %s: it has no %s", ref.uri, REFERENCE_PROFILE)
        return None
    try:
        return DriftWindow(orjson.loads(profile.read_bytes()), size)
    except (KeyError, TypeError, ValueError) as error:
        log.warning("drift is not measured for %s: unusable %s (%s: %s)", ref.uri, REFERENCE_PROFILE,
                    type(error).__name__, error)
        return None


def requested_model(settings: Settings) -> dict[str, str]:
    if settings.model_uri:
        return {}
    if settings.model_stage:
        return {"stage": settings.model_stage}
    return {"alias": settings.model_alias}


def check_schema(metadata: Model) -> None:
    """Refuse a model whose input signature is not the schema this server checks requests against."""
    expected = [(name, name not in OPTIONAL_FEATURES) for name in FEATURES]
    inputs = metadata.signature.inputs.inputs if metadata.signature else []
    actual = [(column.name, column.required) for column in inputs]
    if actual != expected:
        raise ModelRefused(f"model inputs {actual} differ from the served schema {expected}")


def smoke_test(model: ServedModel) -> None:
    fast = model.predict(*to_arrays(list(SMOKE_RECORDS), batch=True))
    reference = model.pipeline.predict(pd.DataFrame(list(SMOKE_RECORDS), columns=list(FEATURES)))
    if not np.all(np.isfinite(fast)):
        raise ModelRefused(f"smoke predictions are not all finite: {fast.tolist()}")
    if not np.allclose(fast, reference, rtol=1e-6, atol=0):
        raise ModelRefused(f"fast path {fast.tolist()} disagrees with the pipeline {reference.tolist()}")


@dataclass(frozen=True)
class Reload:
    result: ReloadResult
    detail: str = ""


class ModelKeeper:
    """Holds the served model; replaces it only with one that loaded and passed the smoke test.

    A request reads `current` once and finishes on that model, so swapping is one assignment.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self._registry = Registry(settings)
        self._lock = threading.Lock()

    def refresh(self) -> Reload:
        with self._lock:
            outcome = self._refresh()
        RELOADS.labels(outcome.result).inc()
        return outcome

    def drift_window(self) -> DriftWindow | None:
        model = self.current
        return model.drift if model is not None else None

    def _refresh(self) -> Reload:
        try:
            ref = self._registry.locate()
        except (mlflow.MlflowException, LookupError, OSError) as error:
            log.warning("cannot tell which model to serve: %s", error)
            return Reload("unavailable", str(error))
        if self.current is not None and self.current.ref == ref:
            return Reload("unchanged")
        try:
            model = load(ref, self.settings, self._registry)
        except Exception as error:  # whatever went wrong, keep serving the model we have
            log.exception("refused %s", ref.uri)
            return Reload("failed", f"{ref.uri}: {type(error).__name__}: {error}")
        self._swap(model)
        log.info("serving %s version %s (%s)", model.name, model.ref.version, ref.uri)
        return Reload("loaded", ref.uri)

    def _swap(self, model: ServedModel) -> None:
        previous, self.current = self.current, model
        if previous is not None:
            MODEL_INFO.labels(previous.name, previous.ref.version or "").set(0)
        MODEL_INFO.labels(model.name, model.ref.version or "").set(1)
        MODEL_LOADED.set(1)
        LAST_RELOAD.set(model.loaded_at.timestamp())


class Poller(BackgroundThread):
    """Loads the first model (retrying until one loads), then asks the registry every interval."""

    name = "model-poller"

    def __init__(self, keeper: ModelKeeper, interval_s: float) -> None:
        super().__init__()
        self._keeper = keeper
        self._interval_s = interval_s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._keeper.refresh()
            except Exception:  # the poller must outlive any surprise, or reloading would stop silently
                log.exception("model refresh failed")
            wait = self._next_wait()
            if wait is None or self._stop.wait(wait):
                return

    def _next_wait(self) -> float | None:
        if self._keeper.current is None:
            return min(self._interval_s, RETRY_S) if self._interval_s else RETRY_S
        return self._interval_s or None
