"""`make retrain` end to end in a copy of the repository: real DVC, real MLflow (sqlite store), real data files.

One project lives through a story: v1 promoted; the same data again is a no-op; an identical retrain is refused
as not better; corrupt and bad files change nothing; the data version comes back
from the remote; v2 is promoted and rolled back; a new, empty registry with unchanged data gets a champion again.
Each step is a module fixture that needs the step before it and records what its test looks at, so the
steps run in story order whichever test runs first (the suite runs in random order).
"""

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import FEATURES, MODEL_NAME
from tests.conftest import ROOT, STORY_CANDIDATES, project_copy, run_make, synthetic_housing

pytestmark = [pytest.mark.integration, pytest.mark.long]  # real processes throughout

MODEL = MODEL_NAME


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
    project.set_candidates(STORY_CANDIDATES)
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


@dataclass
class RetrainStep:
    """The project as a step left it: the step's `make` results and the registry, lock and data at that moment."""

    results: list[subprocess.CompletedProcess]
    champion: str | None
    versions: dict[str, Any]  # version -> ModelVersion, as it was then (stages and tags change later)
    lock: str
    data_md5: str | None
    decision: dict
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> subprocess.CompletedProcess:
        [result] = self.results
        return result


def observe(project: Project, *results: subprocess.CompletedProcess, **notes: Any) -> RetrainStep:
    """Record the project now."""
    try:
        champion: str | None = project.champion()
    except MlflowException:  # no champion (yet): the test says what it expected
        champion = None
    data = project.root / "data/housing.csv"
    lock = project.root / "dvc.lock"
    decision = project.root / "reports/decision.json"
    return RetrainStep(
        list(results), champion, project.versions(), lock.read_text() if lock.exists() else "",
        md5(data) if data.exists() else None, json.loads(decision.read_text()) if decision.exists() else {}, notes,
    )


def all_runs(project: Project) -> int:
    return len(project.client.search_runs([e.experiment_id for e in project.client.search_experiments()]))


@pytest.fixture(scope="module")
def v1(project: Project, datasets: dict[str, Path]) -> RetrainStep:
    """Step 1: the first data, into an empty registry."""
    result = project.retrain(datasets["v1"])
    return observe(
        project, result, locked_data_md5=project.locked_data_md5() if result.returncode == 0 else None,
        metrics=json.loads((project.root / "reports/metrics.json").read_text()) if result.returncode == 0 else {},
        cloud_status=project.dvc("status", "--cloud"),
    )


@pytest.fixture(scope="module")
def v1_again(v1: RetrainStep, project: Project, datasets: dict[str, Path]) -> RetrainStep:
    """Step 2: the same data again."""
    runs_before = all_runs(project)
    result = project.retrain(datasets["v1"])
    return observe(project, result, runs_before=runs_before, runs_after=all_runs(project))


@pytest.fixture(scope="module")
def identical(v1_again: RetrainStep, project: Project) -> RetrainStep:
    """Step 3: train runs again (another CV setting) on the same data: the same model, so not better."""
    lock_before = project.lock()
    project.set_cv_folds(2)  # train runs again; the fitted models are the same
    return observe(project, project.retrain(project.root / "data/housing.csv"), lock_before=lock_before)


@pytest.fixture(scope="module")
def corrupt(identical: RetrainStep, project: Project, datasets: dict[str, Path]) -> RetrainStep:
    """Step 4: corrupt data."""
    result = project.retrain(datasets["corrupt"])
    return observe(project, result, validation=json.loads((project.root / "reports/validation.json").read_text()))


def csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


