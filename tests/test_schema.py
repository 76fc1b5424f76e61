"""serving/schema.py's two ways to check records: a batch of right records a column at a time, and field by field,
which finds and names the problems. They must accept the same records and make the same arrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from serving.schema import EXAMPLE_RECORD, SMOKE_RECORDS, InvalidInput, _checked, _well_formed, in_instances, to_arrays


def with_(**changes: Any) -> dict[str, Any]:
    return {**EXAMPLE_RECORD, **changes}


def without(name: str) -> dict[str, Any]:
    return {key: value for key, value in EXAMPLE_RECORD.items() if key != name}


RIGHT = [
    pytest.param(list(SMOKE_RECORDS), id="smoke records, one without total_bedrooms"),
    pytest.param([with_(housing_median_age=41, population=322)], id="integers"),
    pytest.param([with_(total_bedrooms=None)], id="null total_bedrooms"),
    pytest.param([with_(longitude=-180.0, latitude=90.0)], id="coordinates on the bounds"),
    pytest.param([with_(median_income=float(i)) for i in range(1000)], id="1000 records"),
]

# Each alone in a batch of right records: the column-wise check must hand it to the field-by-field one.
WRONG = [
    pytest.param(with_(median_income=True), id="bool"),
    pytest.param(with_(median_income="8.3"), id="a number as a string"),
    pytest.param(with_(households=None), id="null in a required field"),
    pytest.param(without("households"), id="a required field missing"),
    pytest.param(with_(longitude=-180.5), id="longitude out of bounds"),
    pytest.param(with_(latitude=math.nan), id="latitude NaN"),
    pytest.param(with_(median_income=math.nan), id="NaN in a required field"),
    pytest.param(with_(ocean_proximity="MOON"), id="unknown category"),
    pytest.param(with_(ocean_proximity=None), id="null category"),
    pytest.param(with_(ocean_proximity=["INLAND"]), id="unhashable category"),
    pytest.param(without("ocean_proximity"), id="category missing"),
    pytest.param(with_(colour="red"), id="an unknown field"),
    pytest.param([1, 2], id="a list"),
    pytest.param("record", id="a string"),
    pytest.param(None, id="null"),
    pytest.param(with_(population=10**400), id="an integer beyond float"),
]


@pytest.mark.parametrize("records", RIGHT)
def test_right_records_are_checked_a_column_at_a_time_into_the_same_arrays(records):
    fast = _well_formed(records)
    assert fast is not None
    slow = _checked(records, in_instances)
    for mine, theirs in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(mine, theirs)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    assert np.isnan(fast[0]).sum() == sum(record.get("total_bedrooms") is None for record in records)


@pytest.mark.parametrize("record", WRONG)
@pytest.mark.parametrize("at", [0, 5, 9])
def test_a_wrong_record_anywhere_in_a_batch_goes_to_the_field_by_field_check(record, at):
    records = [with_(median_income=float(i)) for i in range(10)]
    records[at] = record
    assert _well_formed(records) is None
    try:
        expected: Any = _checked(records, in_instances)
    except (InvalidInput, OverflowError) as refusal:
        with pytest.raises(type(refusal)) as raised:
            to_arrays(records)
        assert str(raised.value) == str(refusal)
        if isinstance(refusal, InvalidInput):
            assert isinstance(raised.value, InvalidInput) and raised.value.problems == refusal.problems
            assert all(problem.path.startswith(f"instances[{at}]") for problem in refusal.problems)
    else:  # records _checked accepts but the column-wise check leaves to it: the same arrays either way
        for mine, theirs in zip(to_arrays(records), expected, strict=True):
            np.testing.assert_array_equal(mine, theirs)


def test_an_empty_batch_makes_the_same_empty_arrays():
    assert _well_formed([]) is None
    numeric, codes = to_arrays([])
    assert numeric.shape == codes.shape == (0,)
