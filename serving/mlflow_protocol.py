"""MLflow's scoring protocol, as `mlflow models serve` speaks it (and SageMaker, Databricks): POST /invocations,
GET /ping, GET /version. Same model, same checks, same fast path as /predict; docs/protocols.md shows each shape.

MLflow's own server (mlflow/pyfunc/scoring_server) is the reference: a JSON body holds exactly one of
dataframe_split, dataframe_records, instances or inputs (and optionally params); a text/csv body is a table with a
header row; the answer is {"predictions": [...]}; an error is {"error_code": ..., "message": ...}. Where MLflow
answers a client's mistake with a 500 or in text/plain, this answers 4xx JSON, and names the field at fault.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from mlflow.version import VERSION
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from names import FEATURES
from serving.app import Service
from serving.intake import parse_json, read_checked, refuse_json_beyond, refuse_more_than
from serving.model import RETRY_S
from serving.responses import count_problems, json_response, reported
from serving.schema import (
    MAX_PROBLEMS,
    CheckedInput,
    InputProblem,
    InvalidInput,
    refuse_rows,
    to_arrays,
    unknown_fields,
)
from serving.tabular import column_records, csv_records

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MEDIA_TYPES = ("application/json", "text/csv")
# Room for what surrounds the records in an acceptable JSON body: the format's name, dataframe_split's columns and
# index, params.
JSON_SLACK = 256
# MLflow's error codes (mlflow.protos.databricks_pb2) for what a client can get wrong.
ERROR_CODES = {400: "BAD_REQUEST", 404: "RESOURCE_DOES_NOT_EXIST", 413: "RESOURCE_EXHAUSTED",
               415: "BAD_REQUEST", 503: "TEMPORARILY_UNAVAILABLE"}


def mlflow_error(status: int, message: str, error_code: str | None = None, **details: Any) -> Response:
    headers = {"Retry-After": str(RETRY_S)} if status == 503 else None
    return json_response({"error_code": error_code or ERROR_CODES.get(status, "INTERNAL_ERROR"), "message": message,
                          **details}, status, headers)


def records_in(payload: Any, max_rows: int) -> tuple[list[Any], str]:
    """The records of a JSON /invocations body, and where in the body they are (for naming problems)."""
    if not isinstance(payload, dict):
        raise InvalidInput([InputProblem("body", "body",
                                         f"must be a JSON object with exactly one of {', '.join(FORMATS)}")])
    given = [name for name in FORMATS if name in payload]
    unknown = unknown_fields(name for name in payload if name not in (*FORMATS, "params"))
    if len(given) != 1 or unknown:
        found = f"found {', '.join(given)}" if given else "found none"
        raise InvalidInput(unknown or [InputProblem("body", "body", f"must hold exactly one of {', '.join(FORMATS)}; "
                                                                    f"{found}")])
    if not isinstance(payload.get("params", {}), dict):
        raise InvalidInput([InputProblem("params", "unknown", "must be an object (this model takes no params)")])
    name = given[0]
    data = payload[name]
    if name == "dataframe_split":
        records, where = split_records(data, max_rows), "dataframe_split.data"
    elif isinstance(data, dict) and name in ("instances", "inputs"):  # columns: {"median_income": [...], ...}
        records, where = columns_to_records(data, name, max_rows), name
    elif isinstance(data, list) and data:
        records, where = data, name
    else:
        raise InvalidInput([InputProblem(name, name if name == "instances" else "body",
                                         "must be a non-empty list of records" + (
                                             "" if name == "dataframe_records" else ", or an object of columns"))])
    if not records:
        raise InvalidInput([InputProblem(where, "body", "holds no records")])
    refuse_rows(len(records), max_rows)
    return records, where


def split_records(split: Any, max_rows: int) -> list[dict[str, Any]]:
    """pandas' "split" orient: {"columns": [...], "data": [[...], ...]} and an "index" that does not matter here."""
    if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or not isinstance(
            split.get("data"), list) or not set(split) <= {"columns", "data", "index"}:
        raise InvalidInput([InputProblem("dataframe_split", "body", 'must be {"columns": [names], "data": [rows]} '
                                                                   '(and optionally "index")')])
    columns, rows = split["columns"], split["data"]
    refuse_rows(len(rows), max_rows)
    if not all(type(name) is str for name in columns) or len(set(columns)) != len(columns):
        raise InvalidInput([InputProblem("dataframe_split.columns", "body", "must be distinct column names")])
    for number, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise InvalidInput([InputProblem(f"dataframe_split.data[{number}]", "body",
                                             f"must be a list of {len(columns)} values, one per column")])
    return [dict(zip(columns, row, strict=True)) for row in rows]


