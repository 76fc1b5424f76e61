"""Hostile bodies get a 4xx each at every prediction door, in the door's own error format, and never stall the server:
/health is answered all the while, and memory stays bounded.

The server runs with its default limits (MAX_BATCH_ROWS=10000, so MAX_BODY_BYTES=3665536) on a small model, so that
every door reads its body. scripts/hostile.py (`make hostile`) holds the bodies and the measurement; each door's
slowest refusal, /health's worst latency and the memory growth are printed, not asserted (docs/results.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import mlflow
import orjson
import pytest

from scripts.hostile import LIMITS, Hostile, attack, hostile_bodies
from serving.schema import EXAMPLE_RECORD as GOOD
from serving.settings import Settings
from tests.conftest import RIDGE
from tests.registry import fitted, temporary_registry
from tests.servers import ServerProcess, running_app, serve_environment

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow, logging it

MODEL = "hostile"
BODIES = hostile_bodies()
# Far above what any door needs (tens of MB), far below what building the records of a hostile body took (~600 MB).
MEMORY_GROWTH_LIMIT_MB = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """serve.py, one worker, default limits, on a ridge model in a local directory (MODEL_URI)."""
    tmp = tmp_path_factory.mktemp("hostile")
    with temporary_registry(tmp) as registry:
        version = registry.register(MODEL, fitted(RIDGE))
        model = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}", dst_path=str(tmp / "model"))
    env = serve_environment(MLFLOW_TRACKING_URI=registry.uri, MODEL_URI=model, MODEL_NAME=MODEL,
                            PREDICTION_LOG_DIR=str(tmp / "predictions"))
    with running_app(env, tmp / "serve.log") as server:
        yield server


def post(server: ServerProcess, body: Hostile) -> httpx.Response:
    return server.http.post(body.path.format(name=MODEL), content=body.body,
                            headers={"Content-Type": body.content_type, **body.headers}, timeout=60)


def test_every_door_refuses_every_hostile_body_while_health_keeps_answering(server, report_figure):
    reports = attack(server.url, server.process.pid, MODEL, BODIES)

    assert [report.door for report in reports] == ["/predict", "/invocations JSON", "/invocations CSV",
                                                   "/v2 infer JSON", "/v2 infer binary"]
    for report in reports:
        assert not report.wrong, report.wrong
        assert all(status == 200 for _, status in report.health), report.door
        assert report.growth_mb < MEMORY_GROWTH_LIMIT_MB, report.line()
        report_figure(report.line())


@pytest.mark.parametrize("body", BODIES, ids=[f"{body.door}: {body.name}" for body in BODIES])
def test_each_refusal_names_the_limit_or_the_field_in_the_doors_own_format(server, body):
    response = post(server, body)

    assert response.status_code == body.status
    answer = response.json()
    if body.door.startswith("/invocations"):
        assert answer["error_code"] in ("BAD_REQUEST", "RESOURCE_EXHAUSTED", "INVALID_PARAMETER_VALUE")
        message = answer["message"]
    else:
        message = answer["error"]
    if body.status == 413:
        assert "MAX_BODY_BYTES" in message or "MAX_BATCH_ROWS" in message
    elif "nested" in body.name:
        assert message.startswith("malformed JSON")
    elif "wrong" in body.name:
        assert "1000 or more problem(s)" in message or "1000 problem(s)" in message
        assert "must be a finite number" in message or body.door == "/predict"
    else:
        assert "binary_data_size" in message


def test_a_door_answers_a_body_nested_deeper_than_pythons_json_can_read_with_a_400(server):
    """NaN sends the body to the lenient parser, Python's json module, whose recursion limit is far below 5,000."""
    nested = b"[" * 5_000 + b"NaN" + b"]" * 5_000
    for path in ("/invocations", f"/v2/models/{MODEL}/infer"):
        response = server.http.post(path, content=nested, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, path


def test_a_body_streamed_without_length_is_cut_off_at_the_limit(server):
    chunk = b" " * (1024 * 1024)
    for path in ("/predict", "/invocations", f"/v2/models/{MODEL}/infer"):
        response = server.http.post(path, content=iter([b"["] + [chunk] * 8 + [b"]"]),
                                    headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 413, path
        assert f"MAX_BODY_BYTES={LIMITS.max_body_bytes}" in response.text


def test_the_largest_acceptable_batch_fits_under_the_default_body_limit():
    worst = {name: -1.2345678901234567e-05 for name in GOOD} | {"ocean_proximity": "NEAR OCEAN"}
    batch = {"instances": [worst] * LIMITS.max_batch_rows}
    assert len(orjson.dumps(batch)) < len(json.dumps(batch)) <= LIMITS.max_body_bytes
    assert LIMITS.max_body_bytes < 8 * 1024 * 1024 / 2


def test_body_limit_follows_the_batch_limit():
    assert Settings(max_batch_rows=100).max_body_bytes < Settings().max_body_bytes
    assert Settings(max_batch_rows=100, max_body_bytes=5).max_body_bytes == 5
