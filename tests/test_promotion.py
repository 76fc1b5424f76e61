"""Safe promotion end to end: the retrain job's own steps against real services.

moto (S3: uploads and the DVC remote), an MLflow server with MLflow's basic-auth app (scripts/services.sh: a writer
account for retraining, a read-only one for serving), real DVC, and git with a bare repository standing in for
GitHub. Each job is .github/workflows/retrain.yml's `run:` steps in a checkout (tests/actions_runner.py).

One registry and one origin live through a story: v1 promoted; the accounts can do what their role allows and no
more; a job from a stale checkout promotes v2 and publishes dvc.lock without a conflict; an upload with halved labels
is refused on the reference set; the same data again retrains nothing; a failed `dvc push` changes nothing; a person
approves the refused version, and an approval without a reason or of an unknown version is refused. After each, the
remote's dvc.lock describes exactly the data behind the champion. Each step is a module fixture that needs the step
before it and records what its test looks at, so the steps run in story order whichever test runs first (the suite
runs in random order).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import MODEL_NAME, TARGET
from tests.actions_runner import ActionsRunner, Job
from tests.conftest import STORY_CANDIDATES, clean_environment, run_make, seeded_origin, synthetic_housing
from tests.fake_github import Dispatch
from tests.registry import promotion_keys
from tests.servers import ROOT
from tests.services import LocalServices

pytestmark = [pytest.mark.integration, pytest.mark.long]  # a real MLflow server with basic auth, moto, DVC and git

MODEL = MODEL_NAME
BRANCH = "main"
FAST_TRAINING = {"cv_folds": 0, "candidates": STORY_CANDIDATES}
LOOSE_BARS = {"max_rmse": 200_000, "min_r2": -1.0}


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
            secrets={"MODEL_SIGNING_KEY": promotion_keys()[0].read_text(),
                     **{name: value for name, value in self.services.account("writer").items()
                        if name != "MLFLOW_TRACKING_URI"}},
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
    origin = seeded_origin(tmp_path_factory, FAST_TRAINING, LOOSE_BARS, BRANCH)
    return Pipeline(services, origin, tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="module")
def datasets() -> dict[str, pd.DataFrame]:
    v1 = synthetic_housing(1500, seed=0)
    v2 = pd.concat([v1, synthetic_housing(1500, seed=1)], ignore_index=True)
    halved = v2.assign(**{TARGET: (v2[TARGET] * 0.5).round()})  # wrong labels, every one inside the valid range
    v4 = pd.concat([v2, synthetic_housing(800, seed=4)], ignore_index=True)
    return {"v1": v1, "v2": v2, "halved": halved, "v4": v4}


@dataclass
class PromotionStep:
    """The story as a step left it: the step's job or `make` results, and the registry and the remote right after."""

    job: Job | None
    results: list[subprocess.CompletedProcess]
    champion: Any  # the ModelVersion behind @champion then (None if there was none); its tags change later
    challenger: Any  # the ModelVersion the job's decision judged, as it was then (None if it judged none)
    decision: dict  # the job's reports/decision.json ({} if it wrote none)
    published_data_md5: str | None  # the data version in dvc.lock on the remote branch (None if none is published)
    origin_commits: list[str]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> subprocess.CompletedProcess:
        [result] = self.results
        return result


def observe(pipeline: Pipeline, job: Job | None = None, *results: subprocess.CompletedProcess,
            **notes: Any) -> PromotionStep:
    """Record the registry and the remote now, with what the step ran."""
    try:
        champion = pipeline.champion()
    except MlflowException:  # no champion (yet): the test says what it expected
        champion = None
    report = job.workspace / "reports/decision.json" if job is not None else None
    decision = json.loads(report.read_text()) if report is not None and report.exists() else {}
    judged = (decision.get("challenger") or {}).get("version")
    try:
        published: str | None = pipeline.published_data_md5()
    except subprocess.CalledProcessError:  # no dvc.lock on the branch (yet)
        published = None
    return PromotionStep(job, list(results), champion, pipeline.version(str(judged)) if judged else None, decision,
                         published, pipeline.origin_commits(), notes)