# Bad files through the whole `make retrain`: refused at validation, with the reason, and everything restored. The
# validator's own tests (test_validate.py) name every kind of bad file in-process; here one empty and one truncated
# file show the refusal reaching the pipeline's output.
BAD_FILES = {  # kind: (make the file's text from good data, what the refusal must say)
    "empty file": (lambda f: "", "validate: file: data/housing.csv is empty"),
    "truncated file": (lambda f: csv(f)[: len(csv(f)) * 2 // 3], "validate: file: last line has no newline"),
}


@pytest.fixture(scope="module")
def bad_files(corrupt: RetrainStep, project: Project, datasets: dict[str, Path]) -> dict[str, RetrainStep]:
    """Step 5: every kind of bad file, one after the other."""
    steps = {}
    for kind, (make_text, _) in BAD_FILES.items():
        path = datasets["v1"].parent / f"{kind.replace(' ', '_')}.csv"
        path.write_text(make_text(synthetic_housing(1500, seed=3)))
        steps[kind] = observe(project, project.retrain(path))
    return steps


@pytest.fixture(scope="module")
def restored(bad_files: dict[str, RetrainStep], project: Project) -> RetrainStep:
    """Step 6: the data file and the local cache are lost; `dvc pull` brings the locked version back."""
    (project.root / "data/housing.csv").unlink()
    shutil.rmtree(project.root / ".dvc/cache")
    return observe(project, project.dvc("pull", "fetch"), locked_data_md5=project.locked_data_md5())


@pytest.fixture(scope="module")
def v2_rolled_back(restored: RetrainStep, project: Project, datasets: dict[str, Path]) -> list[RetrainStep]:
    """Step 7: new data is promoted, then rolled back, then rolled back again (nothing left to go back to)."""
    promoted = observe(project, project.retrain(datasets["v2"]), locked_data_md5=project.locked_data_md5())
    rollback = [
        observe(project, run_make(project.root, "rollback", MLFLOW_TRACKING_URI=project.tracking_uri))
        for _ in range(2)
    ]
    return [promoted, *rollback]


def test_first_retrain_registers_and_promotes_v1(v1: RetrainStep, project: Project, datasets: dict[str, Path]):
    result = v1.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert v1.champion == "1"
    version = v1.versions["1"]
    assert version.current_stage == "Production"
    assert version.tags["gate_decision"] == "passed"
    assert version.tags["promotion"] == "gate"
    assert version.tags["gate_check"] == "first_champion"
    assert float(version.tags["reference_rmse"]) > 0
    assert version.tags["data_md5"] == v1.notes["locked_data_md5"] == md5(datasets["v1"])
    assert version.tags["data_url"] == str(datasets["v1"])
    assert len(version.tags["git_commit"]) == 40
    assert v1.decision["decision"] == "promoted"
    assert "| holdout rmse |" in result.stdout and "| reference rmse |" in result.stdout
    assert "Decision: passed" in result.stdout
    assert "retrain summary" in result.stdout
    assert "  champion before  none\n" in result.stdout
    assert "  champion after   version 1 (promotion=gate)\n" in result.stdout
    assert f"mlflow ui --backend-store-uri {project.tracking_uri}; reports/decision.md" in result.stdout
    assert "retrain: 3/5 dvc push" in result.stderr and "train: candidate 2/2: gbdt" in result.stderr

    parent = project.client.get_run(v1.decision["challenger"]["run_id"]).data.tags["mlflow.parentRunId"]
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
    assert v1.notes["metrics"]["best"] == version.tags["candidate"]
    assert "files pushed" in result.stdout
    status = v1.notes["cloud_status"]
    assert "Cache and remote 'local' are in sync" in status.stdout, status.stdout + status.stderr


def test_second_retrain_with_nothing_changed_is_a_noop(v1_again: RetrainStep):
    result = v1_again.result
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("validate", "split", "train", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    assert "unchanged" in result.stdout  # fetch did look upstream
    assert set(v1_again.versions) == {"1"}
    assert v1_again.notes["runs_after"] == v1_again.notes["runs_before"]
    assert "decision         none: data, code and params unchanged, nothing retrained" in result.stdout


def test_an_identical_retrain_is_rejected_as_not_better(identical: RetrainStep):
    result = identical.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert identical.decision["decision"] == "rejected"
    assert identical.decision["check"] == "not_better"
    assert identical.versions["2"].tags["promotion"] == "rejected"
    assert identical.versions["2"].tags["gate_reason"].startswith("not better: holdout RMSE")
    assert identical.champion == "1"
    assert identical.versions["1"].current_stage == "Production"
    assert identical.lock == identical.notes["lock_before"]
    # Both measured on the trusted reference set too (a worse challenger is refused the same way: test_gate.py)
    reference = {side: identical.decision[side]["metrics"]["reference"]["rmse"] for side in ("challenger", "champion")}
    assert reference["challenger"] == pytest.approx(reference["champion"])
    assert "the gate rejected the challenger (reports/decision.md), champion unchanged" in result.stderr


def test_corrupt_data_is_rejected_and_nothing_changes(
    identical: RetrainStep, corrupt: RetrainStep, datasets: dict[str, Path]
):
    result = corrupt.result
    assert result.returncode != 0
    assert "validate: latitude: 5 values outside [32.5, 42.1], e.g. 51.5 (lines 2, 3, 4, ...)" in result.stderr
    assert "validate: population: 1 values are not finite numbers, e.g. ['n/a'] (line 12)" in result.stderr
    assert set(corrupt.versions) == {"1", "2"}
    assert corrupt.champion == "1"
    assert corrupt.lock == identical.lock
    assert corrupt.data_md5 == md5(datasets["v1"])
    assert corrupt.notes["validation"]["valid"] is False




@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_every_kind_of_bad_data_is_refused_with_its_reason(
    corrupt: RetrainStep, bad_files: dict[str, RetrainStep], datasets: dict[str, Path], kind: str
):
    step, refusal = bad_files[kind], BAD_FILES[kind][1]
    assert step.result.returncode != 0
    assert refusal in step.result.stderr, step.result.stderr
    assert "dvc.lock and data/ restored to the last good version" in step.result.stderr
    assert set(step.versions) == {"1", "2"}
    assert step.champion == "1"
    assert step.lock == corrupt.lock
    assert step.data_md5 == md5(datasets["v1"])


def test_previous_data_version_is_restorable_from_the_remote(restored: RetrainStep):
    assert restored.result.returncode == 0, restored.result.stderr
    assert restored.data_md5 == restored.notes["locked_data_md5"]


def test_new_data_promotes_a_new_champion_and_rollback_restores_the_old(
    v2_rolled_back: list[RetrainStep], datasets: dict[str, Path]
):
    promoted, rolled_back, nothing_left = v2_rolled_back
    assert promoted.result.returncode == 0, promoted.result.stdout + promoted.result.stderr
    assert promoted.champion == "3"
    assert promoted.versions["3"].tags["previous_champion"] == "1"
    assert promoted.versions["3"].tags["gate_check"] == "better"
    assert promoted.versions["1"].current_stage == "Archived"
    assert promoted.notes["locked_data_md5"] == md5(datasets["v2"])

    assert rolled_back.result.returncode == 0, rolled_back.result.stderr
    assert "moved from version 3 to version 1" in rolled_back.result.stdout
    assert rolled_back.champion == "1"
    assert rolled_back.versions["1"].current_stage == "Production"

    assert nothing_left.result.returncode != 0
    assert "version 1 has no 'previous_champion' tag" in nothing_left.result.stderr
    assert nothing_left.champion == "1"


def test_new_data_first_measures_the_serving_champion_on_every_labelled_row_of_the_upload(
    v2_rolled_back: list[RetrainStep], project: Project, datasets: dict[str, Path]
):
    promoted = v2_rolled_back[0]
    upload = pd.read_csv(datasets["v2"])
    with pytest.MonkeyPatch.context() as patch:  # what the champion of then (version 1) predicts on those rows
        patch.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
        predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(upload[list(FEATURES)])
    errors = np.asarray(predicted, dtype=float).ravel() - upload["median_house_value"].to_numpy()
    figures = promoted.decision["champion"]["upload"]
    assert figures["rows"] == len(upload) == 3000
    assert figures["rmse"] == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert figures["bias"] == pytest.approx(np.mean(errors))
    run = project.client.get_run(promoted.versions["3"].tags["parent_run_id"])
    assert run.data.metrics["champion_upload_rmse"] == pytest.approx(figures["rmse"])
    assert (f"The champion (version 1) on the upload's 3,000 labelled rows, before any retraining: RMSE "
            f"{figures['rmse']:,.2f}") in promoted.result.stdout + promoted.result.stderr


@pytest.fixture(scope="module")
def empty_registry(v2_rolled_back: list[RetrainStep], project: Project, datasets: dict[str, Path]) -> RetrainStep:
    """Last step: a new MLflow store, as after a wiped mlflow.db or a move to a new server, with unchanged data."""
    # (Deleting the file this process has open would leave MLflow's cached engine reading the old one.)
    # The step puts the project's registry back afterwards: the other tests look at the first one, in any order.
    first_uri, first_client = project.tracking_uri, project.client
    project.tracking_uri = f"sqlite:///{project.root / 'mlflow-new.db'}"
    project.client = MlflowClient(project.tracking_uri, project.tracking_uri)
    try:
        return observe(project, project.retrain(datasets["v2"]), locked_data_md5=project.locked_data_md5())
    finally:
        project.tracking_uri, project.client = first_uri, first_client


def test_an_empty_registry_with_unchanged_data_retrains_and_leaves_a_champion(
    empty_registry: RetrainStep, datasets: dict[str, Path]
):
    result = empty_registry.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"has no {MODEL}@champion for dvc.lock's data (md5 {md5(datasets['v2'])}): retraining" in result.stdout
    assert "Running stage 'train'" in result.stdout
    assert empty_registry.champion == "1"
    assert empty_registry.versions["1"].tags["data_md5"] == empty_registry.notes["locked_data_md5"] \
        == md5(datasets["v2"])
