"""Drift in serve.py: the window against the model's reference profile, then real `python serve.py` processes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from features import reference_profile
from names import CATEGORICAL_FEATURE, FEATURES, NUMERIC_FEATURES, TARGET
from serving.drift import DriftWindow
from serving.schema import to_arrays
from serving.settings import Settings
from tests.conftest import GBDT, json_records, synthetic_housing
from tests.registry import fitted, temporary_registry
from tests.servers import ServerProcess, serve_environment, start_serve, wait_for, wait_until_answering

pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")  # inside MLflow's pyfunc

WINDOW = 400
LOW, HIGH = 0.1, 0.25  # PSI: below LOW stable, above HIGH significant (the alert's threshold)
TOKEN = "drift-reload-token"


def incomes_doubled(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(median_income=frame.median_income * 2)


def all_inland(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(ocean_proximity="INLAND")


SHIFTS = [(incomes_doubled, "median_income"), (all_inland, CATEGORICAL_FEATURE)]


def districts(rows: int, seed: int) -> pd.DataFrame:
    """Districts drawn like the training data, with other random numbers."""
    return synthetic_housing(rows, seed=seed)[list(FEATURES)]


def assert_only_shifted(scores: dict[str, float], shifted: str) -> None:
    assert scores[shifted] > HIGH, scores
    assert all(scores[name] < LOW for name in FEATURES if name != shifted), scores


# --- the window ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile() -> dict:
    data = synthetic_housing(3000, seed=0)
    return reference_profile(data[list(FEATURES)], data[TARGET].to_numpy())  # the target stands in for predictions


def filled(profile: dict, frame: pd.DataFrame, size: int = 1000, batch: int = 50) -> DriftWindow:
    """A window that was sent `frame` in requests of `batch` records, the target as their predictions."""
    window = DriftWindow(profile, size)
    numeric, codes = to_arrays(json_records(frame))
    predictions = synthetic_housing(len(frame), seed=3)[TARGET].to_numpy(dtype=float)
    for start in range(0, len(frame), batch):
        rows = slice(start, start + batch)
        window.add(numeric[rows], codes[rows], predictions[rows])
    window.update()
    return window


def test_training_distribution_keeps_every_score_low(profile):
    window = filled(profile, districts(1000, seed=1), batch=1)
    assert window.rows == 1000
    scores = window.scores()
    assert set(scores) == {*FEATURES, "prediction"}
    assert max(scores.values()) < LOW, scores


@pytest.mark.parametrize(("shift", "shifted"), SHIFTS, ids=["incomes x 2", "one category dominates"])
def test_a_shifted_field_scores_high_and_the_others_stay_low(profile, shift, shifted):
    assert_only_shifted(filled(profile, shift(districts(1000, seed=1))).scores(), shifted)


def test_the_window_holds_only_the_newest_records(profile):
    window = filled(profile, incomes_doubled(districts(1000, seed=1)), size=500)
    assert window.scores()["median_income"] > HIGH
    calm = districts(700, seed=2)  # one batch larger than the window
    window.add(*to_arrays(json_records(calm)), np.full(len(calm), 200_000.0))
    window.update()
    assert window.rows == 500
    assert window.scores()["median_income"] < LOW


def test_an_empty_window_scores_nan(profile):
    window = DriftWindow(profile, 10)
    window.update()
    assert window.rows == 0
    assert all(math.isnan(score) for score in window.scores().values())


def test_a_profile_that_does_not_fit_its_bins_is_refused(profile):
    broken = {**profile, "prediction": {**profile["prediction"], "fractions": [1.0]}}
    with pytest.raises(ValueError, match="fraction per bin"):
        DriftWindow(broken, 10)


def test_drift_window_must_hold_a_record():
    with pytest.raises(ValueError, match="DRIFT_WINDOW"):
        Settings.from_env({"DRIFT_WINDOW": "0"})


# --- the served app ------------------------------------------------------------------------------------------


@dataclass
class Models:
    uri: str
    client: MlflowClient
    first: str  # two versions with a reference profile
    second: str
    without_profile: str  # a version without one
    directory_without_profile: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    root = tmp_path_factory.mktemp("drift-registry")
    pipeline = fitted(GBDT)
    with temporary_registry(root) as registry:
        first = registry.register("drifting", pipeline, profiled=True)
        second = registry.register("drifting", pipeline, alias=None, profiled=True)
        without_profile = registry.register("drifting", pipeline, alias=None)
        plain = mlflow.artifacts.download_artifacts(f"models:/drifting/{without_profile}", dst_path=str(root / "plain"))
        yield Models(registry.uri, registry.client, first, second, without_profile, Path(plain))


def serve_env(models: Models, tmp: Path, **settings: str) -> dict[str, str]:
    return serve_environment(MLFLOW_TRACKING_URI=models.uri, PREDICTION_LOG_DIR=str(tmp / "predictions"),
                             RELOAD_INTERVAL_S="0", **settings)


@dataclass
class Servers:
    profiled: ServerProcess  # "drifting"@champion, DRIFT_WINDOW=400, POST /reload
    plain: ServerProcess  # MODEL_URI of a model without a reference profile


@pytest.fixture(scope="module")
def servers(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("drift-servers")
    started = [
        start_serve(serve_env(models, tmp, MODEL_NAME="drifting", DRIFT_WINDOW=str(WINDOW), RELOAD_TOKEN=TOKEN),
                    tmp / "profiled.log"),
        start_serve(serve_env(models, tmp, MODEL_URI=str(models.directory_without_profile)), tmp / "plain.log"),
    ]
    try:
        for server in started:
            wait_until_answering(server, "/ready")
        yield Servers(*started)
    finally:
        for server in started:
            server.stop()


def drift_samples(server: ServerProcess) -> dict[str, float]:
    """housing_drift_psi by field, and housing_drift_window_rows as "rows", from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {sample.labels.get("field", "rows"): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("housing_drift")
            for sample in family.samples}


