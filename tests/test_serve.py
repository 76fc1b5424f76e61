"""serve.py's app on models registered in a temporary MLflow store: its HTTP contract in this process (Starlette's
TestClient), and real uvicorn processes where the server itself is under test (two workers, polling from start)."""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import httpx2
import mlflow
import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from names import BY_GATE, CATEGORIES, FEATURES, OPTIONAL_FEATURES
from tests.conftest import GBDT, RIDGE, synthetic_housing
from tests.registry import TemporaryRegistry, fitted, predicting_nan, temporary_registry
from tests.servers import (
    ROOT,
    ServerProcess,
    SteadyClient,
    app_in_process,
    running_app,
    serve_environment,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,  # a registry on disk, model loading, and real uvicorn processes
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),  # inside MLflow's pyfunc
]

TOKEN = "s3cret-reload-token"
MAX_BATCH_ROWS = 1000
MAX_BODY_BYTES = 400_000


# --- a temporary registry --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporaryRegistry]:
    with temporary_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


def records(count: int, seed: int = 7) -> list[dict]:
    """Districts as JSON records; some with total_bedrooms null, one without the field."""
    frame = synthetic_housing(rows=count, seed=seed, missing_bedrooms=0.2)[list(FEATURES)]
    rows = [{name: (None if isinstance(value, float) and math.isnan(value) else value)
             for name, value in row.items()} for row in frame.to_dict(orient="records")]
    if count > 2:
        del rows[2]["total_bedrooms"]
    return rows


def records_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(FEATURES)).astype({name: float for name in OPTIONAL_FEATURES})


@pytest.fixture(scope="module")
def models(registry: TemporaryRegistry) -> dict[str, str]:
    """Model "served": version 1 (gradient boosting) is the champion; version 2 (ridge) is registered."""
    first = registry.register("served", fitted(GBDT))
    second = registry.register("served", fitted(RIDGE), alias=None)
    return {"first": first, "second": second}


def serve_env(registry: TemporaryRegistry, tmp: Path, **settings: str) -> dict[str, str]:
    """serve.py's environment for a model of `registry`, with the prediction log in `tmp`, then `settings`."""
    return serve_environment(MLFLOW_TRACKING_URI=registry.uri, PREDICTION_LOG_DIR=str(tmp / "predictions"), **settings)


@pytest.fixture(scope="module")
def prediction_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "predictions"


@pytest.fixture(scope="module")
def server(registry: TemporaryRegistry, models: dict, prediction_log_dir: Path) -> Iterator[TestClient]:
    """The app serving "served"@champion, in this process; no polling, so only POST /reload changes the model."""
    with app_in_process(model_name="served", reload_interval_s=0, reload_token=TOKEN, max_batch_rows=MAX_BATCH_ROWS,
                        max_body_bytes=MAX_BODY_BYTES, prediction_log_dir=prediction_log_dir) as client:
        yield client


@pytest.fixture
def champion_restored(server: TestClient, registry: TemporaryRegistry, models: dict) -> Iterator[None]:
    yield
    registry.client.set_registered_model_alias("served", "champion", models["first"])
    assert reload(server).status_code == 200


def predict(http: httpx.Client | TestClient, body: object, **kwargs) -> httpx.Response | httpx2.Response:
    return http.post("/predict", json=body, **kwargs)


def reload(http: httpx.Client | TestClient, token: str | None = TOKEN) -> httpx.Response | httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http.post("/reload", headers=headers)


def served_version(http: httpx.Client | TestClient) -> str:
    return http.get("/model").json()["version"]


def metrics(http: httpx.Client | TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    text = http.get("/metrics", headers={"Connection": "close"}).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


# --- predictions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 128, 255, 600], ids=["one", "a batch", "the largest inline",
                                                         "parallel chunks"])
def test_batch_predictions_equal_the_models_own(server, registry, models, size):
    batch = records(size)
    response = predict(server, {"instances": batch})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": "served", "version": models["first"]}
    expected = registry.predictions("served", models["first"], records_frame(batch))
    np.testing.assert_allclose(response.json()["predictions"], expected, rtol=1e-6, atol=0)


