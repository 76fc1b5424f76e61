"""The prediction log keeps the newest PREDICTION_LOG_MAX_BYTES of entries across workers, in segments named in age
order; never deletes a segment someone holds open; gives each client a byte budget, so that one client cannot rotate
the others' history out faster than that budget; ships closed segments to S3 (a real moto server) when asked; and drops
(and counts) what it cannot keep, without ever failing a prediction."""

from __future__ import annotations

import fcntl
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import orjson
import pytest

from serving.metrics import METRICS
from serving.prediction_log import CLIENT_BURST_S, SHIPPED, PredictionLog, segment_bytes
from serving.schema import EXAMPLE_RECORD as RECORD
from serving.settings import Settings
from tests.servers import wait_for


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(directory: Path, **overrides: object) -> Settings:
    return Settings(prediction_log_dir=directory, **{"prediction_log_client_bytes_per_s": 0, **overrides})


def entry(request_id: str, records: int = 1) -> dict:
    return {"request_id": request_id, "time": 1.8e9, "model": {"name": "m", "version": "1"},
            "route": "/predict", "inputs": [RECORD] * records, "outputs": [1.0] * records}


def line_bytes(request_id: str = "r000") -> int:
    return len(orjson.dumps({**entry(request_id), "time": "2027-01-15T08:00:00+00:00"})) + 1


def segments(directory: Path) -> list[Path]:
    """The segments in name order, which is age order."""
    return sorted(directory.glob("predictions-*.jsonl"))


def logged(directory: Path) -> list[str]:
    """The request ids in the directory, segment after segment."""
    return [orjson.loads(line)["request_id"] for path in segments(directory) for line in path.read_bytes().splitlines()]


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in segments(directory))


def dropped(reason: str) -> float:
    return METRICS.get_sample_value("housing_prediction_log_dropped_total", {"reason": reason})


def uploads(result: str) -> float:
    return METRICS.get_sample_value("housing_prediction_log_uploads_total", {"result": result})


def write(log: PredictionLog, request_ids: list[str]) -> None:
    log.start()
    for request_id in request_ids:
        log.append(entry(request_id))
    log.stop()  # writes every pending line and closes the segment


# --- the buffer ---------------------------------------------------------------------------------------------------


def test_the_buffer_holds_at_most_its_bytes_and_counts_what_it_drops(tmp_path):
    log = PredictionLog(settings(tmp_path), buffer_bytes=20_000)  # not started: nothing is written meanwhile
    before = dropped("buffer_full")
    for number in range(100):
        log.append(entry(f"r{number:03d}"))  # lines of one length
    kept = 20_000 // line_bytes()
    assert log.pending_bytes == kept * line_bytes()
    assert dropped("buffer_full") == before + 100 - kept


def test_one_entry_larger_than_the_buffer_is_dropped_not_kept(tmp_path):
    log = PredictionLog(settings(tmp_path), buffer_bytes=100_000)
    before = dropped("buffer_full")
    log.append(entry("huge", records=1000))  # ~220 kB of records
    log.append(entry("small"))
    assert dropped("buffer_full") == before + 1
    assert 0 < log.pending_bytes < 1000


def test_stopping_writes_every_pending_line_at_once(tmp_path):
    log = PredictionLog(settings(tmp_path))
    write(log, [f"r{number}" for number in range(500)])  # without waiting for the next flush
    assert logged(tmp_path) == [f"r{number}" for number in range(500)]
    assert orjson.loads(segments(tmp_path)[0].read_bytes().splitlines()[0])["time"] == "2027-01-15T08:00:00+00:00"
    assert log.pending_bytes == 0


