"""A registry outage, with a real MLflow server that the test kills and starts again on the same store.

While it is down: every prediction is answered by the model already loaded; POST /reload answers 503 naming the
registry (its answer time is printed); the poller keeps asking, and logs the outage once. While it is down the
champion moves (written straight into the server's store, as another writer of that database could); once the server
is back, the new champion is served after at most one more failed check, that is within two poll intervals.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from names import FEATURES
from tests.conftest import RIDGE, clean_environment, synthetic_housing
from tests.registry import fitted, temporary_registry
from tests.servers import (
    ServerProcess,
    SteadyClient,
    free_port,
    serve_environment,
    start_serve,
    wait_for,
    wait_until_answering,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow's pyfunc

MODEL = "outage"
TOKEN = "outage-reload-token"
POLL_S = 2.0
RECORD = synthetic_housing(rows=1, seed=3, missing_bedrooms=0.0)[list(FEATURES)].to_dict("records")[0]


def start_mlflow(port: int, store: Path, log: Path) -> ServerProcess:
    """`mlflow server` on `port` with its registry in `store`: the same store on every start."""
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
               "--artifacts-destination", str(store / "artifacts")]
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**clean_environment(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = ServerProcess(process, port, log)
    wait_until_answering(server, "/health", timeout=180)
    return server


def samples(server: ServerProcess) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def reloads(server: ServerProcess, result: str) -> float:
    return samples(server).get(("housing_model_reloads_total", frozenset({("result", result)})), 0.0)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    store = tmp_path / "store"
    store.mkdir()
    server = start_mlflow(free_port(), store, tmp_path / "mlflow.log")
    try:
        yield server, store
    finally:
        server.stop()


def test_registry_outage_keeps_predictions_and_serves_the_new_champion_when_it_returns(registry, tmp_path,
                                                                                     report_figure):
    mlflow_server, store = registry
    with temporary_registry(tmp_path, tracking_uri=mlflow_server.url) as models:
        first = models.register(MODEL, fitted(RIDGE))
        second = models.register(MODEL, fitted({**RIDGE, "params": {"alpha": 100.0}}), alias=None)

    env = serve_environment(MLFLOW_TRACKING_URI=mlflow_server.url, MODEL_NAME=MODEL, RELOAD_INTERVAL_S=str(POLL_S),
                            RELOAD_TOKEN=TOKEN, PREDICTION_LOG_DIR=str(tmp_path / "log"))
    serving = start_serve(env, tmp_path / "serve.log")
    try:
        wait_until_answering(serving, "/ready")
        with SteadyClient(serving.http, RECORD) as predictions:
            mlflow_server.stop()
            unavailable_before = reloads(serving, "unavailable")

            started = time.monotonic()
            answer = httpx.post(serving.url + "/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            reload_s = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "5"
            assert f"the model registry at {mlflow_server.url}" in answer.json()["error"]
            assert answer.json()["result"] == "unavailable"
            assert answer.json()["model"] == {"name": MODEL, "version": first}

            wait_for(lambda: reloads(serving, "unavailable") >= unavailable_before + 3, 120,
                     "three failed registry checks")
            # The champion moves while the server is down, in the server's own store.
            MlflowClient(f"sqlite:///{store}/mlflow.db").set_registered_model_alias(MODEL, "champion", second)

            restarted = start_mlflow(mlflow_server.port, store, mlflow_server.log)
            try:
                back = time.monotonic()
                unavailable_when_back = reloads(serving, "unavailable")
                wait_for(lambda: httpx.get(serving.url + "/ready").json()["model"]["version"] == second,
                         120, "the new champion to be served")
                served_s = time.monotonic() - back
                unavailable_after = reloads(serving, "unavailable")
                wait_for(lambda: predictions.versions_seen().count(second) >= 10, 30, "predictions by the new champion")
                log = serving.output()  # before the registry stops again
            finally:
                restarted.stop()
    finally:
        serving.stop()

    report_figure(f"POST /reload during the outage answered 503 in {reload_s:.2f} s; the new champion was served "
                  f"{served_s:.1f} s after the registry answered again (poll interval {POLL_S:g} s); "
                  f"{len(predictions.answers)} predictions, {len(predictions.failures)} failed")
    assert predictions.failures == []
    versions = predictions.versions_seen()
    switch = versions.index(second)
    assert switch > 0 and set(versions[:switch]) == {first}
    assert set(versions[switch:]) == {second}
    assert unavailable_after - unavailable_when_back <= 1, "more than one failed check after the registry came back"
    registry_lines = [line for line in log.splitlines() if "the model registry at" in line]
    assert len(registry_lines) == 2  # once when it went, once when it came back
    assert f"the model registry at {mlflow_server.url} is unavailable" in registry_lines[0]
    assert f"the model registry at {mlflow_server.url} answers again" in registry_lines[1]


def test_reload_answers_503_in_bounded_time_when_the_registry_hangs(tmp_path, report_figure):
    """A registry that accepts connections and never answers: /reload still answers, 503 naming it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the connections; nobody ever reads them
        registry_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = serve_environment(MLFLOW_TRACKING_URI=registry_url, MODEL_NAME=MODEL, RELOAD_TOKEN=TOKEN,
                                PREDICTION_LOG_DIR=str(tmp_path / "log"))
        serving = start_serve(env, tmp_path / "serve.log")
        try:
            wait_until_answering(serving)
            started = time.monotonic()
            answer = httpx.post(serving.url + "/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            reload_s = time.monotonic() - started
            health = httpx.get(serving.url + "/health")
        finally:
            serving.stop()
    report_figure(f"POST /reload with a registry that never answers: {answer.status_code} in {reload_s:.1f} s")
    assert answer.status_code == 503
    assert answer.json()["error"].startswith(f"the model registry at {registry_url} ")
    assert answer.json()["model"] is None
    assert health.status_code == 200
