"""The /predict schema, from the field table of features.py: records checked and turned into arrays, the problems
found on the way, and the OpenAPI document that describes the same rules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from features import (
    CATEGORIES,
    FEATURES,
    OPTIONAL_FEATURES,
    TARGET,
    FloatArray,
    category_codes,
)
from names import CATEGORICAL_FEATURE, NUMERIC_FEATURES
from serving.settings import Settings

# Real coordinates; far beyond them the neighbourhood features of features.py fail.
COORDINATE_BOUNDS = {"longitude": (-180.0, 180.0), "latitude": (-90.0, 90.0)}

# The one example district: the OpenAPI example, the README's and docs/protocols.md's curl, and the tests' record.
EXAMPLE_RECORD: dict[str, Any] = {
    "longitude": -122.23, "latitude": 37.88, "housing_median_age": 41.0, "total_rooms": 880.0,
    "total_bedrooms": 129.0, "population": 322.0, "households": 126.0, "median_income": 8.3252,
    "ocean_proximity": "NEAR BAY"}

# One district per category, one without total_bedrooms. A model is served only if it predicts them all, finitely,
# and its fast path agrees with the pipeline's own predict() on them (model.smoke_test); the first is the example.
SMOKE_RECORDS: tuple[dict[str, Any], ...] = (
    EXAMPLE_RECORD,
    {"longitude": -118.3, "latitude": 34.05, "housing_median_age": 30.0, "total_rooms": 2000.0,
     "total_bedrooms": 450.0, "population": 1200.0, "households": 420.0, "median_income": 3.5,
     "ocean_proximity": "<1H OCEAN"},
    {"longitude": -119.8, "latitude": 36.8, "housing_median_age": 20.0, "total_rooms": 2500.0,
     "total_bedrooms": 500.0, "population": 1400.0, "households": 480.0, "median_income": 2.9,
     "ocean_proximity": "INLAND"},
    {"longitude": -118.33, "latitude": 33.34, "housing_median_age": 52.0, "total_rooms": 2359.0,
     "total_bedrooms": 591.0, "population": 1100.0, "households": 431.0, "median_income": 2.8,
     "ocean_proximity": "ISLAND"},
    {"longitude": -117.2, "latitude": 32.75, "housing_median_age": 35.0, "total_rooms": 1800.0,
     "total_bedrooms": None, "population": 900.0, "households": 350.0, "median_income": 4.1,
     "ocean_proximity": "NEAR OCEAN"},
)

_CODES: dict[str, float] = dict(zip(CATEGORIES, category_codes(np.array(CATEGORIES)).tolist(), strict=True))
_FIELDS = frozenset(FEATURES)


@dataclass(frozen=True, slots=True)
class InputProblem:
    path: str  # where in the body, e.g. "instances[3].median_income"
    field: str  # the metric label: a feature name, or "body", "instances", "unknown"
    message: str


# Checking a body stops at this many problems: describing every field of 10,000 wrong records would cost the
# server about a second of CPU, for an answer that shows the first 100 anyway.
MAX_PROBLEMS = 1000
MAX_REPORTED_PROBLEMS = 100  # of those, listed in an answer


class InvalidInput(Exception):
    def __init__(self, problems: list[InputProblem]) -> None:
        counted = f"{len(problems)}" if len(problems) < MAX_PROBLEMS else f"{MAX_PROBLEMS} or more"
        super().__init__(f"{counted} problem(s) in the request body")
        self.problems = problems[:MAX_PROBLEMS]

    def reported(self) -> list[InputProblem]:
        """The problems an answer lists: the first MAX_REPORTED_PROBLEMS (the message counts them all)."""
        return self.problems[:MAX_REPORTED_PROBLEMS]


def records_in(payload: Any, max_rows: int) -> tuple[list[Any], bool]:
    """The records of a /predict body, and whether it was a batch (`{"instances": [...]}`)."""
    if not isinstance(payload, dict):
        raise InvalidInput([InputProblem("body", "body", 'must be a JSON object: a record or {"instances": [...]}')])
    if "instances" not in payload:
        return [payload], False
    instances = payload["instances"]
    problems = [InputProblem(name, "unknown", "unknown field") for name in payload if name != "instances"]
    if not isinstance(instances, list) or not instances:
        problems.append(InputProblem("instances", "instances", "must be a non-empty list of records"))
    if problems:
        raise InvalidInput(problems)
    if len(instances) > max_rows:
        raise HTTPException(413, f"{len(instances)} records is more than MAX_BATCH_ROWS={max_rows}")
    return instances, True


def to_arrays(records: list[Any], batch: bool) -> tuple[FloatArray, FloatArray]:
    """Check records against the schema of features.py; return NUMERIC_FEATURES as floats, and category codes."""
    rows: list[list[float]] = []
    codes: list[float] = []
    problems: list[InputProblem] = []
    for index, record in enumerate(records):
        where = f"instances[{index}]" if batch else ""
        if type(record) is not dict:
            problems.append(InputProblem(where or "body", "body", "must be a JSON object"))
            continue
        rows.append([_number(record, name, where, problems) for name in NUMERIC_FEATURES])
        codes.append(_category(record, where, problems))
        if not _FIELDS.issuperset(record):
            unknown = (name for name in record if name not in _FIELDS)
            problems += [InputProblem(_path(where, name), "unknown", "unknown field")
                         for name in islice(unknown, MAX_PROBLEMS)]
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise InvalidInput(problems)
    return np.array(rows, dtype=float), np.array(codes, dtype=float)


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _number(record: dict[str, Any], name: str, where: str, problems: list[InputProblem]) -> float:
    value = record.get(name)
    if type(value) is int or type(value) is float:  # exact types: bool is an int subclass, but not a number here
        if name not in COORDINATE_BOUNDS:
            return value
        low, high = COORDINATE_BOUNDS[name]
        if low <= value <= high:
            return value
        message = f"must be between {low:g} and {high:g}"
    elif value is None and name in OPTIONAL_FEATURES:
        return math.nan
    else:
        message = "is required" if name not in record else "must be a finite number"
    problems.append(InputProblem(_path(where, name), name, message))
    return math.nan


def _category(record: dict[str, Any], where: str, problems: list[InputProblem]) -> float:
    value = record.get(CATEGORICAL_FEATURE)
    if type(value) is str and value in _CODES:
        return _CODES[value]
    message = "is required" if CATEGORICAL_FEATURE not in record else f"must be one of {', '.join(CATEGORIES)}"
    problems.append(InputProblem(_path(where, CATEGORICAL_FEATURE), CATEGORICAL_FEATURE, message))
    return math.nan


def openapi_document(settings: Settings) -> dict[str, Any]:
    def number(name: str) -> dict[str, Any]:
        low, high = COORDINATE_BOUNDS.get(name, (None, None))
        bounds = {"minimum": low, "maximum": high} if low is not None else {}
        return {"type": ["number", "null"] if name in OPTIONAL_FEATURES else "number", **bounds}

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
        "predictions": {"type": "array", "items": {"type": "number"}},
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
# lists for /invocations (its column forms, dataframe_split and text/csv are described in words), and tensors whose
# name, datatype and shape fit a column for v2 (equal lengths across tensors are not expressible).
PROTOCOL_SCHEMAS: dict[str, Any] = {
    "MlflowError": {"type": "object", "required": ["error_code", "message"], "properties": {
        "error_code": {"type": "string"}, "message": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "object"}}}},
    "MlflowPredictions": {"type": "object", "required": ["predictions"],
                          "properties": {"predictions": {"type": "array", "items": {"type": "number"}}}},
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "V2Tensor": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"enum": list(FEATURES)},
        "datatype": {"enum": ["BYTES", "FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
                              "UINT32", "UINT64"]},
        "shape": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array"}, "parameters": {"type": "object"}}},
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
        "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/V2Tensor"}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                "properties": {"name": {"const": TARGET}}}}}}
    unknown = answer("no such model, or not this version", "V2Error")
    not_loaded = answer("no model loaded yet", "V2Error")
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}

    def model_paths(prefix: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
        infer = {"summary": "Open Inference Protocol v2: one named tensor per column (BYTES for ocean_proximity)",
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
