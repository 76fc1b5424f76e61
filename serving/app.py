"""The HTTP endpoints and their error answers, around one ModelKeeper; serve.py routes to them."""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import NamedTuple

import anyio
import anyio.to_thread
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from threadpoolctl import threadpool_limits

from features import FloatArray
from names import FEATURES
from serving.drift import DriftMonitor
from serving.intake import parse_json, read_checked, refuse_json_beyond
from serving.metrics import BATCH_SIZE, PREDICTED_VALUE, PREDICTIONS, metrics_text, observe_all, worker_stopped
from serving.model import RETRY_S, ModelKeeper, Poller, Reload, ServedModel
from serving.openapi import openapi_document
from serving.prediction_log import PredictionLog
from serving.responses import error, json_response, not_loaded, request_id
from serving.schema import CheckedInput, in_body, in_instances, records_in, to_arrays
from serving.settings import Settings
from serving.shadow import ShadowScorer

PARALLEL_MIN_ROWS = 256  # from this batch size, chunks are predicted in parallel threads
# /reload answers within this, whatever the registry does. One registry call is bounded (registry.py), but /reload
# may first wait for a check the poller has begun; past this the check goes on in the background.
RELOAD_ANSWER_S = 8.0


def one_openmp_thread() -> None:
    """Limit OpenMP to one thread in the calling thread. A team of threads is woken, and spins, for each of the
    model's trees: on a busy machine that costs far more than it saves. WORKERS and `Service.parallelism` use cores."""
    threadpool_limits(limits=1, user_api="openmp")


def route_of(request: Request) -> str:
    """The path template of the route that answers: one label for /v2/models/{name}/infer, whatever the name."""
    route = request.scope.get("route")
    return route.path if isinstance(route, Route) else request.url.path


def predict_input(body: bytes, media_type: str, max_rows: int) -> CheckedInput:
    """A /predict body → its checked records (intake.py's steps).

    `{"instances": [record, ...]}` has max_rows + 1 objects, one array and fewer than len(FEATURES) commas per record.
    """
    refuse_json_beyond(body, max_rows + 2, max_rows * len(FEATURES), max_rows)
    records, batch = records_in(parse_json(body), max_rows)
    numeric, codes = to_arrays(records, in_instances if batch else in_body)
    return CheckedInput(records, numeric, codes, batch=batch)


class Scored(NamedTuple):
    values: list[float]  # one prediction per record
    request_id: str  # the client's X-Request-ID, or a new one: in the answer's header and the prediction log
    ids: list[str]  # each prediction's id (prediction_ids)


def prediction_ids(request: str, count: int, batch: bool) -> list[str]:
    """Each prediction's id, what its true price is joined on later (`make realized`): the request's id for one
    /predict record, `<request id>/<index>` for each record of a batch (or of a protocol that always answers a list)."""
    return [f"{request}/{index}" for index in range(count)] if batch else [request]


class Service:
    """The endpoints, around one ModelKeeper and one PredictionLog."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keeper = ModelKeeper(settings)
        self.poller = Poller(self.keeper, 0 if settings.model_uri else settings.reload_interval_s)
        self.prediction_log = PredictionLog(settings)
        self.drift = DriftMonitor(self.keeper.drift_window)
        self.shadow = ShadowScorer(self.keeper, self.prediction_log)
        self.openapi = openapi_document(settings)
        # The cores this worker may use; with WORKERS>1 they are shared out.
        self.parallelism = max(1, len(os.sched_getaffinity(0)) // settings.workers)
        self._pool = ThreadPoolExecutor(self.parallelism, "predict", initializer=one_openmp_thread)
        self.parsers = anyio.CapacityLimiter(self.parallelism)  # large bodies parsed at once (intake.py)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        one_openmp_thread()  # small batches are predicted on this, the event loop's thread
        # The objects of every imported module are long-lived: out of the garbage collector's full passes, which
        # would otherwise walk them all, holding the GIL (and stalling the event loop) for a few hundred ms.
        gc.freeze()
        self.prediction_log.start()
        self.poller.start()
        self.drift.start()
        self.shadow.start()
        try:
            yield
        finally:
            self.shadow.stop()
            self.drift.stop()
            self.poller.stop()
            self._pool.shutdown()
            self.prediction_log.stop()
            worker_stopped()

    async def predict(self, request: Request) -> Response:
        max_rows = self.settings.max_batch_rows
        checked = await read_checked(request, self.settings, self.parsers, ("application/json",),
                                     lambda body, media_type: predict_input(body, media_type, max_rows))
        model = self.keeper.current
        if model is None:
            return not_loaded()
        scored = await self.score(request, model, checked)
        content = ({"predictions": scored.values, "ids": scored.ids} if checked.batch else
                   {"prediction": scored.values[0], "id": scored.request_id})
        return json_response({**content, "model": model.label}, headers={"X-Request-ID": scored.request_id})

    async def score(self, request: Request, model: ServedModel, checked: CheckedInput) -> Scored:
        """Every protocol's one path from checked input to predictions: drift, metrics, the prediction log, and the
        candidate in shadow (after the answer is made, off the request path)."""
        predictions = await self._predict(model, checked.numeric, checked.codes)
        if model.drift is not None:
            model.drift.add(checked.numeric, checked.codes, predictions)
        identity, route = request_id(request), route_of(request)
        scored = Scored(predictions.tolist(), identity, prediction_ids(identity, len(predictions), checked.batch))
        self._record(request, route, model, checked, predictions, scored)
        self.shadow.offer(checked.numeric, checked.codes, predictions, scored.ids, route)
        return scored

    async def _predict(self, model: ServedModel, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        """Small batches inline (a thread hop costs more than it saves); large ones in chunks, in parallel."""
        if len(numeric) < PARALLEL_MIN_ROWS:
            return model.predict(numeric, codes)
        loop = asyncio.get_running_loop()
        chunks = np.array_split(np.arange(len(numeric)), self.parallelism)
        parts = await asyncio.gather(*(loop.run_in_executor(self._pool, model.predict, numeric[rows], codes[rows])
                                       for rows in chunks))
        return np.concatenate(parts)

    def _record(self, request: Request, route: str, model: ServedModel, checked: CheckedInput,
                predictions: FloatArray, scored: Scored) -> None:
        PREDICTIONS.inc(len(scored.values))
        BATCH_SIZE.observe(len(scored.values))
        observe_all(PREDICTED_VALUE, predictions)
        self.prediction_log.append({"request_id": scored.request_id, "time": time.time(), "model": model.label,
                                    "route": route, "ids": scored.ids, "inputs": checked.records,
                                    "outputs": scored.values},
                                   client=request.client.host if request.client else "")

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
