import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from scripts.fetch import DEFAULT_DATA_URL
from scripts.validate import check, read_raw
from tests.conftest import ROOT, synthetic_housing

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())["validate"]


def problems_for(tmp_path: Path, content: str | bytes) -> list[str]:
    path = tmp_path / "housing.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    raw, problems = read_raw(path)
    if raw is not None:
        problems += check(raw, PARAMS)[0]
    return [str(p) for p in problems]


def csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def test_valid_data_has_no_problems(tmp_path):
    assert problems_for(tmp_path, csv(synthetic_housing())) == []


def test_the_shipped_default_data_is_valid(tmp_path):
    assert problems_for(tmp_path, gzip.decompress((ROOT / DEFAULT_DATA_URL).read_bytes())) == []


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("missing column", lambda f: f.drop(columns="median_income"), ["median_income: column is missing"]),
        (
            "renamed column",
            lambda f: f.rename(columns={"households": "homes"}),
            ["households: column is missing", "homes: unexpected column"],
        ),
        (
            "text in numeric column",
            lambda f: f.assign(population=f.population.astype(object).where(f.index != 7, "lots")),
            ["population: 1 values are not finite numbers, e.g. ['lots'] (line 9)"],
        ),
        (
            "infinite value",
            lambda f: f.assign(total_rooms=f.total_rooms.where(f.index != 3, np.inf)),
            ["total_rooms: 1 values are not finite numbers"],
        ),
        ("all-NaN column", lambda f: f.assign(median_income=np.nan), ["median_income: 1500 of 1500 values empty"]),
        (
            "too many missing bedrooms",
            lambda f: f.assign(total_bedrooms=f.total_bedrooms.where(f.index % 5 != 0)),
            ["total_bedrooms: 3"],
        ),
        (
            "coordinates outside California",
            lambda f: f.assign(latitude=f.latitude.where(f.index >= 2, 51.5)),
            ["latitude: 2 values outside [32.5, 42.1], e.g. 51.5 (lines 2, 3)"],
        ),
        (
            "negative counts",
            lambda f: f.assign(households=f.households.where(f.index != 0, -4)),
            ["households: 1 values outside [1, 1000000], e.g. -4 (line 2)"],
        ),
        (
            "target out of range",
            lambda f: f.assign(median_house_value=f.median_house_value.where(f.index != 0, 0)),
            ["median_house_value: 1 values outside [1, 500001]"],
        ),
        (
            "unknown category",
            lambda f: f.assign(ocean_proximity=f.ocean_proximity.where(f.index != 0, "ON MARS")),
            ["ocean_proximity: 1 values not in"],
        ),
        ("duplicate rows", lambda f: pd.concat([f, f.head(100)], ignore_index=True), ["file: 100 duplicate rows"]),
        ("too few rows", lambda f: f.head(50), ["file: 50 data rows, need at least 1000"]),
        ("header only", lambda f: f.head(0), ["file: 0 data rows"]),
    ],
)
def test_each_kind_of_corruption_is_named(tmp_path, name, make, expected):
    found = problems_for(tmp_path, csv(make(synthetic_housing())))
    for fragment in expected:
        assert any(p.startswith(fragment) for p in found), f"{name}: {fragment!r} not in {found}"


def test_empty_file(tmp_path):
    assert problems_for(tmp_path, "") == [f"file: {tmp_path / 'housing.csv'} is empty"]


def test_truncated_file(tmp_path):
    content = csv(synthetic_housing())
    found = problems_for(tmp_path, content[: len(content) // 2 - 7])
    assert "file: last line has no newline: the file looks truncated" in found
    assert any(p.startswith("ocean_proximity: 1 of") for p in found)  # the cut row lost its last fields


def test_not_a_csv(tmp_path):
    found = problems_for(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00binary")
    assert found and all(p.startswith("file: ") for p in found)
