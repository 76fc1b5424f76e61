"""MLflow's scoring protocol, as `mlflow models serve` speaks it (and SageMaker, Databricks): POST /invocations,
GET /ping, GET /version. Same model, same checks, same fast path as /predict; docs/protocols.md shows each shape.

MLflow's own server (mlflow/pyfunc/scoring_server) is the reference: a JSON body holds exactly one of
dataframe_split, dataframe_records, instances or inputs (and optionally params); a text/csv body is a table with a
header row; the answer is {"predictions": [...]}; an error is {"error_code": ..., "message": ...}. Where MLflow
answers a client's mistake with a 500 or in text/plain, this answers 4xx JSON, and names the field at fault.
"""

from __future__ import annotations

from typing import Any

from mlflow.version import VERSION
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from serving.app import Service, count_problems, json_response, request_id
from serving.body import read_body
from serving.model import RETRY_S
from serving.schema import InputProblem, InvalidInput
from serving.tabular import checked_arrays, column_records, csv_records, lenient_json, maybe_off_loop

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
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
    unknown = [InputProblem(name, "unknown", "unknown field") for name in payload if name not in (*FORMATS, "params")]
    if len(given) != 1 or unknown:
        found = f"found {', '.join(given)}" if given else "found none"
        raise InvalidInput(unknown or [InputProblem("body", "body", f"must hold exactly one of {', '.join(FORMATS)}; "
                                                                    f"{found}")])
    if not isinstance(payload.get("params", {}), dict):
        raise InvalidInput([InputProblem("params", "unknown", "must be an object (this model takes no params)")])
    name = given[0]
    data = payload[name]
    if name == "dataframe_split":
        records, where = split_records(data), "dataframe_split.data"
    elif isinstance(data, dict) and name in ("instances", "inputs"):  # columns: {"median_income": [...], ...}
        records, where = columns_to_records(data, name), name
    elif isinstance(data, list) and data:
        records, where = data, name
    else:
        raise InvalidInput([InputProblem(name, name if name == "instances" else "body",
                                         "must be a non-empty list of records" + (
                                             "" if name == "dataframe_records" else ", or an object of columns"))])
    if not records:
        raise InvalidInput([InputProblem(where, "body", "holds no records")])
    if len(records) > max_rows:
        raise HTTPException(413, f"{len(records)} records is more than MAX_BATCH_ROWS={max_rows}")
    return records, where


def split_records(split: Any) -> list[dict[str, Any]]:
    """pandas' "split" orient: {"columns": [...], "data": [[...], ...]} and an "index" that does not matter here."""
    if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or not isinstance(
            split.get("data"), list) or not set(split) <= {"columns", "data", "index"}:
        raise InvalidInput([InputProblem("dataframe_split", "body", 'must be {"columns": [names], "data": [rows]} '
                                                                   '(and optionally "index")')])
    columns, rows = split["columns"], split["data"]
    if not all(type(name) is str for name in columns) or len(set(columns)) != len(columns):
        raise InvalidInput([InputProblem("dataframe_split.columns", "body", "must be distinct column names")])
    for number, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise InvalidInput([InputProblem(f"dataframe_split.data[{number}]", "body",
                                             f"must be a list of {len(columns)} values, one per column")])
    return [dict(zip(columns, row, strict=True)) for row in rows]


def columns_to_records(columns: dict[str, Any], where: str) -> list[dict[str, Any]]:
    lengths = {len(values) for values in columns.values() if isinstance(values, list)}
    problems = [InputProblem(f"{where}.{name}", "body", "must be a list of values, one per record")
                for name, values in columns.items() if not isinstance(values, list)]
    if len(lengths) > 1:
        problems.append(InputProblem(where, "body", f"columns must be equally long; found lengths {sorted(lengths)}"))
    if problems:
        raise InvalidInput(problems)
    return column_records(columns)


def parse(body: bytes, media_type: str, max_rows: int) -> tuple[list[Any], Any, Any]:
    """Body → (records, numeric, codes); InvalidInput, HTTPException or ValueError (unreadable) when it cannot."""
    if media_type == "text/csv":
        records, where = csv_records(body.decode("utf-8-sig")), "rows"  # -sig: a leading BOM is no column
        if not records:
            raise InvalidInput([InputProblem("body", "body", "holds no rows below the header")])
        if len(records) > max_rows:
            raise HTTPException(413, f"{len(records)} records is more than MAX_BATCH_ROWS={max_rows}")
    else:
        records, where = records_in(lenient_json(body), max_rows)
    numeric, codes = checked_arrays(records, lambda row, field: f"{where}[{row}]" + (f".{field}" if field else ""))
    return records, numeric, codes


class MlflowProtocol:
    """The endpoints of `mlflow models serve`, on the Service that answers /predict."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def invocations(self, request: Request) -> Response:
        media_type, *parameters = (part.strip().lower() for part in request.headers.get("content-type", "").split(";"))
        if media_type not in ("application/json", "text/csv"):
            return mlflow_error(415, "send Content-Type: application/json (one of dataframe_split, dataframe_records, "
                                     f"instances, inputs) or text/csv; got {media_type or 'none'!r}")
        if any(parameter.replace(" ", "") not in ("charset=utf-8", "") for parameter in parameters):
            return mlflow_error(415, "the only content type parameter understood is charset=utf-8")
        service = self.service
        try:
            body = await read_body(request, service.settings.max_body_bytes)
            records, numeric, codes = await maybe_off_loop(
                len(body), lambda: parse(body, media_type, service.settings.max_batch_rows))
        except HTTPException as refused:
            return mlflow_error(refused.status_code, refused.detail)
        except ValueError as unreadable:  # UnicodeDecodeError included
            return mlflow_error(400, f"malformed {'CSV' if media_type == 'text/csv' else 'JSON'}: {unreadable}")
        except InvalidInput as invalid:
            count_problems(invalid.problems)
            shown = invalid.reported()
            message = "; ".join(f"{p.path}: {p.message}" for p in shown)
            return mlflow_error(400, f"{len(invalid.problems)} problem(s) in the request body: {message}",
                                "INVALID_PARAMETER_VALUE",
                                problems=[{"path": p.path, "message": p.message} for p in shown])
        model = service.keeper.current
        if model is None:
            return mlflow_error(503, "no model loaded yet")
        identity = request_id(request)
        values = await service.score(request, identity, model, records, numeric, codes)
        return json_response({"predictions": values}, headers={"X-Request-ID": identity})

    async def ping(self, request: Request) -> Response:
        """200 once a model is loaded, with MLflow's body ("\\n"); 503 before, like /ready."""
        if self.service.keeper.current is None:
            return mlflow_error(503, "no model loaded yet")
        return Response("\n", media_type="application/json")

    async def version(self, request: Request) -> Response:
        """The MLflow version whose protocol this speaks, as MLflow sends it: bare text labelled application/json."""
        return Response(VERSION, media_type="application/json")