def test_a_log_that_cannot_make_its_directory_drops_and_counts_every_entry(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    log = PredictionLog(settings(tmp_path / "file" / "logs"))
    before = dropped("write_error")
    write(log, ["r1", "r2"])
    assert dropped("write_error") == before + 2


# --- segments and pruning -----------------------------------------------------------------------------------------


def test_segments_are_named_in_age_order_and_closed_before_they_pass_their_size(tmp_path):
    config = settings(tmp_path, prediction_log_max_bytes=16 * 10 * line_bytes())  # ten lines a segment
    write(PredictionLog(config), [f"r{number:03d}" for number in range(95)])
    assert logged(tmp_path) == [f"r{number:03d}" for number in range(95)]  # name order is write order
    assert [len(path.read_bytes().splitlines()) for path in segments(tmp_path)] == [10] * 9 + [5]
    assert all(path.stat().st_size <= segment_bytes(config) for path in segments(tmp_path))


def test_a_segment_is_closed_once_it_is_segment_s_old(tmp_path):
    clock = Clock()
    log = PredictionLog(settings(tmp_path, prediction_log_segment_s=3600.0), clock=clock)
    log.start()
    log.append(entry("opened"))
    wait_for(lambda: logged(tmp_path) == ["opened"], 10, "the first entry on disk")
    clock.now += 3600.0
    log.append(entry("an hour later"))
    log.stop()
    assert [[orjson.loads(line)["request_id"] for line in path.read_bytes().splitlines()]
            for path in segments(tmp_path)] == [["opened"], ["an hour later"]]


def test_the_directory_keeps_the_newest_entries_within_its_bytes(tmp_path):
    config = settings(tmp_path, prediction_log_max_bytes=16 * 10 * line_bytes())  # 16 segments of ten lines
    for worker in range(5):  # five workers one after the other, as deploys and restarts make them
        write(PredictionLog(config), [f"{worker}{number:03d}" for number in range(50)])
    everything = [f"{worker}{number:03d}" for worker in range(5) for number in range(50)]
    kept = logged(tmp_path)
    assert kept == everything[-len(kept):]  # the oldest went first
    assert directory_bytes(tmp_path) <= config.prediction_log_max_bytes
    # and no more than it had to: pruning stops as soon as the closed segments and an open one fit
    assert directory_bytes(tmp_path) > config.prediction_log_max_bytes - 2 * segment_bytes(config)


def test_a_segment_another_worker_holds_open_is_never_deleted_and_counts_as_full(tmp_path):
    """Another worker (or another container on the same volume) holds an flock on its open segment: here, the
    oldest name in the directory. Pruning skips it, and reserves a full segment for it."""
    config = settings(tmp_path, prediction_log_max_bytes=16 * 10 * line_bytes())
    theirs = tmp_path / "predictions-20000101T000000000000Z-1.jsonl"
    theirs.write_bytes(orjson.dumps(entry("theirs")) + b"\n")
    with open(theirs, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        write(PredictionLog(config), [f"r{number:03d}" for number in range(300)])
        assert segments(tmp_path)[0] == theirs
        assert theirs.read_bytes() == orjson.dumps(entry("theirs")) + b"\n"
        ours = directory_bytes(tmp_path) - theirs.stat().st_size
        assert ours + segment_bytes(config) <= config.prediction_log_max_bytes
    write(PredictionLog(config), [f"s{number:03d}" for number in range(30)])  # closed now: the oldest, first to go
    assert not theirs.exists()


def test_two_workers_writing_at_once_keep_the_newest_entries_of_each_within_the_bytes(tmp_path):
    """What each worker keeps is its newest entries: pruning took whole segments, oldest first (all of one
    worker's, if the other wrote on after it stopped), never one either held open."""
    config = settings(tmp_path, prediction_log_max_bytes=16 * 10 * line_bytes())
    workers = {name: PredictionLog(config) for name in ("a", "b")}

    def flood(name: str) -> None:
        for number in range(400):
            workers[name].append(entry(f"{name}{number:03d}"))

    for log in workers.values():
        log.start()
    threads = [threading.Thread(target=flood, args=(name,)) for name in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in workers.values():
        log.stop()
    kept = logged(tmp_path)
    for name in workers:
        own = [request_id for request_id in kept if request_id.startswith(name)]
        assert own == [f"{name}{number:03d}" for number in range(400 - len(own), 400)]
    assert config.prediction_log_max_bytes - 2 * segment_bytes(config) < directory_bytes(tmp_path)
    assert directory_bytes(tmp_path) <= config.prediction_log_max_bytes


# --- the client budget --------------------------------------------------------------------------------------------


def test_a_client_past_its_budget_is_dropped_and_counted_while_other_clients_are_kept(tmp_path):
    clock = Clock()
    log = PredictionLog(settings(tmp_path, prediction_log_client_bytes_per_s=100), clock=clock)  # not started
    burst = int(100 * CLIENT_BURST_S)
    before = dropped("client_budget")
    for number in range(200):
        log.append(entry(f"f{number:03d}"), client="203.0.113.9")
    flood = log.pending_bytes
    assert flood == burst // line_bytes() * line_bytes()
    assert dropped("client_budget") == before + 200 - burst // line_bytes()
    log.append(entry("q000"), client="198.51.100.4")
    assert log.pending_bytes == flood + line_bytes()

    clock.now += (10 * line_bytes() + 0.5) / 100  # the time ten lines of budget take to come back
    for number in range(200, 220):
        log.append(entry(f"f{number:03d}"), client="203.0.113.9")
    assert log.pending_bytes == flood + line_bytes() + 10 * line_bytes()


def test_one_client_adds_to_the_log_at_most_its_burst_and_then_its_rate(tmp_path):
    """What bounds how fast one client can rotate everyone else's history out: docs/serving.md states it."""
    clock = Clock()
    rate = 1000
    log = PredictionLog(settings(tmp_path, prediction_log_client_bytes_per_s=rate), clock=clock)
    for second in range(1000):  # ten entries a second, three times the budget
        for number in range(10):
            log.append(entry(f"{second:03d}{number}"), client="203.0.113.9")
        clock.now += 1.0
    most = rate * CLIENT_BURST_S + rate * 999  # the burst, then the rate over the 999 s between first and last
    assert most - line_bytes() < log.pending_bytes <= most


def test_without_a_budget_every_client_is_logged(tmp_path):
    log = PredictionLog(settings(tmp_path, prediction_log_client_bytes_per_s=0))
    before = dropped("client_budget")
    for number in range(2000):
        log.append(entry(f"r{number:04d}"), client="203.0.113.9")
    assert log.pending_bytes == 2000 * line_bytes("r0000")
    assert dropped("client_budget") == before


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PREDICTION_LOG_CLIENT_BYTES_PER_S", "-1", "PREDICTION_LOG_CLIENT_BYTES_PER_S must be 0 (no budget) or positive"),
    ("PREDICTION_LOG_SEGMENT_S", "0", "PREDICTION_LOG_SEGMENT_S must be positive"),
    ("PREDICTION_LOG_MAX_BYTES", "0", "PREDICTION_LOG_MAX_BYTES must be at least 1"),
    ("PREDICTION_LOG_S3", "bucket/prefix", "PREDICTION_LOG_S3 must be s3://bucket or s3://bucket/prefix"),
])
def test_prediction_log_settings_are_checked(name: str, value: str, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env({name: value})


# --- shipping to S3 -----------------------------------------------------------------------------------------------


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A client of the real moto server; the log's own client finds it through the same standard variables."""
    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3")


@pytest.fixture
def bucket() -> str:
    """A bucket name of this test's own (moto's server lives as long as the module)."""
    return f"predictions-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The serve log's warnings, also where uvicorn's configuration stopped it propagating."""
    logger = logging.getLogger("housing.serve")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="housing.serve"):
        yield caplog
    logger.removeHandler(caplog.handler)


def shipped(client, bucket: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def test_closed_segments_are_shipped_to_s3_and_marked_shipped(tmp_path, s3, bucket):
    s3.create_bucket(Bucket=bucket)
    config = settings(tmp_path, prediction_log_max_bytes=16 * 10 * line_bytes(),
                      prediction_log_s3=f"s3://{bucket}/host-a/")
    before = uploads("uploaded")
    write(PredictionLog(config), [f"r{number:03d}" for number in range(35)])
    local = segments(tmp_path)
    assert len(local) == 4 and all(path.name.endswith(SHIPPED) for path in local)
    assert shipped(s3, bucket) == {f"host-a/{path.name.removesuffix(SHIPPED)}.jsonl": path.read_bytes()
                                   for path in local}
    assert uploads("uploaded") == before + 4


def test_a_segment_s3_refused_is_kept_and_counted_and_the_next_worker_to_start_ships_it(tmp_path, s3, bucket,
                                                                                         warnings):
    config = settings(tmp_path, prediction_log_s3=f"s3://{bucket}")  # the bucket does not exist yet
    failed = uploads("failed")
    write(PredictionLog(config), ["r1", "r2"])
    assert logged(tmp_path) == ["r1", "r2"]  # written all the same
    [segment] = segments(tmp_path)
    assert not segment.name.endswith(SHIPPED)
    assert uploads("failed") > failed
    assert f"cannot upload {segment.name} to s3://{bucket}/{segment.name}: " in warnings.text
    assert "NoSuchBucket" in warnings.text

    s3.create_bucket(Bucket=bucket)
    write(PredictionLog(config), [])  # a worker that starts, as after a deploy, and predicts nothing
    [marked] = segments(tmp_path)
    assert marked.name == segment.name.removesuffix(".jsonl") + SHIPPED
    assert shipped(s3, bucket) == {segment.name: marked.read_bytes()}
