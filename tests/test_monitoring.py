"""Monitoring as code: the rules and dashboard, checked statically, then against a real Prometheus scraping the app.

The live part starts `python serve.py` twice (a healthy app with WORKERS=2, one whose model never appears) and
Prometheus with its Pushgateway through scripts/monitoring.sh (`make monitoring-up`) with a 1 s scrape and evaluation
interval and a third target where nothing listens. It sends valid, invalid, batched and finally drifted traffic,
switches the model version and offers a broken one, runs `make realized` on the true prices of the first version's
predictions, then evaluates every expression of every dashboard panel and rule through the Prometheus HTTP API, and
draws every dashboard from it (`make dashboard-png`; how values are shown: tests/test_dashboard_png.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from names import FEATURES, NUMERIC_FEATURES, TARGET
from scripts import render_dashboard
from scripts.render_dashboard import Drawn, Prometheus, Window
from tests.conftest import GBDT, clean_environment, json_records, synthetic_housing
from tests.registry import TemporaryRegistry, fitted, predicting_nan, temporary_registry
from tests.servers import (
    ROOT,
    ServerProcess,
    free_port,
    logged_ids,
    serve_environment,
    start_serve,
    wait_for,
    wait_until_answering,
)

pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")  # inside MLflow's pyfunc

RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
PROMTOOL_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = sorted((ROOT / "grafana" / "provisioning" / "datasources").glob("*.yml"))
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval stands for here
EVERY_ALERT = {"HousingServeTargetDown", "HousingNoModelLoaded", "HousingHighErrorRatio", "HousingHighLatency",
               "HousingModelReloadFailed", "HousingFeatureDrift", "HousingPredictionDrift", "HousingNoPredictions",
               "HousingModelReloadRefused", "HousingRevokedModelServing", "HousingCandidateFailing",
               "HousingRealizedAccuracyDegraded"}


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and annotation of every dashboard."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        found += [(f"{path.name}: panel {panel['title']!r}", target["expr"])
                  for panel in panels(dashboard) for target in panel["targets"]]
        found += [(f"{path.name}: annotation {annotation['name']!r}", annotation["expr"])
                  for annotation in dashboard["annotations"]["list"]]
    return found


def non_filtering(expr: str) -> str:
    """`expr` with each comparison as `bool`: it returns 0 or 1 for every series instead of dropping the false ones,
    so a result proves the expression's metrics, labels and joins exist, whether or not the alert holds."""
    return re.sub(r"\s(==|!=|>=|<=|>|<)\s+(?!bool\b)", r" \1 bool ", expr)


# --- static checks -------------------------------------------------------------------------------------------


def test_rule_files_are_the_ones_prometheus_loads():
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    loaded = sorted({path for pattern in config["rule_files"] for path in ROOT.glob(pattern)})
    assert loaded == RULE_FILES
    assert {rule["alert"] for rule in alerts()} == EVERY_ALERT


