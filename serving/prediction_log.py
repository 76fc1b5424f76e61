"""The prediction log: one JSON line per answered prediction request, kept on disk across workers and deploys.

Segments. Each worker appends to its own segment, `predictions-<UTC time it opened>-<pid>.jsonl` in
PREDICTION_LOG_DIR, and holds an exclusive flock on it while it is open: names sort in age order, and a segment no one
else can lock is being written (by this worker, another one, or another container on the same host volume). A worker
closes its segment before a line would take it past `segment_bytes(settings)`, once it is PREDICTION_LOG_SEGMENT_S
old, and when it stops. Each time it opens one it prunes the directory, at start too: the oldest closed segments go
first, until the closed ones plus a full segment for every open one fit in PREDICTION_LOG_MAX_BYTES. Opening and
pruning hold the directory's lock file, so no worker sees another's new segment before that segment is locked.

Budget. Each worker gives each client address PREDICTION_LOG_CLIENT_BYTES_PER_S of log (a token bucket holding
CLIENT_BURST_S of it); what a client sends beyond that is answered but not logged. So one address adds at most
WORKERS times that rate to the log, and the history of every other client lasts at least as long as that rate takes to
fill PREDICTION_LOG_MAX_BYTES (docs/serving.md works out the figures).

Shipping. With PREDICTION_LOG_S3=s3://bucket/prefix, each worker's shipper thread uploads closed segments to
`prefix/<segment name>` (at start, when its worker closes one, every SHIP_INTERVAL_S, and at shutdown), holding the
segment's flock meanwhile, then renames it `*.shipped.jsonl`. Pruning alone deletes segments, shipped or not.

Nothing here delays or fails a prediction: a line that does not fit in the buffer or the budget, or that cannot be
written, is dropped and counted in housing_prediction_log_dropped_total{reason}; an upload that fails is logged,
counted in housing_prediction_log_uploads_total{result="failed"} and tried again at the next pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import orjson

from serving.background import BackgroundThread
from serving.metrics import LOG_DROPPED, LOG_UPLOADS
from serving.settings import Settings

log = logging.getLogger("housing.serve")

# Lines waiting to be written, per worker: ten of the largest batches (MAX_BATCH_ROWS records of ~360 bytes).
PREDICTION_LOG_BUFFER_BYTES = 32 * 1024 * 1024
PREDICTION_LOG_FLUSH_S = 0.2
SEGMENT_MAX_BYTES = 64 * 1024 * 1024
# A segment is PREDICTION_LOG_MAX_BYTES / (SEGMENTS_PER_WORKER * WORKERS), SEGMENT_MAX_BYTES at most: during a deploy
# both colours' workers hold one open, which leaves at least 7/8 of PREDICTION_LOG_MAX_BYTES to closed segments.
SEGMENTS_PER_WORKER = 16
CLIENT_BURST_S = 300.0  # a client's bucket holds this many seconds of its rate: a few of the largest batches
MAX_CLIENTS = 65_536  # buckets per worker; past it (and once idle ones are forgotten) newcomers share OVERFLOW's
OVERFLOW = "*"
SHIP_INTERVAL_S = 60.0  # a shipper looks for closed segments at least this often: other workers', failed uploads
S3_TIMEOUTS_S = (5, 60)  # connect, read
S3_ATTEMPTS = 3
PATTERN = "predictions-*.jsonl"
SHIPPED = ".shipped.jsonl"
LOCK_FILE = ".lock"


class PredictionEntry(TypedDict):
    request_id: str
    time: float  # Unix time; written as ISO 8601 in UTC
    model: Mapping[str, object]  # model.ModelLabel
    route: str  # the endpoint that answered, e.g. /predict, /invocations, /v2/models/{name}/infer
    ids: list[str]  # each prediction's id, in the records' order (app.Scored.ids)
    inputs: list[Any]  # the records as sent
    outputs: list[float]


def segment_bytes(settings: Settings) -> int:
    per_worker = settings.prediction_log_max_bytes // (SEGMENTS_PER_WORKER * settings.workers)
    return max(1, min(SEGMENT_MAX_BYTES, per_worker))


def s3_destination(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without its slashes)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


@contextmanager
def directory_locked(directory: Path) -> Iterator[None]:
    """The directory's lock: held to open a segment, to prune and to pick a segment to ship, never longer."""
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def try_lock(path: Path) -> int | None:
    """A read descriptor of `path` holding its exclusive flock; None if it is gone or someone holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ClientBudget:
    """Bytes of log per client address: a token bucket of `bytes_per_s`, holding CLIENT_BURST_S of it."""

    def __init__(self, bytes_per_s: int, clock: Callable[[], float]) -> None:
        self.rate = float(bytes_per_s)
        self.capacity = self.rate * CLIENT_BURST_S
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # client -> [bytes available, when last counted]
        self._swept_at = float("-inf")
        self._lock = threading.Lock()

    def has_room(self, client: str) -> bool:
        """Whether the client has any budget left: checked before its entry is turned into a line."""
        with self._lock:
            return self._bucket(client, self._clock())[0] > 0

    def take(self, client: str, size: int) -> bool:
        with self._lock:
            bucket = self._bucket(client, self._clock())
            if bucket[0] < size:
                return False
            bucket[0] -= size
            return True

    def _bucket(self, client: str, now: float) -> list[float]:
        if client not in self._buckets and len(self._buckets) >= MAX_CLIENTS:
            if now - self._swept_at >= 1.0:  # forget the clients whose bucket has refilled: they are as new
                self._swept_at = now
                self._buckets = {key: bucket for key, bucket in self._buckets.items()
                                 if bucket[0] + (now - bucket[1]) * self.rate < self.capacity}
            if len(self._buckets) >= MAX_CLIENTS:
                client = OVERFLOW
        bucket = self._buckets.setdefault(client, [self.capacity, now])
        bucket[0] = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        return bucket


class Segment:
    def __init__(self, path: Path, fd: int, opened_at: float) -> None:
        self.path = path
        self.fd = fd  # holds the segment's flock until closed
        self.opened_at = opened_at
        self.size = 0


class PredictionLog(BackgroundThread):
    """One JSON line per prediction request, written by a background thread (see the module's docstring).

    A request turns its entry into its JSON line (a few microseconds for one record, milliseconds for the largest
    batch; the request's records are not kept alive) and appends it to a buffer bounded in bytes, which the thread
    writes out every PREDICTION_LOG_FLUSH_S, and at shutdown. Waking the thread per request would cost a request
    more than the prediction itself.
    """

    name = "prediction-log"
    join_timeout_s = 10.0  # stopping writes what is pending

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 buffer_bytes: int = PREDICTION_LOG_BUFFER_BYTES) -> None:
        super().__init__()
        self.directory = settings.prediction_log_dir
        self.max_bytes = settings.prediction_log_max_bytes
        self.segment_bytes = segment_bytes(settings)
        self.segment_s = settings.prediction_log_segment_s
        self.buffer_bytes = buffer_bytes
        self._clock = clock
        rate = settings.prediction_log_client_bytes_per_s
        self._budget = ClientBudget(rate, clock) if rate else None
        self._shipper = Shipper(self.directory, settings.prediction_log_s3) if settings.prediction_log_s3 else None
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._count_lock = threading.Lock()  # held for one addition: the request path never waits on the disk
        self._segment: Segment | None = None  # the writer thread's alone
        self._usable = False
        self._failing = False

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def append(self, entry: PredictionEntry, client: str = "") -> None:
        """Queue the entry's line, unless the client's budget or the buffer has no room for it."""
        budget = self._budget
        if budget is not None and not budget.has_room(client):  # before the line is made: a flood costs little
            LOG_DROPPED.labels("client_budget").inc()
            return
        line = orjson.dumps({**entry, "time": datetime.fromtimestamp(entry["time"], UTC).isoformat()},
                            option=orjson.OPT_APPEND_NEWLINE)
        if budget is not None and not budget.take(client, len(line)):
            LOG_DROPPED.labels("client_budget").inc()
            return
        with self._count_lock:
            if self._pending_bytes + len(line) > self.buffer_bytes:
                LOG_DROPPED.labels("buffer_full").inc()
                return
            self._pending_bytes += len(line)
        self._pending.append(line)

    def start(self) -> None:
        super().start()
        if self._shipper is not None:
            self._shipper.start()

    def stop(self) -> None:
        super().stop()  # the writer writes what is pending and closes its segment, which the shipper's last pass takes
        if self._shipper is not None:
            self._shipper.stop()

    def _run(self) -> None:
        self._usable = self._prepare()
        while not self._stop.wait(PREDICTION_LOG_FLUSH_S):
            self._write()
        self._write()
        self._close()

    def _prepare(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with directory_locked(self.directory):
                self._prune()
        except OSError as error:
            log.error("prediction log disabled: %s", error)
            return False
        return True

    def _write(self) -> None:
        if self._segment is not None and self._too_old(self._segment):  # also with nothing to write
            self._close()
        while self._pending:
            line = self._pending.popleft()
            with self._count_lock:
                self._pending_bytes -= len(line)
            if not self._write_line(line):
                LOG_DROPPED.labels("write_error").inc()

    def _write_line(self, line: bytes) -> bool:
        if not self._usable:
            return False
        segment = self._segment
        try:
            if segment is not None and (segment.size + len(line) > self.segment_bytes or self._too_old(segment)):
                self._close()
                segment = None
            if segment is None:
                segment = self._segment = self._open()
            write_all(segment.fd, line)
        except OSError as error:
            if segment is not None:  # no partial line stays behind; the next line starts a new segment
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, segment.size)
                self._close()
            if not self._failing:
                log.error("prediction log: cannot write to %s: %s", self.directory, error)
            self._failing = True
            return False
        segment.size += len(line)
        self._failing = False
        return True

    def _too_old(self, segment: Segment) -> bool:
        return self._clock() - segment.opened_at >= self.segment_s

    def _open(self) -> Segment:
        with directory_locked(self.directory):
            while True:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                path = self.directory / f"predictions-{stamp}-{os.getpid()}.jsonl"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
                except FileExistsError:  # another log of this process opened one in the same microsecond
                    continue
                break
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no one else can hold it yet: they need the directory lock
            segment = Segment(path, fd, self._clock())
            self._prune()
        return segment

    def _close(self) -> None:
        segment, self._segment = self._segment, None
        if segment is None:
            return
        if segment.size == 0:
            segment.path.unlink(missing_ok=True)
        os.close(segment.fd)  # releases its lock: the segment is closed, for pruning and shipping
        if self._shipper is not None and segment.size:
            self._shipper.wake()

    def _prune(self) -> None:
        """Delete the oldest closed segments until the closed ones plus a full segment per open one fit in
        max_bytes. Holds the directory lock. A segment being shipped counts as open meanwhile."""
        closed: list[tuple[Path, int, int]] = []  # path, size, a descriptor holding its lock
        total = 0
        try:
            for path in sorted(self.directory.glob(PATTERN)):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                fd = try_lock(path)
                if fd is None:
                    total += max(size, self.segment_bytes)
                else:
                    closed.append((path, size, fd))
                    total += size
            for path, size, _ in closed:
                if total <= self.max_bytes:
                    break
                if self._shipper is not None and not path.name.endswith(SHIPPED):
                    log.warning("prediction log: deleting %s, not shipped yet, to keep PREDICTION_LOG_MAX_BYTES",
                                path.name)
                path.unlink(missing_ok=True)
                total -= size
        finally:
            for _, _, fd in closed:
                os.close(fd)


class Shipper(BackgroundThread):
    """Uploads closed, unshipped segments of `directory` to S3, oldest first; a failed pass is tried again later."""

    name = "prediction-log-shipper"
    join_timeout_s = 10.0  # the last pass at shutdown; a segment it leaves is shipped by the next worker to start

    def __init__(self, directory: Path, destination: str) -> None:
        super().__init__()
        self.directory = directory
        self.bucket, self.prefix = s3_destination(destination)
        self._wake = threading.Event()
        self._client: Any = None

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.join_timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.ship()
            self._wake.wait(SHIP_INTERVAL_S)
        self.ship()

    def ship(self) -> None:
        """Upload every closed segment not shipped yet; stop at the first failure."""
        while (claimed := self._claim()) is not None:
            path, fd = claimed
            try:
                uploaded = self._upload(path, fd)
                if uploaded:
                    path.rename(path.with_name(path.name.removesuffix(".jsonl") + SHIPPED))
            finally:
                os.close(fd)
            if not uploaded:
                return

    def _claim(self) -> tuple[Path, int] | None:
        """The oldest closed segment not shipped yet, with a descriptor holding its lock."""
        try:
            with directory_locked(self.directory):
                for path in sorted(self.directory.glob(PATTERN)):
                    if path.name.endswith(SHIPPED):
                        continue
                    fd = try_lock(path)
                    if fd is None:
                        continue
                    try:  # still under this name (another shipper may have renamed it), and not empty
                        current = path.stat()
                    except FileNotFoundError:
                        current = None
                    if current is not None and current.st_ino == os.fstat(fd).st_ino and current.st_size:
                        return path, fd
                    os.close(fd)
        except OSError as error:  # no directory yet, or no longer: the writer logs why
            log.debug("prediction log shipper: %s", error)
        return None

    def _upload(self, path: Path, fd: int) -> bool:
        key = f"{self.prefix}/{path.name}" if self.prefix else path.name
        try:
            if self._client is None:
                self._client = s3_client()
            with open(fd, "rb", closefd=False) as body:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson")
        except Exception as error:  # noqa: BLE001 - botocore's and the network's errors alike: count, log, retry later
            LOG_UPLOADS.labels("failed").inc()
            log.warning("prediction log: cannot upload %s to s3://%s/%s: %s", path.name, self.bucket, key, error)
            return False
        LOG_UPLOADS.labels("uploaded").inc()
        return True


def s3_client() -> Any:
    """boto3's S3 client with bounded time: S3_TIMEOUTS_S per connection and read, S3_ATTEMPTS tries in all."""
    import boto3  # only when shipping: importing it costs each worker ~0.2 s
    from botocore.config import Config

    connect_s, read_s = S3_TIMEOUTS_S
    config = Config(connect_timeout=connect_s, read_timeout=read_s,
                    retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"})
    return boto3.client("s3", config=config)
