"""JSON answers and the error answers every endpoint shares: the shape of /predict's errors, and the request id."""

from __future__ import annotations

import uuid
from collections import Counter as Tally
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from serving.metrics import VALIDATION_FAILURES
from serving.model import RETRY_S
from serving.schema import InputProblem, InvalidInput


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers=headers, media_type="application/json")


def error(status: int, message: str, headers: Mapping[str, str] | None = None, **details: Any) -> Response:
    return json_response({"error": message, **details}, status, headers)


def not_loaded() -> Response:
    return error(503, "no model loaded yet", headers={"Retry-After": str(RETRY_S)})


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


def count_problems(problems: list[InputProblem]) -> None:
    for field, count in Tally(problem.field for problem in problems).items():
        VALIDATION_FAILURES.labels(field).inc(count)


def reported(invalid: InvalidInput) -> list[dict[str, str]]:
    """The problems an answer lists (the first MAX_REPORTED_PROBLEMS), each as {"path", "message"}."""
    return [{"path": problem.path, "message": problem.message} for problem in invalid.reported()]


async def http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only (EXCEPTION_HANDLERS)
        raise exc
    return error(exc.status_code, exc.detail, headers=exc.headers)


async def invalid_input(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, InvalidInput):  # registered for InvalidInput only (EXCEPTION_HANDLERS)
        raise exc
    count_problems(exc.problems)
    return error(422, str(exc), problems=reported(exc))


EXCEPTION_HANDLERS = {HTTPException: http_error, InvalidInput: invalid_input}