def locked_data_md5(workspace: Path) -> str:
    """The data version in a checkout's own dvc.lock."""
    return yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]["fetch"]["outs"][0]["md5"]


def retrain_commit(pipeline: Pipeline, key: str) -> str:
    """The message of the commit a job publishes dvc.lock with, for the upload at `key`."""
    return f"retrain: dvc.lock for s3://{pipeline.services.data_bucket}/{key}"


def basic_auth(services: LocalServices, role: str) -> tuple[str, str]:
    account = services.account(role)
    return account["MLFLOW_TRACKING_USERNAME"], account["MLFLOW_TRACKING_PASSWORD"]


@pytest.fixture(scope="module")
def stale_checkout(pipeline: Pipeline) -> Path:
    """A job dispatched now that waits in the concurrency group while other jobs publish: its checkout goes stale."""
    return pipeline.clone("stale")


@pytest.fixture(scope="module")
def first(stale_checkout: Path, pipeline: Pipeline, datasets: dict[str, pd.DataFrame]) -> PromotionStep:
    """Step 1: the first upload, into an empty registry (the stale job was dispatched just before it)."""
    key, data_md5 = pipeline.upload("v1", datasets["v1"])
    job = pipeline.run_job(pipeline.clone("first"), key)
    return observe(pipeline, job, key=key, data_md5=data_md5)


@pytest.fixture(scope="module")
def permissions(first: PromotionStep, services: LocalServices) -> dict[str, int]:
    """Step 2: nobody, serving's read-only account and the writer each try to read and to change the registry.

    The writer's probe alias is deleted again, so the story goes on with the registry as step 1 left it.
    """
    api = f"{services.mlflow_url}/api/2.0/mlflow"
    reader, writer = basic_auth(services, "reader"), basic_auth(services, "writer")
    alias = {"name": MODEL, "alias": "probe", "version": "1"}
    version = {"name": MODEL, "source": "s3://housing-mlflow/anything"}
    return {
        "anonymous reads the model": httpx.get(f"{api}/registered-models/get", params={"name": MODEL},
                                               timeout=10).status_code,
        "reader reads the champion": httpx.get(f"{api}/registered-models/alias",
                                               params={"name": MODEL, "alias": "champion"}, auth=reader,
                                               timeout=10).status_code,
        "reader sets an alias": httpx.post(f"{api}/registered-models/alias", json=alias, auth=reader,
                                           timeout=10).status_code,
        "reader registers a version": httpx.post(f"{api}/model-versions/create", json=version, auth=reader,
                                                 timeout=10).status_code,
        "writer sets an alias": httpx.post(f"{api}/registered-models/alias", json=alias, auth=writer,
                                           timeout=10).status_code,
        "writer deletes it": httpx.request("DELETE", f"{api}/registered-models/alias",
                                           json={"name": MODEL, "alias": "probe"}, auth=writer,
                                           timeout=10).status_code,
    }


@pytest.fixture(scope="module")
def stale(permissions: dict[str, int], stale_checkout: Path, pipeline: Pipeline,
          datasets: dict[str, pd.DataFrame]) -> PromotionStep:
    """Step 3: the job dispatched before step 1 runs now, from its stale checkout, on new data."""
    had_lock = (stale_checkout / "dvc.lock").exists()
    key, data_md5 = pipeline.upload("v2", datasets["v2"])
    job = pipeline.run_job(stale_checkout, key)
    return observe(pipeline, job, key=key, data_md5=data_md5, checkout_had_lock=had_lock)


@pytest.fixture(scope="module")
def halved(stale: PromotionStep, pipeline: Pipeline, datasets: dict[str, pd.DataFrame]) -> PromotionStep:
    """Step 4: the v2 data with every label halved."""
    key, _ = pipeline.upload("halved", datasets["halved"])
    return observe(pipeline, pipeline.run_job(pipeline.clone("halved"), key))


