"""A /predict request from bytes to checked arrays: every step that may refuse a body, in the order it may.

The event loop never parses a large body. It only collects the bytes (at most MAX_BODY_BYTES); a body larger than
INLINE_MAX_BYTES is counted, parsed and checked in a worker thread, a bounded number at a time. Before parsing, a
body with more JSON values than MAX_BATCH_ROWS records can hold is refused by counting bytes: parsing costs time in
proportion to the number of values, and orjson holds the GIL while it parses, so that time would be taken from the
event loop even in another thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request

from features import FEATURES, FloatArray
from serving.schema import records_in, to_arrays
from serving.settings import Settings

# Up to this size (about 60 records) parsing and checking take less than a millisecond, less than a thread hop.
INLINE_MAX_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class PredictInput:
    records: list[Any]  # as sent, for the prediction log
    batch: bool  # sent as {"instances": [...]}: answered with "predictions", else with "prediction"
    numeric: FloatArray  # NUMERIC_FEATURES, NaN for a missing optional one
    codes: FloatArray  # CATEGORIES index of each record's category


async def read_predict_input(request: Request, settings: Settings, parsers: anyio.CapacityLimiter) -> PredictInput:
    """415, 413, 400 (HTTPException) or 422 (schema.InvalidInput) for a body that cannot be predicted.

    `parsers` bounds how many large bodies are parsed at once (in threads), so that hostile bodies cannot take
    every core from the requests that are answered on the event loop.
    """
    if not is_json(request.headers.get("content-type", "")):
        raise HTTPException(415, "send the records as Content-Type: application/json")
    body = await read_body(request, settings.max_body_bytes)
    if len(body) <= INLINE_MAX_BYTES:
        return parse(body, settings.max_batch_rows)
    return await anyio.to_thread.run_sync(parse, body, settings.max_batch_rows, limiter=parsers)


def parse(body: bytes, max_rows: int) -> PredictInput:
    check_value_count(body, max_rows)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as problem:
        raise HTTPException(400, f"malformed JSON: {problem}") from None
    records, batch = records_in(payload, max_rows)
    numeric, codes = to_arrays(records, batch)
    return PredictInput(records, batch, numeric, codes)


def check_value_count(body: bytes, max_rows: int) -> None:
    """413 for a body with more objects, arrays or commas than `max_rows` records of the schema contain.

    `{"instances": [record, ...]}` has max_rows + 1 objects, one array and fewer than len(FEATURES) commas per record.
    Strings in an acceptable body are category names, which contain none of these characters, so counting them in
    the raw bytes (about 1 ms for the largest body) never refuses a body the schema would accept; it refuses the
    million-key object or the million empty records before they cost a parse.
    """
    containers = body.count(b"{") + body.count(b"[")
    if containers > max_rows + 2:
        raise HTTPException(413, f"{containers} JSON objects and arrays: more than MAX_BATCH_ROWS={max_rows} records "
                                 f"contain ({max_rows + 2})")
    commas = body.count(b",")
    if commas > max_rows * len(FEATURES):
        raise HTTPException(413, f"{commas} JSON values: more than MAX_BATCH_ROWS={max_rows} records contain "
                                 f"({max_rows * len(FEATURES)})")


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is larger than MAX_BODY_BYTES={limit}, what "
                                 "MAX_BATCH_ROWS records need: send fewer records per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is larger than MAX_BODY_BYTES={limit}, what MAX_BATCH_ROWS records "
                                     "need: send fewer records per request")
        chunks.append(chunk)
    return b"".join(chunks)
