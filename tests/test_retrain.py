"""`make retrain` end to end in a copy of the repository: real DVC, real MLflow (sqlite store), real data files.

The tests run in order, each on the state the previous one left (versions are numbered by registration).
"""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from features import FEATURES
from tests.conftest import ROOT, project_copy, run_make, synthetic_housing

MODEL = "California_Housing_Regression"
SMALL_PARAMS = {
    "candidates": {
        "ridge": {"model": "ridge", "features": {"neighbours": [], "encoding": "onehot"}, "params": {"alpha": 1.0}},
        "gbdt": {"model": "hist_gradient_boosting", "features": {"neighbours": [4, 16], "folds": 5},
                 "params": {"max_iter": 150, "learning_rate": 0.1, "random_state": 0}},
    },
    "weak": {"weak": {"model": "hist_gradient_boosting", "features": {"neighbours": []},
                      "params": {"max_iter": 2, "learning_rate": 0.05, "random_state": 0}}},
}


class Project:
    def __init__(self, root: Path):
        self.root = root
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.tracking_uri, self.tracking_uri)

    def retrain(self, data: Path):
        return run_make(self.root, "retrain", DATA_URL=str(data), MLFLOW_TRACKING_URI=self.tracking_uri)

    def set_candidates(self, candidates: dict) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        params["train"]["candidates"] = candidates
        params["train"]["cv_folds"] = 0
        params["gate"].update(max_rmse=200_000, min_r2=0.0)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def set_cv_folds(self, folds: int) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        params["train"]["cv_folds"] = folds
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def lock(self) -> str:
        return (self.root / "dvc.lock").read_text()

    def dvc(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / ".venv/bin/dvc"), *args], cwd=self.root, capture_output=True, text=True)

    def champion(self) -> str:
        return str(self.client.get_model_version_by_alias(MODEL, "champion").version)

    def versions(self) -> dict[str, dict]:
        return {str(v.version): v for v in self.client.search_model_versions(f"name='{MODEL}'")}

    def locked_data_md5(self) -> str:
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())
        return lock["stages"]["fetch"]["outs"][0]["md5"]

    def decision(self) -> dict:
        return json.loads((self.root / "reports/decision.json").read_text())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def seed_reference(root: Path, frame: pd.DataFrame) -> None:
    """`make reference SOURCE=...` in the project with data the test trusts, committed as a person would."""
    source = root.parent / f"{root.name}-trusted.csv"
    frame.to_csv(source, index=False)
    result = run_make(root, "reference", f"SOURCE={source}")
    assert result.returncode == 0, result.stdout + result.stderr
    for command in (["git", "add", "reference"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "reference"]):
        subprocess.run(command, cwd=root, check=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(project_copy(tmp_path_factory.mktemp("repo")))
    project.set_candidates(SMALL_PARAMS["candidates"])
    seed_reference(project.root, synthetic_housing(4000, seed=9))
    return project


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("incoming")
    paths = {}
    for name, frame in {"v1": synthetic_housing(1500, seed=0), "v2": synthetic_housing(3000, seed=1)}.items():
        paths[name] = folder / f"{name}.csv"
        frame.to_csv(paths[name], index=False)
    corrupt = synthetic_housing(1500, seed=2)
    corrupt.loc[:4, "latitude"] = 51.5
    corrupt["population"] = corrupt["population"].astype(object)
    corrupt.loc[10, "population"] = "n/a"
    paths["corrupt"] = folder / "corrupt.csv"
    corrupt.to_csv(paths["corrupt"], index=False)
    return paths


def test_first_retrain_registers_and_promotes_v1(project, datasets):
    result = project.retrain(datasets["v1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.champion() == "1"
    version = project.versions()["1"]
    assert version.current_stage == "Production"
    assert version.tags["gate_decision"] == "passed"
    assert version.tags["promotion"] == "gate"
    assert version.tags["gate_check"] == "first_champion"
    assert float(version.tags["reference_rmse"]) > 0
    assert version.tags["data_md5"] == project.locked_data_md5() == md5(datasets["v1"])
    assert version.tags["data_url"] == str(datasets["v1"])
    assert len(version.tags["git_commit"]) == 40
    assert project.decision()["decision"] == "promoted"
    assert "| holdout rmse |" in result.stdout and "| reference rmse |" in result.stdout
    assert "Decision: passed" in result.stdout
    assert "retrain summary" in result.stdout
    assert "  champion before  none\n" in result.stdout
    assert "  champion after   version 1 (promotion=gate)\n" in result.stdout
    assert f"mlflow ui --backend-store-uri {project.tracking_uri}; reports/decision.md" in result.stdout
    assert "retrain: 3/5 dvc push" in result.stderr and "train: candidate 2/2: gbdt" in result.stderr

    parent = project.client.get_run(project.decision()["challenger"]["run_id"]).data.tags["mlflow.parentRunId"]
    children = project.client.search_runs([project.client.get_run(parent).info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(run.data.tags["candidate"] for run in children) == ["gbdt", "ridge"]
    for run in children:
        assert {"rmse", "mae", "r2"} <= set(run.data.metrics)
        plots = {a.path for a in project.client.list_artifacts(run.info.run_id, "plots")}
        assert plots == {"plots/predicted_vs_actual.png", "plots/residuals.png", "plots/feature_importance.png"}
    logged_model = project.client.get_logged_model(version.source.removeprefix("models:/"))
    model_dir = Path(urlparse(logged_model.artifact_location).path)
    profile = json.loads((model_dir / "extra_files/reference_profile.json").read_text())
    assert set(profile["fields"]) == set(FEATURES) and profile["prediction"]["edges"]
    metrics = json.loads((project.root / "reports/metrics.json").read_text())
    assert metrics["best"] == version.tags["candidate"]
    assert "files pushed" in result.stdout
    status = project.dvc("status", "--cloud")
    assert "Cache and remote 'local' are in sync" in status.stdout, status.stdout + status.stderr


def test_second_retrain_with_nothing_changed_is_a_noop(project, datasets):
    runs_before = len(project.client.search_runs([e.experiment_id for e in project.client.search_experiments()]))
    result = project.retrain(datasets["v1"])
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("validate", "split", "train", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    assert "unchanged" in result.stdout  # fetch did look upstream
    assert set(project.versions()) == {"1"}
    assert len(project.client.search_runs([e.experiment_id for e in project.client.search_experiments()])) \
        == runs_before
    assert "decision         none: data, code and params unchanged, nothing retrained" in result.stdout


def test_an_identical_retrain_is_rejected_as_not_better(project):
    lock_before = project.lock()
    project.set_cv_folds(2)  # train runs again; the fitted models are the same
    result = project.retrain(project.root / "data/housing.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.decision()["decision"] == "rejected"
    assert project.decision()["check"] == "not_better"
    assert project.versions()["2"].tags["promotion"] == "rejected"
    assert project.versions()["2"].tags["gate_reason"].startswith("not better: holdout RMSE")
    assert project.champion() == "1"
    assert project.lock() == lock_before
    assert "the gate rejected the challenger (reports/decision.md), champion unchanged" in result.stderr


def test_worse_challenger_is_registered_but_not_promoted(project, datasets):
    project.set_candidates(SMALL_PARAMS["weak"])
    lock_before = project.lock()
    result = project.retrain(datasets["v1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(project.versions()) == {"1", "2", "3"}
    assert project.versions()["3"].tags["gate_decision"] == "rejected"
    assert "worse than the champion's" in project.versions()["3"].tags["gate_reason"]
    assert project.champion() == "1"
    assert project.lock() == lock_before
    assert project.versions()["1"].current_stage == "Production"
    decision = project.decision()
    assert decision["decision"] == "rejected"
    assert decision["challenger"]["metrics"]["reference"]["rmse"] > decision["champion"]["metrics"]["reference"]["rmse"]


def test_corrupt_data_is_rejected_and_nothing_changes(project, datasets):
    project.set_candidates(SMALL_PARAMS["candidates"])
    lock_before = (project.root / "dvc.lock").read_text()
    result = project.retrain(datasets["corrupt"])
    assert result.returncode != 0
    assert "validate: latitude: 5 values outside [32.5, 42.1], e.g. 51.5 (lines 2, 3, 4, ...)" in result.stderr
    assert "validate: population: 1 values are not finite numbers, e.g. ['n/a'] (line 12)" in result.stderr
    assert set(project.versions()) == {"1", "2", "3"}
    assert project.champion() == "1"
    assert (project.root / "dvc.lock").read_text() == lock_before
    assert md5(project.root / "data/housing.csv") == md5(datasets["v1"])
    assert json.loads((project.root / "reports/validation.json").read_text())["valid"] is False


def csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


BAD_FILES = {  # kind: (make the file's text from good data, what the refusal must say)
    "empty file": (lambda f: "", "validate: file: data/housing.csv is empty"),
    "header only": (lambda f: csv(f.head(0)), "validate: file: 0 data rows, need at least"),
    "missing column": (lambda f: csv(f.drop(columns="median_income")), "validate: median_income: column is missing"),
    "renamed column": (lambda f: csv(f.rename(columns={"households": "homes"})),
                       "validate: households: column is missing"),
    "all-NaN column": (lambda f: csv(f.assign(total_rooms=None)), "validate: total_rooms: 1500 of 1500 values empty"),
    "unknown category": (lambda f: csv(f.assign(ocean_proximity="UNDERWATER")),
                         "validate: ocean_proximity: 1500 values not in"),
    "negative counts": (lambda f: csv(f.assign(population=-f.population)),
                        "validate: population: 1500 values outside [1, 1000000]"),
    "truncated file": (lambda f: csv(f)[: len(csv(f)) * 2 // 3], "validate: file: last line has no newline"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_every_kind_of_bad_data_is_refused_with_its_reason(project, datasets, kind):
    lock_before = (project.root / "dvc.lock").read_text()
    make_text, refusal = BAD_FILES[kind]
    path = datasets["v1"].parent / f"{kind.replace(' ', '_')}.csv"
    path.write_text(make_text(synthetic_housing(1500, seed=3)))
    result = project.retrain(path)
    assert result.returncode != 0
    assert refusal in result.stderr, result.stderr
    assert "dvc.lock and data/ restored to the last good version" in result.stderr
    assert set(project.versions()) == {"1", "2", "3"}
    assert project.champion() == "1"
    assert (project.root / "dvc.lock").read_text() == lock_before
    assert md5(project.root / "data/housing.csv") == md5(datasets["v1"])


def test_previous_data_version_is_restorable_from_the_remote(project):
    (project.root / "data/housing.csv").unlink()
    shutil.rmtree(project.root / ".dvc/cache")
    pulled = project.dvc("pull", "fetch")
    assert pulled.returncode == 0, pulled.stderr
    assert md5(project.root / "data/housing.csv") == project.locked_data_md5()


def test_new_data_promotes_a_new_champion_and_rollback_restores_the_old(project, datasets):
    result = project.retrain(datasets["v2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert project.champion() == "4"
    assert project.versions()["4"].tags["previous_champion"] == "1"
    assert project.versions()["4"].tags["gate_check"] == "better"
    assert project.versions()["1"].current_stage == "Archived"
    assert project.locked_data_md5() == md5(datasets["v2"])

    result = run_make(project.root, "rollback", MLFLOW_TRACKING_URI=project.tracking_uri)
    assert result.returncode == 0, result.stderr
    assert "moved from version 4 to version 1" in result.stdout
    assert project.champion() == "1"
    assert project.versions()["1"].current_stage == "Production"

    result = run_make(project.root, "rollback", MLFLOW_TRACKING_URI=project.tracking_uri)
    assert result.returncode != 0
    assert "version 1 has no 'previous_champion' tag" in result.stderr
    assert project.champion() == "1"


def test_an_empty_registry_with_unchanged_data_retrains_and_leaves_a_champion(project, datasets):
    # A new MLflow store, as after a wiped mlflow.db or a move to a new server. (Deleting the file this process
    # has open would leave MLflow's cached engine reading the old one.)
    project.tracking_uri = f"sqlite:///{project.root / 'mlflow-new.db'}"
    project.client = MlflowClient(project.tracking_uri, project.tracking_uri)
    result = project.retrain(datasets["v2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"has no {MODEL}@champion for dvc.lock's data (md5 {md5(datasets['v2'])}): retraining" in result.stdout
    assert "Running stage 'train'" in result.stdout
    assert project.champion() == "1"
    assert project.versions()["1"].tags["data_md5"] == project.locked_data_md5() == md5(datasets["v2"])