def send(server: ServerProcess, frame: pd.DataFrame, batch: int = 50) -> None:
    rows = json_records(frame)
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(rows), batch):
            response = client.post(server.url + "/predict", json={"instances": rows[start:start + batch]})
            assert response.status_code == 200, response.text


def switch(server: ServerProcess, models: Models, version: str) -> None:
    models.client.set_registered_model_alias("drifting", "champion", version)
    response = httpx.post(server.url + "/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.json()["result"] == "loaded", response.text


@pytest.fixture
def empty_window(servers: Servers, models: Models) -> ServerProcess:
    """The profiled server, just switched to another version with a profile: its window starts empty."""
    server = servers.profiled
    serving = httpx.get(server.url + "/model").json()["version"]
    switch(server, models, models.second if serving == models.first else models.first)
    wait_for(lambda: drift_samples(server).get("rows") == 0, 10, "an empty drift window for the new version")
    return server


def window_full(server: ServerProcess) -> dict[str, float]:
    """The scores once the window holds WINDOW records: every record sent since it was empty."""
    return wait_for(lambda: (samples := drift_samples(server))["rows"] == WINDOW and samples, 10,
                    f"{WINDOW} records in the drift window")


@pytest.mark.integration
def test_served_training_distribution_keeps_scores_low(empty_window):
    send(empty_window, districts(WINDOW, seed=2))
    scores = window_full(empty_window)
    assert set(scores) == {*FEATURES, "prediction", "rows"}
    assert max(scores[name] for name in (*FEATURES, "prediction")) < LOW, scores


@pytest.mark.integration
@pytest.mark.parametrize(("shift", "shifted"), SHIFTS, ids=["incomes x 2", "one category dominates"])
def test_served_shift_raises_its_fields_score_only(empty_window, shift, shifted):
    send(empty_window, shift(districts(WINDOW, seed=2)))
    assert_only_shifted(window_full(empty_window), shifted)


@pytest.mark.integration
def test_incomes_doubled_shift_the_predictions_too(empty_window):
    send(empty_window, incomes_doubled(districts(WINDOW, seed=2)))
    assert window_full(empty_window)["prediction"] > HIGH  # income drives the price


@pytest.mark.integration
def test_single_records_count_like_batches(empty_window):
    send(empty_window, districts(WINDOW // 2, seed=3), batch=1)
    send(empty_window, districts(WINDOW // 2, seed=4), batch=WINDOW // 2)
    assert max(window_full(empty_window)[name] for name in NUMERIC_FEATURES) < LOW


@pytest.mark.integration
def test_switching_to_a_version_without_profile_turns_its_scores_nan(servers, models):
    send(servers.profiled, districts(WINDOW, seed=2))
    # Its PSI series exist before the switch (the monitor published them): only then is there something to turn NaN.
    # Without this wait, a run where this test comes first could switch before the monitor's first update.
    window_full(servers.profiled)
    switch(servers.profiled, models, models.without_profile)

    def unmeasured() -> bool:
        samples = drift_samples(servers.profiled)
        return samples.pop("rows") == 0 and len(samples) == len(FEATURES) + 1 and all(map(math.isnan, samples.values()))

    wait_for(unmeasured, 10, "NaN drift scores and an empty window")


@pytest.mark.integration
def test_a_model_without_reference_profile_exports_no_drift(servers):
    send(servers.plain, districts(50, seed=2))
    assert httpx.get(servers.plain.url + "/metrics").text.count("housing_model_loaded 1.0") == 1
    assert drift_samples(servers.plain) == {"rows": 0}
    assert "drift is not measured" in servers.plain.output()
