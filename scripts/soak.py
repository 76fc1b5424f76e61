"""`make soak`: serve.py on two workers under 60 s of load at concurrency 32, with three champion changes.

Trains two small models on --data (ridge, two strengths) into a throwaway sqlite registry, serves its champion with
`python serve.py` (WORKERS=2, polling every 2 s), and moves the champion between the two versions three times
during the load; the workers pick each change up by polling, with no restart. Prints requests, failures (any answer
but 200, or a broken connection), p50/p99 and each worker's RSS before and after. Goal: 0 failed, RSS growth under
10%. Load comes from the same minimal keep-alive client as `make bench`, on this machine's loopback only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import orjson
import pandas as pd
import psutil
from mlflow.tracking import MlflowClient

import train
from names import BY_GATE, CHAMPION, FEATURES, PROMOTION_TAG, TARGET
from scripts.bench import ROOT, BenchedServer, closed_loop, for_seconds, start, wait_ready

MODEL = "soak"
WARM_UP_S = 5.0
POLL_S = 2.0


def register_two(data: pd.DataFrame, uri: str) -> tuple[str, str]:
    """Two ridge models (different strengths, so their answers differ) as versions of MODEL; the first is champion."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    versions = []
    for alpha in (1.0, 1000.0):
        spec = {"model": "ridge", "features": {"neighbours": [], "encoding": "onehot"}, "params": {"alpha": alpha}}
        pipeline = train.build_pipeline(spec).fit(data[list(FEATURES)], data[TARGET].to_numpy())
        with mlflow.start_run():
            info = train.log_pipeline(pipeline, data[list(FEATURES)].dropna().head(3))
        # serving loads only what the gate passed (serving/model.py): these stand-ins are tagged as the gate tags
        versions.append(str(mlflow.register_model(info.model_uri, MODEL, tags={PROMOTION_TAG: BY_GATE}).version))
    client.set_registered_model_alias(MODEL, CHAMPION, versions[0])
    return versions[0], versions[1]


def workers(server: BenchedServer) -> list[psutil.Process]:
    """uvicorn's worker processes: the supervisor's children that run the app (not multiprocessing's helpers)."""
    return [child for child in psutil.Process(server.process.pid).children()
            if "resource_tracker" not in " ".join(child.cmdline())]


def served_version(server: BenchedServer) -> str:
    request = urllib.request.Request(server.url("/ready"), headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as response:  # nosec B310  # http://127.0.0.1 it started
        version: str = orjson.loads(response.read())["model"]["version"]
    return version


def change_champion(server: BenchedServer, uri: str, versions: tuple[str, str], seconds: float, log: list[str]) -> None:
    """Three alias changes, evenly spread over the load; each waits until ten answers in a row (new connections,
    any worker) come from the new version."""
    client = MlflowClient(uri)
    started = time.monotonic()
    for change in range(3):
        time.sleep(max(0.0, started + seconds * (change + 1) / 4 - time.monotonic()))  # a schedule, not a sync
        target = versions[(change + 1) % 2]
        client.set_registered_model_alias(MODEL, CHAMPION, target)
        moved = time.monotonic()
        streak = 0
        while streak < 10 and time.monotonic() - moved < 30:
            streak = streak + 1 if served_version(server) == target else 0
        state = f"served after {time.monotonic() - moved:.1f} s" if streak >= 10 else "NOT served within 30 s"
        log.append(f"champion -> version {target}: {state}")


def rss_mb(processes: list[psutil.Process]) -> list[float]:
    return [process.memory_info().rss / 2**20 for process in processes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive clients (default 32)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "housing.csv",
                        help="CSV to train the two models on and take the request's record from")
    args = parser.parse_args()

    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: run `make retrain` (it fetches the data), or pass --data CSV")
    data = pd.read_csv(args.data)
    scratch = Path(tempfile.mkdtemp(prefix="housing-soak-"))
    uri = f"sqlite:///{scratch}/mlflow.db"
    versions = register_two(data, uri)
    record = data[list(FEATURES)].dropna().iloc[0].to_dict()
    env = {"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": uri, "MODEL_NAME": MODEL,
           "WORKERS": "2", "RELOAD_INTERVAL_S": str(POLL_S), "PREDICTION_LOG_DIR": str(scratch / "predictions")}
    server = start("serve", [sys.executable, "serve.py"], "/predict", env, scratch)
    changes: list[str] = []
    try:
        wait_ready(server, "/ready")
        body = orjson.dumps(record)
        closed_loop(server, body, args.connections, for_seconds(WARM_UP_S))
        processes = workers(server)
        before = rss_mb(processes)
        changer = threading.Thread(target=change_champion, args=(server, uri, versions, args.seconds, changes))
        changer.start()
        tally = closed_loop(server, body, args.connections, for_seconds(args.seconds))
        changer.join()
        after = rss_mb(processes)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    summary = tally.summary()
    print(f"soak: {args.seconds:g} s, {args.connections} connections, 2 workers, 1 record per request")
    for line in changes:
        print(f"  {line}")
    print(f"  requests {tally.answered}, failed {tally.errors}, {summary['req/s']:.0f} req/s, "
          f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms")
    for number, (old, new) in enumerate(zip(before, after, strict=True), start=1):
        print(f"  worker {number} RSS {old:.0f} MB -> {new:.0f} MB ({(new - old) / old:+.1%})")
    grew = max((new - old) / old for old, new in zip(before, after, strict=True))
    healthy = tally.errors == 0 and grew < 0.10 and all("served after" in line for line in changes)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
