"""The prediction log: one JSON line per /predict request, written off the request path."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, TypedDict

import orjson

from serving.background import BackgroundThread
from serving.metrics import LOG_DROPPED

log = logging.getLogger("housing.serve")

PREDICTION_LOG_MAX_BYTES = 64 * 1024 * 1024
PREDICTION_LOG_BACKUPS = 5
PREDICTION_LOG_BUFFER = 100_000  # entries waiting to be written
PREDICTION_LOG_FLUSH_S = 0.2


class PredictionEntry(TypedDict):
    request_id: str
    time: float  # Unix time; written as ISO 8601 in UTC
    model: Mapping[str, object]  # model.ModelLabel
    inputs: list[Any]  # the records as sent
    outputs: list[float]


class _CountedFailures(RotatingFileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        LOG_DROPPED.inc()


class PredictionLog(BackgroundThread):
    """One JSON line per prediction request, written by a background thread.

    A request only appends its entry to a bounded in-memory buffer, which the thread writes out every
    PREDICTION_LOG_FLUSH_S, and at shutdown. Waking the thread per request would cost a request more than the
    prediction itself. A full buffer or a failing disk loses entries, counted in housing_prediction_log_dropped_total,
    but never delays or fails a prediction. Each worker writes its own file.
    """

    name = "prediction-log"
    join_timeout_s = 10.0  # stopping writes what is pending

    def __init__(self, directory: Path, max_bytes: int = PREDICTION_LOG_MAX_BYTES) -> None:
        super().__init__()
        self.path = directory / f"predictions-{os.getpid()}.jsonl"
        self.max_bytes = max_bytes
        self._pending: deque[PredictionEntry] = deque()

    def append(self, entry: PredictionEntry) -> None:
        if len(self._pending) >= PREDICTION_LOG_BUFFER:
            LOG_DROPPED.inc()
        else:
            self._pending.append(entry)

    def _run(self) -> None:
        lines = self._open()
        while not self._stop.wait(PREDICTION_LOG_FLUSH_S):
            self._write(lines)
        self._write(lines)
        if lines is not None:
            lines.close()

    def _write(self, lines: RotatingFileHandler | None) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if lines is None:
                LOG_DROPPED.inc()
                continue
            line = {**entry, "time": datetime.fromtimestamp(entry["time"], UTC).isoformat()}
            lines.handle(logging.makeLogRecord({"msg": orjson.dumps(line).decode()}))

    def _open(self) -> RotatingFileHandler | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.error("prediction log disabled: %s", error)
            return None
        return _CountedFailures(self.path, maxBytes=self.max_bytes, backupCount=PREDICTION_LOG_BACKUPS,
                                encoding="utf-8", delay=True)
