"""The HTTP endpoints and their error answers, around one ModelKeeper; serve.py routes to them."""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from threadpoolctl import threadpool_limits

from features import FloatArray
from serving.body import read_predict_input
from serving.drift import DriftMonitor
from serving.metrics import BATCH_SIZE, PREDICTED_VALUE, PREDICTIONS, VALIDATION_FAILURES, metrics_text, worker_stopped
from serving.model import RETRY_S, ModelKeeper, Poller, Reload, ServedModel
from serving.prediction_log import PredictionLog
from serving.schema import InputProblem, InvalidInput, openapi_document
from serving.settings import Settings

PARALLEL_MIN_ROWS = 256  # from this batch size, chunks are predicted in parallel threads
# /reload answers within this, whatever the registry does. One registry call is bounded (registry.py), but /reload
# may first wait for a check the poller has begun; past this the check goes on in the background.
RELOAD_ANSWER_S = 8.0


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


def route_of(request: Request) -> str:
    """The path template of the route that answers: one label for /v2/models/{name}/infer, whatever the name."""
    route = request.scope.get("route")
    return route.path if isinstance(route, Route) else request.url.path


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
        self.drift = DriftMonitor(self.keeper.drift_window)
        self.openapi = openapi_document(settings)
        # The cores this worker may use; with WORKERS>1 they are shared out.
        self.parallelism = max(1, len(os.sched_getaffinity(0)) // settings.workers)
        self._pool = ThreadPoolExecutor(self.parallelism, "predict", initializer=one_openmp_thread)
        self._parsers = anyio.CapacityLimiter(self.parallelism)  # large bodies parsed at once (body.py)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        one_openmp_thread()  # small batches are predicted on this, the event loop's thread
        # The objects of every imported module are long-lived: out of the garbage collector's full passes, which
        # would otherwise walk them all, holding the GIL (and stalling the event loop) for a few hundred ms.
        gc.freeze()
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
            worker_stopped()

    async def predict(self, request: Request) -> Response:
        inputs = await read_predict_input(request, self.settings, self._parsers)
        model = self.keeper.current
        if model is None:
            return not_loaded()
        identity = request_id(request)
        values = await self.score(request, identity, model, inputs.records, inputs.numeric, inputs.codes)
        content = {"predictions": values} if inputs.batch else {"prediction": values[0]}
        return json_response({**content, "model": model.label}, headers={"X-Request-ID": identity})

    async def score(self, request: Request, identity: str, model: ServedModel, records: list[Any],
                    numeric: FloatArray, codes: FloatArray) -> list[float]:
        """Every protocol's one path from checked arrays to predictions: drift, metrics and the prediction log."""
        predictions = await self._predict(model, numeric, codes)
        if model.drift is not None:
            model.drift.add(numeric, codes, predictions)
        values: list[float] = predictions.tolist()
        self._record(identity, route_of(request), model, records, values)
        return values

    async def _predict(self, model: ServedModel, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        """Small batches inline (a thread hop costs more than it saves); large ones in chunks, in parallel."""
        if len(numeric) < PARALLEL_MIN_ROWS:
            return model.predict(numeric, codes)
        loop = asyncio.get_running_loop()
        chunks = np.array_split(np.arange(len(numeric)), self.parallelism)
        parts = await asyncio.gather(*(loop.run_in_executor(self._pool, model.predict, numeric[rows], codes[rows])
                                       for rows in chunks))
        return np.concatenate(parts)

    def _record(self, identity: str, route: str, model: ServedModel, records: list[Any], values: list[float]) -> None:
        PREDICTIONS.inc(len(values))
        BATCH_SIZE.observe(len(values))
        for value in values:
            PREDICTED_VALUE.observe(value)
        self.prediction_log.append({"request_id": identity, "time": time.time(), "model": model.label,
                                    "route": route, "inputs": records, "outputs": values})

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        model = self.keeper.current
        return json_response({"status": "ready", "model": model.label}) if model else not_loaded()

    async def model(self, request: Request) -> Response:
        """The served model; `not_serving`: the version the registry points at instead, refused or failed, and why."""
        model, not_serving = self.keeper.current, self.keeper.not_serving
        if model is None:
            return error(503, "no model loaded yet", headers={"Retry-After": str(RETRY_S)}, not_serving=not_serving)
        return json_response({**model.describe(), "not_serving": not_serving})

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
        try:
            with anyio.fail_after(RELOAD_ANSWER_S):
                outcome = await anyio.to_thread.run_sync(self.keeper.refresh, abandon_on_cancel=True)
        except TimeoutError:
            outcome = Reload("unavailable", f"the model registry at {self.keeper.registry_address} did not answer "
                                            f"within {RELOAD_ANSWER_S:g} s (or a new version is still loading); the "
                                            "check goes on in the background, GET /model shows what is served")
        model = self.keeper.current
        content = {"result": outcome.result, "detail": outcome.detail, "model": model.label if model else None}
        if outcome.result == "unavailable":  # the registry's outage, not this server's: ask again later
            return json_response({"error": outcome.detail, **content}, 503, {"Retry-After": str(RETRY_S)})
        if outcome.result in ("failed", "refused"):
            refused = f"the new version was refused; the served model stays: {outcome.detail}"
            return json_response({"error": refused, **content}, 502)
        return json_response(content)

    async def openapi_json(self, request: Request) -> Response:
        return json_response(self.openapi)


async def http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only (EXCEPTION_HANDLERS)
        raise exc
    return error(exc.status_code, exc.detail, headers=exc.headers)


def count_problems(problems: list[InputProblem]) -> None:
    for field, count in Tally(problem.field for problem in problems).items():
        VALIDATION_FAILURES.labels(field).inc(count)


async def invalid_input(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, InvalidInput):  # registered for InvalidInput only (EXCEPTION_HANDLERS)
        raise exc
    count_problems(exc.problems)
    reported = [{"path": p.path, "message": p.message} for p in exc.reported()]
    return error(422, str(exc), problems=reported)


EXCEPTION_HANDLERS = {HTTPException: http_error, InvalidInput: invalid_input}