@pytest.mark.integration
def test_promtool_unit_tests_pass():
    result = subprocess.run(["promtool", "test", "rules", *PROMTOOL_TESTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_and_stays_silent_in_the_unit_tests():
    fires, silent = set(), set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires == EVERY_ALERT
    assert silent == EVERY_ALERT


@pytest.mark.parametrize("alert", alerts(), ids=lambda alert: alert["alert"])
def test_every_alert_says_how_bad_what_and_what_to_do(alert):
    assert alert["labels"]["severity"] in ("critical", "warning")
    assert alert["annotations"]["summary"]
    assert len(alert["annotations"]["runbook"]) > 40


def test_dashboards_are_well_formed():
    datasources = {source["uid"] for path in DATASOURCES for source in yaml.safe_load(path.read_text())["datasources"]}
    dashboards = [json.loads(path.read_text()) for path in DASHBOARDS]
    assert dashboards
    uids = [dashboard["uid"] for dashboard in dashboards]
    assert len(set(uids)) == len(uids)
    for dashboard in dashboards:
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), dashboard["uid"]
        references = [annotation["datasource"] for annotation in dashboard["annotations"]["list"]]
        for panel in panels(dashboard):
            assert panel["targets"], panel["title"]
            assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(set(refs)) == len(refs), panel["title"]
            references += [panel["datasource"], *(target["datasource"] for target in panel["targets"])]
        assert {reference["uid"] for reference in references} <= datasources
        assert {reference["type"] for reference in references} == {"prometheus"}
        assert_grid_without_overlap(dashboard["panels"])


def assert_grid_without_overlap(items: list[dict]) -> None:
    cells = {}
    for item in items:
        grid = item["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, item["title"]
        for cell in itertools.product(range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, f"{item['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = item["title"]


def test_compose_mounts_what_prometheus_and_grafana_load():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"serve", "mlflow", "prometheus", "grafana", "pushgateway"}
    mounts = {name: dict(volume.split(":")[:2] for volume in service.get("volumes", []) if volume.startswith("./"))
              for name, service in services.items()}
    assert all((ROOT / source).exists() for by_service in mounts.values() for source in by_service)
    # Prometheus: this prometheus.yml, its rules, and target files where its file_sd looks, naming serve:8000 and the
    # Pushgateway, whose pushed labels it keeps.
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    config_dir = Path(mounts["prometheus"]["./prometheus.yml"]).parent
    for pattern in config["rule_files"]:
        assert str(config_dir / Path(pattern).parent) == mounts["prometheus"]["./" + str(Path(pattern).parent)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"housing-serve", "pushgateway"}
    assert jobs["pushgateway"]["honor_labels"] is True
    targets = {target["source"]: target["target"] for target in services["prometheus"]["configs"]}
    for job, source, address in (("housing-serve", "serve-target", "serve:8000"),
                                 ("pushgateway", "pushgateway-target", "pushgateway:9091")):
        (sd_pattern,) = jobs[job]["file_sd_configs"][0]["files"]
        assert Path(targets[source]).match(str(config_dir / sd_pattern))
        assert yaml.safe_load(compose["configs"][source]["content"]) == [{"targets": [address]}]
    assert services["pushgateway"]["ports"] == ["127.0.0.1:9091:9091"]
    # Grafana: the provisioning, the dashboards where the provider reads them, the datasource at the prometheus service.
    assert mounts["grafana"]["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/housing.yml").read_text())["providers"]
    assert mounts["grafana"]["./grafana/dashboards"] == provider["options"]["path"]
    (datasource,) = yaml.safe_load(DATASOURCES[0].read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"


# --- against a real Prometheus -------------------------------------------------------------------------------


@dataclass
class Live:
    prometheus: str
    healthy: ServerProcess  # WORKERS=2, follows "housing"@champion every second
    unloaded: ServerProcess  # its model never appears
    dead: str  # host:port where nothing listens
    started: float
    calm: float  # when Prometheus had recorded the drift of training-like traffic
    drifted: float  # ... and of drifted traffic
    predicted: int  # records the healthy app predicted
    answered: int  # its /predict requests answered 200
    labelled: dict[str, float]  # the true price of each of the first version's predictions, by id
    versions: tuple[str, str]

    def instance(self, server: ServerProcess) -> str:
        return f"127.0.0.1:{server.port}"


def query(prometheus: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr} if at is None else {"query": expr, "time": at}
    answer = httpx.get(f"{prometheus}/api/v1/query", params=params, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def query_range(prometheus: str, expr: str, start: float) -> list[dict]:
    """`expr` over 1 s steps from `start` to now, as a dashboard panel asks for it."""
    answer = httpx.get(f"{prometheus}/api/v1/query_range", timeout=30,
                       params={"query": expr, "start": start, "end": time.time(), "step": 1}).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def app_metrics(server: ServerProcess) -> list:
    text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def app_value(server: ServerProcess, name: str, **labels: str) -> float:
    return sum(sample.value for sample in app_metrics(server)
               if sample.name == name and labels.items() <= sample.labels.items())


class Traffic:
    """Requests to one app on new connections (so that both workers answer), counting what was predicted and keeping
    the true price of each prediction whose price it was given, by the prediction's id."""

    def __init__(self, server: ServerProcess) -> None:
        self.url = server.url + "/predict"
        self.predicted = self.answered = 0
        self.labelled: dict[str, float] = {}

    def send(self, body: object, status: int = 200, truths: list[float] | None = None, **kwargs) -> None:
        response = httpx.post(self.url, json=body, headers={"Connection": "close"}, timeout=30, **kwargs)
        assert response.status_code == status, response.text
        if status == 200:
            self.answered += 1
            self.predicted += len(body["instances"]) if "instances" in body else 1
            if truths is not None:
                answer = response.json()
                self.labelled.update(zip(answer.get("ids", [answer.get("id")]), truths, strict=True))

    def batches(self, frame: pd.DataFrame, size: int = 100, truths: np.ndarray | None = None) -> None:
        rows = json_records(frame)
        for start in range(0, len(rows), size):
            self.send({"instances": rows[start:start + size]},
                      truths=None if truths is None else truths[start:start + size].tolist())


def monitoring(command: str, env: dict[str, str]) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "monitoring.sh"), command], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("monitoring")
    with temporary_registry(tmp) as registry:
        first = registry.register("housing", fitted(GBDT), profiled=True)
        second = registry.register("housing", fitted(GBDT), alias=None, profiled=True)
        # The candidate in shadow from the start: the bake panels and alert have its series to show.
        registry.client.set_registered_model_alias("housing", "candidate", second)

        env = serve_environment(MLFLOW_TRACKING_URI=registry.uri, PREDICTION_LOG_DIR=str(tmp / "predictions"))
        healthy = start_serve({**env, "MODEL_NAME": "housing", "WORKERS": "2", "RELOAD_INTERVAL_S": "1"},
                              tmp / "healthy.log")
        unloaded = start_serve({**env, "MODEL_NAME": "never-registered"}, tmp / "unloaded.log")
        refusing = socket.socket()  # bound and never listening: connections are refused, and the port stays taken
        refusing.bind(("127.0.0.1", 0))
        dead, port, pushgateway = f"127.0.0.1:{refusing.getsockname()[1]}", free_port(), free_port()
        monitoring_env = {**env, "MONITORING_DIR": str(tmp / "prometheus"), "PROMETHEUS_PORT": str(port),
                          "PUSHGATEWAY_PORT": str(pushgateway), "SCRAPE_INTERVAL": "1s",
                          "MONITORING_TARGETS": f"127.0.0.1:{healthy.port} 127.0.0.1:{unloaded.port} {dead}"}
        try:
            started = time.time()
            monitoring("up", monitoring_env)
            wait_until_answering(healthy, "/ready")
            wait_until_answering(unloaded, "/health")
            found = drive(f"http://127.0.0.1:{port}", healthy, unloaded, dead, started, registry, (first, second))
            realized({**env, "PUSHGATEWAY_URL": f"http://127.0.0.1:{pushgateway}", "MODEL_NAME": "housing",
                      "REALIZED_REPORT_DIR": str(tmp / "realized")}, tmp, registry, found)
            yield found
        finally:
            monitoring("down", monitoring_env)
            healthy.stop()
            unloaded.stop()
            refusing.close()


def drive(prometheus: str, healthy: ServerProcess, unloaded: ServerProcess, dead: str, started: float,
          registry: TemporaryRegistry, versions: tuple[str, str]) -> Live:
    """The traffic and model changes the live tests look at, in order."""
    first, second = versions
    wait_for(lambda: app_value(healthy, "housing_model_loaded") == 1, 60, "both workers to load the model")
    calm = synthetic_housing(3500, seed=2)
    traffic, calm_frame, truths = Traffic(healthy), calm[list(FEATURES)], calm[TARGET].to_numpy()
    rows = json_records(calm_frame)
    for record, truth in zip(rows[:60], truths, strict=False):
        traffic.send(record, truths=[truth])
    sizes = (1, 2, 5, 10, 20, 50, 100, 200, 500)
    for size, start in zip(sizes, itertools.accumulate(sizes, initial=60), strict=False):
        traffic.send({"instances": rows[start:start + size]}, truths=truths[start:start + size].tolist())
    traffic.batches(calm_frame.iloc[1000:], truths=truths[1000:])
    good = rows[0]
    for body in ({**good, "median_income": "8.3"}, {**good, "ocean_proximity": "MOON"},
                 {"instances": [good, {**good, "latitude": None, "households": True}]}, {**good, "rooms": 3}):
        traffic.send(body, 422)
    assert httpx.post(traffic.url, content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    for _ in range(20):
        Traffic(unloaded).send(good, 503)
    calm = wait_for(lambda: len(result := query(prometheus, "job_field:housing_drift_psi:max")) == len(FEATURES) + 1
                    and result[0]["value"][0], 60, "Prometheus to record drift scores of the calm traffic")

    registry.client.set_registered_model_alias("housing", "champion", second)  # a new version: empty drift windows
    wait_for(lambda: app_value(healthy, "housing_model_info", version=first) == 0, 60, "both workers to reload")
    registry.register("housing", predicting_nan())  # the champion now, and refused
    wait_for(lambda: app_value(healthy, "housing_model_reloads_total", result="failed") > 0, 60, "a refused model")
    registry.client.set_registered_model_alias("housing", "champion", second)

    shifted = synthetic_housing(3000, seed=3)[list(FEATURES)]
    shifted = shifted.assign(median_income=shifted.median_income * 2, ocean_proximity="INLAND")
    traffic.batches(shifted)

    def both_windows_filling() -> bool:
        windows = [s.value for s in app_metrics(healthy) if s.name == "housing_drift_window_rows"]
        if len(windows) == 2 and min(windows) > 0:
            return True
        traffic.batches(shifted.head(100))
        return False

    wait_for(both_windows_filling, 60, "drifted records in the window of each worker")
    drifted = wait_for(lambda: (result := query(prometheus, 'job_field:housing_drift_psi:max{field="median_income"}'
                                                            " > 0.25")) and result[0]["value"][0],
                       60, "Prometheus to record the drift")
    return Live(prometheus, healthy, unloaded, dead, started, calm, drifted, traffic.predicted, traffic.answered,
                traffic.labelled, versions)


def realized(env: dict[str, str], tmp: Path, registry: TemporaryRegistry, live: Live) -> None:
    """`make realized` on the true prices of the first version's predictions (and two labels it cannot use), once
    the prediction log holds them, with each version tagged with a reference RMSE as the gate tags it; then until
    Prometheus has scraped the figures from the Pushgateway."""
    trusted = synthetic_housing(2000, seed=9)
    for version in live.versions:
        errors = registry.predictions("housing", version, trusted[list(FEATURES)]) - trusted[TARGET].to_numpy()
        rmse = np.sqrt(np.mean(errors**2))
        registry.client.set_model_version_tag("housing", version, "reference_rmse", f"{rmse:.2f}")
    labels = tmp / "labels.csv"
    again = next(iter(live.labelled.items()))  # a duplicate
    pd.DataFrame({"id": [*live.labelled, "never-predicted", again[0]],
                  TARGET: [*live.labelled.values(), 1.0, again[1]]}).to_csv(labels, index=False)
    wait_for(lambda: set(live.labelled) <= logged_ids(Path(env["PREDICTION_LOG_DIR"])), 30,
             "the prediction log to hold every labelled prediction")
    # The candidate's pairs are best effort: its own process, at the lowest priority, scores them when the workers
    # leave it CPU, and drops what it cannot (serving/scoring_process.py). Some of them are enough here.
    wait_for(lambda: set(live.labelled) & logged_ids(Path(env["PREDICTION_LOG_DIR"]), shadow=True), 120,
             "labelled predictions paired in shadow in the prediction log")
    result = subprocess.run([sys.executable, "-m", "scripts.realized", str(labels)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # In a range query from the start, not an instant one: the range's points fall at start + k s, and a range that
    # has a point with the figures keeps it, however late it is asked; an instant query can see a sample that a
    # range ending a moment later does not reach yet. The tests ask for ranges.
    wait_for(lambda: any(series["values"] for series in query_range(live.prometheus, "housing_realized_rmse_dollars",
                                                                      live.started)), 30,
             "Prometheus to scrape the realized figures from the Pushgateway")


@pytest.mark.integration
def test_counters_add_up_across_two_workers(live):
    instance = live.instance(live.healthy)
    # Every request is answered before it is counted, and Prometheus scrapes every second.
    wait_for(lambda: by_label(query(live.prometheus, f'housing_predictions_total{{instance="{instance}"}}'), "")
             == {"": live.predicted}, 30, f"housing_predictions_total == {live.predicted} in Prometheus")
    answered = query(live.prometheus, f'sum(housing_http_requests_total{{instance="{instance}", route="/predict", '
                                      'status="200"})')
    assert by_label(answered, "") == {"": live.answered}
    # Each worker answered, and reports its own window (labelled pid).
    wait_for(lambda: len(query(live.prometheus, f'housing_drift_window_rows{{instance="{instance}"}} > 0')) == 2, 30,
             "a drift window with records from each worker in Prometheus")


@pytest.mark.integration
def test_realized_figures_reach_prometheus_for_the_labelled_version_beside_its_reference(live):
    first, second = live.versions
    labelled = by_label(query(live.prometheus, 'housing_realized_labelled_predictions{role="served"}'), "version")
    assert labelled == {first: len(live.labelled), second: 0}
    ratio = by_label(query(live.prometheus, 'housing_realized_rmse_dollars{role="served"} / on (job, name, version) '
                                            "housing_reference_rmse_dollars"), "version")
    assert set(ratio) == {first} and 0.8 < ratio[first] < 1.2, ratio  # the same kind of data as the reference set
    # The candidate scored the same records in shadow (the live stack bakes `second`): its figures stand apart.
    shadow = by_label(query(live.prometheus, 'housing_realized_labelled_predictions{role="shadow"}'), "version")
    assert set(shadow) == {second} and 0 < shadow[second] <= len(live.labelled)
    outcomes = by_label(query(live.prometheus, "housing_realized_labels"), "outcome")
    assert outcomes == {"joined": len(live.labelled), "duplicate": 1, "unknown": 1, "late": 0, "invalid": 0}


@pytest.mark.integration
def test_training_like_traffic_keeps_drift_low_in_prometheus(live):
    scores = by_label(query(live.prometheus, "job_field:housing_drift_psi:max", at=live.calm), "field")
    assert set(scores) == {*FEATURES, "prediction"}
    assert max(scores.values()) < 0.1, scores


@pytest.mark.integration
def test_drifted_traffic_raises_the_shifted_fields_only(live):
    scores = by_label(query(live.prometheus, "job_field:housing_drift_psi:max", at=live.drifted), "field")
    assert scores["median_income"] > 0.25 and scores["ocean_proximity"] > 0.25, scores
    assert all(scores[name] < 0.1 for name in NUMERIC_FEATURES if name != "median_income"), scores
    assert scores["prediction"] > 0.25, scores  # income drives the price


@pytest.mark.integration
def test_alerts_follow_the_traffic(live):
    """Pending or firing, by alert: what the traffic should trigger, and nothing else."""
    healthy, unloaded = live.instance(live.healthy), live.instance(live.unloaded)
    expected = {
        "HousingServeTargetDown": {live.dead},
        "HousingNoModelLoaded": {unloaded},
        "HousingNoPredictions": {unloaded},
        "HousingModelReloadFailed": {healthy},
        "HousingHighErrorRatio": {""},  # per job: 503s from the instance without a model
        "HousingFeatureDrift": {"median_income", "ocean_proximity"},
        "HousingPredictionDrift": {"prediction"},
    }

    def active() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for series in query(live.prometheus, 'ALERTS{alertname=~"Housing.+"}'):
            labels = series["metric"]
            found.setdefault(labels["alertname"], set()).add(labels.get("field", labels.get("instance", "")))
        return found

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: active() == expected, 30, "the alerts of the traffic")
    assert active() == expected
    firing = query(live.prometheus, 'ALERTS{alertname="HousingModelReloadFailed", alertstate="firing"}')
    assert firing  # `for: 0`: at once


EXPRESSIONS = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in rules()] + dashboard_expressions()


@pytest.mark.integration
@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[where for where, _ in EXPRESSIONS])
def test_every_rule_and_panel_expression_returns_data(live, where, expr):
    """Each expression as Grafana runs it (a range query over the test's traffic) parses and returns series.
    Alert expressions are made non-filtering: an alert that should stay silent returns its series too."""
    if where in EVERY_ALERT:
        expr = non_filtering(expr)
    result = query_range(live.prometheus, expr.replace("$__rate_interval", RATE_INTERVAL), live.started)
    assert any(series["values"] for series in result), f"{where}: no data for {expr}"


# --- the dashboards drawn from it: make dashboard-png ----------------------------------------------------------


@dataclass
class Rendered:
    pictures: dict[str, Path]  # by dashboard file name
    drawn: dict[str, list[Drawn]]
    end: float


@pytest.fixture(scope="module")
def traffic_window(live, tmp_path_factory) -> Rendered:
    """Every dashboard over the test's own traffic, from when Prometheus started until now."""
    out = tmp_path_factory.mktemp("dashboards")
    prometheus = Prometheus(live.prometheus)
    scrape_s = prometheus.scrape_interval_s()

    def drift_in_range() -> float:
        """Now, if range queries (what the panels run) end with a few points of the drift the traffic caused (the
        realized figures are in them already: the `live` fixture waited for that)."""
        window = Window(live.started, time.time(), scrape_s)
        series = prometheus.range("job_field:housing_drift_psi:max", window)
        return window.end if any((one.values[-3:] > 0.25).sum() == 3 for one in series) else 0.0

    end = wait_for(drift_in_range, 30, "three points of drift in a range query")
    pictures = {path.name: out / f"dashboard-{path.stem}.png" for path in DASHBOARDS}
    drawn = {path.name: render_dashboard.render(path, prometheus, live.started, end, pictures[path.name])
             for path in DASHBOARDS}
    print(f"dashboard PNGs of the test traffic: {out}")  # docs/dashboard-housing-serve.png is one of them
    return Rendered(pictures, drawn, end)


@pytest.mark.integration
def test_every_panel_with_a_query_draws_series_from_prometheus(traffic_window):
    for path in DASHBOARDS:
        drawable = panels(json.loads(path.read_text()))
        assert [(one.title, one.type) for one in traffic_window.drawn[path.name]] == [
            (panel["title"], panel["type"]) for panel in drawable]
        empty = [one.title for one, panel in zip(traffic_window.drawn[path.name], drawable, strict=True)
                 if panel.get("targets") and one.series < 1]
        assert not empty, f"{path.name}: nothing drawn for {empty}"


@pytest.mark.integration
def test_the_panels_show_what_the_traffic_did(traffic_window, live):
    drawn = {one.title: one.series for one in traffic_window.drawn["housing-serve.json"]}
    assert drawn["Targets up"] == 3  # the healthy app, the one without a model, and the dead target
    assert drawn["Model loaded"] == 2
    assert drawn["Model version in service"] == 2  # the first version, then the second
    assert drawn["Drift per field (PSI)"] == drawn["PSI now"] == len(FEATURES) + 1  # and the predictions
    alerts = query(live.prometheus, 'ALERTS{alertname=~"Housing.+"}', at=traffic_window.end)
    assert drawn["Alerts"] == len(alerts) > 0
    assert drawn["Records per request"] >= 10  # the batch sizes sent: 1 to 500 records, and 100s


@pytest.mark.integration
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_each_panel_is_a_box_where_its_grid_position_puts_it(traffic_window, path):
    """In the PNG: inside every panel's box the panel colour, just left of it the page's background."""
    picture = traffic_window.pictures[path.name]
    dashboard = json.loads(path.read_text())
    rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in dashboard["panels"])
    dpi, column_in = render_dashboard.DPI, (render_dashboard.PAGE_WIDTH_IN - 2 * render_dashboard.MARGIN_IN) / 24
    with Image.open(picture) as image:
        pixels = image.convert("RGB")
        assert image.size == (round(render_dashboard.PAGE_WIDTH_IN * dpi), round(
            (render_dashboard.HEADER_IN + rows * render_dashboard.GRID_ROW_IN + render_dashboard.MARGIN_IN) * dpi))
    panel_color, background = (tuple(int(code[i:i + 2], 16) for i in (1, 3, 5))
                               for code in (render_dashboard.PANEL, render_dashboard.BACKGROUND))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        left = render_dashboard.MARGIN_IN + grid["x"] * column_in + render_dashboard.GAP_IN / 2
        top = render_dashboard.HEADER_IN + grid["y"] * render_dashboard.GRID_ROW_IN + render_dashboard.GAP_IN / 2
        right = left + grid["w"] * column_in - render_dashboard.GAP_IN
        inside = (round((right - 0.05) * dpi), round((top + 0.05) * dpi))  # the title band's far end
        outside = (round(left * dpi) - 3, inside[1])
        assert pixels.getpixel(inside) == panel_color, panel["title"]
        assert pixels.getpixel(outside) == background, panel["title"]


@pytest.mark.integration
def test_make_dashboard_png_draws_each_dashboard_over_its_own_time_range(live, tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "dashboard-png", f"DASHBOARD_PNG_DIR={tmp_path}"],
                            cwd=ROOT, env={**clean_environment(), "PROMETHEUS_URL": live.prometheus},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        png = tmp_path / f"dashboard-{dashboard['uid']}.png"
        assert str(png) in lines
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    reported = [re.fullmatch(r"(\w+) +(\d+) series  (.+)", line) for line in lines if not line.startswith("/")]
    assert all(reported), lines
    assert [(match[1], match[3]) for match in reported] == [
        (panel["type"], panel["title"]) for path in DASHBOARDS for panel in panels(json.loads(path.read_text()))]
    assert min(int(match[2]) for match in reported) >= 1, result.stdout
