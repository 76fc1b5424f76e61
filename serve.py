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
    MAX_BATCH_ROWS       records per request (10000)
    MAX_BODY_BYTES       request body size (8388608)
    PREDICTION_LOG_DIR   JSON lines of every prediction, one size-rotated file per worker (logs/)
    DRIFT_WINDOW         records per worker whose inputs and predictions are compared with the served model's training
                         data (1000); see serving/drift.py. The drift alert needs 500 of them (prometheus/rules)

With WORKERS>1, `python serve.py` runs prometheus-client in multiprocess mode in PROMETHEUS_MULTIPROC_DIR (a new
temporary directory unless set; its *.db files are deleted at start). Plain `uvicorn --workers N serve:app` does not.
prometheus-client switches to multiprocess mode whenever that variable exists, even empty: set it, or leave it out.

The parts live in serving/: settings, schema (records → arrays, the OpenAPI document), body (reading a /predict
request), registry, model (load, check, keep, reload), trees (the fast path), drift, prediction_log, metrics, and
app (the endpoints).
"""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from serving.app import EXCEPTION_HANDLERS, Service
from serving.metrics import MetricsMiddleware, prepare_multiprocess_metrics
from serving.settings import Settings


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
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(MetricsMiddleware, routes=frozenset(route.path for route in routes))
    return app


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
    uvicorn.run("serve:app", host=settings.host, port=settings.port, workers=settings.workers,
                log_config=LOG_CONFIG, timeout_worker_healthcheck=60)


app = create_app(Settings.from_env())

if __name__ == "__main__":
    main()