def columns_to_records(columns: dict[str, Any], where: str, max_rows: int) -> list[dict[str, Any]]:
    lengths = {len(values) for values in columns.values() if isinstance(values, list)}
    refuse_rows(max(lengths, default=0), max_rows)
    problems = [InputProblem(f"{where}.{name}", "body", "must be a list of values, one per record")
                for name, values in columns.items() if not isinstance(values, list)][:MAX_PROBLEMS]
    if len(lengths) > 1:
        problems.append(InputProblem(where, "body", f"columns must be equally long; found lengths {sorted(lengths)}"))
    if problems:
        raise InvalidInput(problems)
    return column_records(columns)


def parse(body: bytes, media_type: str, max_rows: int) -> CheckedInput:
    """An /invocations body → its checked records (intake.py's steps)."""
    if media_type == "text/csv":
        refuse_more_than(max_rows + 2, max(body.count(b"\n"), body.count(b"\r")), "CSV lines", max_rows)
        refuse_more_than((max_rows + 1) * len(FEATURES), body.count(b","), "CSV cells", max_rows)
        try:
            records, where = csv_records(body.decode("utf-8-sig"), max_rows), "rows"  # -sig: a leading BOM is no column
        except ValueError as unreadable:  # UnicodeDecodeError included
            raise HTTPException(400, f"malformed CSV: {unreadable}") from None
        if not records:
            raise InvalidInput([InputProblem("body", "body", "holds no rows below the header")])
    else:
        refuse_json_beyond(body, max_rows + JSON_SLACK, max_rows * (len(FEATURES) + 1) + JSON_SLACK, max_rows)
        records, where = records_in(parse_json(body, lenient=True), max_rows)
    numeric, codes = to_arrays(records, lambda row, field: f"{where}[{row}]" + (f".{field}" if field else ""))
    return CheckedInput(records, numeric, codes)


class MlflowProtocol:
    """The endpoints of `mlflow models serve`, on the Service that answers /predict."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def invocations(self, request: Request) -> Response:
        service = self.service
        try:
            checked = await read_checked(request, service.settings, service.parsers, MEDIA_TYPES,
                                         partial(parse, max_rows=service.settings.max_batch_rows))
        except HTTPException as refused:
            return mlflow_error(refused.status_code, refused.detail)
        except InvalidInput as invalid:
            count_problems(invalid.problems)
            shown = reported(invalid)
            message = "; ".join(f"{problem['path']}: {problem['message']}" for problem in shown)
            return mlflow_error(400, f"{invalid}: {message}", "INVALID_PARAMETER_VALUE", problems=shown)
        model = service.keeper.current
        if model is None:
            return mlflow_error(503, "no model loaded yet")
        scored = await service.score(request, model, checked)
        return json_response({"predictions": scored.values}, headers={"X-Request-ID": scored.request_id})

    async def ping(self, request: Request) -> Response:
        """200 once a model is loaded, with MLflow's body ("\\n"); 503 before, like /ready."""
        if self.service.keeper.current is None:
            return mlflow_error(503, "no model loaded yet")
        return Response("\n", media_type="application/json")

    async def version(self, request: Request) -> Response:
        """The MLflow version whose protocol this speaks, as MLflow sends it: bare text labelled application/json."""
        return Response(VERSION, media_type="application/json")
