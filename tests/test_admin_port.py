"""ADMIN_PORT: /reload and /metrics answer only there; the public port serves everything else and 404s those two.
With two workers both ports are shared by both, and /metrics on the admin port sums the workers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ServerProcess, free_port, running_app, serve_environment

pytestmark = pytest.mark.integration

TOKEN = "admin-port-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """Two workers, an admin port on loopback, and a registry that refuses connections (no model needed here)."""
    tmp = tmp_path_factory.mktemp("admin-port")
    admin_port = free_port()
    metrics_dir = tmp / "prometheus"
    metrics_dir.mkdir()  # prometheus-client writes there as soon as serve.py is imported
    env = serve_environment(HOST="127.0.0.1", WORKERS="2", ADMIN_PORT=str(admin_port), RELOAD_TOKEN=TOKEN,
                            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
                            PREDICTION_LOG_DIR=str(tmp / "predictions"), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    with running_app(env, tmp / "serve.log", "/health") as server:
        yield server, f"http://127.0.0.1:{admin_port}"


@pytest.mark.parametrize(("method", "path"), [("GET", "/metrics"), ("POST", "/reload")])
def test_admin_endpoints_are_not_found_on_the_public_port(server, method, path):
    public, _ = server
    response = httpx.request(method, public.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


@pytest.mark.parametrize("path", ["/health", "/ready", "/model", "/openapi.json"])
def test_public_endpoints_are_not_found_on_the_admin_port(server, path):
    _, admin = server
    assert httpx.get(admin + path).status_code == 404


def test_the_public_document_leaves_out_the_admin_endpoints(server):
    public, _ = server
    paths = httpx.get(public.url + "/openapi.json").json()["paths"]
    assert {"/predict", "/health"} <= set(paths)
    assert not {"/reload", "/metrics"} & set(paths)


def test_reload_answers_on_the_admin_port(server):
    _, admin = server
    assert httpx.post(admin + "/reload").status_code == 401
    answer = httpx.post(admin + "/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 503  # the registry refuses connections
    assert "the model registry at http://127.0.0.1:" in answer.json()["error"]


def test_admin_metrics_sum_the_public_requests_of_both_workers(server):
    public, admin = server

    def health_answers() -> float:
        text = httpx.get(admin + "/metrics", headers={"Connection": "close"}).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "housing_http_requests_total" and sample.labels["route"] == "/health")

    before = health_answers()
    with httpx.Client(headers={"Connection": "close"}) as client:  # a new connection each: either worker
        for _ in range(20):
            assert client.get(public.url + "/health").status_code == 200
    for _ in range(4):  # whichever worker answers the scrape, it reports both workers' answers
        assert health_answers() - before == 20
