"""`make bake`: decide on the candidate with live evidence: promote it to champion, or refuse it.

The candidate (alias `candidate`, moved by a promotion while BAKE_S > 0) has served in shadow beside the champion
since its `candidate_since` tag: every request answered by the champion was scored by the candidate too, off the
request path (serving/shadow.py). This waits until BAKE_S seconds have passed since then and BAKE_MIN_PREDICTIONS
paired predictions were made (or the candidate failed on a record), at most BAKE_TIMEOUT_S, then checks, in order:

  errors      the candidate failed on no record (raised, or not finite)
  shift       the median |candidate - champion| / champion on live traffic is within the gate's bound
              (params.yaml gate.reference.max_prediction_shift)
  latency     the candidate's p99 time per request is within BAKE_MAX_P99_S
  alerts      no serving alert fired during the bake (with PROMETHEUS_URL; without it: no 5xx answer and no failed
              reload while this command watched)

Passed: `candidate` becomes `champion` (the last step), dvc.lock becomes the candidate's (commit it, or
scripts/publish_lock.sh publish). Refused: `candidate` is removed, the version tagged with the failed check and its
figures, and the exit status is 1 with one line naming the cause. Too little evidence by the timeout: nothing
changes, exit 2. The evidence and the decision go to the version's run (bake.json) and reports/bake.md.

The evidence comes from the app's /metrics (the admin port when ADMIN_PORT is set): HOST, PORT, ADMIN_PORT as `make
serve` reads them, or SERVE_URL; with PROMETHEUS_URL set, from Prometheus, which sums every worker of every host.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from names import CANDIDATE, CANDIDATE_SINCE, CHAMPION, DVC_LOCK, PREVIOUS_CHAMPION, model_name
from scripts.champion import point_champion, registry_failure, version_by_alias
from scripts.promote import lock_of, now

REPORT = Path("reports/bake.md")
TIMEOUT_S = 10.0  # one HTTP call to the app or Prometheus


@dataclass(frozen=True)
class BakeSettings:
    bake_s: float
    min_predictions: int
    timeout_s: float
    poll_s: float
    max_p99_s: float
    max_shift: float
    metrics_url: str  # the app's /metrics, or "" with prometheus_url
    prometheus_url: str

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] = os.environ) -> BakeSettings:
        gate = yaml.safe_load(Path("params.yaml").read_text())["gate"]
        host, port, admin = environ.get("HOST") or "127.0.0.1", environ.get("PORT") or "8000", environ.get(
            "ADMIN_PORT", "")
        app = environ.get("SERVE_URL") or f"http://{host}:{admin if admin not in ('', '0') else port}"
        bake_s = float(environ.get("BAKE_S") or 0)
        return cls(bake_s=bake_s, min_predictions=int(environ.get("BAKE_MIN_PREDICTIONS") or 200),
                   timeout_s=float(environ.get("BAKE_TIMEOUT_S") or bake_s + 600),
                   poll_s=float(environ.get("BAKE_POLL_S") or 10),
                   max_p99_s=float(environ.get("BAKE_MAX_P99_S") or 0.25),
                   max_shift=float(gate["reference"]["max_prediction_shift"]),
                   metrics_url=app.rstrip("/") + "/metrics", prometheus_url=environ.get("PROMETHEUS_URL", ""))


@dataclass(frozen=True)
class Evidence:
    paired: float  # records scored by both
    errors: float
    dropped: float
    median_shift: float  # NaN until a pair is measured
    p99_s: float
    alerts: float  # serving alerts that fired (with Prometheus), or 5xx answers and failed reloads (the app)


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts {upper bound: count}: linear within a bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total == 0:
        return math.nan
    rank, lower, below = quantile * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def from_app(url: str, version: str) -> Evidence:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # nosec B310  # the operator's own app
        text = response.read().decode()
    counts: dict[str, float] = {}
    shift: dict[float, float] = {}
    latency: dict[float, float] = {}
    failures = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "housing_http_requests_total" and labels.get("status", "").startswith("5"):
                failures += sample.value
            elif sample.name == "housing_model_reloads_total" and labels.get("result") == "failed":
                failures += sample.value
            elif labels.get("version") != version:
                continue
            elif sample.name == "housing_shadow_relative_difference_bucket":
                shift[float(labels["le"])] = sample.value
            elif sample.name == "housing_shadow_latency_seconds_bucket":
                latency[float(labels["le"])] = sample.value
            elif sample.name.endswith("_total"):
                counts[sample.name] = sample.value
    return Evidence(counts.get("housing_shadow_predictions_total", 0.0), counts.get("housing_shadow_errors_total", 0.0),
                    counts.get("housing_shadow_dropped_total", 0.0), histogram_quantile(0.5, shift),
                    histogram_quantile(0.99, latency), failures)


def from_prometheus(url: str, version: str, since: datetime) -> Evidence:
    window = f"{max(int((datetime.now(UTC) - since).total_seconds()), 60)}s"

    def query(expression: str) -> float:
        address = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        with urllib.request.urlopen(address, timeout=TIMEOUT_S) as response:  # nosec B310  # the operator's own
            result = json.loads(response.read())["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    selector = f'{{version="{version}"}}'
    return Evidence(
        query(f"sum(housing_shadow_predictions_total{selector})"),
        query(f"sum(housing_shadow_errors_total{selector})"),
        query(f"sum(housing_shadow_dropped_total{selector})"),
        query(f"histogram_quantile(0.5, sum by (le) (housing_shadow_relative_difference_bucket{selector}))"),
        query(f"histogram_quantile(0.99, sum by (le) (housing_shadow_latency_seconds_bucket{selector}))"),
        query(f'count(max_over_time(ALERTS{{alertstate="firing", alertname=~"Housing.+"}}[{window}]))'))


def verdict(evidence: Evidence, baseline: Evidence, settings: BakeSettings, watched_app: bool) -> tuple[str, str]:
    """("passed", "") or (failed check, why)."""
    if evidence.errors > 0:
        return "errors", f"the candidate failed on {evidence.errors:g} of {evidence.paired + evidence.errors:g} records"
    if not evidence.median_shift <= settings.max_shift:
        return "shift", (f"median relative difference from the champion {evidence.median_shift:.1%} > "
                         f"{settings.max_shift:.0%} (params.yaml gate.reference.max_prediction_shift)")
    if not evidence.p99_s <= settings.max_p99_s:
        return "latency", f"p99 {evidence.p99_s * 1000:.1f} ms per request > BAKE_MAX_P99_S={settings.max_p99_s:g}"
    fired = evidence.alerts - (baseline.alerts if watched_app else 0)
    if fired > 0:
        what = "5xx answers or failed reloads while it baked" if watched_app else "serving alerts fired while it baked"
        return "alerts", f"{fired:g} {what}"
    return "passed", ""


def bake(client: MlflowClient, name: str, settings: BakeSettings,
         clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> int:
    candidate = version_by_alias(client, name, CANDIDATE)
    if candidate is None:
        print(f"bake: {name} has no {CANDIDATE}: nothing to decide")
        return 0
    version = candidate.version
    since = datetime.fromisoformat(candidate.tags.get(CANDIDATE_SINCE, now()).replace("Z", "+00:00"))

    def evidence() -> Evidence:
        if settings.prometheus_url:
            return from_prometheus(settings.prometheus_url, version, since)
        return from_app(settings.metrics_url, version)

    started = clock()
    try:
        baseline = latest = evidence()
        # Until the bake's time and evidence are in; an error decides at once: none is allowed.
        while latest.errors == 0 and (clock() < since.timestamp() + settings.bake_s
                                      or latest.paired < settings.min_predictions):
            if clock() - started > settings.timeout_s:
                print(f"bake: version {version} not decided: {latest.paired:g} paired predictions of "
                      f"{settings.min_predictions} after {clock() - started:.0f} s (BAKE_TIMEOUT_S); the candidate "
                      "stays: run `make bake` again once it has had traffic", file=sys.stderr)
                return 2
            sleep(settings.poll_s)
            latest = evidence()
    except OSError as error:
        where = settings.prometheus_url or settings.metrics_url
        print(f"bake: cannot read the evidence at {where}: {error}; the candidate stays (set SERVE_URL, HOST/PORT/"
              "ADMIN_PORT or PROMETHEUS_URL to where the app's metrics are)", file=sys.stderr)
        return 2
    check, why = verdict(latest, baseline, settings, watched_app=not settings.prometheus_url)
    decide(client, name, candidate, check, why, latest, since)
    if check != "passed":
        print(f"bake: refused version {version} ({check}): {why}", file=sys.stderr)
        return 1
    print(f"bake: {name} alias {CHAMPION} -> version {version} after {latest.paired:g} paired predictions "
          f"(median shift {latest.median_shift:.1%}, p99 {latest.p99_s * 1000:.1f} ms)")
    return 0


def decide(client: MlflowClient, name: str, candidate: ModelVersion, check: str, why: str, evidence: Evidence,
           since: datetime) -> None:
    """Record the decision, then carry it out; moving `champion` is the last step."""
    version = candidate.version
    lock = lock_of(client, name, version) if check == "passed" else None  # first: a missing one changes nothing
    record = {"version": version, "decision": check, "reason": why, "since": since.isoformat(), "decided_at": now(),
              **asdict(evidence)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(f"# Bake of version {version}: {'promoted' if check == 'passed' else 'refused'}\n\n"
                      + "\n".join(f"- {key}: {value}" for key, value in record.items()) + "\n")
    if candidate.run_id:
        client.log_dict(candidate.run_id, record, f"bake-{record['decided_at']}.json")
    tags = {"bake_decision": "passed" if check == "passed" else "refused", "bake_check": check,
            "bake_paired": f"{evidence.paired:g}", "bake_median_shift": f"{evidence.median_shift:.4f}",
            "bake_p99_s": f"{evidence.p99_s:.4f}", "bake_errors": f"{evidence.errors:g}"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if check != "passed":
        client.delete_registered_model_alias(name, CANDIDATE)
        return
    champion = version_by_alias(client, name, CHAMPION)
    previous = champion.version if champion else None
    DVC_LOCK.write_text(lock or "")  # the data behind the new champion
    if previous:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, previous)
    client.delete_registered_model_alias(name, CANDIDATE)
    point_champion(client, name, version, previous)


def main() -> int:
    try:
        return bake(MlflowClient(), model_name(), BakeSettings.from_env())
    except MlflowException as error:
        print(f"bake: {registry_failure(os.environ.get('MLFLOW_TRACKING_URI', ''), error)}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - a PromotionRefused from lock_of, a bad setting: one line, no change
        print(f"bake: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
