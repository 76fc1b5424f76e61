"""Serve the registry's champion over HTTP: `python serve.py` (what `make serve` runs) or `uvicorn serve:app`.

Settings come from the environment:

    HOST                 interface to bind (127.0.0.1; the image sets 0.0.0.0)
    PORT                 8000
    WORKERS              uvicorn worker processes (1); metrics are summed over them
    MLFLOW_TRACKING_URI  the registry (MLflow's own default when unset)
    MODEL_NAME           registered model (California_Housing_Regression)
    MODEL_ALIAS          alias to serve (champion)
    MODEL_STAGE          serve the newest version in this stage instead, e.g. Production (unset)
    MODEL_URI            serve exactly this model: a local directory, runs:/..., models:/... (unset); it is loaded
                         once, never polled, and reported without a registry version
    RELOAD_INTERVAL_S    how often to ask the registry which version to serve (30); 0 disables polling
    RELOAD_TOKEN         enables `POST /reload` with `Authorization: Bearer <token>` (unset: disabled)
    MAX_BATCH_ROWS       records per request (10000)
    MAX_BODY_BYTES       request body size (8388608)
    PREDICTION_LOG_DIR   JSON lines of every prediction, one size-rotated file per worker (logs/)
    DRIFT_WINDOW         records per worker whose inputs and predictions are compared with the served model's training
                         data (1000); see DriftWindow. The drift alert needs 500 of them (prometheus/rules)

With WORKERS>1, `python serve.py` runs prometheus-client in multiprocess mode in PROMETHEUS_MULTIPROC_DIR (a new
temporary directory unless set; its *.db files are deleted at start). Plain `uvicorn --workers N serve:app` does not.
prometheus-client switches to multiprocess mode whenever that variable exists, even empty: set it, or leave it out.
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import orjson
import pandas as pd
import uvicorn
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import Pipeline
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from threadpoolctl import threadpool_limits

from features import (
    CATEGORICAL_FEATURE,
    CATEGORIES,
    FEATURES,
    NUMERIC_FEATURES,
    OPTIONAL_FEATURES,
    PROFILE_FILE,
    bin_indices,
    category_codes,
    psi,
)

log = logging.getLogger("housing.serve")

# Every reload downloads a model; MLflow's progress bars would fill the server log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RETRY_S = 5  # how soon to look again while no model is loaded; also the Retry-After of a 503
FLAT_TREES_MAX_ROWS = 128  # above this, sklearn's predict() is faster than FlatTrees
PARALLEL_MIN_ROWS = 256  # from this batch size, chunks are predicted in parallel threads
MAX_REPORTED_PROBLEMS = 100
PREDICTION_LOG_MAX_BYTES = 64 * 1024 * 1024
PREDICTION_LOG_BACKUPS = 5
PREDICTION_LOG_BUFFER = 100_000  # entries waiting to be written
PREDICTION_LOG_FLUSH_S = 0.2
# Real coordinates; far beyond them the neighbourhood features of features.py fail.
COORDINATE_BOUNDS = {"longitude": (-180.0, 180.0), "latitude": (-90.0, 90.0)}
REFERENCE_PROFILE = Path("extra_files", PROFILE_FILE)  # in the model directory, from train.log_pipeline
DRIFT_FIELDS = (*FEATURES, "prediction")
DRIFT_UPDATE_S = 1.0  # how often each worker bins its new records and publishes its drift scores


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model_name: str = "California_Housing_Regression"
    model_alias: str = "champion"
    model_stage: str = ""
    model_uri: str = ""
    reload_interval_s: float = 30.0
    reload_token: str = ""
    max_batch_rows: int = 10_000
    max_body_bytes: int = 8 * 1024 * 1024
    prediction_log_dir: Path = Path("logs")
    drift_window: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Each field from the variable of its upper-cased name, converted to the type of its default."""
        values = {}
        for setting in fields(cls):
            raw = environ.get(setting.name.upper(), "")
            if raw:
                kind = type(setting.default)
                try:
                    values[setting.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{setting.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("workers", "max_batch_rows", "max_body_bytes", "drift_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        if self.reload_interval_s < 0:
            raise ValueError("RELOAD_INTERVAL_S must be 0 (off) or positive")


# --- metrics ---------------------------------------------------------------------------------------------------

METRICS = CollectorRegistry()
REQUESTS = Counter("housing_http_requests", "HTTP requests by route, method and status.",
                   ["route", "method", "status"], registry=METRICS)
LATENCY = Histogram("housing_http_request_duration_seconds", "Time to answer a request, by route.", ["route"],
                    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5, 5.0, 10.0),
                    registry=METRICS)
IN_FLIGHT = Gauge("housing_http_requests_in_flight", "Requests being answered.", multiprocess_mode="livesum",
                  registry=METRICS)
PREDICTIONS = Counter("housing_predictions", "Records predicted.", registry=METRICS)
PREDICTED_VALUE = Histogram("housing_prediction_value_dollars", "Predicted median house values (USD).",
                            buckets=tuple(range(50_000, 550_001, 50_000)), registry=METRICS)
BATCH_SIZE = Histogram("housing_batch_size", "Records per answered /predict request.",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000), registry=METRICS)
VALIDATION_FAILURES = Counter("housing_validation_failures", "Problems found in /predict bodies, by field.",
                              ["field"], registry=METRICS)
MODEL_INFO = Gauge("housing_model_info", "1 for the model version being served, 0 for versions served before.",
                   ["name", "version"], multiprocess_mode="livemax", registry=METRICS)
MODEL_LOADED = Gauge("housing_model_loaded", "1 when a model is loaded (in every worker: the minimum).",
                     multiprocess_mode="livemin", registry=METRICS)
RELOAD_RESULTS = ("loaded", "unchanged", "failed", "unavailable")
RELOADS = Counter("housing_model_reloads", f"Registry checks by result: {', '.join(RELOAD_RESULTS)}.",
                  ["result"], registry=METRICS)
LAST_RELOAD = Gauge("housing_model_last_reload_timestamp_seconds", "Unix time the served model was loaded.",
                    multiprocess_mode="livemax", registry=METRICS)
LOG_DROPPED = Counter("housing_prediction_log_dropped", "Prediction log entries lost (queue full or write error).",
                      registry=METRICS)
# The series the alerts watch exist at 0 from the start: rate() and increase() cannot count the value a series is
# born with, so a first burst of failures would go unseen.
for result in RELOAD_RESULTS:
    RELOADS.labels(result)
for status in ("200", "400", "413", "415", "422", "500", "503"):  # what /predict answers
    REQUESTS.labels("/predict", "POST", status)
for field in (*FEATURES, "body", "instances", "unknown"):  # see Problem.field
    VALIDATION_FAILURES.labels(field)
# One series per worker ("liveall": a pid label with WORKERS>1). A PSI belongs to one worker's window, and windows do
# not add up; prometheus/rules takes the maximum over the windows that hold enough records.
DRIFT_PSI = Gauge("housing_drift_psi", "Population Stability Index of the drift window against the served model's "
                  "training data, per input field and for the predictions; NaN while the window is empty.", ["field"],
                  multiprocess_mode="liveall", registry=METRICS)
DRIFT_ROWS = Gauge("housing_drift_window_rows", "Records in the drift window (DRIFT_WINDOW at most).",
                   multiprocess_mode="liveall", registry=METRICS)


def multiprocess_metrics() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ  # prometheus-client's own test, made when it is imported


def metrics_text() -> bytes:
    if not multiprocess_metrics():
        return generate_latest(METRICS)
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


# --- input ---------------------------------------------------------------------------------------------------

_CODES = dict(zip(CATEGORIES, category_codes(np.array(CATEGORIES)).tolist(), strict=True))
_FIELDS = frozenset(FEATURES)
_NUMBERS = (int, float)  # exact types: bool is an int subclass, but not a number here


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # where in the body, e.g. "instances[3].median_income"
    field: str  # the metric label: a feature name, or "body", "instances", "unknown"
    message: str


class InvalidInput(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s) in the request body")
        self.problems = problems


def records_in(payload: Any, max_rows: int) -> tuple[list[Any], bool]:
    """The records of a /predict body, and whether it was a batch (`{"instances": [...]}`)."""
    if not isinstance(payload, dict):
        raise InvalidInput([Problem("body", "body", 'must be a JSON object: a record or {"instances": [...]}')])
    if "instances" not in payload:
        return [payload], False
    instances = payload["instances"]
    problems = [Problem(name, "unknown", "unknown field") for name in payload if name != "instances"]
    if not isinstance(instances, list) or not instances:
        problems.append(Problem("instances", "instances", "must be a non-empty list of records"))
    if problems:
        raise InvalidInput(problems)
    if len(instances) > max_rows:
        raise HTTPException(413, f"{len(instances)} records is more than MAX_BATCH_ROWS={max_rows}")
    return instances, True


def to_arrays(records: list[Any], batch: bool) -> tuple[np.ndarray, np.ndarray]:
    """Check records against the schema of features.py; return NUMERIC_FEATURES as floats, and category codes."""
    rows, codes, problems = [], [], []
    for index, record in enumerate(records):
        where = f"instances[{index}]" if batch else ""
        if type(record) is not dict:
            problems.append(Problem(where or "body", "body", "must be a JSON object"))
            continue
        rows.append([_number(record, name, where, problems) for name in NUMERIC_FEATURES])
        codes.append(_category(record, where, problems))
        if not _FIELDS.issuperset(record):
            problems += [Problem(_path(where, name), "unknown", "unknown field")
                         for name in record if name not in _FIELDS]
    if problems:
        raise InvalidInput(problems)
    return np.array(rows, dtype=float), np.array(codes, dtype=float)


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _number(record: dict, name: str, where: str, problems: list[Problem]) -> float:
    value = record.get(name)
    if type(value) in _NUMBERS:
        if name not in COORDINATE_BOUNDS:
            return value
        low, high = COORDINATE_BOUNDS[name]
        if low <= value <= high:
            return value
        message = f"must be between {low:g} and {high:g}"
    elif value is None and name in OPTIONAL_FEATURES:
        return math.nan
    else:
        message = "is required" if name not in record else "must be a finite number"
    problems.append(Problem(_path(where, name), name, message))
    return math.nan


def _category(record: dict, where: str, problems: list[Problem]) -> float:
    value = record.get(CATEGORICAL_FEATURE)
    if type(value) is str and value in _CODES:
        return _CODES[value]
    message = "is required" if CATEGORICAL_FEATURE not in record else f"must be one of {', '.join(CATEGORIES)}"
    problems.append(Problem(_path(where, CATEGORICAL_FEATURE), CATEGORICAL_FEATURE, message))
    return math.nan


# --- model ---------------------------------------------------------------------------------------------------

# One district per category, one without total_bedrooms. A model is served only if it predicts them all, finitely,
# and its fast path agrees with the pipeline's own predict() on them.
SMOKE_RECORDS = (
    {"longitude": -122.23, "latitude": 37.88, "housing_median_age": 41.0, "total_rooms": 880.0,
     "total_bedrooms": 129.0, "population": 322.0, "households": 126.0, "median_income": 8.3252,
     "ocean_proximity": "NEAR BAY"},
    {"longitude": -118.3, "latitude": 34.05, "housing_median_age": 30.0, "total_rooms": 2000.0,
     "total_bedrooms": 450.0, "population": 1200.0, "households": 420.0, "median_income": 3.5,
     "ocean_proximity": "<1H OCEAN"},
    {"longitude": -119.8, "latitude": 36.8, "housing_median_age": 20.0, "total_rooms": 2500.0,
     "total_bedrooms": 500.0, "population": 1400.0, "households": 480.0, "median_income": 2.9,
     "ocean_proximity": "INLAND"},
    {"longitude": -118.33, "latitude": 33.34, "housing_median_age": 52.0, "total_rooms": 2359.0,
     "total_bedrooms": 591.0, "population": 1100.0, "households": 431.0, "median_income": 2.8,
     "ocean_proximity": "ISLAND"},
    {"longitude": -117.2, "latitude": 32.75, "housing_median_age": 35.0, "total_rooms": 1800.0,
     "total_bedrooms": None, "population": 900.0, "households": 350.0, "median_income": 4.1,
     "ocean_proximity": "NEAR OCEAN"},
)


@dataclass(frozen=True)
class ModelRef:
    """Which model to serve: what the registry (or MODEL_URI) points at."""

    uri: str
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
    def label(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.ref.version}

    def predict(self, numeric: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """The pipeline's predictions, minus its pandas input handling: the first step's array fast path."""
        features = self.pipeline.steps[0][1].transform_arrays(numeric, codes)
        if self.trees is not None and len(features) <= FLAT_TREES_MAX_ROWS and not np.isnan(features).any():
            return self.trees.predict(features)
        return self.pipeline[1:].predict(features)

    def describe(self) -> dict[str, Any]:
        return {**self.label, **self.requested, "uri": self.ref.uri, "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "metrics": self.metrics}


class FlatTrees:
    """A HistGradientBoostingRegressor's trees as flat arrays, walked all at once, one tree level per numpy step.

    For a few rows, sklearn's predict() is nearly all fixed cost: input checks, then a Python call per tree (~1.4 ms
    for one row through the champion's 225 trees); walking all trees together takes ~0.08 ms. Beyond
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

    def predict(self, X: np.ndarray) -> np.ndarray:
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


def _category_goes_right(model: HistGradientBoostingRegressor, trees: list, nodes: np.ndarray,
                         categorical: np.ndarray) -> np.ndarray:
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


def probe_arrays(rows: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Random districts across California: every category, some without total_bedrooms."""
    rng = np.random.default_rng(0)
    households = rng.uniform(1, 5000, rows)
    rooms = households * rng.uniform(1, 10, rows)
    bedrooms = np.where(rng.random(rows) < 0.1, np.nan, rooms * rng.uniform(0.1, 0.4, rows))
    numeric = np.column_stack([rng.uniform(-124.4, -114.3, rows), rng.uniform(32.5, 42.0, rows),
                               rng.integers(1, 53, rows), rooms, bedrooms, households * rng.uniform(1, 5, rows),
                               households, rng.uniform(0.5, 15, rows)])
    return numeric, rng.integers(0, len(CATEGORIES), rows).astype(float)


class ModelRefused(Exception):
    pass


def locate(settings: Settings, client: MlflowClient) -> ModelRef:
    """The registry version that MODEL_STAGE or MODEL_ALIAS points at."""
    if settings.model_stage:
        with warnings.catch_warnings():  # stages are deprecated in MLflow 3, still used by seed deployments
            warnings.simplefilter("ignore", FutureWarning)
            versions = client.get_latest_versions(settings.model_name, [settings.model_stage])
        if not versions:
            raise LookupError(f"{settings.model_name} has no version in stage {settings.model_stage}")
        version = max(versions, key=lambda v: int(v.version)).version
    else:
        version = client.get_model_version_by_alias(settings.model_name, settings.model_alias).version
    return ModelRef(f"models:/{settings.model_name}/{version}", str(version))


def load(ref: ModelRef, settings: Settings, registry: Callable[[], MlflowClient]) -> ServedModel:
    """Download, check and load the model; raise unless it is fit to serve."""
    with tempfile.TemporaryDirectory(prefix="housing-model-") as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=scratch)
        metadata = Model.load(local)
        check_schema(metadata)
        pipeline = mlflow.sklearn.load_model(local)
        drift = drift_window(ref, Path(local) / REFERENCE_PROFILE, settings.drift_window)
    if not hasattr(pipeline.steps[0][1], "transform_arrays"):
        raise ModelRefused("the first pipeline step is not features.HousingFeatures")
    model = ServedModel(ref=ref, name=settings.model_name, requested=requested_model(settings), pipeline=pipeline,
                        trees=flatten(pipeline), drift=drift, run_id=metadata.run_id,
                        metrics=training_metrics(registry, metadata.run_id), loaded_at=datetime.now(UTC))
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


def training_metrics(registry: Callable[[], MlflowClient], run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return registry().get_run(run_id).data.metrics
    except mlflow.MlflowException as error:  # a model copied away from its tracking server still serves
        log.warning("no training metrics for run %s: %s", run_id, error)
        return {}


def smoke_test(model: ServedModel) -> None:
    fast = model.predict(*to_arrays(list(SMOKE_RECORDS), batch=True))
    reference = model.pipeline.predict(pd.DataFrame(list(SMOKE_RECORDS), columns=list(FEATURES)))
    if not np.all(np.isfinite(fast)):
        raise ModelRefused(f"smoke predictions are not all finite: {fast.tolist()}")
    if not np.allclose(fast, reference, rtol=1e-6, atol=0):
        raise ModelRefused(f"fast path {fast.tolist()} disagrees with the pipeline {reference.tolist()}")


@dataclass(frozen=True)
class Reload:
    result: str  # loaded, unchanged, failed (model refused), unavailable (registry error, or no such model)
    detail: str = ""


class ModelKeeper:
    """Holds the served model; replaces it only with one that loaded and passed the smoke test.

    A request reads `current` once and finishes on that model, so swapping is one assignment.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self._client: MlflowClient | None = None
        self._lock = threading.Lock()

    def refresh(self) -> Reload:
        with self._lock:
            outcome = self._refresh()
        RELOADS.labels(outcome.result).inc()
        return outcome

    def _refresh(self) -> Reload:
        try:
            ref = self._locate()
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

    def _locate(self) -> ModelRef:
        if self.settings.model_uri:
            return ModelRef(self.settings.model_uri, None)
        return locate(self.settings, self._registry())

    def _registry(self) -> MlflowClient:
        """Made on first use, off the start-up path: an unusable MLFLOW_TRACKING_URI must not stop the server."""
        if self._client is None:
            self._client = MlflowClient()
        return self._client

    def _swap(self, model: ServedModel) -> None:
        previous, self.current = self.current, model
        if previous is not None:
            MODEL_INFO.labels(previous.name, previous.ref.version or "").set(0)
        MODEL_INFO.labels(model.name, model.ref.version or "").set(1)
        MODEL_LOADED.set(1)
        LAST_RELOAD.set(model.loaded_at.timestamp())


class BackgroundThread:
    """A daemon thread running `_run` until `stop()` sets `_stop`; subclasses name it and write `_run`."""

    name = "background"
    join_timeout_s = 5.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.join_timeout_s)

    def _run(self) -> None:
        raise NotImplementedError


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


# --- drift ---------------------------------------------------------------------------------------------------


class DriftWindow:
    """The last `size` records one model predicted, in the bins of its reference profile (features.py), and their PSI.

    PSI (Population Stability Index) because it is the usual score of model monitoring, with conventional thresholds
    (below 0.1 stable, above 0.25 a significant shift), it treats numeric and categorical fields alike, and over bins
    fixed at training time it needs only a bin index per value: a window is a ring of small integers, and its scores
    are bin counts. A request only queues its arrays (`add`, one deque append); `update`, on the drift thread, bins
    them into the ring and `scores` compares the ring's bin fractions with the training fractions.
    """

    def __init__(self, profile: dict, size: int) -> None:
        self.size = size
        self._numeric = [profile["fields"][name] for name in NUMERIC_FEATURES]
        self._prediction = profile["prediction"]
        if any(len(p["fractions"]) != len(p["edges"]) + 2 for p in (*self._numeric, self._prediction)):
            raise ValueError("a numeric profile needs a fraction per bin: len(edges) + 1, and one for missing values")
        category = profile["fields"][CATEGORICAL_FEATURE]
        # The profile's bin of each of this server's category codes; its last bin is for unknown categories.
        self._category_bins = np.array([category["categories"].index(c) if c in category["categories"]
                                        else len(category["categories"]) for c in CATEGORIES])
        self._expected = [np.asarray(p["fractions"], dtype=float) for p in (*self._numeric, category, self._prediction)]
        self._bins = np.zeros((size, len(DRIFT_FIELDS)), dtype=np.intp)
        self._written = 0
        # At most `size` entries of at least one record each: always the newest `size` records, if the thread lags.
        self._queued: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=size)

    @property
    def rows(self) -> int:
        return min(self._written, self.size)

    def add(self, numeric: np.ndarray, codes: np.ndarray, predictions: np.ndarray) -> None:
        self._queued.append((numeric, codes, predictions))

    def update(self) -> None:
        """Move the queued records into the ring, overwriting the oldest."""
        batches = [self._queued.popleft() for _ in range(len(self._queued))]
        if not batches:
            return
        numeric, codes, predictions = (np.concatenate(parts)[-self.size:] for parts in zip(*batches, strict=True))
        bins = np.column_stack([*(bin_indices(p, numeric[:, i]) for i, p in enumerate(self._numeric)),
                                self._category_bins[codes.astype(np.intp)], bin_indices(self._prediction, predictions)])
        self._bins[(self._written + np.arange(len(bins))) % self.size] = bins
        self._written += len(bins)

    def scores(self) -> dict[str, float]:
        """PSI of each of DRIFT_FIELDS; NaN for an empty window."""
        window = self._bins[:self.rows]
        if not len(window):
            return dict.fromkeys(DRIFT_FIELDS, math.nan)
        return {field: psi(expected, np.bincount(window[:, i], minlength=len(expected)) / len(window))
                for i, (field, expected) in enumerate(zip(DRIFT_FIELDS, self._expected, strict=True))}


class DriftMonitor(BackgroundThread):
    """Every DRIFT_UPDATE_S, brings the served model's drift window up to date and publishes its scores.

    A new model comes with a new, empty window. A model without a reference profile gets no PSI series and a window
    of 0 records; if one with a profile served before it in this worker, its PSI series turn NaN (multiprocess mode
    cannot remove series).
    """

    name = "drift"

    def __init__(self, keeper: ModelKeeper) -> None:
        super().__init__()
        self._keeper = keeper
        self._published = False

    def _run(self) -> None:
        while not self._stop.wait(DRIFT_UPDATE_S):
            try:
                self.publish()
            except Exception:  # like the poller: a surprise must not end drift monitoring silently
                log.exception("drift update failed")

    def publish(self) -> None:
        model = self._keeper.current
        window = model.drift if model is not None else None
        if window is not None:
            window.update()
            scores, rows = window.scores(), window.rows
        elif self._published:
            scores, rows = dict.fromkeys(DRIFT_FIELDS, math.nan), 0
        else:
            return
        for field, score in scores.items():
            DRIFT_PSI.labels(field).set(score)
        DRIFT_ROWS.set(rows)
        self._published = True


# --- prediction log ------------------------------------------------------------------------------------------


class _CountedFailures(RotatingFileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        LOG_DROPPED.inc()


class PredictionLog(BackgroundThread):
    """One JSON line per prediction request, written by a background thread.

    A request only appends its entry to a bounded in-memory buffer, which the thread writes out every
    PREDICTION_LOG_FLUSH_S, and at shutdown. Waking the thread per request would cost a request more than the
    prediction itself. A full buffer or a failing disk loses entries, counted in housing_prediction_log_dropped_total,
    but never delays or fails a prediction. Each worker writes its own file.
    """

    name = "prediction-log"
    join_timeout_s = 10.0  # stopping writes what is pending

    def __init__(self, directory: Path, max_bytes: int = PREDICTION_LOG_MAX_BYTES) -> None:
        super().__init__()
        self.path = directory / f"predictions-{os.getpid()}.jsonl"
        self.max_bytes = max_bytes
        self._pending: deque[dict] = deque()

    def append(self, entry: dict) -> None:
        if len(self._pending) >= PREDICTION_LOG_BUFFER:
            LOG_DROPPED.inc()
        else:
            self._pending.append(entry)

    def _run(self) -> None:
        lines = self._open()
        while not self._stop.wait(PREDICTION_LOG_FLUSH_S):
            self._write(lines)
        self._write(lines)
        if lines is not None:
            lines.close()

    def _write(self, lines: RotatingFileHandler | None) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if lines is None:
                LOG_DROPPED.inc()
                continue
            entry["time"] = datetime.fromtimestamp(entry["time"], UTC).isoformat()
            lines.handle(logging.makeLogRecord({"msg": orjson.dumps(entry).decode()}))

    def _open(self) -> RotatingFileHandler | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.error("prediction log disabled: %s", error)
            return None
        return _CountedFailures(self.path, maxBytes=self.max_bytes, backupCount=PREDICTION_LOG_BACKUPS,
                                encoding="utf-8", delay=True)


# --- HTTP ----------------------------------------------------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts and times every request by route; unknown paths and methods share one label, to bound the series."""

    def __init__(self, app: ASGIApp, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            LATENCY.labels(route).observe(time.perf_counter() - started)
            REQUESTS.labels(route, method, str(status)).inc()
            IN_FLIGHT.dec()


def one_openmp_thread() -> None:
    """Limit OpenMP to one thread in the calling thread. A team of threads is woken, and spins, for each of the
    model's trees: on a busy machine that costs far more than it saves. WORKERS and `Service.parallelism` use cores."""
    threadpool_limits(limits=1, user_api="openmp")


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers=headers, media_type="application/json")


def error(status: int, message: str, headers: Mapping[str, str] | None = None, **details: Any) -> Response:
    return json_response({"error": message, **details}, status, headers)


def not_loaded() -> Response:
    return error(503, "no model loaded yet", headers={"Retry-After": str(RETRY_S)})


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is larger than MAX_BODY_BYTES={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is larger than MAX_BODY_BYTES={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


class Service:
    """The endpoints, around one ModelKeeper and one PredictionLog."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keeper = ModelKeeper(settings)
        self.poller = Poller(self.keeper, 0 if settings.model_uri else settings.reload_interval_s)
        self.prediction_log = PredictionLog(settings.prediction_log_dir)
        self.drift = DriftMonitor(self.keeper)
        self.openapi = openapi_document(settings)
        # The cores this worker may use; with WORKERS>1 they are shared out.
        self.parallelism = max(1, len(os.sched_getaffinity(0)) // settings.workers)
        self._pool = ThreadPoolExecutor(self.parallelism, "predict", initializer=one_openmp_thread)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        one_openmp_thread()  # small batches are predicted on this, the event loop's thread
        self.prediction_log.start()
        self.poller.start()
        self.drift.start()
        try:
            yield
        finally:
            self.drift.stop()
            self.poller.stop()
            self._pool.shutdown()
            self.prediction_log.stop()
            if multiprocess_metrics():
                prometheus_multiprocess.mark_process_dead(os.getpid())

    async def predict(self, request: Request) -> Response:
        if not is_json(request.headers.get("content-type", "")):
            raise HTTPException(415, "send the records as Content-Type: application/json")
        body = await read_body(request, self.settings.max_body_bytes)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as problem:
            raise HTTPException(400, f"malformed JSON: {problem}") from None
        records, batch = records_in(payload, self.settings.max_batch_rows)
        numeric, codes = to_arrays(records, batch)
        model = self.keeper.current
        if model is None:
            return not_loaded()
        predictions = await self._predict(model, numeric, codes)
        if model.drift is not None:
            model.drift.add(numeric, codes, predictions)
        values = predictions.tolist()
        identity = request_id(request)
        self._record(identity, model, records, values)
        content = {"predictions": values} if batch else {"prediction": values[0]}
        return json_response({**content, "model": model.label}, headers={"X-Request-ID": identity})

    async def _predict(self, model: ServedModel, numeric: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Small batches inline (a thread hop costs more than it saves); large ones in chunks, in parallel."""
        if len(numeric) < PARALLEL_MIN_ROWS:
            return model.predict(numeric, codes)
        loop = asyncio.get_running_loop()
        chunks = np.array_split(np.arange(len(numeric)), self.parallelism)
        parts = await asyncio.gather(*(loop.run_in_executor(self._pool, model.predict, numeric[rows], codes[rows])
                                       for rows in chunks))
        return np.concatenate(parts)

    def _record(self, identity: str, model: ServedModel, records: list, values: list[float]) -> None:
        PREDICTIONS.inc(len(values))
        BATCH_SIZE.observe(len(values))
        for value in values:
            PREDICTED_VALUE.observe(value)
        self.prediction_log.append({"request_id": identity, "time": time.time(), "model": model.label,
                                    "inputs": records, "outputs": values})

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        model = self.keeper.current
        return json_response({"status": "ready", "model": model.label}) if model else not_loaded()

    async def model(self, request: Request) -> Response:
        model = self.keeper.current
        return json_response(model.describe()) if model else not_loaded()

    async def metrics(self, request: Request) -> Response:
        return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)

    async def reload(self, request: Request) -> Response:
        token = self.settings.reload_token
        if not token:
            return error(404, "reload is disabled: set RELOAD_TOKEN to enable it")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return error(401, "send Authorization: Bearer <RELOAD_TOKEN>", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error(403, "wrong reload token")
        outcome = await run_in_threadpool(self.keeper.refresh)
        model = self.keeper.current
        content = {"result": outcome.result, "detail": outcome.detail, "model": model.label if model else None}
        return json_response(content, 502 if outcome.result in ("failed", "unavailable") else 200)

    async def openapi_json(self, request: Request) -> Response:
        return json_response(self.openapi)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, headers=exc.headers)


async def invalid_input(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    for field, count in Tally(problem.field for problem in exc.problems).items():
        VALIDATION_FAILURES.labels(field).inc(count)
    reported = [{"path": p.path, "message": p.message} for p in exc.problems[:MAX_REPORTED_PROBLEMS]]
    return error(422, f"{len(exc.problems)} problem(s) in the request body", problems=reported)


def create_app(settings: Settings) -> Starlette:
    service = Service(settings)
    routes = [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/health", service.health),
        Route("/ready", service.ready),
        Route("/model", service.model),
        Route("/metrics", service.metrics),
        Route("/reload", service.reload, methods=["POST"]),
        Route("/openapi.json", service.openapi_json),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan,
                    exception_handlers={HTTPException: http_error, InvalidInput: invalid_input})
    app.add_middleware(MetricsMiddleware, routes=frozenset(route.path for route in routes))
    return app


# --- OpenAPI -------------------------------------------------------------------------------------------------


def openapi_document(settings: Settings) -> dict[str, Any]:
    def number(name: str) -> dict[str, Any]:
        low, high = COORDINATE_BOUNDS.get(name, (None, None))
        bounds = {"minimum": low, "maximum": high} if low is not None else {}
        return {"type": ["number", "null"] if name in OPTIONAL_FEATURES else "number", **bounds}

    def answer(description: str, schema: str = "Error") -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}

    record = {
        "type": "object",
        "additionalProperties": False,
        "required": [name for name in FEATURES if name not in OPTIONAL_FEATURES],
        "properties": {**{name: number(name) for name in NUMERIC_FEATURES},
                       CATEGORICAL_FEATURE: {"type": "string", "enum": list(CATEGORIES)}},
        "example": SMOKE_RECORDS[0],
    }
    batch = {"type": "object", "additionalProperties": False, "required": ["instances"],
             "properties": {"instances": {"type": "array", "minItems": 1, "maxItems": settings.max_batch_rows,
                                          "items": {"$ref": "#/components/schemas/Record"}}}}
    prediction = {"type": "object", "required": ["model"], "properties": {
        "prediction": {"type": "number"},
        "predictions": {"type": "array", "items": {"type": "number"}},
        "model": {"type": "object", "properties": {"name": {"type": "string"},
                                                   "version": {"type": ["string", "null"]}}}}}
    problem = {"type": "object", "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}
    failure = {"type": "object", "required": ["error"],
               "properties": {"error": {"type": "string"}, "problems": {"type": "array", "items": problem}}}
    predict = {
        "summary": "Predict median house values (USD) for one record or a batch",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
            {"$ref": "#/components/schemas/Record"}, {"$ref": "#/components/schemas/Batch"}]}}}},
        "responses": {
            "200": answer("a prediction for a record, predictions for a batch", "Prediction"),
            "400": answer("malformed JSON"),
            "413": answer("body larger than MAX_BODY_BYTES, or more records than MAX_BATCH_ROWS"),
            "415": answer("Content-Type is not application/json"),
            "422": answer("records that do not match the schema; each problem names its path"),
            "503": answer("no model loaded yet; retry after Retry-After seconds"),
        },
    }
    plain = {"200": {"description": "OK"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "California housing price regressor", "version": "1"},
        "paths": {
            "/predict": {"post": predict},
            "/health": {"get": {"summary": "The process is alive", "responses": plain}},
            "/ready": {"get": {"summary": "A model is loaded", "responses": {**plain, "503": answer("not yet")}}},
            "/model": {"get": {"summary": "The served model: version, run, training metrics",
                               "responses": {**plain, "503": answer("no model loaded yet")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": plain}},
            "/reload": {"post": {"summary": "Ask the registry now; load the version it points at if new",
                                 "security": [{"reloadToken": []}],
                                 "responses": {**plain, "401": answer("no bearer token"), "403": answer("wrong token"),
                                               "404": answer("RELOAD_TOKEN is not set"),
                                               "502": answer("the new version was refused, or the registry failed")}}},
        },
        "components": {
            "schemas": {"Record": record, "Batch": batch, "Prediction": prediction, "Error": failure},
            "securitySchemes": {"reloadToken": {"type": "http", "scheme": "bearer"}},
        },
    }


# --- entry point ---------------------------------------------------------------------------------------------

LOG_CONFIG = {
    **uvicorn.config.LOGGING_CONFIG,
    "loggers": {**uvicorn.config.LOGGING_CONFIG["loggers"],
                "housing": {"handlers": ["default"], "level": "INFO", "propagate": False}},
}


def prepare_multiprocess_metrics() -> None:
    """Give all workers one directory of prometheus-client value files, without a previous run's values."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
        return
    directory = tempfile.mkdtemp(prefix="housing-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def main() -> None:
    settings = Settings.from_env()
    if settings.workers > 1:
        prepare_multiprocess_metrics()
    # A worker imports numpy, scikit-learn and MLflow before it answers the supervisor's first ping; with uvicorn's
    # 5 s default, workers merely slow to start on a busy machine are killed and restarted.
    uvicorn.run("serve:app", host=settings.host, port=settings.port, workers=settings.workers,
                log_config=LOG_CONFIG, timeout_worker_healthcheck=60)


app = create_app(Settings.from_env())

if __name__ == "__main__":
    main()
