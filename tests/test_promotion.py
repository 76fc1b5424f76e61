"""Safe promotion end to end: the retrain job's own steps against real services.

moto (S3: uploads and the DVC remote), an MLflow server with MLflow's basic-auth app (scripts/services.sh: a writer
account for retraining, a read-only one for serving), real DVC, and git with a bare repository standing in for
GitHub. Each job is .github/workflows/retrain.yml's `run:` steps in a checkout (tests/actions_runner.py).

The tests run in order, each on the state the previous one left: v1 promoted; a job from a stale checkout
promotes v2 and publishes dvc.lock without a conflict; an upload with halved labels is refused on the reference
set; the same data again retrains nothing; a failed `dvc push` changes nothing; a person approves a refused version.
After each, the remote's dvc.lock describes exactly the data behind the champion.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from features import TARGET
from tests.actions_runner import ActionsRunner, Job
from tests.conftest import clean_environment, project_copy, run_make, synthetic_housing
from tests.fake_github import Dispatch
from tests.servers import ROOT
from tests.services import LocalServices

pytestmark = pytest.mark.integration  # a real MLflow server with basic auth, moto, DVC and git
STORY_IN_FILE_ORDER = True  # the steps build on each other (tests/conftest.py); to become chained fixtures

MODEL = "California_Housing_Regression"
BRANCH = "main"
FAST_TRAINING = {
    "cv_folds": 0,
    "candidates": {
        "ridge": {"model": "ridge", "features": {"neighbours": [], "encoding": "onehot"}, "params": {"alpha": 1.0}},
        "gbdt": {"model": "hist_gradient_boosting", "features": {"neighbours": [8], "folds": 3},
                 "params": {"max_iter": 60, "learning_rate": 0.15, "random_state": 0}},
    },
}
LOOSE_BARS = {"max_rmse": 200_000, "min_r2": -1.0}
GIT_USER = ["-c", "user.name=test", "-c", "user.email=test@example.com"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Pipeline:
    """The origin repository, the services and a way to run the retrain job in any checkout."""

    def __init__(self, services: LocalServices, origin: Path, workdir: Path) -> None:
        self.services = services
        self.origin = origin
        self.workdir = workdir
        self.s3 = services.client("s3")
        self.jobs = 0

    def registry(self) -> MlflowClient:
        return MlflowClient(self.services.mlflow_url, self.services.mlflow_url)

    def clone(self, name: str) -> Path:
        """actions/checkout of the dispatched commit: the branch tip at the time of the dispatch."""
        workspace = self.workdir / name
        subprocess.run(["git", "clone", "-q", "--branch", BRANCH, str(self.origin), str(workspace)], check=True)
        return workspace

    def upload(self, name: str, frame: pd.DataFrame) -> tuple[str, str]:
        key = f"data/{name}/housing.csv"
        body = frame.to_csv(index=False).encode()
        self.s3.put_object(Bucket=self.services.data_bucket, Key=key, Body=body)
        return key, md5(body)

    def run_job(self, workspace: Path, key: str, **variables: str) -> Job:
        self.jobs += 1
        runner = ActionsRunner(
            self.origin,
            self.workdir,
            machine_env={**clean_environment(), **self.services.aws_env(), "VENV": str(ROOT / ".venv")},
            variables={"AWS_REGION": "us-east-1", "S3_DVC_BUCKET": self.services.dvc_bucket,
                       "MLFLOW_TRACKING_URI": self.services.mlflow_url, "MODEL_NAME": MODEL, **variables},
            secrets={name: value for name, value in self.services.account("writer").items()
                     if name != "MLFLOW_TRACKING_URI"},
        )
        head = self.s3.head_object(Bucket=self.services.data_bucket, Key=key)
        inputs = {"s3_bucket": self.services.data_bucket, "s3_key": key, "s3_etag": head["ETag"].strip('"')}
        job = runner.run_job(Dispatch("retrain.yml", f"refs/heads/{BRANCH}", inputs, {}), BRANCH, workspace)
        (self.workdir / f"job-{self.jobs}.log").write_text(job.log())
        return job

    def champion(self) -> Any:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in self.services.account("writer").items():
                patch.setenv(name, value)
            return self.registry().get_model_version_by_alias(MODEL, "champion")

    def version(self, number: str) -> Any:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in self.services.account("writer").items():
                patch.setenv(name, value)
            return self.registry().get_model_version(MODEL, number)

    def published_data_md5(self) -> str:
        """The data version in dvc.lock on the remote branch."""
        lock = yaml.safe_load(git(self.origin, "show", f"{BRANCH}:dvc.lock"))
        return lock["stages"]["fetch"]["outs"][0]["md5"]

    def origin_commits(self) -> list[str]:
        return git(self.origin, "log", "--format=%s", BRANCH).splitlines()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with LocalServices.on_free_ports(tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture(scope="module")
def pipeline(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    seed = project_copy(tmp_path_factory.mktemp("seed"))
    params = yaml.safe_load((seed / "params.yaml").read_text())
    params["train"].update(FAST_TRAINING)
    params["gate"].update(LOOSE_BARS)
    (seed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Each module gets its own folder: basetemp is shared by the whole session, and a name there would collide.
    trusted = tmp_path_factory.mktemp("reference-source") / "trusted.csv"
    synthetic_housing(4000, seed=9).to_csv(trusted, index=False)
    result = run_make(seed, "reference", f"SOURCE={trusted}")
    assert result.returncode == 0, result.stderr
    git(seed, *GIT_USER, "commit", "-qam", "fast training params, synthetic reference set")
    git(seed, "branch", "-M", BRANCH)
    origin = tmp_path_factory.mktemp("origin") / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(origin)], check=True)
    return Pipeline(services, origin, tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="module")
def stale_checkout(pipeline: Pipeline) -> Path:
    """A job dispatched now that waits in the concurrency group while other jobs publish: its checkout goes stale."""
    return pipeline.clone("stale")


@pytest.fixture(scope="module")
def datasets() -> dict[str, pd.DataFrame]:
    v1 = synthetic_housing(1500, seed=0)
    v2 = pd.concat([v1, synthetic_housing(1500, seed=1)], ignore_index=True)
    halved = v2.assign(**{TARGET: (v2[TARGET] * 0.5).round()})  # wrong labels, every one inside the valid range
    v4 = pd.concat([v2, synthetic_housing(800, seed=4)], ignore_index=True)
    return {"v1": v1, "v2": v2, "halved": halved, "v4": v4}


def test_the_registry_refuses_anonymous_requests(services):
    response = httpx.get(f"{services.mlflow_url}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                         timeout=10)
    assert response.status_code == 401


def test_the_first_upload_is_promoted_and_its_data_version_published(pipeline, datasets, stale_checkout):
    key, data_md5 = pipeline.upload("v1", datasets["v1"])
    job = pipeline.run_job(pipeline.clone("first"), key)
    assert job.succeeded, job.log()
    champion = pipeline.champion()
    assert champion.version == "1"
    assert champion.tags["promotion"] == "gate"
    assert champion.tags["data_md5"] == data_md5 == pipeline.published_data_md5()
    assert champion.tags["data_s3_etag"] == job.inputs["s3_etag"]
    assert f"pin_upload: training s3://{pipeline.services.data_bucket}/{key} pinned at etag" in job.output(
        "Pin the upload")
    assert pipeline.origin_commits()[0] == f"retrain: dvc.lock for s3://{pipeline.services.data_bucket}/{key}"


def basic_auth(services: LocalServices, role: str) -> tuple[str, str]:
    account = services.account(role)
    return account["MLFLOW_TRACKING_USERNAME"], account["MLFLOW_TRACKING_PASSWORD"]


def test_servings_account_can_read_but_not_register_or_move_the_alias_and_the_writer_can(services):
    api = f"{services.mlflow_url}/api/2.0/mlflow"
    reader, writer = basic_auth(services, "reader"), basic_auth(services, "writer")
    assert httpx.get(f"{api}/registered-models/alias", params={"name": MODEL, "alias": "champion"}, auth=reader,
                     timeout=10).status_code == 200
    alias = {"name": MODEL, "alias": "probe", "version": "1"}
    assert httpx.post(f"{api}/registered-models/alias", json=alias, auth=reader, timeout=10).status_code == 403
    version = {"name": MODEL, "source": "s3://housing-mlflow/anything"}
    assert httpx.post(f"{api}/model-versions/create", json=version, auth=reader, timeout=10).status_code == 403
    assert httpx.post(f"{api}/registered-models/alias", json=alias, auth=writer, timeout=10).status_code == 200
    assert httpx.request("DELETE", f"{api}/registered-models/alias", json={"name": MODEL, "alias": "probe"},
                         auth=writer, timeout=10).status_code == 200


def test_a_job_from_a_stale_checkout_trains_on_the_branch_tip_and_publishes_without_conflict(
        pipeline, datasets, stale_checkout):
    assert not (stale_checkout / "dvc.lock").exists()  # dispatched before the first job published its dvc.lock
    key, data_md5 = pipeline.upload("v2", datasets["v2"])
    job = pipeline.run_job(stale_checkout, key)
    assert job.succeeded, job.log()
    assert "commit(s) after the dispatched" in job.output("Newest branch tip")
    champion = pipeline.champion()
    assert champion.version == "2"
    assert champion.tags["previous_champion"] == "1"
    assert champion.tags["data_md5"] == data_md5 == pipeline.published_data_md5()
    assert pipeline.origin_commits()[:2] == [f"retrain: dvc.lock for s3://{pipeline.services.data_bucket}/{key}",
                                            f"retrain: dvc.lock for s3://{pipeline.services.data_bucket}/data/v1/"
                                            f"housing.csv"]


def test_an_upload_with_halved_labels_is_refused_on_the_reference_set(pipeline, datasets, capsys):
    published = pipeline.published_data_md5()
    key, _ = pipeline.upload("halved", datasets["halved"])
    job = pipeline.run_job(pipeline.clone("halved"), key)
    assert job.succeeded, job.log()  # a refusal is a decision, not a failure
    decision = json.loads((job.workspace / "reports/decision.json").read_text())
    assert decision["decision"] == "rejected"
    assert decision["check"] == "reference_rmse"
    assert decision["reason"].startswith("reference set: RMSE")
    challenger, champion = (decision[side]["metrics"] for side in ("challenger", "champion"))
    assert challenger["holdout"]["rmse"] < champion["holdout"]["rmse"]  # on the upload's own holdout it "wins"
    assert challenger["reference"]["rmse"] > 2 * champion["reference"]["rmse"]
    assert decision["prediction_shift"] > 0.4
    assert pipeline.version(decision["challenger"]["version"]).tags["promotion"] == "rejected"
    assert pipeline.champion().version == "2"
    assert pipeline.published_data_md5() == published == pipeline.champion().tags["data_md5"]
    assert "publish_lock: dvc.lock unchanged" in job.output("Commit dvc.lock")
    with capsys.disabled():
        print(f"\nhalved labels: reference RMSE challenger {challenger['reference']['rmse']:,.0f} vs champion "
              f"{champion['reference']['rmse']:,.0f}; holdout (from the upload) {challenger['holdout']['rmse']:,.0f} "
              f"vs {champion['holdout']['rmse']:,.0f}; prediction shift {decision['prediction_shift']:.1%}")


def test_the_same_data_again_retrains_nothing_and_keeps_the_champion(pipeline, datasets):
    key, _ = pipeline.upload("v2-again", datasets["v2"])
    job = pipeline.run_job(pipeline.clone("again"), key)
    assert job.succeeded, job.log()
    assert "decision         none: data, code and params unchanged" in job.output("Retrain")
    assert pipeline.champion().version == "2"


def test_a_failed_dvc_push_leaves_the_champion_and_dvc_lock_unchanged(pipeline, datasets):
    published, commits = pipeline.published_data_md5(), pipeline.origin_commits()
    key, _ = pipeline.upload("v4", datasets["v4"])
    job = pipeline.run_job(pipeline.clone("push-fails"), key, S3_DVC_BUCKET="no-such-bucket")
    assert not job.succeeded
    assert job.steps["Retrain"].returncode != 0
    assert "Commit dvc.lock" not in job.steps
    output = job.output("Retrain")
    assert "retrain: dvc push to remote 's3remote' failed (see above), so nothing was promoted and the champion is " \
           "unchanged; dvc.lock and data/ restored to the last good version" in output
    assert "retrain: fix the remote (credentials, bucket, network: dvc push --remote s3remote -v)" in output
    decision = json.loads((job.workspace / "reports/decision.json").read_text())
    assert decision["decision"] == "passed"  # the gate passed it; the order kept it from production
    assert "promotion" not in pipeline.version(decision["challenger"]["version"]).tags
    assert pipeline.champion().version == "2"
    assert pipeline.published_data_md5() == published and pipeline.origin_commits() == commits
    assert yaml.safe_load((job.workspace / "dvc.lock").read_text())["stages"]["fetch"]["outs"][0]["md5"] == published


def test_a_person_can_approve_a_refused_version_and_the_registry_records_it(pipeline, datasets):
    refused = next(v for v in ("3", "4") if pipeline.version(v).tags.get("gate_check") == "reference_rmse")
    workspace = pipeline.clone("approve")
    env = {**pipeline.services.account("writer"), "PROMOTED_BY": "analyst@example.com"}
    result = run_make(workspace, "promote", f"VERSION={refused}", "REASON=prices really halved", **env)
    assert result.returncode == 0, result.stdout + result.stderr
    champion = pipeline.champion()
    assert champion.version == refused
    assert champion.tags["promotion"] == "human"
    assert champion.tags["approved_by"] == "analyst@example.com"
    assert champion.tags["approval_reason"] == "prices really halved"
    assert champion.tags["previous_champion"] == "2"
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["fetch"]["outs"][0]["md5"] == champion.tags["data_md5"]


def test_an_approval_needs_a_reason_and_a_judged_version(pipeline):
    workspace = pipeline.workdir / "approve"
    env = pipeline.services.account("writer")
    result = run_make(workspace, "promote", "VERSION=2", "REASON=", **env)
    assert result.returncode != 0
    assert 'promote: refused: an approval needs a reason: make promote VERSION=n REASON="why' in result.stderr
    result = run_make(workspace, "promote", "VERSION=99", "REASON=because", **env)
    assert result.returncode != 0
    assert f"promote: refused: {MODEL} has no version '99'" in result.stderr
