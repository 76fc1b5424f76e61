"""The app for tests: in this process (HTTP contracts: Starlette's TestClient runs the app and its lifespan, no
socket), or as real server processes (what needs uvicorn: workers, signals, the admin port, a process restart), each
in its own process group on a free port, stopped by group; and a client that keeps predicting while a test changes
the model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
import orjson
from starlette.testclient import TestClient

from serve import create_app
from serving.settings import Settings
from tests.conftest import ROOT, clean_environment
from tests.registry import promotion_keys

T = TypeVar("T")
# What serve.py reads (serving/settings.py, and the metrics folder its workers share): a test's server sees only
# the ones the test gives it, since some mean something even when set empty.
SERVE_SETTINGS = (*(setting.name.upper() for setting in fields(Settings)), "PROMETHEUS_MULTIPROC_DIR")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @cached_property
    def http(self) -> httpx.Client:
        """A client of this server; closed when the server stops."""
        return httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 30 s, and any children the leader left behind."""
        if "http" in self.__dict__:
            self.http.close()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def free_port() -> int:
    """A loopback port the OS chose, kept from everyone else asking for a port until a server binds it.

    A bare bind-and-close would hand the port back to the OS, which may give it to the next caller (another test,
    another engineer's suite) before our server binds it. Instead the probe connects to itself and closes the
    accepted side first: the port sits in TIME_WAIT for a minute, when the OS gives it to no `bind(port 0)`, while
    a server that sets SO_REUSEADDR (uvicorn, moto, MLflow, Prometheus, the fake docker) binds it at once.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            accepted.close()
    return port


def serve_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any AWS, MLflow or serve.py setting, then `settings`; MODEL_VERIFY_KEYS is
    this test process's promotion key unless `settings` say otherwise."""
    return ({name: value for name, value in clean_environment().items() if name not in SERVE_SETTINGS}
            | {"MODEL_VERIFY_KEYS": promotion_keys()[1]} | settings)


def start_serve(env: Mapping[str, str], log: Path) -> ServerProcess:
    """`python serve.py` (what `make serve` runs) in exactly the environment `env`, on a free port."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "serve.py"], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env={**env, "PORT": str(port)}, start_new_session=True)
    return ServerProcess(process, port, log)


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def wait_until_answering(server: ServerProcess, path: str = "/health", timeout: float = 90) -> None:
    def answers() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()}")
        try:
            return httpx.get(server.url + path, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, timeout, f"{path} on {server.url}")


@contextmanager
def running_app(env: Mapping[str, str], log: Path, path: str = "/ready") -> Iterator[ServerProcess]:
    """`python serve.py` in `env` (see `serve_environment`), once `path` answers 200; stopped when the block ends."""
    server = start_serve(env, log)
    try:
        wait_until_answering(server, path)
        yield server
    finally:
        server.stop()


@contextmanager
def app_in_process(ready: bool = True, **settings: Any) -> Iterator[TestClient]:
    """serve.py's app built from `Settings(**settings)`, its lifespan running, answering a client in this process;
    once /ready answers 200 unless `ready` is False (the model loads in the background, as in a server).

    The registry is MLflow's from the environment (MLFLOW_TRACKING_URI), as in a server. Metrics are this process's
    own (prometheus-client's default single-process mode): compare before and after, not absolute counts.
    """
    with TestClient(create_app(Settings(**{"model_verify_keys": promotion_keys()[1], **settings}))) as client:
        if ready:
            wait_for(lambda: client.get("/ready").status_code == 200, 90, "the in-process app's /ready")
        yield client


@dataclass
class SteadyClient:
    """Sends the same record again and again from a thread, noting (status, version, prediction) per answer.

    `client`: a server's `http`, or an in-process app's TestClient (both are safe to share with this thread)."""

    client: httpx.Client | TestClient
    record: dict
    answers: list[tuple[int, str | None, float | None]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def versions_seen(self) -> list[str | None]:
        return [version for _, version, _ in self.answers]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = self.client.post("/predict", json=self.record)
            except (httpx.HTTPError, httpx2.HTTPError) as error:
                self.failures.append(repr(error))
                continue
            if response.status_code != 200:
                self.failures.append(f"{response.status_code} {response.text}")
                continue
            body = response.json()
            self.answers.append((response.status_code, body["model"]["version"], body["prediction"]))


def logged_ids(directory: Path, shadow: bool = False) -> set[str]:
    """The prediction ids in the log's entries: the champion's, or with `shadow` the candidate's paired ones."""
    entries = (orjson.loads(line) for path in directory.glob("predictions-*.jsonl")
               for line in path.read_bytes().splitlines())
    return {one for entry in entries if entry["route"].startswith("shadow") == shadow for one in entry["ids"]}
