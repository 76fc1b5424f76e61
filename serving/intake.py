"""Every prediction door's one intake (/predict, /invocations, /v2/models/{name}/infer): a request's bytes to checked
arrays, through the steps that may refuse it, in the order they may.

1. Content-Type: 415 unless the door reads it (v2 reads any: its protocol names none).
2. Size: the event loop only collects the bytes, at most MAX_BODY_BYTES (413; a larger declared Content-Length is
   refused before a byte is read).
3. A body larger than INLINE_MAX_BYTES goes on in a worker thread, `parsers` of them at once, so that hostile bodies
   cannot take every core from the requests answered on the event loop. There, each door's parse function:
   a. counts: more JSON containers and commas (CSV lines and commas) in the raw bytes than MAX_BATCH_ROWS records of
      the door's shape hold is 413, before anything is parsed. Parsing costs time in proportion to the number of
      values and orjson holds the GIL while it parses, so that time would be taken from the event loop even in a
      thread. Strings in an acceptable body are column and category names, none of which holds these characters,
      so counting never refuses a body the schema accepts;
   b. parses: malformed JSON or CSV, or JSON nested deeper than a parser's stack, is 400;
   c. finds the records where its protocol puts them; more rows than MAX_BATCH_ROWS is 413 before they are built;
   d. checks them (schema.to_arrays), stopping at MAX_PROBLEMS, each problem named in the door's terms.
Each door answers these refusals (HTTPException, schema.InvalidInput) in its protocol's error format: never a 5xx.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request

from serving.schema import CheckedInput
from serving.settings import Settings

# Up to this size (about 60 records) parsing and checking take less than a millisecond, less than a thread hop.
INLINE_MAX_BYTES = 16 * 1024
NOT_FINITE = "Infinity"  # what ±Infinity becomes (lenient JSON, typed tensors): a string, which to_arrays refuses

Parse = Callable[[bytes, str], CheckedInput]  # (body, media type) → checked input; HTTPException or InvalidInput


async def read_checked(request: Request, settings: Settings, parsers: anyio.CapacityLimiter,
                       media_types: tuple[str, ...], parse: Parse) -> CheckedInput:
    media_type = media_type_of(request, media_types)
    body = await read_body(request, settings.max_body_bytes)
    if len(body) <= INLINE_MAX_BYTES:
        return parse(body, media_type)
    return await anyio.to_thread.run_sync(parse, body, media_type, limiter=parsers)


def media_type_of(request: Request, accepted: tuple[str, ...]) -> str:
    """The request's media type if the door reads it (and its only parameter, if any, is charset=utf-8); else 415.
    `accepted` empty: whatever it is."""
    media_type, *parameters = (part.strip().lower() for part in request.headers.get("content-type", "").split(";"))
    if not accepted:
        return media_type
    if media_type not in accepted:
        raise HTTPException(415, f"send Content-Type: {' or '.join(accepted)}; got {media_type or 'none'!r}")
    if any(parameter.replace(" ", "") not in ("charset=utf-8", "") for parameter in parameters):
        raise HTTPException(415, "the only Content-Type parameter understood is charset=utf-8")
    return media_type


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


def refuse_more_than(limit: int, count: int, what: str, max_rows: int) -> None:
    """413 when a body holds more of `what` than `limit`, what MAX_BATCH_ROWS records of its shape hold."""
    if count > limit:
        raise HTTPException(413, f"{count} {what}: more than MAX_BATCH_ROWS={max_rows} records hold ({limit})")


def refuse_json_beyond(body: bytes, containers: int, values: int, max_rows: int) -> None:
    """413 for a JSON body with more objects and arrays than `containers`, or more commas than `values`: what
    MAX_BATCH_ROWS records of the door's shape hold, counted in the raw bytes before anything is parsed."""
    refuse_more_than(containers, body.count(b"{") + body.count(b"["), "JSON objects and arrays", max_rows)
    refuse_more_than(values, body.count(b","), "JSON values", max_rows)


def parse_json(body: bytes, lenient: bool = False) -> Any:
    """The body's JSON; 400 if it is not JSON. `lenient`: as Python's json module reads it, which is what MLflow's
    clients and pandas write: NaN is a missing value (null), ±Infinity a value to_arrays refuses."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict:
        refusal = strict
    if lenient and (b"NaN" in body or b"Infinity" in body):  # the only JSON orjson refuses and json reads
        try:
            return json.loads(body, parse_constant=lambda name: None if name == "NaN" else NOT_FINITE)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            pass
    raise HTTPException(400, f"malformed JSON: {refusal}")
