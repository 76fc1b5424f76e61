"""The OpenAPI document of every operation serve.py routes: /predict's schema from the field table of names.py,
and the shapes of MLflow's scoring protocol and the Open Inference Protocol v2 that JSON Schema can state exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from names import CATEGORICAL_FEATURE, CATEGORIES, FEATURES, NUMERIC_FEATURES, OPTIONAL_FEATURES, TARGET
from serving.schema import COORDINATE_BOUNDS, EXAMPLE_RECORD, SMOKE_RECORDS
from serving.settings import Settings


def number(name: str) -> dict[str, Any]:
    """A numeric field's values: a number (null too when optional), within bounds for coordinates."""
    low, high = COORDINATE_BOUNDS.get(name, (None, None))
    bounds = {"minimum": low, "maximum": high} if low is not None else {}
    return {"type": ["number", "null"] if name in OPTIONAL_FEATURES else "number", **bounds}


def openapi_document(settings: Settings) -> dict[str, Any]:
    def answer(description: str, schema: str = "Error") -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}

    record = {
        "type": "object",
        "additionalProperties": False,
        "required": [name for name in FEATURES if name not in OPTIONAL_FEATURES],
        "properties": {**{name: number(name) for name in NUMERIC_FEATURES},
                       CATEGORICAL_FEATURE: {"type": "string", "enum": list(CATEGORIES)}},
        "example": EXAMPLE_RECORD,
    }
    batch = {"type": "object", "additionalProperties": False, "required": ["instances"],
             "properties": {"instances": {"type": "array", "minItems": 1, "maxItems": settings.max_batch_rows,
                                          "items": {"$ref": "#/components/schemas/Record"}}}}
    prediction = {"type": "object", "required": ["model"], "properties": {
        "prediction": {"type": "number"},
        "id": {"type": "string", "description": "the prediction's id: X-Request-ID if sent; give it with the true "
                                                "price later (`make realized`)"},
        "predictions": {"type": "array", "items": {"type": "number"}},
        "ids": {"type": "array", "items": {"type": "string"},
                "description": "each prediction's id, in order: <X-Request-ID or a new id>/<index>"},
        "model": {"type": "object", "properties": {"name": {"type": "string"},
                                                   "version": {"type": ["string", "null"]}}}}}
    problem = {"type": "object", "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}
    failure = {"type": "object", "required": ["error"],
               "properties": {"error": {"type": "string"}, "problems": {"type": "array", "items": problem}}}
    predict = {
        "summary": "Predict median house values (USD) for one record or a batch",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
            {"$ref": "#/components/schemas/Record"}, {"$ref": "#/components/schemas/Batch"}]},
            # The first fills the body of "Try it out" on /docs.
            "examples": {"record": {"summary": "one district", "value": EXAMPLE_RECORD},
                         "batch": {"summary": "a batch of districts, one without total_bedrooms",
                                   "value": {"instances": [SMOKE_RECORDS[1], SMOKE_RECORDS[4]]}}}}}},
        "responses": {
            "200": answer("a prediction for a record, predictions for a batch", "Prediction"),
            "400": answer("malformed JSON"),
            "413": answer("body larger than MAX_BODY_BYTES, or more records (or JSON values) than MAX_BATCH_ROWS"),
            "415": answer("Content-Type is not application/json"),
            "422": answer("records that do not match the schema; each problem names its path"),
            "503": answer("no model loaded yet; retry after Retry-After seconds"),
        },
    }
    plain = {"200": {"description": "OK"}}
    paths = {**mlflow_paths(settings, answer), **v2_paths(settings, answer)}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "California housing price regressor", "version": "1"},
        "paths": {
            "/predict": {"post": predict},
            "/health": {"get": {"summary": "The process is alive", "responses": plain}},
            "/ready": {"get": {"summary": "A model is loaded", "responses": {**plain, "503": answer("not yet")}}},
            "/model": {"get": {"summary": "The served model: version, run, training metrics",
                               "description": "not_serving: the version the registry points at instead, if it was "
                                              "refused (not promoted by the gate or a person) or failed, and why",
                               "responses": {**plain, "503": answer("no model loaded yet")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": plain}},
            "/reload": {"post": {"summary": "Ask the registry now; load the version it points at if new",
                                 "security": [{"reloadToken": []}],
                                 "responses": {**plain, "401": answer("no bearer token"), "403": answer("wrong token"),
                                               "404": answer("RELOAD_TOKEN is not set"),
                                               "502": answer("the new version was refused; the served model stays"),
                                               "503": answer("the registry is unavailable or has no such model, or "
                                                             "did not answer in time; retry after Retry-After")}}},
            **paths,
        },
        "components": {
            "schemas": {"Record": record, "Batch": batch, "Prediction": prediction, "Error": failure,
                        **PROTOCOL_SCHEMAS},
            "securitySchemes": {"reloadToken": {"type": "http", "scheme": "bearer"}},
        },
    }
    if settings.admin_port:  # the public port's document; /reload and /metrics answer 404 there (admin.py)
        for path in ("/reload", "/metrics"):
            del document["paths"][path]
    return document


# The two other protocols (docs/protocols.md). Their request schemas describe the shapes a schema can pin down: record
# lists for /invocations (its column forms, dataframe_split and text/csv are described in words), and for v2 one
# record as nine tensors in FEATURES order: a tensor's length equal to its shape's, and equal lengths across tensors,
# are not expressible, so batches, other orders, a left-out optional tensor and binary data are described in words.
NUMBER_DATATYPES = ["FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


def v2_tensor(name: str) -> dict[str, Any]:
    """One column of one record as a v2 tensor: its value flat, or in a list of one (shape [1, 1])."""
    value = {"type": "string", "enum": list(CATEGORIES)} if name == CATEGORICAL_FEATURE else number(name)
    return {"type": "object", "required": ["name", "datatype", "shape", "data"], "properties": {
        "name": {"const": name},
        "datatype": {"const": "BYTES"} if name == CATEGORICAL_FEATURE else {"enum": NUMBER_DATATYPES},
        "shape": {"enum": [[1], [1, 1]]},
        "data": {"type": "array", "minItems": 1, "maxItems": 1,
                 "items": {"anyOf": [value, {"type": "array", "minItems": 1, "maxItems": 1, "items": value}]}},
        # binary_data_size says the values follow the JSON (the binary extension), which this schema does not cover
        "parameters": {"type": "object", "properties": {"binary_data_size": False}}}}


PROTOCOL_SCHEMAS: dict[str, Any] = {
    "MlflowError": {"type": "object", "required": ["error_code", "message"], "properties": {
        "error_code": {"type": "string"}, "message": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "object"}}}},
    "MlflowPredictions": {"type": "object", "required": ["predictions"],
                          "properties": {"predictions": {"type": "array", "items": {"type": "number"}}}},
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
}


def mlflow_paths(settings: Settings, answer: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
    records = {"type": "array", "minItems": 1, "maxItems": settings.max_batch_rows,
               "items": {"$ref": "#/components/schemas/Record"}}
    formats = [{"type": "object", "additionalProperties": False, "required": [name],
                "properties": {name: records, "params": {"type": "object"}}}
               for name in ("dataframe_records", "instances", "inputs")]
    invocations = {
        "summary": "MLflow's scoring protocol: predictions for a table of records",
        "description": "A JSON object with exactly one of dataframe_split ({\"columns\": [...], \"data\": [[...]]}), "
                       "dataframe_records, instances or inputs (records, or for the last two an object of equally long "
                       "columns), as `mlflow models serve` accepts them; or Content-Type: text/csv with a header row.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": formats}}}},
        "responses": {
            "200": answer("the predictions, in the order of the records", "MlflowPredictions"),
            "400": answer("malformed JSON or CSV, or records that do not match the schema; each problem named",
                          "MlflowError"),
            "413": answer("body larger than MAX_BODY_BYTES, or more records than MAX_BATCH_ROWS", "MlflowError"),
            "415": answer("Content-Type is neither application/json nor text/csv", "MlflowError"),
            "503": answer("no model loaded yet; retry after Retry-After seconds", "MlflowError"),
        },
    }
    as_mlflow = {"description": "as `mlflow models serve` answers it", "content": {"application/json": {}}}
    return {
        "/invocations": {"post": invocations},
        "/ping": {"get": {"summary": "MLflow's health check: 200 once a model is loaded",
                          "responses": {"200": as_mlflow, "503": answer("no model loaded yet", "MlflowError")}}},
        "/version": {"get": {"summary": "The MLflow version whose scoring protocol this speaks (bare text)",
                             "responses": {"200": as_mlflow}}},
    }


