"""`make bench`: serve.py against a bare Starlette app and `mlflow models serve`, on the current champion, interleaved.

Starts the servers (one worker each) on free local ports and checks that serve.py and mlflow predict the same numbers.
Then, for 1 and 100 records per request at 1 and 16 concurrent connections, it alternates rounds of closed-loop load
between serve.py's /predict ("predict"), serve.py's /invocations ("invocations", MLflow's scoring protocol: see
docs/protocols.md), a Starlette app that reads the body and answers a constant ("bare": the framework's ceiling, on
the same uvicorn) and MLflow's own /invocations ("mlflow"). It prints req/s, p50, p99 and errors, and for each of ours
its req/s as a share of bare's, its p50 as a multiple of bare's, and its req/s against mlflow's (invocations/mlflow is
the like-for-like ratio). Then the latency of 1,000- and 10,000-record batches, and last the model's own time per
record in this process (the serving path of scripts/tune.py's budget: features and trees, no HTTP). All servers get
the same bytes: `{"instances": [...]}`. The load comes from a minimal keep-alive HTTP/1.1 client on asyncio, so that
the client costs far less CPU than the servers it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess  # starts the servers it measures: fixed argv, never a shell  # nosec B404
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from names import CHAMPION, FEATURES, model_name

ROOT = Path(__file__).resolve().parent.parent
CASES = ((1, 1), (1, 16), (100, 1), (100, 16))  # (records per request, concurrent connections)
WARM_UP_S = 0.5
BATCHES = (1000, 10_000)  # records per request of the batch latencies (10,000: the default MAX_BATCH_ROWS)


async def constant(request: Request) -> Response:
    """The bare app's one endpoint: it reads the body, as any predictor must, and answers a fixed prediction."""
    await request.body()
    return Response(b'{"predictions":[0.0]}', media_type="application/json")


# What serve.py costs beyond this is the model and the app's own work: run by uvicorn like serve.py (one worker).
bare_app = Starlette(routes=[Route("/predict", constant, methods=["POST"]), Route("/health", constant)])


@dataclass
class BenchedServer:
    name: str
    port: int
    path: str  # where predictions are posted
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, body: bytes) -> bytes:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies) + self.errors

    def add(self, other: Tally) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.seconds += other.seconds

    def summary(self) -> dict[str, float]:
        ms = np.array(self.latencies or [math.nan]) * 1000
        return {"req/s": len(self.latencies) / self.seconds, "p50": float(np.percentile(ms, 50)),
                "p99": float(np.percentile(ms, 99)), "errors": self.errors}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return cast(int, probe.getsockname()[1])  # (host, port) for an AF_INET socket


def start(name: str, command: list[str], path: str, env: dict[str, str], scratch: Path) -> BenchedServer:
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    log = scratch / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env={**env, "PORT": str(port)}, stdout=output,  # nosec B603  # argv built here
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return BenchedServer(name, port, path, process, log)


def wait_ready(server: BenchedServer, ready_path: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.process.returncode}; see {server.log}")
        try:
            with urllib.request.urlopen(server.url(ready_path), timeout=5) as response:  # nosec B310  # http://127.0.0.1 it started
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # poll interval while the server starts
    raise SystemExit(f"{server.name} not ready after {timeout_s:.0f} s; see {server.log}")


