"""The prediction log: one JSON line per /predict request, written off the request path."""

from __future__ import annotations

import logging
import os
import threading
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
# Lines waiting to be written, per worker: ten of the largest batches (MAX_BATCH_ROWS records of ~360 bytes).
PREDICTION_LOG_BUFFER_BYTES = 32 * 1024 * 1024
PREDICTION_LOG_FLUSH_S = 0.2


class PredictionEntry(TypedDict):
    request_id: str
    time: float  # Unix time; written as ISO 8601 in UTC
    model: Mapping[str, object]  # model.ModelLabel
    route: str  # the endpoint that answered, e.g. /predict, /invocations, /v2/models/{name}/infer
    inputs: list[Any]  # the records as sent
    outputs: list[float]


class _CountedFailures(RotatingFileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        LOG_DROPPED.inc()


class PredictionLog(BackgroundThread):
    """One JSON line per prediction request, written by a background thread.

    A request turns its entry into its JSON line (a few microseconds for one record, milliseconds for the largest
    batch; the request's records are not kept alive) and appends it to a buffer bounded in bytes, which the thread
    writes out every PREDICTION_LOG_FLUSH_S, and at shutdown. Waking the thread per request would cost a request
    more than the prediction itself. A full buffer or a failing disk loses lines, counted in
    housing_prediction_log_dropped_total, but never delays or fails a prediction. Each worker writes its own file.
    """

    name = "prediction-log"
    join_timeout_s = 10.0  # stopping writes what is pending

    def __init__(self, directory: Path, max_bytes: int = PREDICTION_LOG_MAX_BYTES,
                 buffer_bytes: int = PREDICTION_LOG_BUFFER_BYTES) -> None:
        super().__init__()
        self.path = directory / f"predictions-{os.getpid()}.jsonl"
        self.max_bytes = max_bytes
        self.buffer_bytes = buffer_bytes
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._count_lock = threading.Lock()  # held for one addition: the request path never waits on the disk

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def append(self, entry: PredictionEntry) -> None:
        line = orjson.dumps({**entry, "time": datetime.fromtimestamp(entry["time"], UTC).isoformat()})
        with self._count_lock:
            if self._pending_bytes + len(line) > self.buffer_bytes:
                LOG_DROPPED.inc()
                return
            self._pending_bytes += len(line)
        self._pending.append(line)

    def _run(self) -> None:
        lines = self._open()
        while not self._stop.wait(PREDICTION_LOG_FLUSH_S):
            self._write(lines)
        self._write(lines)
        if lines is not None:
            lines.close()

    def _write(self, lines: RotatingFileHandler | None) -> None:
        while self._pending:
            line = self._pending.popleft()
            with self._count_lock:
                self._pending_bytes -= len(line)
            if lines is None:
                LOG_DROPPED.inc()
                continue
            lines.handle(logging.makeLogRecord({"msg": line.decode()}))

    def _open(self) -> RotatingFileHandler | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.error("prediction log disabled: %s", error)
            return None
        return _CountedFailures(self.path, maxBytes=self.max_bytes, backupCount=PREDICTION_LOG_BACKUPS,
                                encoding="utf-8", delay=True)
