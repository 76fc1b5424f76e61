"""validate stage: refuse data that would silently make a bad model.

Checks the schema (the ten columns, numeric types), value ranges, missing-value rates, categories,
row count, duplicates and truncation. Writes reports/validation.json either way; on any problem prints
one line per problem, naming the column, and exits 1 so that nothing downstream runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from names import CATEGORICAL_FEATURE, CATEGORIES, COLUMNS

DATA = Path("data/housing.csv")
REPORT = Path("reports/validation.json")
NUMERIC_COLUMNS = [c for c in COLUMNS if c != CATEGORICAL_FEATURE]


@dataclass
class DataProblem:
    column: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.column}: {self.message}"


def _lines(index: pd.Index, limit: int = 3) -> str:
    """File line numbers of the first offending rows (line 1 is the header)."""
    shown = ", ".join(str(i + 2) for i in index[:limit])
    return f"line {shown}" if len(index) == 1 else f"lines {shown}{', ...' if len(index) > limit else ''}"


def read_raw(path: Path) -> tuple[pd.DataFrame | None, list[DataProblem]]:
    """Read every cell as text so that nothing is coerced before it is checked."""
    if not path.exists():
        return None, [DataProblem("file", "exists", f"{path} does not exist")]
    content = path.read_bytes()
    if not content.strip():
        return None, [DataProblem("file", "empty", f"{path} is empty")]
    problems = []
    if not content.endswith(b"\n"):
        problems.append(DataProblem("file", "truncated", "last line has no newline: the file looks truncated"))
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        return None, [*problems, DataProblem("file", "parse", f"not a valid CSV: {error}".strip())]
    return frame, problems


def check(raw: pd.DataFrame, params: dict[str, Any]) -> tuple[list[DataProblem], dict[str, Any]]:
    problems: list[DataProblem] = []
    rows = len(raw)
    missing_columns = [c for c in COLUMNS if c not in raw.columns]
    problems += [DataProblem(c, "schema", "column is missing") for c in missing_columns]
    problems += [DataProblem(str(c), "schema", f"unexpected column (expected {', '.join(COLUMNS)})")
                 for c in raw.columns if c not in COLUMNS]
    if rows < params["min_rows"]:
        problems.append(DataProblem("file", "rows", f"{rows} data rows, need at least {params['min_rows']}"))

    stats = {}
    allowed_missing = params["max_missing_fraction"]
    for column in [c for c in COLUMNS if c in raw.columns]:
        text = raw[column].str.strip()
        empty = text.eq("")
        missing_fraction = float(empty.mean()) if rows else 0.0
        limit = allowed_missing.get(column, 0.0)
        if empty.any() and missing_fraction > limit:
            where = _lines(raw.index[empty])
            problems.append(DataProblem(column, "missing", f"{empty.sum()} of {rows} values empty "
                                        f"({missing_fraction:.1%}, at most {limit:.1%} allowed; {where})"))
        stats[column] = {"missing_fraction": round(missing_fraction, 6)}
        if column == CATEGORICAL_FEATURE:
            unknown = ~empty & ~text.isin(CATEGORIES)
            if unknown.any():
                values = sorted(text[unknown].unique())[:5]
                problems.append(DataProblem(column, "category", f"{unknown.sum()} values not in {list(CATEGORIES)}: "
                                            f"{values} ({_lines(raw.index[unknown])})"))
            stats[column]["counts"] = text[~empty].value_counts().to_dict()
            continue
        values = pd.to_numeric(text.where(~empty), errors="coerce")
        not_numeric = ~empty & (values.isna() | ~np.isfinite(values))
        if not_numeric.any():
            examples = list(text[not_numeric].unique()[:3])
            problems.append(DataProblem(column, "type", f"{not_numeric.sum()} values are not finite numbers, e.g. "
                                        f"{examples} ({_lines(raw.index[not_numeric])})"))
        low, high = params["ranges"][column]
        valid = values[~not_numeric & ~empty]
        outside = valid[(valid < low) | (valid > high)]
        if len(outside):
            problems.append(DataProblem(column, "range", f"{len(outside)} values outside [{low}, {high}], e.g. "
                                        f"{outside.iloc[0]:g} ({_lines(outside.index)})"))
        if len(valid):
            stats[column].update(min=float(valid.min()), max=float(valid.max()), mean=float(valid.mean()))

    duplicates = raw.duplicated()
    limit = params["max_duplicate_fraction"]
    if rows and duplicates.mean() > limit:
        where = _lines(raw.index[duplicates])
        problems.append(DataProblem("file", "duplicates", f"{duplicates.sum()} duplicate rows "
                                    f"({duplicates.mean():.1%}, at most {limit:.1%} allowed; {where})"))
    return problems, {"rows": rows, "duplicate_rows": int(duplicates.sum()), "columns": stats}


def main() -> int:
    params = yaml.safe_load(Path("params.yaml").read_text())["validate"]
    raw, problems = read_raw(DATA)
    summary: dict[str, Any] = {}
    if raw is not None:
        found, summary = check(raw, params)
        problems += found
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = {"source": str(DATA), "valid": not problems, "problems": [asdict(p) for p in problems], **summary}
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    if problems:
        print(f"validate: {DATA} rejected ({len(problems)} problems, report in {REPORT}):", file=sys.stderr)
        for problem in problems:
            print(f"validate: {problem}", file=sys.stderr)
        return 1
    print(f"validate: {DATA} ok ({summary['rows']} rows, {summary['duplicate_rows']} duplicates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
