"""`make bench-shadow`: what a candidate in shadow costs clients: serve.py on two workers, with and without one.

Serves the registry's champion with `python serve.py` (WORKERS=2, polling every second) and alternates rounds of
closed-loop load of one record per request at 1 and 16 connections, with the alias `candidate` set (to the
champion's own version: a shadow model of the same size scores every answered record) and removed, waiting each time
until both workers have loaded or dropped it. Prints p50, p99 and req/s of each, and with/without ratios; the goal
is at most +10% at p50 and p99. The alias is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import CANDIDATE, CHAMPION, FEATURES, model_name
from scripts.bench import ROOT, Tally, closed_loop, for_seconds, start, wait_ready

CASES = (1, 16)  # concurrent connections, one record per request
WORKERS = 2


def shadow_loaded(url: str, version: str) -> bool:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:  # nosec B310  # the server it started
        text = response.read().decode()
    return f'housing_candidate_info{{version="{version}"}} 1.0' in text


def loads_logged(log: Path, version: str) -> int:
    """How many times a worker has logged loading `version` as the candidate (serving/model.py)."""
    return log.read_text(errors="replace").count(f"scoring candidate version {version} in shadow")


def wait_until(condition: bool, url: str, version: str, timeout_s: float = 120, log: Path | None = None,
               loads: int = 0) -> None:
    """Until the candidate is loaded (condition True) or gone (False) in the workers that answer /metrics; when
    loaded, also until `log` holds `loads` loads of it (the gauge shows a candidate as soon as one worker has it)."""
    deadline = time.monotonic() + timeout_s
    while shadow_loaded(url, version) != condition or (condition and log and loads_logged(log, version) < loads):
        if time.monotonic() > deadline:
            raise SystemExit(f"the candidate was not {'loaded' if condition else 'dropped'} in {timeout_s:.0f} s")
        time.sleep(0.5)  # the poll interval of the server is 1 s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="load per round (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds with and without, alternating (default 4)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "holdout.csv", help="CSV of records to send")
    args = parser.parse_args()

    client, name = MlflowClient(), model_name()
    version = client.get_model_version_by_alias(name, CHAMPION).version
    record = pd.read_csv(args.data)[list(FEATURES)].head(1)
    body = json.dumps(record.astype(object).where(record.notna(), None).to_dict(orient="records")[0]).encode()
    scratch = Path(tempfile.mkdtemp(prefix="housing-bench-shadow-"))
    server = start("serve", [sys.executable, "serve.py"], "/predict",
                   {**os.environ, "WORKERS": str(WORKERS), "RELOAD_INTERVAL_S": "1",
                    "PREDICTION_LOG_DIR": str(scratch / "predictions")}, scratch)
    tallies = {(shadow, connections): Tally() for shadow in (False, True) for connections in CASES}
    try:
        wait_ready(server, "/ready")
        url, loads = server.url(""), 0
        for round_ in range(args.rounds):
            for shadow in (False, True) if round_ % 2 == 0 else (True, False):
                if shadow and not shadow_loaded(url, version):
                    client.set_registered_model_alias(name, CANDIDATE, version)
                    loads += WORKERS
                elif shadow_loaded(url, version):
                    client.delete_registered_model_alias(name, CANDIDATE)
                # Each worker loads the candidate once (seconds of CPU, a one-off per promotion): measured after
                # both have, so that the rounds compare the cost of scoring in shadow, request after request.
                wait_until(shadow, url, version, log=scratch / "serve.log", loads=loads)
                for connections in CASES:
                    closed_loop(server, body, connections, for_seconds(0.3))  # warm-up
                    tallies[(shadow, connections)].add(closed_loop(server, body, connections,
                                                                   for_seconds(args.seconds)))
    finally:
        with contextlib.suppress(MlflowException):  # already gone
            client.delete_registered_model_alias(name, CANDIDATE)
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"serve.py, WORKERS={WORKERS}, one record per request, {args.rounds} alternating rounds of "
          f"{args.seconds:g} s; candidate = the champion's version {version}")
    print(f"{'connections':>11} {'candidate':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for connections in CASES:
        without, with_ = (tallies[(shadow, connections)].summary() for shadow in (False, True))
        for label, summary in (("none", without), ("in shadow", with_)):
            print(f"{connections:>11} {label:>10} {summary['req/s']:>8.0f} {summary['p50']:>8.2f} "
                  f"{summary['p99']:>8.2f}")
        print(f"{connections:>11} {'ratio':>10} {with_['req/s'] / without['req/s']:>8.2f} "
              f"{with_['p50'] / without['p50']:>8.2f} {with_['p99'] / without['p99']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