def predictions(server: BenchedServer, body: bytes) -> np.ndarray:
    request = urllib.request.Request(server.url(server.path), data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # nosec B310  # http://127.0.0.1 it started
        return np.asarray(json.loads(response.read())["predictions"], dtype=float).ravel()


async def one_connection(server: BenchedServer, request: bytes, keep_going: Callable[[Tally], bool],
                         tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        while keep_going(tally):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.partition(b":")[2]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200 "):
                tally.latencies.append(time.perf_counter() - started)
            else:
                tally.errors += 1
    except (OSError, asyncio.IncompleteReadError, StopIteration):
        tally.errors += 1
    finally:
        writer.close()


def closed_loop(server: BenchedServer, body: bytes, connections: int, keep_going: Callable[[Tally], bool]) -> Tally:
    """`connections` clients, each sending `body` again as soon as it has the answer, while `keep_going`."""

    async def run() -> Tally:
        tally = Tally()
        started = time.perf_counter()
        request = server.request(body)
        await asyncio.gather(*(one_connection(server, request, keep_going, tally) for _ in range(connections)))
        tally.seconds = time.perf_counter() - started
        return tally

    return asyncio.run(run())


def for_seconds(seconds: float) -> Callable[[Tally], bool]:
    deadline = time.perf_counter() + seconds
    return lambda tally: time.perf_counter() < deadline


def for_requests(count: int) -> Callable[[Tally], bool]:
    return lambda tally: tally.answered < count


def compare(servers: list[BenchedServer], body: bytes, connections: int, seconds: float,
            rounds: int) -> dict[str, Tally]:
    """Rounds of load on each server in turn, the order alternating, after a short warm-up of each."""
    for server in servers:
        closed_loop(server, body, connections, for_seconds(WARM_UP_S))
    tallies = {server.name: Tally() for server in servers}
    for round_ in range(rounds):
        for server in servers if round_ % 2 == 0 else servers[::-1]:
            tallies[server.name].add(closed_loop(server, body, connections, for_seconds(seconds / rounds)))
    return tallies


def payload(records: pd.DataFrame) -> bytes:
    rows = records.astype(object).where(records.notna(), None).to_dict(orient="records")
    return json.dumps({"instances": rows}).encode()


def print_row(size: int | str, connections: int, name: str, summary: dict[str, Any],
              bare: dict[str, Any] | None = None, mlflow: dict[str, Any] | None = None) -> None:
    ratios = ""
    if bare is not None and mlflow is not None:
        ratios = (f" {summary['req/s'] / bare['req/s']:>9.1%} {summary['p50'] / bare['p50']:>8.2f}x"
                  f" {summary['req/s'] / mlflow['req/s']:>10.1f}x")
    print(f"{size:>7} {connections:>4} {name:>11} {summary['req/s']:>8.1f} {summary['p50']:>8.2f} "
          f"{summary['p99']:>8.2f} {summary['errors']:>6}" + ratios)


def run(servers: list[BenchedServer], records: pd.DataFrame, args: argparse.Namespace) -> None:
    *ours, bare, mlflow = servers
    theirs = predictions(mlflow, payload(records.head(100)))
    for server in ours:
        worst = float(np.max(np.abs(predictions(server, payload(records.head(100))) - theirs) / np.abs(theirs)))
        print(f"same 100 records, max relative difference between {server.name} and mlflow: {worst:.1e}")
        if worst > 1e-6:
            raise SystemExit("the servers disagree")
    print(f"{'records':>7} {'conc':>4} {'server':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'of bare/s':>9} {'p50/bare':>9} {'ours/mlflow':>11}")
    for size, connections in CASES:
        tallies = compare(servers, payload(records.head(size)), connections, args.seconds, args.rounds)
        summaries = {name: tally.summary() for name, tally in tallies.items()}
        for server in ours:
            print_row(size, connections, server.name, summaries[server.name], summaries["bare"], summaries["mlflow"])
        for other in (bare, mlflow):
            print_row(size, connections, other.name, summaries[other.name])
    for size in BATCHES:
        # Rows drawn again as needed: the holdout has fewer than 10,000.
        batch = payload(records.sample(size, replace=len(records) < size, random_state=0))
        # mlflow needs over a second for 10,000 records: fewer requests, as many as its spread needs.
        for server, count in ((*((one, args.requests) for one in ours), (mlflow, max(3, args.requests // 5)))):
            closed_loop(server, batch, 1, for_requests(2))  # warm-up
            print_row(size, 1, server.name, closed_loop(server, batch, 1, for_requests(count)).summary())
    in_process(records)


def in_process(records: pd.DataFrame) -> None:
    """The champion's time per record in this process, as serving predicts it: features and trees, no HTTP."""
    import mlflow.sklearn  # only here: while the servers are measured, this process stays a light client

    from scripts.tune import serving_cost

    cost = serving_cost(mlflow.sklearn.load_model(f"models:/{model_name()}@{CHAMPION}"), records)
    print(f"in process ({cost['latency_path']}): 1 record {cost['latency_ms_1_row'] * 1e3:.1f} us, "
          f"1,000 records {cost['latency_ms_per_row_1000'] * 1e3:.1f} us per record")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="load per server and case (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per case (default 3)")
    parser.add_argument("--requests", type=int, default=40, help="batches of each size sent to serve.py (default 40)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "holdout.csv", help="CSV of records to send")
    args = parser.parse_args()

    records = pd.read_csv(args.data)[list(FEATURES)]
    model = f"models:/{model_name()}@{CHAMPION}"
    scratch = Path(tempfile.mkdtemp(prefix="housing-bench-"))
    # `mlflow models serve` runs `uvicorn` from PATH: this interpreter's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ours = start("predict", [sys.executable, "serve.py"], "/predict",
                 {**env, "WORKERS": "1", "RELOAD_INTERVAL_S": "0", "PREDICTION_LOG_DIR": str(scratch / "predictions")},
                 scratch)
    bare = start("bare", [sys.executable, "-m", "uvicorn", "scripts.bench:bare_app", "--host", "127.0.0.1",
                          "--port", "{port}", "--workers", "1"], "/predict", env, scratch)
    mlflow = start("mlflow", [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                              "-h", "127.0.0.1", "-p", "{port}", "-w", "1"], "/invocations", env, scratch)
    # "invocations" is the same process as "predict", in MLflow's protocol.
    servers = [ours, replace(ours, name="invocations", path="/invocations"), bare, mlflow]
    try:
        wait_ready(ours, "/ready")
        wait_ready(bare, "/health")
        wait_ready(mlflow, "/ping")
        run(servers, records, args)
    finally:
        for server in (ours, bare, mlflow):
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
