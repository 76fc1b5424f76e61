"""`make realized`: the true prices of served predictions, joined by id, give each model version its realized RMSE,
MAE and bias, in the report, in the registry and at the Pushgateway.

The story runs real parts once: a registry (MLflow, SQLite) with two versions, a `python serve.py` that serves one and
then the other (the prediction log as it writes it), a real Pushgateway (Debian's prometheus-pushgateway), and `make
realized` on a labels CSV with duplicates, an unknown id and an invalid row. The figures must equal what the
registered models predict offline on the same rows, to the cent. The rest reads logs and labels written here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import boto3
import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from names import FEATURES, TARGET
from scripts import realized
from serving.prediction_log import PredictionLog
from serving.schema import EXAMPLE_RECORD
from serving.settings import Settings
from tests.conftest import GBDT, RIDGE, json_records, run_make, synthetic_housing
from tests.registry import TemporaryRegistry, fitted, temporary_registry
from tests.servers import ROOT, free_port, logged_ids, running_app, serve_environment, wait_for

TOKEN = "reload-token-for-the-test"
LINE = re.compile(r"version (\w+): (\d+) labelled predictions, RMSE ([\d,.-]+), MAE ([\d,.-]+), bias ([\d,.-]+)")


@dataclass
class Story:
    registry: TemporaryRegistry
    versions: tuple[str, str]
    rows: dict[str, pd.DataFrame]  # the labelled rows predicted by each version, with the label that counts
    result: subprocess.CompletedProcess
    report: dict
    report_md: str
    pushed: dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (metric, sorted labels) -> value

    def printed(self) -> dict[str, tuple[int, float, float, float]]:
        return {version: (int(count), *(float(value.replace(",", "")) for value in figures))
                for version, count, *figures in LINE.findall(self.result.stdout)}

    def metric(self, metric: str, **labels: str) -> float:
        return self.pushed[(metric, tuple(sorted({"job": realized.PUSH_JOB, "instance": "", **labels}.items())))]


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with log.open("wb") as output:
        process = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 30, "the Pushgateway")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, pushgateway: str) -> Iterator[Story]:
    tmp = tmp_path_factory.mktemp("realized")
    data = synthetic_housing(700, seed=5)
    first_rows, second_rows = data.iloc[:300].copy(), data.iloc[300:550].copy()
    with temporary_registry(tmp) as registry:
        first = registry.register("housing", fitted(GBDT))
        second = registry.register("housing", fitted(RIDGE), alias=None)
        for version, reference in ((first, "21000.00"), (second, "30000.00")):
            registry.client.set_model_version_tag("housing", version, "reference_rmse", reference)
        logs = tmp / "predictions"
        env = serve_environment(MLFLOW_TRACKING_URI=registry.uri, MODEL_NAME="housing", RELOAD_INTERVAL_S="0",
                                RELOAD_TOKEN=TOKEN, PREDICTION_LOG_DIR=str(logs))
        with running_app(env, tmp / "serve.log") as app:
            records = json_records(first_rows[list(FEATURES)])
            answer = app.http.post("/predict", json={"instances": records[:290]}, headers={"X-Request-ID": "a"})
            assert answer.json()["model"]["version"] == first
            first_ids = answer.json()["ids"]
            for index, record in enumerate(records[290:]):  # one record a request: the request's id is the id
                answer = app.http.post("/predict", json=record, headers={"X-Request-ID": f"single-{index}"})
                first_ids.append(answer.json()["id"])
            registry.client.set_registered_model_alias("housing", "champion", second)
            reload = app.http.post("/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            assert reload.json()["model"]["version"] == second, reload.text
            answer = app.http.post("/predict", json={"instances": json_records(second_rows[list(FEATURES)])},
                                   headers={"X-Request-ID": "b"})
            second_ids = answer.json()["ids"]
            wait_for(lambda: set(first_ids + second_ids) <= logged_ids(logs), 30, "the prediction log")
        first_rows["id"], second_rows["id"] = first_ids, second_ids
        second_rows = second_rows.iloc[:150]  # 150 of the 250 predictions of the second version get a label
        labels = pd.concat([first_rows, second_rows])[["id", TARGET]].assign(observed_at="2027-02-01T00:00:00Z")
        later = first_rows.iloc[:1][["id", TARGET]].assign(**{TARGET: 123_456.0, "observed_at": "2027-03-01"})
        first_rows.loc[first_rows.index[0], TARGET] = 123_456.0  # the later label of a conflicting pair counts
        extra = pd.DataFrame({"id": ["a/5", "never-predicted", "b/3", ""], TARGET: [
            labels.set_index("id").loc["a/5", TARGET], 1.0, "not a price", 1.0], "observed_at": ""})
        csv = tmp / "labels.csv"
        pd.concat([labels, later, extra]).to_csv(csv, index=False)
        report_dir = tmp / "report"
        result = run_make(ROOT, "realized", f"LABELS={csv}", PREDICTION_LOG_DIR=str(logs), PUSHGATEWAY_URL=pushgateway,
                          MLFLOW_TRACKING_URI=registry.uri, MODEL_NAME="housing", REALIZED_REPORT_DIR=str(report_dir),
                          timeout_s=300)
        assert result.returncode == 0, result.stdout + result.stderr
        text = httpx.get(f"{pushgateway}/metrics", timeout=10).text
        pushed = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                  for family in text_string_to_metric_families(text) for sample in family.samples
                  if sample.labels.get("job") == realized.PUSH_JOB}
        yield Story(registry, (first, second), {first: first_rows, second: second_rows}, result,
                    json.loads((report_dir / "realized.json").read_text()), (report_dir / "realized.md").read_text(),
                    pushed)


def offline(story: Story, version: str) -> dict[str, float]:
    rows = story.rows[version]
    errors = story.registry.predictions("housing", version, rows[list(FEATURES)]) - rows[TARGET].to_numpy()
    return {"labelled": len(rows), "rmse": float(np.sqrt(np.mean(errors**2))), "mae": float(np.mean(np.abs(errors))),
            "bias": float(np.mean(errors))}


@pytest.mark.integration
def test_each_version_reproduces_the_offline_rmse_of_its_registered_model_on_the_same_rows_to_the_cent(story):
    printed = story.printed()
    for version in story.versions:
        expected = offline(story, version)
        assert printed[version] == (expected["labelled"], round(expected["rmse"], 2), round(expected["mae"], 2),
                                    round(expected["bias"], 2)), version


@pytest.mark.integration
def test_two_versions_served_in_turn_keep_separate_figures(story):
    first, second = story.versions
    by_version = {one["version"]: one for one in story.report["versions"]}
    assert set(by_version) == {first, second}
    assert (by_version[first]["labelled"], by_version[first]["logged"]) == (300, 300)
    assert (by_version[second]["labelled"], by_version[second]["logged"]) == (150, 250)
    assert by_version[second]["coverage"] == pytest.approx(0.6)
    assert by_version[first]["rmse"] != by_version[second]["rmse"]


@pytest.mark.integration
def test_duplicate_unknown_and_invalid_labels_are_counted_and_the_job_goes_on(story):
    assert story.report["labels"] == {
        "rows": 455, "joined": 450, "duplicate": 2, "conflicting": 1, "unknown": 1, "late": 0, "invalid": 2,
        "files": 1}
    assert "labels: 450 joined, 2 duplicate, 1 unknown, 0 late, 2 invalid" in story.result.stdout


@pytest.mark.integration
def test_an_interval_is_given_from_200_labels_only(story):
    first, second = story.versions
    by_version = {one["version"]: one for one in story.report["versions"]}
    low, high = by_version[first]["interval"]["rmse"]
    assert low < by_version[first]["rmse"] < high
    assert "interval" not in by_version[second]


@pytest.mark.integration
def test_the_pushgateway_holds_each_versions_figures_beside_its_reference_rmse(story):
    for version in story.versions:
        expected = offline(story, version)
        labels = {"name": "housing", "version": version, "role": "served"}
        assert story.metric("housing_realized_labelled_predictions", **labels) == expected["labelled"]
        assert story.metric("housing_realized_rmse_dollars", **labels) == pytest.approx(expected["rmse"])
        assert story.metric("housing_realized_bias_dollars", **labels) == pytest.approx(expected["bias"])
    first, second = story.versions
    assert story.metric("housing_reference_rmse_dollars", name="housing", version=first) == 21_000
    assert story.metric("housing_reference_rmse_dollars", name="housing", version=second) == 30_000
    assert story.metric("housing_realized_labels", outcome="unknown") == 1


@pytest.mark.integration
def test_each_version_carries_its_realized_figures_as_registry_tags(story):
    for version in story.versions:
        tags = story.registry.client.get_model_version("housing", version).tags
        assert tags["realized_rmse"] == f"{offline(story, version)['rmse']:.2f}"
        assert tags["realized_labelled"] == str(offline(story, version)["labelled"])
        assert tags["reference_rmse"]  # the gate's, untouched beside them


@pytest.mark.integration
def test_the_report_lists_each_version_and_its_day(story):
    today = datetime.now(UTC).date().isoformat()
    for version in story.versions:
        assert f"| housing {version} | served |" in story.report_md
        assert f"## housing version {version} (served), per day of prediction (UTC)" in story.report_md
    assert f"| {today} | 300 | 100.0% |" in story.report_md


# --- without the app: prediction logs written here ---------------------------------------------------------------


def write_log(directory: Path, entries: list[tuple[str, str, list[str], list[float]]]) -> None:
    """(ISO time, version, ids, outputs) as serve.py logs them: through the real PredictionLog."""
    log = PredictionLog(Settings(prediction_log_dir=directory, prediction_log_client_bytes_per_s=0))
    log.start()
    for when, version, ids, outputs in entries:
        log.append({"request_id": ids[0], "time": datetime.fromisoformat(when).timestamp(),
                    "model": {"name": "housing", "version": version}, "route": "/predict", "ids": ids,
                    "inputs": [EXAMPLE_RECORD] * len(ids), "outputs": outputs})
    log.stop()


def labels_csv(path: Path, labels: dict[str, float]) -> str:
    pd.DataFrame({"id": list(labels), TARGET: list(labels.values())}).to_csv(path, index=False)
    return str(path)


def test_a_rerun_with_more_labels_recomputes_the_affected_days_and_counts_the_late_labels(tmp_path):
    write_log(tmp_path, [("2027-01-04T10:00:00+00:00", "3", ["m/0", "m/1"], [100.0, 200.0]),
                         ("2027-01-05T10:00:00+00:00", "3", ["t/0", "t/1"], [100.0, 200.0])])
    log = realized.read_log(tmp_path)
    monday = realized.compute(log, realized.read_labels(labels_csv(tmp_path / "one.csv", {"m/0": 110.0})))
    both = {"m/0": 110.0, "m/1": 180.0, "t/0": 100.0}
    again = realized.compute(log, realized.read_labels(labels_csv(tmp_path / "two.csv", both)),
                             json.loads(json.dumps(monday.__dict__)))
    assert again.labels["late"] == 1  # m/1: Monday was reported without it
    assert again.recomputed == ["housing 3 served 2027-01-04"]
    (version,) = again.versions
    assert [(day["day"], day["labelled"], day["rmse"]) for day in version["days"]] == [
        ("2027-01-04", 2, pytest.approx(np.sqrt((10**2 + 20**2) / 2))), ("2027-01-05", 1, 0.0)]
    assert version["bias"] == pytest.approx((-10 + 20 + 0) / 3)


def test_a_segment_being_written_and_an_unreadable_line_are_counted_not_fatal(tmp_path):
    write_log(tmp_path, [("2027-01-04T10:00:00+00:00", "3", ["x/0"], [100.0])])
    (segment,) = tmp_path.glob("predictions-*.jsonl")
    with segment.open("ab") as out:
        out.write(b"not json\n" + segment.read_bytes().replace(b'"x/0"', b'"x/1"') + b'{"request_id": "half')
    log = realized.read_log(tmp_path)
    assert sorted(log.frame["id"]) == ["x/0", "x/1"]
    assert log.bad_lines == 2


def test_shipped_segments_are_read_from_s3_once(tmp_path, moto_endpoint, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="logs")
    here, gone = tmp_path / "here", tmp_path / "gone"
    write_log(here, [("2027-01-04T10:00:00+00:00", "3", ["kept/0"], [1.0])])
    write_log(gone, [("2027-01-04T11:00:00+00:00", "3", ["pruned/0"], [2.0])])
    for segment in [*here.glob("predictions-*.jsonl"), *gone.glob("predictions-*.jsonl")]:  # as the shipper does
        s3.put_object(Bucket="logs", Key=f"host-1/{segment.name}", Body=segment.read_bytes())
    for segment in here.glob("predictions-*.jsonl"):
        segment.rename(segment.with_name(segment.name.removesuffix(".jsonl") + ".shipped.jsonl"))
    log = realized.read_log(here, "s3://logs/host-1")
    assert sorted(log.frame["id"]) == ["kept/0", "pruned/0"]
    assert (log.segments, log.from_s3) == (2, 1)


def test_labels_without_their_columns_stop_the_job_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REALIZED_REPORT_DIR", str(tmp_path / "report"))
    (tmp_path / "labels.csv").write_text("prediction_id,price\nx,1\n")
    assert realized.main([str(tmp_path / "labels.csv")]) == 2
    assert "no column id, median_house_value" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.integration
def test_the_benchmark_joins_a_generated_log_and_prints_the_time(report_figure):
    result = subprocess.run([sys.executable, "-m", "scripts.realized_bench", "100000", "10000", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (figure,) = [line for line in result.stdout.splitlines() if line.startswith("realized: ")]
    assert "10,000 joined, 100 duplicate, 100 unknown" in figure
    report_figure(figure.removeprefix("realized: ") + " (make realized-bench: 1,000,000 and 100,000)")
