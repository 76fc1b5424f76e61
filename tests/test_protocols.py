"""The protocols clients already speak, driven by their own clients against a running serve.py: MLflow's scoring
protocol (mlflow's ScoringServerClient, and the payload MLflow logged beside the model) and the Open Inference Protocol
v2 (tritonclient). Each must predict exactly what the registered model itself predicts, and refuse what /predict
refuses, in its own error shape, naming the field or tensor."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from mlflow.version import VERSION
from tritonclient.utils import InferenceServerException

from names import CATEGORICAL_FEATURE, CATEGORIES, FEATURES, NUMERIC_FEATURES, TARGET
from tests.conftest import GBDT
from tests.registry import TemporaryRegistry, fitted, temporary_registry
from tests.servers import ServerProcess, running_app, wait_for
from tests.test_serve import metrics, records, records_frame, serve_env, value

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow's pyfunc

MAX_BATCH_ROWS = 1000
ROWS = 300
V2_ROUTE = "/v2/models/{name}/infer"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporaryRegistry]:
    with temporary_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def version(registry: TemporaryRegistry) -> str:
    """The champion of "served": with a reference profile, so that the server watches drift."""
    return registry.register("served", fitted(GBDT), profiled=True)


@pytest.fixture(scope="module")
def server(registry: TemporaryRegistry, version: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("server")
    env = serve_env(registry, tmp, MODEL_NAME="served", RELOAD_INTERVAL_S="0", MAX_BATCH_ROWS=str(MAX_BATCH_ROWS),
                    DRIFT_WINDOW="100000")
    with running_app(env, tmp / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """ROWS districts; a fifth without total_bedrooms (NaN, as pandas holds a missing value)."""
    return records_frame(records(ROWS, seed=21))


def expected(registry: TemporaryRegistry, version: str, frame: pd.DataFrame) -> np.ndarray:
    return registry.predictions("served", version, frame)


def plain(frame: pd.DataFrame) -> list[dict]:
    """The frame's rows as JSON records: null for NaN."""
    return [{name: None if isinstance(value, float) and math.isnan(value) else value for name, value in row.items()}
            for row in frame.to_dict(orient="records")]


