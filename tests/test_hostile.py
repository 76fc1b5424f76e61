"""Hostile /predict bodies get a 4xx each, and never stall the server: /health is answered all the while.

The server runs with its default limits (MAX_BATCH_ROWS=10000, so MAX_BODY_BYTES=3665536). One client posts the
bodies back to back; another asks /health in a loop meanwhile. The worst /health latency is printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from serving.schema import EXAMPLE_RECORD as GOOD
from serving.settings import Settings
from tests.servers import ServerProcess, free_port, running_app, serve_environment

pytestmark = pytest.mark.integration

LIMITS = Settings()
EIGHT_MB = 8 * 1024 * 1024


def many_keys(size: int) -> bytes:
    """One JSON object of about `size` bytes: {"k0":0,"k1":0,...}, ~800k keys in 8 MB."""
    keys, total, parts = 0, 2, []
    while total < size - 16:
        part = f'"k{keys}":0'
        parts.append(part)
        total += len(part) + 1
        keys += 1
    return ("{" + ",".join(parts) + "}").encode()


def empty_records(size: int) -> bytes:
    """{"instances": [{}, {}, ...]} of about `size` bytes."""
    count = (size - 20) // 4
    return b'{"instances": [' + b"{}, " * (count - 1) + b"{}]}"


def wrong_records() -> bytes:
    """MAX_BATCH_ROWS records, every field of every record wrong: the costliest body that is parsed and checked."""
    record = {name: "x" for name in GOOD}
    body = orjson.dumps({"instances": [record] * LIMITS.max_batch_rows})
    assert len(body) <= LIMITS.max_body_bytes
    return body


HOSTILE: dict[str, tuple[bytes, int]] = {  # name: (body, expected status)
    "8 MB object of ~800k keys": (many_keys(EIGHT_MB), 413),
    "8 MB of empty records": (empty_records(EIGHT_MB), 413),
    "object of ~300k keys, under MAX_BODY_BYTES": (many_keys(LIMITS.max_body_bytes), 413),
    "~900k empty records, under MAX_BODY_BYTES": (empty_records(LIMITS.max_body_bytes), 413),
    "arrays nested a million deep": (b"[" * 1_000_000 + b"]" * 1_000_000, 413),
    "10,000 records, every field wrong": (wrong_records(), 422),
}
ROUNDS = 3


# The prober runs in its own process, so that sending 8 MB bodies from this one cannot delay it: it measures the
# server alone. It asks until its standard input closes, then prints (started, finished, status) of each answer.
PROBE = """
import http.client, json, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
answers = []
while not stop.is_set():
    started = time.time()
    connection.request("GET", "/health")
    response = connection.getresponse()
    response.read()
    answers.append((started, time.time(), response.status))
    if len(answers) == 1:
        print("answering", flush=True)
print(json.dumps(answers))
"""


@dataclass
class HealthProbe:
    """GET /health in a loop, from another process, on one keep-alive connection."""

    port: int
    answers: list[tuple[float, float, int]] = field(default_factory=list)

    def __enter__(self) -> HealthProbe:
        self._process = subprocess.Popen([sys.executable, "-c", PROBE, str(self.port)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None and self._process.stdout.readline() == "answering\n"
        return self

    def __exit__(self, *exc_info: object) -> None:
        output, _ = self._process.communicate(timeout=60)
        self.answers = [tuple(answer) for answer in json.loads(output)]

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Default limits; a registry that refuses connections (no model is needed to refuse a body)."""
    tmp = tmp_path_factory.mktemp("hostile")
    env = serve_environment(HOST="127.0.0.1", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
                            PREDICTION_LOG_DIR=str(tmp / "predictions"))
    with running_app(env, tmp / "serve.log", "/health") as server:
        yield server


def test_hostile_bodies_get_4xx_while_health_keeps_answering(server, report_figure):
    answers: list[tuple[str, int, str]] = []
    in_flight: list[tuple[float, float]] = []  # when each hostile request was sent, and answered
    with HealthProbe(server.port) as probe, httpx.Client(timeout=60) as hostile:
        for _ in range(ROUNDS):
            for name, (body, _) in HOSTILE.items():
                sent = time.time()
                response = hostile.post(server.url + "/predict", content=body,
                                        headers={"Content-Type": "application/json"})
                in_flight.append((sent, time.time()))
                answers.append((name, response.status_code, response.json()["error"]))

    for name, status, message in answers:
        assert status == HOSTILE[name][1], (name, status, message)
    assert len(answers) == ROUNDS * len(HOSTILE)
    assert all(status == 200 for _, _, status in probe.answers)
    # A /health asked and answered while a hostile body was with the server: the event loop was not waiting on it.
    inside = [(started, finished) for started, finished, _ in probe.answers
              if any(sent <= started and finished <= answered for sent, answered in in_flight)]
    assert inside, "/health was never answered while a hostile body was being read or parsed"
    during = [(started, finished) for started, finished, _ in probe.answers
              if in_flight[0][0] <= started and finished <= in_flight[-1][1]]
    latencies_ms = sorted((finished - started) * 1000 for started, finished in during)
    report_figure(f"/health during {len(answers)} hostile bodies ({in_flight[-1][1] - in_flight[0][0]:.1f} s): "
                  f"{len(during)} answers ({len(inside)} within a hostile request), "
                  f"p50 {latencies_ms[len(latencies_ms) // 2]:.1f} ms, worst {latencies_ms[-1]:.1f} ms")


@pytest.mark.parametrize(("name", "expected"), [(name, status) for name, (_, status) in HOSTILE.items()],
                         ids=list(HOSTILE))
def test_each_hostile_body_is_refused_with_a_message_naming_the_limit(server, name, expected):
    body = HOSTILE[name][0]
    response = httpx.post(server.url + "/predict", content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == expected
    message = response.json()["error"]
    if expected == 413:
        assert "MAX_BODY_BYTES" in message or "MAX_BATCH_ROWS" in message
    else:
        assert message == "1000 or more problem(s) in the request body"


def test_a_body_streamed_without_length_is_cut_off_at_the_limit(server):
    chunk = b" " * (1024 * 1024)
    response = httpx.post(server.url + "/predict", content=iter([b"["] + [chunk] * 8 + [b"]"]),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert f"MAX_BODY_BYTES={LIMITS.max_body_bytes}" in response.json()["error"]


def test_the_largest_acceptable_batch_fits_under_the_default_body_limit():
    worst = {name: -1.2345678901234567e-05 for name in GOOD} | {"ocean_proximity": "NEAR OCEAN"}
    batch = {"instances": [worst] * LIMITS.max_batch_rows}
    assert len(orjson.dumps(batch)) < len(json.dumps(batch)) <= LIMITS.max_body_bytes
    assert LIMITS.max_body_bytes < EIGHT_MB / 2


def test_body_limit_follows_the_batch_limit():
    assert Settings(max_batch_rows=100).max_body_bytes < Settings().max_body_bytes
    assert Settings(max_batch_rows=100, max_body_bytes=5).max_body_bytes == 5

