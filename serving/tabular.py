"""Records sent in other protocols' shapes (rows, columns, CSV, NaN-bearing JSON), checked exactly as /predict checks
its records, with each problem located in the protocol's own terms."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson
from starlette.concurrency import run_in_threadpool

from features import FloatArray
from names import CATEGORICAL_FEATURE
from serving.schema import InputProblem, InvalidInput, to_arrays

T = TypeVar("T")

OFF_LOOP_BYTES = 64 * 1024  # bodies from this size are parsed and checked in a worker thread, not on the event loop
NOT_FINITE = "Infinity"  # what ±Infinity becomes: a string, which to_arrays refuses as "must be a finite number"
_NUMERIC_MISSING = frozenset({"", "nan", "NaN", "NA", "null"})  # CSV cells pandas.read_csv would read as missing


def lenient_json(body: bytes) -> Any:
    """Parse JSON as Python's json module does, which is what MLflow's clients and pandas write: NaN is a missing
    value (null) and ±Infinity is kept as a non-number. orjson first, for speed; the fallback only on its refusal.
    Raises ValueError."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict:
        try:
            return json.loads(body, parse_constant=lambda name: None if name == "NaN" else NOT_FINITE)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(str(strict)) from None


def finite_or_marked(value: float) -> float | str | None:
    """A number from a typed tensor as a JSON record holds it: NaN is missing (None), ±Infinity refused."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else NOT_FINITE


def column_records(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """{"name": [values...], ...} → one record per position. The caller checks that the lists are equally long."""
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def csv_records(text: str) -> list[dict[str, Any]]:
    """A CSV with a header row (what DataFrame.to_csv(index=False) writes) → records, numbers as floats.

    A cell that is not a number stays a string, so that to_arrays names it; an empty (or NaN) cell is missing.
    """
    try:
        return _csv_records(csv.reader(io.StringIO(text)))
    except csv.Error as unreadable:
        raise ValueError(str(unreadable)) from None


def _csv_records(reader: Any) -> list[dict[str, Any]]:
    header = next(reader, None)
    if not header:
        raise InvalidInput([InputProblem("body", "body", "must be a CSV with a header row naming the columns")])
    numeric = [name != CATEGORICAL_FEATURE for name in header]
    records = []
    for row in reader:
        if len(row) != len(header):
            raise InvalidInput([InputProblem(f"line {reader.line_num}", "body",
                                             f"has {len(row)} cells; the header names {len(header)}")])
        records.append({name: _cell(cell) if is_number else cell
                        for name, cell, is_number in zip(header, row, numeric, strict=True)})
    return records


def _cell(text: str) -> float | str | None:
    if text.strip() in _NUMERIC_MISSING:
        return None
    try:
        return finite_or_marked(float(text))
    except ValueError:
        return text


def checked_arrays(records: list[Any], locate: Callable[[int, str], str]) -> tuple[FloatArray, FloatArray]:
    """to_arrays on a batch; when it finds problems, each is reported at `locate(row, field)` (field "": the whole
    record), in the protocol's terms."""
    try:
        return to_arrays(records, batch=True)
    except InvalidInput:
        pass
    problems = []
    for row, record in enumerate(records):  # only on the way to a 4xx: the rows again, one by one, to place them
        try:
            to_arrays([record], batch=False)
        except InvalidInput as found:
            problems += [InputProblem(locate(row, "" if p.path == "body" else p.path), p.field, p.message)
                         for p in found.problems]
    raise InvalidInput(problems)


async def maybe_off_loop(size: int, parse: Callable[[], T]) -> T:
    """Parse small bodies right here (a thread hop costs more); large ones in a thread, so the loop keeps answering."""
    return parse() if size < OFF_LOOP_BYTES else await run_in_threadpool(parse)
