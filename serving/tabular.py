"""Records sent in other protocols' shapes (columns, CSV, typed numbers), as /predict's records look: JSON values."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from typing import Any

from names import CATEGORICAL_FEATURE
from serving.intake import NOT_FINITE
from serving.schema import InputProblem, InvalidInput, refuse_rows

_NUMERIC_MISSING = frozenset({"", "nan", "NaN", "NA", "null"})  # CSV cells pandas.read_csv would read as missing
_NUMBER_STARTS = frozenset("0123456789+-. \t\n\r\f\viInN")  # what float() accepts at the start of a number


def finite_or_marked(value: float) -> float | str | None:
    """A number from a typed tensor as a JSON record holds it: NaN is missing (None), ±Infinity refused."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else NOT_FINITE


def column_records(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """{"name": [values...], ...} → one record per position. The caller checks that the lists are equally long."""
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def csv_records(text: str, max_rows: int) -> list[dict[str, Any]]:
    """A CSV with a header row (what DataFrame.to_csv(index=False) writes) → records, numbers as floats; 413 past
    `max_rows` rows, before the next is read.

    A cell that is not a number stays a string, so that to_arrays names it; an empty (or NaN) cell is missing.
    Raises ValueError for a CSV the csv module cannot read.
    """
    try:
        return _csv_records(csv.reader(io.StringIO(text)), max_rows)
    except csv.Error as unreadable:
        raise ValueError(str(unreadable)) from None


def _csv_records(reader: Any, max_rows: int) -> list[dict[str, Any]]:
    header = next(reader, None)
    if not header:
        raise InvalidInput([InputProblem("body", "body", "must be a CSV with a header row naming the columns")])
    numeric = [name != CATEGORICAL_FEATURE for name in header]
    records: list[dict[str, Any]] = []
    for row in reader:
        refuse_rows(len(records) + 1, max_rows)
        if len(row) != len(header):
            raise InvalidInput([InputProblem(f"line {reader.line_num}", "body",
                                             f"has {len(row)} cells; the header names {len(header)}")])
        records.append({name: _cell(cell) if is_number else cell
                        for name, cell, is_number in zip(header, row, numeric, strict=True)})
    return records


def _cell(text: str) -> float | str | None:
    if text.strip() in _NUMERIC_MISSING:
        return None
    if text[0] not in _NUMBER_STARTS:  # not a number: no exception raised and caught (a CSV of junk is 90k cells)
        return text
    try:
        return finite_or_marked(float(text))
    except ValueError:
        return text
