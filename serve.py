"""Serve the registry's champion over HTTP: `python serve.py` (what `make serve` runs) or `uvicorn serve:app`.

Settings come from the environment (serving/settings.py reads and checks them, once):

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
    ADMIN_PORT           when set, /reload and /metrics answer only on this port and 404 on PORT, and PORT serves
                         everything else (unset or 0: everything on PORT); needs `python serve.py`, which binds both
    ADMIN_HOST           interface of ADMIN_PORT (127.0.0.1: keep the admin endpoints off the public network)
    MAX_BATCH_ROWS       records per request (10000)
    MAX_BODY_BYTES       request body size (unset or 0: what MAX_BATCH_ROWS records need, 360 bytes each + 64 KiB:
                         3665536 for 10000; serving/settings.py says why)
    PREDICTION_LOG_DIR   JSON lines of every prediction, in segments shared by every worker (logs/); see
                         serving/prediction_log.py and docs/serving.md
    PREDICTION_LOG_MAX_BYTES           the directory's size over all workers: oldest segments go first (4294967296)
    PREDICTION_LOG_CLIENT_BYTES_PER_S  log bytes per client address and worker, after a 5-minute burst (32768);
                                       past it, predictions are answered but not logged; 0: no budget
    PREDICTION_LOG_SEGMENT_S           a segment is closed (and shipped) at this age at the latest (3600)
    PREDICTION_LOG_S3                  s3://bucket/prefix: upload closed segments there (unset: off)
    FORWARDED_ALLOW_IPS  uvicorn's: peers whose X-Forwarded-For names the client (127.0.0.1,::1); the client's
                         address is what the prediction log's budget counts
    DRIFT_WINDOW         records per worker whose inputs and predictions are compared with the served model's training
                         data (1000); see serving/drift.py. The drift alert needs 500 of them (prometheus/rules)

With WORKERS>1, `python serve.py` runs prometheus-client in multiprocess mode in PROMETHEUS_MULTIPROC_DIR (a new
temporary directory unless set; its *.db files are deleted at start). Plain `uvicorn --workers N serve:app` does not.
prometheus-client switches to multiprocess mode whenever that variable exists, even empty: set it, or leave it out.

The parts live in serving/ (its __init__ lists them in layers): intake reads every prediction door's body through one
bounded path into schema's checked input; app holds the endpoints; mlflow_protocol and v2_protocol speak MLflow's
scoring protocol and the Open Inference Protocol v2 on the same model (docs/protocols.md).

Every registry call is bounded (3 attempts of at most 3 s: MLFLOW_HTTP_REQUEST_TIMEOUT, _MAX_RETRIES,
_BACKOFF_FACTOR, _BACKOFF_JITTER; serving/registry.py), and POST /reload answers within 8 s: 503 naming the
registry while it is unavailable, and predictions go on with the model already loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from uvicorn.supervisors import Multiprocess

from serving.admin import AdminPortSplit
from serving.metrics import MetricsMiddleware, prepare_multiprocess_metrics
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.app import Service


def create_app(settings: Settings) -> Starlette:
    # The app's parts are imported here, not at the top: the supervisor of `python serve.py` only binds the sockets
    # and starts the workers, and would otherwise import numpy, scikit-learn and MLflow too (3-5 s of CPU at every start
    # and ~320 MB held for nothing). Each worker imports them when uvicorn loads serve:app.
    from serving import docs
    from serving.app import Service
    from serving.responses import EXCEPTION_HANDLERS

    service = Service(settings)
    routes = [
        Route("/predict", service.predict, methods=["POST"]),
        Route("/health", service.health),
        Route("/ready", service.ready),
        Route("/model", service.model),
        Route("/metrics", service.metrics),
        Route("/reload", service.reload, methods=["POST"]),
        Route("/openapi.json", service.openapi_json),
        *docs.routes(),  # GET /docs: Swagger UI for /openapi.json
        *protocol_routes(service),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers=EXCEPTION_HANDLERS)
    if settings.admin_port:
        app.add_middleware(AdminPortSplit, admin_port=settings.admin_port)
    app.add_middleware(MetricsMiddleware, routes=frozenset(route.path for route in routes))
    return app


def protocol_routes(service: Service) -> list[Route]:
    """MLflow's scoring protocol and the Open Inference Protocol v2, beside /predict (docs/protocols.md)."""
    from serving.mlflow_protocol import MlflowProtocol  # with the app's parts: see create_app
    from serving.v2_protocol import OpenInferenceProtocol

    mlflow, v2 = MlflowProtocol(service), OpenInferenceProtocol(service)
    model = "/v2/models/{name}"
    routes = [
        Route("/invocations", mlflow.invocations, methods=["POST"]),
        Route("/ping", mlflow.ping),
        Route("/version", mlflow.version),
        Route("/v2", v2.server_metadata),
        Route("/v2/health/live", v2.live),
        Route("/v2/health/ready", v2.ready),
    ]
    for prefix in (model, model + "/versions/{version}"):
        routes += [Route(prefix, v2.model_metadata), Route(prefix + "/ready", v2.model_ready),
                   Route(prefix + "/infer", v2.infer, methods=["POST"])]
    return routes


LOG_CONFIG: dict[str, Any] = {
    **uvicorn.config.LOGGING_CONFIG,
    "loggers": {**uvicorn.config.LOGGING_CONFIG["loggers"],
                "housing": {"handlers": ["default"], "level": "INFO", "propagate": False}},
}


def main() -> None:
    settings = Settings.from_env()
    if settings.workers > 1:
        prepare_multiprocess_metrics()
    # A worker imports numpy, scikit-learn and MLflow before it answers the supervisor's first ping; with uvicorn's
    # 5 s default, workers merely slow to start on a busy machine are killed and restarted.
    options: dict[str, Any] = {"workers": settings.workers, "log_config": LOG_CONFIG, "timeout_worker_healthcheck": 60}
    if not settings.admin_port:
        uvicorn.run("serve:app", host=settings.host, port=settings.port, **options)
        return
    # Both sockets are bound here, before any worker starts, and every worker accepts on both (admin.py).
    config = uvicorn.Config("serve:app", host=settings.host, port=settings.port, **options)
    sockets = [config.bind_socket(),
               uvicorn.Config("serve:app", host=settings.admin_host, port=settings.admin_port, **options).bind_socket()]
    if settings.workers > 1:
        Multiprocess(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
else:  # `uvicorn serve:app`, and each worker of `python serve.py`
    app = create_app(Settings.from_env())
