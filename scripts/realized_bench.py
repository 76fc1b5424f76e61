"""`make realized-bench`: how long `make realized` takes to join PREDICTIONS logged predictions with LABELS labels.

Writes a prediction log as serve.py writes it (JSON lines, RECORDS_PER_REQUEST records an entry, two model versions
over a week, the example record as inputs) and a labels CSV (ids of a random tenth of the predictions, plus 1%
duplicates and 1% unknown ids) into a temporary directory, then times reading, joining and measuring
(scripts/realized.py: read_labels, read_log, compute) and prints the figure. Nothing is pushed or tagged.

  python -m scripts.realized_bench [PREDICTIONS [LABELS [RECORDS_PER_REQUEST]]]   (1000000 100000 1)
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from names import model_name
from scripts import realized
from serving.schema import EXAMPLE_RECORD

SEGMENT_ENTRIES = 50_000  # entries a segment


def write_log(directory: Path, predictions: int, per_request: int, rng: np.random.Generator) -> list[str]:
    """Segments of `predictions` predictions; returns every prediction's id."""
    start = datetime(2027, 1, 4, tzinfo=UTC)
    ids: list[str] = []
    outputs = rng.normal(200_000, 80_000, predictions).round(2)
    requests = -(-predictions // per_request)
    lines: list[bytes] = []
    for request in range(requests):
        first = request * per_request
        count = min(per_request, predictions - first)
        request_id = f"req-{request:08d}"
        entry_ids = [request_id] if per_request == 1 else [f"{request_id}/{i}" for i in range(count)]
        ids += entry_ids
        when = start + timedelta(seconds=7 * 24 * 3600 * request / requests)
        lines.append(orjson.dumps({
            "request_id": request_id, "time": when.isoformat(),
            "model": {"name": model_name(), "version": "1" if request < requests // 2 else "2"},
            "route": "/predict", "ids": entry_ids, "inputs": [EXAMPLE_RECORD] * count,
            "outputs": outputs[first:first + count].tolist()}, option=orjson.OPT_APPEND_NEWLINE))
        if len(lines) == SEGMENT_ENTRIES or request == requests - 1:
            (directory / f"predictions-{when:%Y%m%dT%H%M%S%f}Z-{request}.jsonl").write_bytes(b"".join(lines))
            lines = []
    return ids


def write_labels(path: Path, ids: list[str], labels: int, rng: np.random.Generator) -> None:
    chosen = rng.choice(len(ids), labels, replace=False)
    frame = pd.DataFrame({"id": np.asarray(ids, dtype=object)[chosen],
                          "median_house_value": rng.normal(200_000, 90_000, labels).round()})
    extra = labels // 100
    frame = pd.concat([frame, frame.head(extra),  # duplicates
                       pd.DataFrame({"id": [f"never-logged-{i}" for i in range(extra)],
                                     "median_house_value": 100_000.0})], ignore_index=True)
    frame.to_csv(path, index=False)


def main(argv: list[str]) -> int:
    predictions, labels, per_request = ([int(value) for value in argv] + [1_000_000, 100_000, 1][len(argv):])[:3]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="realized-bench-") as scratch:
        folder = Path(scratch)
        (folder / "logs").mkdir()
        ids = write_log(folder / "logs", predictions, per_request, rng)
        write_labels(folder / "labels.csv", ids, labels, rng)
        size = sum(path.stat().st_size for path in (folder / "logs").iterdir())
        started = time.perf_counter()
        read = realized.read_labels(str(folder / "labels.csv"))
        log = realized.read_log(folder / "logs")
        result = realized.compute(log, read)
        seconds = time.perf_counter() - started
    for one in result.versions:
        print(realized.line(one, model_name()))
    print(f"realized: {predictions:,} logged predictions ({per_request} per entry, {size / 2**20:,.0f} MiB of log) "
          f"joined with {labels:,} labels in {seconds:.1f} s "
          f"({result.labels['joined']:,} joined, {result.labels['duplicate']:,} duplicate, "
          f"{result.labels['unknown']:,} unknown)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
