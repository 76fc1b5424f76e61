"""Every Prometheus series the server exports, the middleware that counts requests, and the /metrics text.

The names are a contract with prometheus/rules and the Grafana dashboards: change them there too, or not at all.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from names import FEATURES

if TYPE_CHECKING:  # features imports scikit-learn; serve.py's supervisor imports this module
    from features import FloatArray

# What one registry check came to: loaded (a new model serves), unchanged, failed (the model could not be loaded or
# failed a check), unavailable (a registry error, or no such model), refused (the version is not what a trusted key
# signed, not recorded as promoted by the gate or a person, or revoked: serving/model.py).
ReloadResult = Literal["loaded", "unchanged", "failed", "unavailable", "refused"]
RELOAD_RESULTS: tuple[ReloadResult, ...] = get_args(ReloadResult)

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
RELOADS = Counter("housing_model_reloads", f"Registry checks by result: {', '.join(RELOAD_RESULTS)}.",
                  ["result"], registry=METRICS)
REVOKED_SERVING = Gauge("housing_model_revoked_serving", "1 while the version the registry points at is revoked and "
                        "no unrevoked version it replaced can take over: the model in hand keeps serving.",
                        multiprocess_mode="livemax", registry=METRICS)
LAST_RELOAD = Gauge("housing_model_last_reload_timestamp_seconds", "Unix time the served model was loaded.",
                    multiprocess_mode="livemax", registry=METRICS)
# Why a prediction log entry was not written: buffer_full, write_error, client_budget (serving/prediction_log.py).
LogDropReason = Literal["buffer_full", "write_error", "client_budget"]
LOG_DROPPED = Counter("housing_prediction_log_dropped", "Prediction log entries not written, by reason: "
                      f"{', '.join(get_args(LogDropReason))}.", ["reason"], registry=METRICS)
LOG_UPLOADS = Counter("housing_prediction_log_uploads", "Closed prediction log segments sent to PREDICTION_LOG_S3, "
                      "by result: uploaded, failed.", ["result"], registry=METRICS)
# The series the alerts watch exist at 0 from the start: rate() and increase() cannot count the value a series is
# born with, so a first burst of failures would go unseen.
for result in RELOAD_RESULTS:
    RELOADS.labels(result)
for reason in get_args(LogDropReason):
    LOG_DROPPED.labels(reason)
for upload_result in ("uploaded", "failed"):
    LOG_UPLOADS.labels(upload_result)
for status in ("200", "400", "413", "415", "422", "500", "503"):  # what /predict answers
    REQUESTS.labels("/predict", "POST", status)
for prediction_route in ("/invocations", "/v2/models/{name}/infer"):  # docs/protocols.md
    for status in ("200", "400", "404", "413", "415", "500", "503"):
        REQUESTS.labels(prediction_route, "POST", status)
for field in (*FEATURES, "body", "instances", "unknown"):  # see schema.InputProblem.field
    VALIDATION_FAILURES.labels(field)
# One series per worker ("liveall": a pid label with WORKERS>1). A PSI belongs to one worker's window, and windows do
# not add up; prometheus/rules takes the maximum over the windows that hold enough records.
DRIFT_PSI = Gauge("housing_drift_psi", "Population Stability Index of the drift window against the served model's "
                  "training data, per input field and for the predictions; NaN while the window is empty.", ["field"],
                  multiprocess_mode="liveall", registry=METRICS)
DRIFT_ROWS = Gauge("housing_drift_window_rows", "Records in the drift window (DRIFT_WINDOW at most).",
                   multiprocess_mode="liveall", registry=METRICS)
# A loaded model whose compiled path (serving/trees.py) could not reproduce its predictions: it serves through
# scikit-learn, correct but many times slower; the serve log says why.
# The candidate in shadow (serving/shadow.py), by its version: what `make bake` decides on.
SHADOW_PREDICTIONS = Counter("housing_shadow_predictions", "Records the candidate scored in shadow, paired with the "
                             "champion's answer.", ["version"], registry=METRICS)
SHADOW_DROPPED = Counter("housing_shadow_dropped", "Records not scored in shadow: the queue was full, or the "
                         "scoring process gave no answer in time.", ["version"],
                         registry=METRICS)
SHADOW_ERRORS = Counter("housing_shadow_errors", "Records the candidate failed to score (raised, or not finite).",
                        ["version"], registry=METRICS)
SHADOW_LATENCY = Histogram("housing_shadow_latency_seconds", "The candidate's CPU time to score one request's records.",
                           ["version"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                                 2.5), registry=METRICS)
SHADOW_DIFFERENCE = Histogram("housing_shadow_relative_difference", "|candidate - champion| / champion per record "
                              "(the gate's prediction shift, on live traffic).", ["version"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
                              registry=METRICS)
CANDIDATE_INFO = Gauge("housing_candidate_info", "1 for the candidate version loaded in shadow.", ["version"],
                       multiprocess_mode="livemax", registry=METRICS)
COMPILE_FALLBACKS = Counter("housing_model_compile_fallbacks", "Models loaded that serve through scikit-learn "
                            "because their compiled predictor was refused or could not be built.", registry=METRICS)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Below this many values observe() one by one is cheaper: the numpy calls of a bucket count cost ~6 us in all.
OBSERVE_ALL_MIN_VALUES = 8


def observe_all(histogram: Histogram, values: FloatArray) -> None:
    """Histogram.observe of every value, at the cost of one per bucket: a bucket count and the sum for the whole
    batch, instead of a lock and a bucket search per value (~1 us a value; 10 ms for a batch of 10,000). Fills the
    histogram's own value holders, so single- and multi-process modes export it unchanged."""
    if len(values) < OBSERVE_ALL_MIN_VALUES:
        for value in values.tolist():
            histogram.observe(value)
        return
    upper_bounds = histogram._upper_bounds  # ends with +Inf; observe() counts a value in the first bound >= it
    counts = np.bincount(np.searchsorted(upper_bounds, values, side="left"), minlength=len(upper_bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(np.sum(values)))


class MetricsMiddleware:
    """Counts and times every request by route; unknown paths and methods share one label, to bound the series."""

    def __init__(self, app: ASGIApp, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
            # The template of the route that answered (set by the router), so /v2/models/{name}/infer is one label.
            template = getattr(scope.get("route"), "path", None)
            route = template if template in self.routes else "other"
            LATENCY.labels(route).observe(time.perf_counter() - started)
            REQUESTS.labels(route, method, str(status)).inc()
            IN_FLIGHT.dec()


def multiprocess_metrics() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ  # prometheus-client's own test, made when it is imported


def metrics_text() -> bytes:
    if not multiprocess_metrics():
        return generate_latest(METRICS)
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


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


def worker_stopped() -> None:
    """Drop this worker's live gauges from the sums, minima and maxima the other workers still report."""
    if multiprocess_metrics():
        prometheus_multiprocess.mark_process_dead(os.getpid())