def test_single_predictions_equal_the_models_own(server, registry, models):
    batch = records(4)  # [2] has no total_bedrooms, and some are null
    expected = registry.predictions("served", models["first"], records_frame(batch))
    for record, wanted in zip(batch, expected, strict=True):
        response = predict(server, record)
        assert response.status_code == 200, response.text
        assert response.json()["prediction"] == pytest.approx(wanted, rel=1e-6)
        assert response.json()["model"] == {"name": "served", "version": models["first"]}


def test_request_id_is_echoed_or_made_up(server):
    given = predict(server, records(1)[0], headers={"X-Request-ID": "client-chosen-17"})
    made_up = predict(server, records(1)[0])
    assert given.headers["X-Request-ID"] == "client-chosen-17"
    assert len(made_up.headers["X-Request-ID"]) == 32


def test_every_prediction_is_logged(server, prediction_log_dir):
    record = records(1, seed=11)[0]
    response = predict(server, record, headers={"X-Request-ID": "logged-request-1"})
    log_dir = prediction_log_dir

    def logged() -> dict | None:
        for path in log_dir.glob("predictions-*.jsonl"):
            for line in path.read_bytes().splitlines():
                if b"logged-request-1" in line:
                    return orjson.loads(line)
        return None

    entry = wait_for(logged, 10, "the prediction log entry")
    assert response.json()["id"] == "logged-request-1"
    assert entry["ids"] == ["logged-request-1"]
    assert entry["inputs"] == [record]
    assert entry["outputs"] == [response.json()["prediction"]]
    assert entry["model"] == response.json()["model"]
    assert datetime.fromisoformat(entry["time"]).tzinfo is not None


def test_each_prediction_of_a_batch_has_an_id_numbered_under_the_request_id(server):
    given = predict(server, {"instances": records(3, seed=12)}, headers={"X-Request-ID": "batch-7"}).json()
    made_up = predict(server, {"instances": records(2, seed=13)})

    assert given["ids"] == ["batch-7/0", "batch-7/1", "batch-7/2"]
    request = made_up.headers["X-Request-ID"]
    assert made_up.json()["ids"] == [f"{request}/0", f"{request}/1"]


# --- bad input -----------------------------------------------------------------------------------------------


def with_(record: dict, **changes) -> dict:
    return {**record, **changes}


def without(record: dict, name: str) -> dict:
    return {key: value for key, value in record.items() if key != name}


GOOD = records(1)[0] | {"total_bedrooms": 120.0}

SCHEMA_PROBLEMS = [
    ("missing field", without(GOOD, "median_income"), [("median_income", "is required")]),
    ("string number", with_(GOOD, median_income="8.3"), [("median_income", "must be a finite number")]),
    ("boolean", with_(GOOD, housing_median_age=True), [("housing_median_age", "must be a finite number")]),
    ("null required", with_(GOOD, population=None), [("population", "must be a finite number")]),
    ("bedrooms not a number", with_(GOOD, total_bedrooms="many"), [("total_bedrooms", "must be a finite number")]),
    ("unknown category", with_(GOOD, ocean_proximity="MOON"),
     [("ocean_proximity", "must be one of " + ", ".join(CATEGORIES))]),
    ("category not a string", with_(GOOD, ocean_proximity=["INLAND"]),
     [("ocean_proximity", "must be one of " + ", ".join(CATEGORIES))]),
    ("off the globe", with_(GOOD, longitude=1e300), [("longitude", "must be between -180 and 180")]),
    ("misspelt field", with_(without(GOOD, "total_bedrooms"), total_bedroom=3), [("total_bedroom", "unknown field")]),
    ("not an object", [GOOD], [("body", 'must be a JSON object: a record or {"instances": [...]}')]),
    ("empty batch", {"instances": []}, [("instances", "must be a non-empty list of records")]),
    ("instances not a list", {"instances": GOOD}, [("instances", "must be a non-empty list of records")]),
    ("extra key beside instances", {"instances": [GOOD], "id": 1}, [("id", "unknown field")]),
    ("record not an object", {"instances": [GOOD, 3]}, [("instances[1]", "must be a JSON object")]),
    ("several problems, by path",
     {"instances": [GOOD, GOOD, GOOD, with_(without(GOOD, "latitude"), median_income=None)]},
     [("instances[3].latitude", "is required"), ("instances[3].median_income", "must be a finite number")]),
]


