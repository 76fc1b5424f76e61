"""The prediction log's buffer is bounded in bytes, drops (and counts) what does not fit, and is written out when
the log stops, as the server's shutdown does."""

from __future__ import annotations

import orjson

from serving.metrics import METRICS
from serving.prediction_log import PredictionLog
from serving.schema import EXAMPLE_RECORD as RECORD


def entry(request_id: str, records: int = 1) -> dict:
    return {"request_id": request_id, "time": 1.8e9, "model": {"name": "m", "version": "1"},
            "inputs": [RECORD] * records, "outputs": [1.0] * records}


def dropped() -> float:
    return METRICS.get_sample_value("housing_prediction_log_dropped_total")


def test_the_buffer_holds_at_most_its_bytes_and_counts_what_it_drops(tmp_path):
    log = PredictionLog(tmp_path, buffer_bytes=20_000)  # not started: nothing is written meanwhile
    line_bytes = len(orjson.dumps({**entry("r000"), "time": "2027-01-15T08:00:00+00:00"}))
    before = dropped()
    for number in range(100):
        log.append(entry(f"r{number:03d}"))  # lines of one length
    kept = 20_000 // line_bytes
    assert log.pending_bytes == kept * line_bytes
    assert dropped() == before + 100 - kept


def test_one_entry_larger_than_the_buffer_is_dropped_not_kept(tmp_path):
    log = PredictionLog(tmp_path, buffer_bytes=100_000)
    before = dropped()
    log.append(entry("huge", records=1000))  # ~220 kB of records
    log.append(entry("small"))
    assert dropped() == before + 1
    assert 0 < log.pending_bytes < 1000


def test_stopping_writes_every_pending_line_at_once(tmp_path):
    log = PredictionLog(tmp_path)
    log.start()
    for number in range(500):
        log.append(entry(f"r{number}"))
    log.stop()  # without waiting for the next flush
    lines = (tmp_path / log.path.name).read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"r{number}" for number in range(500)]
    assert orjson.loads(lines[0])["time"] == "2027-01-15T08:00:00+00:00"
    assert log.pending_bytes == 0