def invocations(server: ServerProcess, content: bytes | str, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(server.url + "/invocations", content=content, headers={"Content-Type": content_type},
                      timeout=30)


# --- MLflow's scoring protocol ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [ROWS, 1], ids=["batch", "single"])
def test_mlflows_own_scoring_client_gets_the_models_own_predictions(server, registry, version, frame, rows):
    client = ScoringServerClient("127.0.0.1", server.port)
    client.wait_server_ready(timeout=10)
    sent = frame.head(rows)  # the client sends dataframe_split, with NaN where total_bedrooms is missing
    answer = client.invoke(sent)
    np.testing.assert_allclose(np.asarray(answer.get_predictions(), dtype=float).ravel(),
                               expected(registry, version, sent), rtol=1e-6, atol=0)


def test_ping_and_version_answer_as_mlflow_models_serve_does(server):
    client = ScoringServerClient("127.0.0.1", server.port)
    client.ping()
    assert client.get_version() == VERSION
    ping = httpx.get(server.url + "/ping")
    assert (ping.status_code, ping.text, ping.headers["content-type"]) == (200, "\n", "application/json")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # ours, as before: MLflow's is /ping's


def test_the_serving_example_mlflow_logged_beside_the_model_predicts_what_mlflow_predicts(server, registry, version,
                                                                                          tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(f"models:/served/{version}", dst_path=str(tmp_path)))
    example = (local / "serving_input_example.json").read_text()
    assert "dataframe_split" in example
    response = invocations(server, example)
    assert response.status_code == 200, response.text
    # What MLflow's scoring server answers to the same file: its own parsing, in this process.
    mlflow.models.predict(str(local), input_path=str(local / "serving_input_example.json"), content_type="json",
                          output_path=str(tmp_path / "mlflow.json"), env_manager="local")
    wanted = json.loads((tmp_path / "mlflow.json").read_text())["predictions"]
    assert len(wanted) == 3
    np.testing.assert_allclose(response.json()["predictions"], wanted, rtol=1e-6, atol=0)


def bodies(frame: pd.DataFrame) -> dict[str, tuple[bytes, str]]:
    rows = plain(frame)
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    split = frame.to_dict(orient="split")
    as_json = {
        "dataframe_split": {"dataframe_split": split},
        "dataframe_records": {"dataframe_records": rows},
        "instances as records": {"instances": rows},
        "instances as columns": {"instances": columns},
        "inputs as columns": {"inputs": columns},
        "inputs as records, with params": {"inputs": rows, "params": {}},
    }
    # json.dumps writes NaN for pandas' missing values, as MLflow's client does; orjson would write null.
    cases = {name: (json.dumps(body).encode(), "application/json") for name, body in as_json.items()}
    cases["csv"] = (frame.to_csv(index=False).encode(), "text/csv")
    cases["csv; charset=utf-8, with a byte order mark"] = (frame.to_csv(index=False).encode("utf-8-sig"),
                                                          "text/csv; charset=utf-8")
    return cases


@pytest.mark.parametrize("case", list(bodies(records_frame(records(3)))))
def test_every_input_format_mlflow_documents_predicts_the_same(server, registry, version, frame, case):
    content, content_type = bodies(frame)[case]
    response = invocations(server, content, content_type)
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["predictions"]
    np.testing.assert_allclose(response.json()["predictions"], expected(registry, version, frame), rtol=1e-6, atol=0)


GOOD = plain(records_frame(records(2, seed=3)))
BAD = [GOOD[0], {**GOOD[1], "median_income": "high", CATEGORICAL_FEATURE: "MOON"}]

MLFLOW_MISTAKES = [
    ("two formats", {"instances": GOOD, "inputs": GOOD}, 400, "exactly one of"),
    ("no format", {"rows": GOOD}, 400, "rows: unknown field"),
    ("not an object", GOOD, 400, "must be a JSON object"),
    ("empty records", {"dataframe_records": []}, 400, "non-empty list"),
    ("split without columns", {"dataframe_split": {"data": [[1]]}}, 400, "dataframe_split"),
    ("split row too short", {"dataframe_split": {"columns": list(FEATURES), "data": [[1.0]]}}, 400,
     "dataframe_split.data[0]: must be a list of 9 values"),
    ("columns of unequal length", {"inputs": {"longitude": [1.0, 2.0], "latitude": [1.0]}}, 400, "equally long"),
    ("bad values, by path", {"dataframe_records": BAD}, 400,
     "dataframe_records[1].median_income: must be a finite number; "
     "dataframe_records[1].ocean_proximity: must be one of"),
    ("a missing required field", {"instances": [{k: v for k, v in GOOD[0].items() if k != "latitude"}]}, 400,
     "instances[0].latitude: is required"),
    ("too many records", {"instances": GOOD * (MAX_BATCH_ROWS // 2 + 1)}, 413, "MAX_BATCH_ROWS"),
]


@pytest.mark.parametrize(("body", "status", "message"), [case[1:] for case in MLFLOW_MISTAKES],
                         ids=[case[0] for case in MLFLOW_MISTAKES])
def test_client_mistakes_are_4xx_in_mlflows_error_shape(server, body, status, message):
    response = invocations(server, orjson.dumps(body))
    assert response.status_code == status, response.text
    assert set(response.json()) >= {"error_code", "message"}
    assert message in response.json()["message"]


@pytest.mark.parametrize(("content", "content_type", "status", "message"), [
    (b'{"inputs": [', "application/json", 400, "malformed JSON"),
    (b'{"inputs": [{"longitude": Infinity}]}', "application/json", 400, "inputs[0].longitude: must be a finite"),
    (b"longitude,latitude\n1.0", "text/csv", 400, "has 1 cells; the header names 2"),
    (b"longitude\n-122.2\n", "text/csv", 400, "rows[0].latitude: is required"),
    (b"\xff\xfe", "text/csv", 400, "malformed CSV"),
    (b"{}", "text/plain", 415, "application/json"),
    (b"{}", "application/json; charset=latin-1", 415, "charset=utf-8"),
    (b"{}", "", 415, "application/json"),
], ids=["truncated JSON", "infinite", "ragged CSV", "CSV missing a column", "CSV not UTF-8", "text", "latin-1",
        "no content type"])
def test_unreadable_invocations_get_their_status(server, content, content_type, status, message):
    response = invocations(server, content, content_type)
    assert response.status_code == status, response.text
    assert message in response.json()["message"]


# --- Open Inference Protocol v2 --------------------------------------------------------------------------------


def triton_inputs(frame: pd.DataFrame, binary: bool) -> list[triton.InferInput]:
    tensors = []
    for name in FEATURES:
        values = (frame[name].to_numpy(dtype=object) if name == CATEGORICAL_FEATURE
                  else frame[name].to_numpy(dtype=np.float64))
        tensor = triton.InferInput(name, [len(frame)], "BYTES" if name == CATEGORICAL_FEATURE else "FP64")
        tensor.set_data_from_numpy(values, binary_data=binary)
        tensors.append(tensor)
    return tensors


@pytest.fixture
def v2_client(server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=30)
    yield client
    client.close()


def test_tritonclient_sees_a_live_ready_server_and_the_models_signature(v2_client, version):
    assert v2_client.is_server_live()
    assert v2_client.is_server_ready()
    assert v2_client.is_model_ready("served")
    assert v2_client.is_model_ready("served", version)
    assert not v2_client.is_model_ready("elsewhere")
    metadata = v2_client.get_model_metadata("served")
    assert metadata["name"] == "served"
    assert metadata["versions"] == [version]
    assert metadata["platform"] == "mlflow_sklearn"
    assert metadata["inputs"] == [{"name": name, "datatype": "FP64", "shape": [-1]} for name in NUMERIC_FEATURES] + [
        {"name": CATEGORICAL_FEATURE, "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": TARGET, "datatype": "FP64", "shape": [-1]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors (tritonclient's default)", "JSON tensors"])
@pytest.mark.parametrize("rows", [ROWS, 1], ids=["batch", "single"])
def test_tritonclient_infers_the_models_own_predictions(v2_client, registry, version, frame, binary, rows):
    sent = frame.head(rows)
    result = v2_client.infer("served", triton_inputs(sent, binary), request_id="r-17")
    np.testing.assert_allclose(result.as_numpy(TARGET), expected(registry, version, sent), rtol=1e-6, atol=0)
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("served", version, "r-17")
    versioned = v2_client.infer("served", triton_inputs(sent, binary), model_version=version)
    np.testing.assert_array_equal(versioned.as_numpy(TARGET), result.as_numpy(TARGET))


def tensor(name: str, data: list, datatype: str | None = None) -> dict:
    kind = datatype or ("BYTES" if name == CATEGORICAL_FEATURE else "FP64")
    return {"name": name, "datatype": kind, "shape": [len(data)], "data": data}


def v2_body(rows: list[dict], **replace: dict) -> dict:
    return {"inputs": [replace.get(name, tensor(name, [row[name] for row in rows])) for name in FEATURES]}


V2_MISTAKES = [
    ("a value that is not a number", v2_body(BAD), 400,
     "median_income[1]: must be a finite number; ocean_proximity[1]: must be one of"),
    ("a number tensor sent as BOOL", v2_body(GOOD, population=tensor("population", [True, False], "BOOL")), 400,
     "population: datatype 'BOOL' does not fit this column; send FP64"),
    ("the category sent as numbers", v2_body(GOOD, ocean_proximity=tensor(CATEGORICAL_FEATURE, [1, 2], "INT64")), 400,
     "ocean_proximity: datatype 'INT64' does not fit this column; send BYTES"),
    ("a required tensor missing", {"inputs": [tensor("longitude", [1.0])]}, 400, "latitude: is required"),
    ("an unknown tensor", {"inputs": [tensor("rooms", [1.0])]}, 400, "rooms: unknown tensor"),
    ("shape and data disagree", v2_body(GOOD, households={**tensor("households", [1.0, 2.0]), "shape": [3]}), 400,
     "households: holds 2 values; its shape [3] says 3"),
    ("tensors of unequal length", v2_body(GOOD, households=tensor("households", [1.0])), 400,
     "one value per record"),
    ("no inputs", {"inputs": []}, 400, "non-empty list of tensors"),
    ("an unknown output", {**v2_body(GOOD), "outputs": [{"name": "price"}]}, 400, "one output, 'median_house_value'"),
]


@pytest.mark.parametrize(("body", "status", "message"), [case[1:] for case in V2_MISTAKES],
                         ids=[case[0] for case in V2_MISTAKES])
def test_v2_mistakes_are_400_naming_the_tensor(server, body, status, message):
    response = httpx.post(server.url + "/v2/models/served/infer", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert message in response.json()["error"]


def test_v2_binary_data_is_checked_too(server):
    head = orjson.dumps({"inputs": [{"name": "longitude", "datatype": "FP64", "shape": [2],
                                     "parameters": {"binary_data_size": 16}}]})
    response = httpx.post(server.url + "/v2/models/served/infer", content=head + struct.pack("<d", 1.0),
                          headers={"Inference-Header-Content-Length": str(len(head))}, timeout=30)
    assert response.status_code == 400
    assert "longitude: binary_data_size 16 runs past the end of the body" in response.json()["error"]


def test_unknown_models_and_versions_are_404_whatever_the_body(server, v2_client, frame):
    with pytest.raises(InferenceServerException, match="unknown model 'elsewhere'"):
        v2_client.infer("elsewhere", triton_inputs(frame.head(1), binary=True))
    response = httpx.post(server.url + "/v2/models/elsewhere/infer", content=b"not even JSON", timeout=30)
    assert response.status_code == 404
    with pytest.raises(InferenceServerException, match="version '999' of 'served' is not served"):
        v2_client.get_model_metadata("served", "999")


# --- every protocol is counted, watched and logged -------------------------------------------------------------


def test_metrics_drift_and_the_prediction_log_count_every_protocol(server, v2_client, frame):
    before = metrics(server.http)
    rows = frame.head(5)
    assert invocations(server, orjson.dumps({"dataframe_records": plain(rows)})).status_code == 200
    assert invocations(server, orjson.dumps({"dataframe_records": BAD})).status_code == 400
    v2_client.infer("served", triton_inputs(rows, binary=True), headers={"X-Request-ID": "v2-logged"})
    assert httpx.post(server.url + "/predict", json={"instances": plain(rows)}).status_code == 200
    after = metrics(server.http)

    def moved(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert moved("housing_http_requests_total", route="/invocations", method="POST", status="200") == 1
    assert moved("housing_http_requests_total", route="/invocations", method="POST", status="400") == 1
    assert moved("housing_http_requests_total", route=V2_ROUTE, method="POST", status="200") == 1
    assert moved("housing_http_request_duration_seconds_count", route=V2_ROUTE) == 1
    assert moved("housing_http_requests_total", route="/predict", method="POST", status="200") == 1
    assert moved("housing_predictions_total") == 15
    assert moved("housing_validation_failures_total", field="median_income") == 1

    def drift_holds_every_prediction() -> bool:  # the window (DRIFT_WINDOW) is larger than all this module sends
        samples = metrics(server.http)
        return value(samples, "housing_drift_window_rows") == value(samples, "housing_predictions_total")

    wait_for(drift_holds_every_prediction, 20, "the drift window to hold every protocol's records")
    log_dir = server.log.parent / "predictions"

    def logged_route() -> str | None:
        for path in log_dir.glob("predictions-*.jsonl"):
            for line in path.read_bytes().splitlines():
                entry = orjson.loads(line)
                if entry["request_id"] == "v2-logged":
                    return entry["route"]
        return None

    assert wait_for(logged_route, 10, "the v2 request's log entry") == V2_ROUTE


def test_openapi_describes_both_protocols(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/invocations", "/ping", "/version", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
            "/v2/models/{name}/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(
        paths)
    assert set(paths["/invocations"]["post"]["responses"]) == {"200", "400", "413", "415", "503"}


def test_categories_travel_as_bytes(server):
    """Every category through v2 JSON tensors predicts what /predict predicts for it."""
    rows = [{**GOOD[0], CATEGORICAL_FEATURE: category} for category in CATEGORIES]
    v2 = httpx.post(server.url + "/v2/models/served/infer", json=v2_body(rows), timeout=30).json()
    ours = httpx.post(server.url + "/predict", json={"instances": rows}, timeout=30).json()
    assert v2["outputs"][0]["data"] == ours["predictions"]