def v2_paths(settings: Settings, answer: Callable[[str, str], dict[str, Any]]) -> dict[str, Any]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "example": settings.model_name}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    infer_request = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": len(FEATURES), "maxItems": len(FEATURES),
                   "prefixItems": [v2_tensor(name) for name in FEATURES]},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                "properties": {"name": {"const": TARGET}}}}}}
    unknown = answer("no such model, or not this version", "V2Error")
    not_loaded = answer("no model loaded yet", "V2Error")
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}

    def model_paths(prefix: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
        infer = {"summary": "Open Inference Protocol v2: one named tensor per column (BYTES for ocean_proximity)",
                 "description": "The schema shows one record. A batch of n records is the same with each tensor's "
                                "shape [n] (or [n, 1]) and n values, n equal across tensors, up to MAX_BATCH_ROWS; the "
                                "tensors may come in any order, total_bedrooms may be left out, and the values may "
                                "follow the JSON in Triton's binary tensor data extension (an "
                                "Inference-Header-Content-Length header and parameters.binary_data_size).",
                 "parameters": parameters,
                 "requestBody": {"required": True, "content": {"application/json": {"schema": infer_request}}},
                 "responses": {"200": ok, "400": answer("malformed request or values; each problem names its tensor",
                                                        "V2Error"),
                               "404": unknown, "413": answer("too large", "V2Error"), "503": not_loaded}}
        return {
            prefix: {"get": {"summary": "Model metadata: inputs and outputs with datatypes and shapes, versions",
                             "parameters": parameters, "responses": {"200": ok, "404": unknown, "503": not_loaded}}},
            prefix + "/ready": {"get": {"summary": "The model is ready", "parameters": parameters,
                                        "responses": {"200": ok, "404": unknown, "503": not_loaded}}},
            prefix + "/infer": {"post": infer},
        }

    ready = {"200": ok, "503": {"description": "not ready", "content": {"application/json": {}}}}
    return {
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": ok}}},
        "/v2/health/live": {"get": {"summary": "The server is live", "responses": {"200": ok}}},
        "/v2/health/ready": {"get": {"summary": "The server is ready (a model is loaded)", "responses": ready}},
        **model_paths("/v2/models/{name}", [name]),
        **model_paths("/v2/models/{name}/versions/{version}", [name, version]),
    }