@pytest.mark.parametrize(("body", "problems"), [case[1:] for case in SCHEMA_PROBLEMS],
                         ids=[case[0] for case in SCHEMA_PROBLEMS])
def test_schema_problems_are_422_naming_each_field(server, body, problems):
    response = predict(server, body)
    assert response.status_code == 422, response.text
    assert [(p["path"], p["message"]) for p in response.json()["problems"]] == problems


@pytest.mark.parametrize(("content", "content_type", "status", "message"), [
    (b'{"longitude": -122.2,', "application/json", 400, "malformed JSON"),
    (b'{"longitude": NaN}', "application/json", 400, "malformed JSON"),
    (b'{"longitude": 1e999}', "application/json", 400, "malformed JSON"),
    (b"\xff\xfe", "application/json", 400, "malformed JSON"),
    (orjson.dumps(GOOD), "text/plain", 415, "Content-Type: application/json"),
    (orjson.dumps(GOOD), "application/x-www-form-urlencoded", 415, "Content-Type: application/json"),
    (orjson.dumps({"instances": [GOOD] * (MAX_BATCH_ROWS + 1)}), "application/json", 413, "MAX_BATCH_ROWS"),
    (b" " * (MAX_BODY_BYTES + 1), "application/json", 413, "MAX_BODY_BYTES"),
], ids=["truncated", "NaN", "infinite", "not UTF-8", "text", "form", "batch too large", "body too large"])
def test_unreadable_requests_get_their_status(server, content, content_type, status, message):
    response = server.post("/predict", content=content, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_body_too_large_is_refused_when_streamed_without_length(server):
    chunks = iter([b"[" + b" " * MAX_BODY_BYTES, b"]"])
    response = server.post("/predict", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "MAX_BODY_BYTES" in response.json()["error"]


def test_wrong_method_and_unknown_path_are_json_errors(server):
    assert server.get("/predict").status_code == 405
    assert server.get("/nowhere").json() == {"error": "Not Found"}


# --- prediction log ------------------------------------------------------------------------------------------


def test_metrics_move_with_traffic(server, models):
    before = metrics(server)
    assert predict(server, {"instances": records(7)}).status_code == 200
    assert predict(server, records(1)[0]).status_code == 200
    assert predict(server, records(1, seed=3)[0]).status_code == 200
    assert predict(server, {"instances": [with_(GOOD, median_income="x", ocean_proximity="MOON")]}).status_code == 422
    after = metrics(server)

    def moved(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert moved("housing_predictions_total") == 9
    assert moved("housing_http_requests_total", route="/predict", method="POST", status="200") == 3
    assert moved("housing_http_requests_total", route="/predict", method="POST", status="422") == 1
    assert moved("housing_http_request_duration_seconds_count", route="/predict") == 4
    assert moved("housing_batch_size_count") == 3
    assert moved("housing_batch_size_sum") == 9
    assert moved("housing_prediction_value_dollars_count") == 9
    assert moved("housing_validation_failures_total", field="median_income") == 1
    assert moved("housing_validation_failures_total", field="ocean_proximity") == 1
    assert value(after, "housing_http_requests_in_flight") == 1  # the scrape itself
    assert value(after, "housing_model_info", name="served", version=models["first"]) == 1
    assert value(after, "housing_model_loaded") == 1
    assert value(after, "housing_model_last_reload_timestamp_seconds") > 1.7e9
    # The reload outcomes the alerts watch exist from the start, at 0 until one happens.
    for result in ("loaded", "unchanged", "failed", "unavailable", "refused"):
        assert ("housing_model_reloads_total", frozenset({("result", result)})) in after


@pytest.fixture(scope="module")
def two_workers(registry, models, tmp_path_factory) -> Iterator[ServerProcess]:
    """WORKERS=2, with a stale file in PROMETHEUS_MULTIPROC_DIR that would break the metrics if kept."""
    tmp = tmp_path_factory.mktemp("two-workers")
    metrics_dir = tmp / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left over from a previous run")
    env = serve_env(registry, tmp, MODEL_NAME="served", WORKERS="2", RELOAD_INTERVAL_S="0",
                    PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    with running_app(env, tmp / "serve.log") as server:
        yield server


def test_metrics_add_up_across_two_workers(two_workers, models):
    server, log_dir = two_workers, two_workers.log.parent / "predictions"
    # /ready answers for the worker it reaches; housing_model_loaded is the minimum over the workers.
    wait_for(lambda: value(metrics(server.http), "housing_model_loaded") == 1, 60, "every worker to load the model")
    sent = 0

    def both_workers_served() -> bool:
        nonlocal sent
        with httpx.Client(headers={"Connection": "close"}) as client:  # a new connection, any worker
            for _ in range(10):
                assert client.post(server.url + "/predict", json=records(1)[0]).status_code == 200
        sent += 10
        return len(list(log_dir.glob("predictions-*.jsonl"))) == 2

    wait_for(both_workers_served, 60, "requests answered by each worker")
    for _ in range(4):  # whichever worker answers the scrape, it reports the sum
        samples = metrics(server.http)
        assert value(samples, "housing_predictions_total") == sent
        assert value(samples, "housing_http_requests_total", route="/predict", method="POST", status="200") == sent
        assert value(samples, "housing_model_info", name="served", version=models["first"]) == 1
        assert value(samples, "housing_model_loaded") == 1
        assert value(samples, "housing_http_requests_in_flight") == 1


def test_the_supervisor_of_two_workers_never_loads_the_model_libraries(two_workers):
    """`python serve.py` only binds the sockets and starts the workers: scikit-learn and Numba (with MLflow, seconds of
    CPU and hundreds of MB) are the workers' alone."""
    wait_for(lambda: value(metrics(two_workers.http), "housing_model_loaded") == 1, 60, "the workers to load")
    supervisor = Path(f"/proc/{two_workers.process.pid}/maps").read_text()
    workers = [Path(f"/proc/{pid}/maps").read_text() for pid in
               Path(f"/proc/{two_workers.process.pid}/task/{two_workers.process.pid}/children").read_text().split()]
    for library in ("/sklearn/", "/numba/", "/llvmlite/"):
        assert library not in supervisor
        assert any(library in maps for maps in workers), library  # the check can see what it looks for


# --- model lifecycle -----------------------------------------------------------------------------------------


def assert_clean_switch(client: SteadyClient, registry: TemporaryRegistry, name: str, old: str, new: str) -> None:
    """No failures; old version answers, then only the new one; each answer is its version's own prediction."""
    assert client.failures == []
    versions = client.versions_seen()
    switch = versions.index(new)
    assert switch > 0 and set(versions[:switch]) == {old} and set(versions[switch:]) == {new}
    frame = records_frame([client.record])
    expected = {version: registry.predictions(name, version, frame)[0] for version in (old, new)}
    assert expected[old] != pytest.approx(expected[new], rel=1e-3)
    for _, version, prediction in client.answers:
        assert prediction == pytest.approx(expected[version], rel=1e-6)


def test_reload_swaps_champion_without_failing_a_request(server, registry, models, champion_restored):
    with SteadyClient(server, records(1)[0]) as client:
        wait_for(lambda: len(client.answers) >= 20, 30, "answers from the first model")
        registry.client.set_registered_model_alias("served", "champion", models["second"])
        response = reload(server)
        assert response.status_code == 200, response.text
        assert response.json()["result"] == "loaded"
        assert response.json()["model"] == {"name": "served", "version": models["second"]}
        wait_for(lambda: client.versions_seen().count(models["second"]) >= 20, 30, "answers from the new model")
    assert served_version(server) == models["second"]
    assert_clean_switch(client, registry, "served", models["first"], models["second"])
    assert reload(server).json()["result"] == "unchanged"


def register_nan_predicting(registry: TemporaryRegistry) -> str:
    return registry.register("served", predicting_nan())


def register_without_pickle(registry: TemporaryRegistry) -> str:
    """A version promoted (signed) without its model.pkl: it verifies, and cannot be loaded."""
    version = registry.register("served", fitted(RIDGE), promotion=None)
    model_id = registry.client.get_model_version("served", version).source.removeprefix("models:/")
    Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"), "model.pkl").unlink()
    registry.approve("served", version, BY_GATE)
    return version


@pytest.mark.parametrize("register_broken", [register_nan_predicting, register_without_pickle],
                         ids=["predicts NaN", "artifact missing"])
def test_broken_champion_is_refused_and_old_one_kept(server, registry, models, champion_restored, register_broken):
    register_broken(registry)
    failed_before = value(metrics(server), "housing_model_reloads_total", result="failed")

    response = reload(server)
    assert response.status_code == 502
    assert response.json()["result"] == "failed"
    assert response.json()["model"] == {"name": "served", "version": models["first"]}
    assert served_version(server) == models["first"]
    assert predict(server, GOOD).json()["model"]["version"] == models["first"]
    assert value(metrics(server), "housing_model_reloads_total", result="failed") == failed_before + 1
    not_serving = server.get("/model").json()["not_serving"]
    assert not_serving["result"] == "failed"
    # The public answer names the check, or says the log has the error; the error itself is only behind the token.
    if register_broken is register_without_pickle:
        assert "No such file or directory" in response.json()["detail"]
        assert not_serving["reason"] == f"{not_serving['uri']}: could not be loaded (the server log says why)"
    else:
        assert not_serving["reason"].endswith("smoke predictions are not all finite: [nan, nan, nan, nan, nan]")


# --- only what the gate passed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("promotion", "why"), [
    (None, "has no promotion tag: neither the gate nor a person promoted it"),
    ("rejected", "is tagged promotion=rejected: the gate refused it"),
    ("self-approved", "is tagged promotion='self-approved', not one of gate, human"),
], ids=["no record", "rejected by the gate", "unknown value"])
def test_alias_moved_by_hand_to_a_version_nobody_promoted_is_refused(server, registry, models, champion_restored,
                                                                       promotion, why):
    version = registry.register("served", fitted(RIDGE, seed=2), promotion=promotion)
    refused_before = value(metrics(server), "housing_model_reloads_total", result="refused")

    response = reload(server)
    assert response.status_code == 502
    assert response.json()["result"] == "refused"
    assert response.json()["model"] == {"name": "served", "version": models["first"]}
    reason = response.json()["detail"]
    assert reason.startswith(f"models:/served/{version} {why}")
    assert f"`make promote VERSION={version} REASON=" in reason
    described = server.get("/model").json()
    assert described["version"] == models["first"]
    assert described["not_serving"] == {"version": version, "uri": f"models:/served/{version}", "result": "refused",
                                        "reason": reason}
    assert predict(server, GOOD).json()["model"]["version"] == models["first"]
    assert value(metrics(server), "housing_model_reloads_total", result="refused") == refused_before + 1


@pytest.mark.parametrize("promotion", ["gate", "human"])
def test_version_promoted_by_the_gate_or_approved_by_a_person_is_served(server, registry, champion_restored,
                                                                        promotion):
    version = registry.register("served", fitted(RIDGE, seed=3), promotion=promotion)

    response = reload(server)
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "loaded"
    assert served_version(server) == version
    assert server.get("/model").json()["not_serving"] is None


def test_refused_version_is_served_once_a_person_approves_it(server, registry, champion_restored):
    version = registry.register("served", fitted(RIDGE, seed=4), promotion="rejected")
    assert reload(server).json()["result"] == "refused"

    registry.approve("served", version)  # what `make promote` records
    assert reload(server).json()["result"] == "loaded"
    assert served_version(server) == version


def test_pointing_the_alias_back_clears_the_refusal(server, registry, models, champion_restored):
    registry.register("served", fitted(RIDGE, seed=2), promotion=None)
    assert reload(server).json()["result"] == "refused"

    registry.client.set_registered_model_alias("served", "champion", models["first"])  # what `make rollback` does
    assert reload(server).json()["result"] == "unchanged"
    assert server.get("/model").json()["not_serving"] is None


def test_unpromoted_champion_is_not_served_at_start_unless_model_uri_names_it(registry, tmp_path):
    version = registry.register("unpromoted", fitted(RIDGE, seed=5), promotion=None)
    uri = f"models:/unpromoted/{version}"
    with (app_in_process(model_name="unpromoted", model_uri=uri, prediction_log_dir=tmp_path / "pinned") as pinned,
          app_in_process(ready=False, model_name="unpromoted", reload_interval_s=0.3,
                         prediction_log_dir=tmp_path / "following") as following):
        # MODEL_URI is an explicit choice: no promotion record is asked for
        assert predict(pinned, GOOD).status_code == 200
        assert pinned.get("/model").json()["uri"] == uri

        wait_for(lambda: value(metrics(following), "housing_model_reloads_total", result="refused") >= 2, 60,
                 "the app to refuse the champion, and refuse it again")
        assert predict(following, GOOD).status_code == 503
        unloaded = following.get("/model")
        assert unloaded.status_code == 503
        assert unloaded.json()["not_serving"]["uri"] == uri
        assert "has no promotion tag" in unloaded.json()["not_serving"]["reason"]

        registry.approve("unpromoted", version)
        wait_for(lambda: following.get("/ready").status_code == 200, 60, "the approved version to load")
        assert following.get("/model").json()["not_serving"] is None
        assert predict(following, GOOD).json()["model"] == {"name": "unpromoted", "version": version}


def test_reload_needs_the_token(server):
    assert reload(server, token=None).status_code == 401
    assert reload(server, token=None).headers["WWW-Authenticate"] == "Bearer"
    assert server.post("/reload", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert reload(server, token="guess").status_code == 403
    assert reload(server).json()["result"] == "unchanged"


def test_model_endpoint_describes_the_served_version(server, registry, models):
    described = server.get("/model").json()
    run_id = registry.client.get_model_version("served", models["first"]).run_id
    assert described["name"] == "served"
    assert described["version"] == models["first"]
    assert described["alias"] == "champion"
    assert described["run_id"] == run_id
    assert datetime.fromisoformat(described["loaded_at"]).tzinfo is not None
    assert described["metrics"] == registry.client.get_run(run_id).data.metrics


@pytest.fixture(scope="module")
def polling_server(registry, tmp_path_factory) -> Iterator[ServerProcess]:
    """Follows "polled"@champion every 0.3 s; starts before any such model exists; no RELOAD_TOKEN."""
    tmp = tmp_path_factory.mktemp("polling")
    env = serve_env(registry, tmp, MODEL_NAME="polled", RELOAD_INTERVAL_S="0.3")
    with running_app(env, tmp / "serve.log", "/health") as server:
        yield server


@pytest.fixture(scope="module")
def first_polled_champion(polling_server, registry) -> dict:
    """The polling server's answers before any champion exists, then its first champion, once it serves it."""
    before = {path: polling_server.http.get(path) for path in ("/ready", "/model", "/health")}
    before["/predict"] = predict(polling_server.http, GOOD)

    def looked_twice() -> bool:
        return value(metrics(polling_server.http), "housing_model_reloads_total", result="unavailable") >= 2

    wait_for(looked_twice, 60, "the server to look for a champion, and look again")
    version = registry.register("polled", fitted(GBDT, seed=1))
    wait_for(lambda: polling_server.http.get("/ready").status_code == 200, 60, "/ready to turn 200")
    return {"before": before, "version": version, "answer": predict(polling_server.http, GOOD).json()}


def test_without_a_model_it_answers_503_until_a_champion_appears(first_polled_champion):
    before = first_polled_champion["before"]
    for path in ("/ready", "/model", "/predict"):
        assert before[path].status_code == 503
        assert before[path].headers["Retry-After"] == "5"
    assert before["/health"].status_code == 200
    assert first_polled_champion["answer"]["model"] == {"name": "polled", "version": first_polled_champion["version"]}


def test_polling_picks_up_a_new_champion_without_failing_a_request(polling_server, registry, first_polled_champion):
    old = served_version(polling_server.http)
    with SteadyClient(polling_server.http, records(1)[0]) as client:
        wait_for(lambda: len(client.answers) >= 20, 30, "answers from the first model")
        new = registry.register("polled", fitted(RIDGE, seed=1))
        wait_for(lambda: client.versions_seen().count(new) >= 20, 60, "answers from the new champion")
    assert served_version(polling_server.http) == new
    assert_clean_switch(client, registry, "polled", old, new)


def test_reload_is_disabled_without_a_token(polling_server):
    response = reload(polling_server.http)
    assert response.status_code == 404
    assert "RELOAD_TOKEN" in response.json()["error"]


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")
def test_stage_and_uri_settings_choose_the_model(registry, models, tmp_path):
    registry.client.transition_model_version_stage("served", models["second"], "Production")
    local = mlflow.artifacts.download_artifacts(f"models:/served/{models['first']}", dst_path=str(tmp_path / "model"))
    with (app_in_process(model_name="served", model_stage="Production", prediction_log_dir=tmp_path / "s") as staged,
          app_in_process(model_name="served", model_uri=local, prediction_log_dir=tmp_path / "p") as pinned):
        staged_model = staged.get("/model").json()
        pinned_model = pinned.get("/model").json()
        pinned_prediction = predict(pinned, GOOD).json()
    assert (staged_model["version"], staged_model["stage"]) == (models["second"], "Production")
    assert (pinned_model["version"], pinned_model["uri"]) == (None, None)  # a local path is not the public's business
    assert local not in json.dumps(pinned_model)
    expected = registry.predictions("served", models["first"], records_frame([GOOD]))[0]
    assert pinned_prediction["prediction"] == pytest.approx(expected, rel=1e-6)


# --- the rest of the surface ---------------------------------------------------------------------------------


def test_health_and_openapi(server):
    assert server.get("/health").json() == {"status": "ok"}
    document = server.get("/openapi.json").json()
    record = document["components"]["schemas"]["Record"]
    assert list(record["properties"]) == list(FEATURES)
    assert record["properties"]["ocean_proximity"]["enum"] == list(CATEGORIES)
    assert set(record["required"]) == set(FEATURES) - OPTIONAL_FEATURES
    assert set(document["paths"]["/predict"]["post"]["responses"]) == {"200", "400", "413", "415", "422", "503"}
    assert document["components"]["schemas"]["Batch"]["properties"]["instances"]["maxItems"] == MAX_BATCH_ROWS


# --- the code ------------------------------------------------------------------------------------------------

# serving/'s modules in layers: each imports only from layers before its own, so app → model → trees, never back.
LAYERS = [
    {"signature", "metrics", "background", "trees", "admin"},
    {"settings"},
    {"schema", "registry", "drift", "prediction_log"},
    {"intake", "model", "openapi"},
    {"tabular", "responses", "scoring_process"},
    {"shadow"},
    {"app", "docs"},
    {"mlflow_protocol", "v2_protocol"},
]


def test_serving_modules_import_only_from_the_layers_below_them():
    layer_of = {name: number for number, names in enumerate(LAYERS) for name in names}
    modules = {path.stem: path for path in (ROOT / "serving").glob("*.py") if path.stem != "__init__"}
    assert set(modules) == set(layer_of), "put each module of serving/ in one of LAYERS"
    for name, path in modules.items():
        imported = {node.module.removeprefix("serving.") for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("serving.")}
        upward = {other for other in imported if layer_of[other] >= layer_of[name]}
        assert not upward, f"serving/{name}.py imports {upward}, from its own layer or above"
