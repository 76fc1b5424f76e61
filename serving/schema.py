"""The schema of a record, from the field table of names.py: records checked and turned into arrays, the problems
found on the way (named in each door's terms), and the one type every door's intake produces (intake.py)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from features import FloatArray, category_codes
from names import CATEGORICAL_FEATURE, CATEGORIES, FEATURES, NUMERIC_FEATURES, OPTIONAL_FEATURES

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
COLUMNWISE_MIN_RECORDS = 8  # below this, checking field by field is faster (3 us for one record, against 8)
_NUMBERS = operator.itemgetter(*NUMERIC_FEATURES)  # a record's numbers, in order: a tuple
_NUMBER_TYPES = frozenset({int, float, type(None)})  # exact: bool is an int subclass, but not a number here
_REQUIRED_COLUMNS = np.array([i for i, name in enumerate(NUMERIC_FEATURES) if name not in OPTIONAL_FEATURES])
_BOUNDED_COLUMNS = tuple((NUMERIC_FEATURES.index(name), low, high) for name, (low, high) in COORDINATE_BOUNDS.items())


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


@dataclass(frozen=True, slots=True)
class CheckedInput:
    """A request's records, checked: what every door hands the model, the metrics and the prediction log."""

    records: list[Any]  # as sent, for the prediction log
    numeric: FloatArray  # NUMERIC_FEATURES, NaN for a missing optional one
    codes: FloatArray  # CATEGORIES index of each record's category
    batch: bool = True  # /predict: sent as {"instances": [...]}, answered with "predictions"; else "prediction"
    client_id: str | None = None  # v2: the id the client gave its request, sent back in the answer


Locate = Callable[[int, str], str]  # (row, field) → where a problem is, in the door's terms; field "": the record


def in_instances(row: int, field: str) -> str:
    """/predict's batch: instances[3].median_income."""
    return f"instances[{row}]" + (f".{field}" if field else "")


def in_body(row: int, field: str) -> str:
    """/predict's single record: median_income, or the body itself."""
    return field or "body"


def unknown_fields(names: Any, where: Callable[[str], str] = str) -> list[InputProblem]:
    """An "unknown field" problem for each of `names` (at most MAX_PROBLEMS)."""
    return [InputProblem(where(name), "unknown", "unknown field") for name in islice(names, MAX_PROBLEMS)]


def records_in(payload: Any, max_rows: int) -> tuple[list[Any], bool]:
    """The records of a /predict body, and whether it was a batch (`{"instances": [...]}`)."""
    if not isinstance(payload, dict):
        raise InvalidInput([InputProblem("body", "body", 'must be a JSON object: a record or {"instances": [...]}')])
    if "instances" not in payload:
        return [payload], False
    instances = payload["instances"]
    problems = unknown_fields(name for name in payload if name != "instances")
    if not isinstance(instances, list) or not instances:
        problems.append(InputProblem("instances", "instances", "must be a non-empty list of records"))
    if problems:
        raise InvalidInput(problems)
    refuse_rows(len(instances), max_rows)
    return instances, True


def refuse_rows(rows: int, max_rows: int) -> None:
    """413 for more records than MAX_BATCH_ROWS, before they are built or checked."""
    if rows > max_rows:
        raise HTTPException(413, f"{rows} records is more than MAX_BATCH_ROWS={max_rows}")


def to_arrays(records: list[Any], locate: Locate = in_instances) -> tuple[FloatArray, FloatArray]:
    """Check records against the fields of names.py; return NUMERIC_FEATURES as floats, and category codes.

    Stops at MAX_PROBLEMS problems; each is placed with `locate`, only once found (the checked path builds no names).
    """
    arrays = _well_formed(records) if len(records) >= COLUMNWISE_MIN_RECORDS else None
    return arrays if arrays is not None else _checked(records, locate)


def _well_formed(records: list[Any]) -> tuple[FloatArray, FloatArray] | None:
    """The arrays of a batch in which every record is right, checked a column at a time (~0.8 us a record, against
    ~2 us field by field); None if any record may not be, for _checked to find what and say where. It accepts only
    what _checked accepts: every field present (total_bedrooms may be null) and no other, numbers of the exact types
    int and float, coordinates within COORDINATE_BOUNDS, a known category."""
    if not records:
        return None
    try:
        numbers = list(map(_NUMBERS, records))  # KeyError: a field missing; TypeError: not an object
        codes = [_CODES[record[CATEGORICAL_FEATURE]] for record in records]  # KeyError: not a category (or missing)
    except (KeyError, TypeError):
        return None
    if set(map(len, records)) != {len(FEATURES)}:  # every field is there: so others are not
        return None
    if not set(map(type, chain.from_iterable(numbers))) <= _NUMBER_TYPES:
        return None
    try:
        numeric = np.array(numbers, dtype=float)  # null becomes NaN
    except OverflowError:  # an integer beyond float's range: _checked fails alike, as it always has
        return None
    if np.isnan(numeric[:, _REQUIRED_COLUMNS]).any():  # null (or NaN) where a value is required: _checked decides
        return None
    for column, low, high in _BOUNDED_COLUMNS:
        values = numeric[:, column]
        if not ((low <= values) & (values <= high)).all():
            return None
    return numeric, np.array(codes, dtype=float)


def _checked(records: list[Any], locate: Locate) -> tuple[FloatArray, FloatArray]:
    """to_arrays field by field, each problem found named."""
    rows: list[list[float]] = []
    codes: list[float] = []
    problems: list[InputProblem] = []
    for index, record in enumerate(records):
        if type(record) is not dict:
            problems.append(InputProblem(locate(index, ""), "body", "must be a JSON object"))
            continue
        before = len(problems)
        rows.append([_number(record, name, problems) for name in NUMERIC_FEATURES])
        codes.append(_category(record, problems))
        if not _FIELDS.issuperset(record):
            problems += unknown_fields(name for name in record if name not in _FIELDS)
        for at in range(before, len(problems)):  # found with the field's name as path: placed now
            problem = problems[at]
            problems[at] = InputProblem(locate(index, problem.path), problem.field, problem.message)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise InvalidInput(problems)
    return np.array(rows, dtype=float), np.array(codes, dtype=float)


def _number(record: dict[str, Any], name: str, problems: list[InputProblem]) -> float:
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
    problems.append(InputProblem(name, name, message))
    return math.nan


def _category(record: dict[str, Any], problems: list[InputProblem]) -> float:
    value = record.get(CATEGORICAL_FEATURE)
    if type(value) is str and value in _CODES:
        return _CODES[value]
    message = "is required" if CATEGORICAL_FEATURE not in record else f"must be one of {', '.join(CATEGORIES)}"
    problems.append(InputProblem(CATEGORICAL_FEATURE, CATEGORICAL_FEATURE, message))
    return math.nan