@pytest.fixture(scope="module")
def again(halved: PromotionStep, pipeline: Pipeline, datasets: dict[str, pd.DataFrame]) -> PromotionStep:
    """Step 5: the v2 data uploaded again under another key."""
    key, _ = pipeline.upload("v2-again", datasets["v2"])
    return observe(pipeline, pipeline.run_job(pipeline.clone("again"), key))


@pytest.fixture(scope="module")
def push_fails(again: PromotionStep, pipeline: Pipeline, datasets: dict[str, pd.DataFrame]) -> PromotionStep:
    """Step 6: new, good data, with a DVC remote that does not exist."""
    key, _ = pipeline.upload("v4", datasets["v4"])
    job = pipeline.run_job(pipeline.clone("push-fails"), key, S3_DVC_BUCKET="no-such-bucket")
    return observe(pipeline, job, checkout_data_md5=locked_data_md5(job.workspace))


@pytest.fixture(scope="module")
def approved(push_fails: PromotionStep, halved: PromotionStep, pipeline: Pipeline) -> PromotionStep:
    """Step 7: a person approves the version the gate refused in step 4, with a reason."""
    refused = halved.challenger.version
    workspace = pipeline.clone("approve")
    env = {**pipeline.services.account("writer"), "PROMOTED_BY": "analyst@example.com",
           "MODEL_SIGNING_KEY": str(promotion_keys()[0])}
    result = run_make(workspace, "promote", f"VERSION={refused}", "REASON=prices really halved", **env)
    return observe(pipeline, None, result, refused=refused, workspace=workspace,
                   checkout_data_md5=locked_data_md5(workspace))


@pytest.fixture(scope="module")
def refused_approvals(approved: PromotionStep, pipeline: Pipeline) -> PromotionStep:
    """Step 8: approvals without a reason, and of a version that does not exist."""
    workspace, env = approved.notes["workspace"], pipeline.services.account("writer")
    no_reason = run_make(workspace, "promote", "VERSION=2", "REASON=", **env)
    unknown = run_make(workspace, "promote", "VERSION=99", "REASON=because", **env)
    return observe(pipeline, None, no_reason, unknown)


def test_the_registry_refuses_anonymous_requests(permissions: dict[str, int]):
    assert permissions["anonymous reads the model"] == 401


def test_the_first_upload_is_promoted_and_its_data_version_published(first: PromotionStep, pipeline: Pipeline):
    job = first.job
    assert job.succeeded, job.log()
    assert first.champion.version == "1"
    assert first.champion.tags["promotion"] == "gate"
    assert first.champion.tags["data_md5"] == first.notes["data_md5"] == first.published_data_md5
    assert first.champion.tags["data_s3_etag"] == job.inputs["s3_etag"]
    assert f"pin_upload: training s3://{pipeline.services.data_bucket}/{first.notes['key']} pinned at etag" \
        in job.output("Pin the upload")
    assert first.origin_commits[0] == retrain_commit(pipeline, first.notes["key"])


def test_servings_account_can_read_but_not_register_or_move_the_alias_and_the_writer_can(
        permissions: dict[str, int]):
    assert {what: status for what, status in permissions.items() if what != "anonymous reads the model"} == {
        "reader reads the champion": 200,
        "reader sets an alias": 403,
        "reader registers a version": 403,
        "writer sets an alias": 200,
        "writer deletes it": 200,
    }


def test_a_job_from_a_stale_checkout_trains_on_the_branch_tip_and_publishes_without_conflict(
        first: PromotionStep, stale: PromotionStep, pipeline: Pipeline):
    assert not stale.notes["checkout_had_lock"]  # dispatched before the first job published its dvc.lock
    job = stale.job
    assert job.succeeded, job.log()
    assert "commit(s) after the dispatched" in job.output("Newest branch tip")
    assert stale.champion.version == "2"
    assert stale.champion.tags["previous_champion"] == "1"
    assert stale.champion.tags["data_md5"] == stale.notes["data_md5"] == stale.published_data_md5
    assert stale.origin_commits[:2] == [retrain_commit(pipeline, stale.notes["key"]),
                                        retrain_commit(pipeline, first.notes["key"])]


