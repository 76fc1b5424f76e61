"""A /predict request from bytes to checked arrays: every step that may refuse a body, in the order it may."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request

from features import FloatArray
from serving.schema import records_in, to_arrays
from serving.settings import Settings


@dataclass(frozen=True, slots=True)
class PredictInput:
    records: list[Any]  # as sent, for the prediction log
    batch: bool  # sent as {"instances": [...]}: answered with "predictions", else with "prediction"
    numeric: FloatArray  # NUMERIC_FEATURES, NaN for a missing optional one
    codes: FloatArray  # CATEGORIES index of each record's category


async def read_predict_input(request: Request, settings: Settings) -> PredictInput:
    """415, 413, 400 (HTTPException) or 422 (schema.InvalidInput) for a body that cannot be predicted."""
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPException(415, "send the records as Content-Type: application/json")
    body = await read_body(request, settings.max_body_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as problem:
        raise HTTPException(400, f"malformed JSON: {problem}") from None
    records, batch = records_in(payload, settings.max_batch_rows)
    numeric, codes = to_arrays(records, batch)
    return PredictInput(records, batch, numeric, codes)


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is larger than MAX_BODY_BYTES={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is larger than MAX_BODY_BYTES={limit}")
        chunks.append(chunk)
    return b"".join(chunks)