def test_an_upload_with_halved_labels_is_refused_on_the_reference_set(
        stale: PromotionStep, halved: PromotionStep, report_figure):
    job, decision = halved.job, halved.decision
    assert job.succeeded, job.log()  # a refusal is a decision, not a failure
    assert decision["decision"] == "rejected"
    assert decision["check"] == "reference_rmse"
    assert decision["reason"].startswith("reference set: RMSE")
    challenger, champion = (decision[side]["metrics"] for side in ("challenger", "champion"))
    assert challenger["holdout"]["rmse"] < champion["holdout"]["rmse"]  # on the upload's own holdout it "wins"
    assert challenger["reference"]["rmse"] > 2 * champion["reference"]["rmse"]
    assert decision["prediction_shift"] > 0.4
    assert halved.challenger.tags["promotion"] == "rejected"
    assert halved.challenger.tags["gate_check"] == "reference_rmse"
    assert halved.champion.version == "2"
    assert halved.published_data_md5 == stale.published_data_md5 == halved.champion.tags["data_md5"]
    assert "publish_lock: dvc.lock unchanged" in job.output("Commit dvc.lock")
    report_figure(f"halved labels: reference RMSE challenger {challenger['reference']['rmse']:,.0f} vs champion "
                  f"{champion['reference']['rmse']:,.0f}; holdout (from the upload) "
                  f"{challenger['holdout']['rmse']:,.0f} vs {champion['holdout']['rmse']:,.0f}; prediction shift "
                  f"{decision['prediction_shift']:.1%}")


def test_the_same_data_again_retrains_nothing_and_keeps_the_champion(again: PromotionStep):
    job = again.job
    assert job.succeeded, job.log()
    assert "decision         none: data, code and params unchanged" in job.output("Retrain")
    assert again.champion.version == "2"


def test_a_failed_dvc_push_leaves_the_champion_and_dvc_lock_unchanged(again: PromotionStep, push_fails: PromotionStep):
    job = push_fails.job
    assert not job.succeeded
    assert job.steps["Retrain"].returncode != 0
    assert "Commit dvc.lock" not in job.steps
    output = job.output("Retrain")
    assert "retrain: dvc push to remote 's3remote' failed (see above), so nothing was promoted and the champion is " \
           "unchanged; dvc.lock and data/ restored to the last good version" in output
    assert "retrain: fix the remote (credentials, bucket, network: dvc push --remote s3remote -v)" in output
    assert push_fails.decision["decision"] == "passed"  # the gate passed it; the order kept it from production
    assert "promotion" not in push_fails.challenger.tags
    assert push_fails.champion.version == "2"
    assert push_fails.published_data_md5 == again.published_data_md5
    assert push_fails.origin_commits == again.origin_commits
    assert push_fails.notes["checkout_data_md5"] == again.published_data_md5


def test_a_person_can_approve_a_refused_version_and_the_registry_records_it(approved: PromotionStep):
    result = approved.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert approved.champion.version == approved.notes["refused"]
    assert approved.champion.tags["promotion"] == "human"
    assert approved.champion.tags["approved_by"] == "analyst@example.com"
    assert approved.champion.tags["approval_reason"] == "prices really halved"
    assert approved.champion.tags["previous_champion"] == "2"
    assert approved.notes["checkout_data_md5"] == approved.champion.tags["data_md5"]


def test_an_approval_needs_a_reason_and_a_judged_version(approved: PromotionStep, refused_approvals: PromotionStep):
    no_reason, unknown = refused_approvals.results
    assert no_reason.returncode != 0
    assert 'promote: refused: an approval needs a reason: make promote VERSION=n REASON="why' in no_reason.stderr
    assert unknown.returncode != 0
    assert f"promote: refused: {MODEL} has no version '99'" in unknown.stderr
    assert refused_approvals.champion.version == approved.champion.version  # a refused approval changes nothing
