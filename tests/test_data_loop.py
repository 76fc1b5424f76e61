"""The data loop end to end, every part a real process on 127.0.0.1.

moto (S3 + Secrets Manager) and an MLflow server with its artifacts in S3 (scripts/services.sh), the serving app
(serve.py, polling the registry every second), and a strict fake of GitHub's workflow-dispatch API whose accepted
dispatches start the retrain job of .github/workflows/retrain.yml the way a runner would: a fresh clone of the
repository, then the job's own `run:` steps (make retrain, commit dvc.lock, reload the app).

A CSV uploaded to S3 becomes an EventBridge "Object Created" event for dispatch_lambda.handler, which dispatches
the workflow. The story has five steps, each on the state the previous one left: v1 promoted and served; v2
promoted and hot-reloaded under load; corrupt data fails the job; data that yields a worse model is refused by the
gate; an event delivered twice retrains once. Each step is a module fixture that needs the step before it and
records what its test looks at, so the steps run in story order whichever test runs first (the suite runs in
random order).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

import dispatch_lambda
from names import MODEL_NAME, TARGET
from scripts.split import holdout_mask
from serving.schema import EXAMPLE_RECORD
from tests.actions_runner import RETRAIN_TIMEOUT_S, WORKFLOW, ActionsRunner, Job
from tests.conftest import STORY_CANDIDATES, clean_environment, seeded_origin, synthetic_housing
from tests.fake_github import FakeGitHub
from tests.registry import promotion_keys
from tests.servers import ROOT, ServerProcess, running_app, serve_environment, wait_for
from tests.services import LocalServices

pytestmark = [pytest.mark.integration, pytest.mark.long]  # real processes throughout

log = logging.getLogger(__name__)

MODEL = MODEL_NAME
BRANCH = "main"
KEY_PREFIX = "data/"  # the stack's DataKeyPrefix (infra/housing-mlops.yml)
GITHUB_TOKEN = "ghp_" + "L00p" * 9
RELOAD_TOKEN = "reload-" + uuid.uuid4().hex
# Small models and no cross-validation: each retrain takes seconds. The absolute bars are loose so that the
# comparison with the champion on the same holdout rows is what decides.
FAST_TRAINING = {"cv_folds": 0, "candidates": STORY_CANDIDATES}
LOOSE_GATE = {"max_rmse": 200_000, "min_r2": -1.0}
RECORD = {**EXAMPLE_RECORD, "total_bedrooms": None}  # the example district, without its optional field


# --- the loop's parts ------------------------------------------------------------------------------------------


class PredictionClient(threading.Thread):
    """Sends /predict continually until stopped; keeps the model version of every answer, or why it failed."""

    def __init__(self, url: str) -> None:
        super().__init__(name="prediction-client", daemon=True)
        self.url = url
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._halt.is_set():
                self._predict(client)
                self._halt.wait(0.01)  # pacing, about 50 requests a second

    def _predict(self, client: httpx.Client) -> None:
        try:
            response = client.post("/predict", json=RECORD)
        except httpx.HTTPError as error:
            self.failures.append(repr(error))
            return
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code == 200 and isinstance(body.get("prediction"), float):
            self.versions.append(str(body["model"]["version"]))
        else:
            self.failures.append(f"{response.status_code}: {response.text[:300]}")

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class DataLoop:
    services: LocalServices
    app: ServerProcess
    runner: ActionsRunner
    github: FakeGitHub
    origin: Path
    s3: Any = field(init=False)
    registry: MlflowClient = field(init=False)

    def __post_init__(self) -> None:
        self.s3 = self.services.client("s3")
        self.registry = MlflowClient(self.services.mlflow_url, self.services.mlflow_url)

    def upload(self, name: str, frame: pd.DataFrame) -> str:
        """PUT `frame` as CSV at data/<name>/housing.csv in the data bucket; return the key."""
        key = f"{KEY_PREFIX}{name}/housing.csv"
        self.s3.put_object(Bucket=self.services.data_bucket, Key=key, Body=frame.to_csv(index=False).encode())
        return key

    def deliver(self, key: str) -> int:
        """Invoke the dispatch Lambda with the EventBridge event S3 sends for the object at `key`."""
        return dispatch_lambda.handler(self.object_created_event(key), None)

    def object_created_event(self, key: str) -> dict:
        bucket = self.services.data_bucket
        head = self.s3.head_object(Bucket=bucket, Key=key)
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Object Created",
            "source": "aws.s3",
            "account": "123456789012",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "region": "us-east-1",
            "resources": [f"arn:aws:s3:::{bucket}"],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {
                    "key": urllib.parse.quote_plus(key, safe="/"),
                    "size": head["ContentLength"],
                    "etag": head["ETag"].strip('"'),
                    "sequencer": uuid.uuid4().hex[:18].upper(),
                },
                "request-id": uuid.uuid4().hex[:16].upper(),
                "requester": "123456789012",
                "source-ip-address": "127.0.0.1",
                "reason": "PutObject",
            },
        }

    def etag(self, key: str) -> str:
        return self.s3.head_object(Bucket=self.services.data_bucket, Key=key)["ETag"].strip('"')

    def champion(self) -> str:
        return str(self.registry.get_model_version_by_alias(MODEL, "champion").version)

    def versions(self) -> dict[str, ModelVersion]:
        return {str(v.version): v for v in self.registry.search_model_versions(f"name='{MODEL}'")}

    def training_runs(self, key: str) -> int:
        """How many retrain runs (parent runs, tagged with their DATA_URL) trained on the object at `key`."""
        experiments = [e.experiment_id for e in self.registry.search_experiments()]
        data_url = f"s3://{self.services.data_bucket}/{key}"
        return len(self.registry.search_runs(experiments, f"tags.data_url = '{data_url}'"))

    def served(self) -> dict:
        response = httpx.get(f"{self.app.url}/model", timeout=5)
        return response.json() if response.status_code == 200 else {}

    def wait_until_served(self, version: str, timeout_s: float = 60, job: int | None = None) -> dict:
        """The app's /model once it shows `version`; fails at once if retrain job number `job` ends without it."""

        def serving() -> dict:
            model = self.served()
            if model.get("version") == version:
                return model
            if job is not None and len(self.runner.jobs) >= job:
                finished = self.runner.jobs[job - 1]
                if not finished.succeeded or self.champion() != version:
                    raise AssertionError(f"retrain job {job} did not make {version} the champion:\n{finished.log()}")
            return {}

        return wait_for(serving, timeout_s, f"the app serving version {version}")

    def predict(self) -> dict:
        response = httpx.post(f"{self.app.url}/predict", json=RECORD, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def origin_commits(self) -> list[str]:
        return subprocess.run(
            ["git", "log", "--format=%s", BRANCH], cwd=self.origin, capture_output=True, text=True, check=True
        ).stdout.splitlines()

    def bucket_keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServices]:
    with LocalServices.on_free_ports(tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository the runner clones: this checkout with fast training params, branch main, bare."""
    return seeded_origin(tmp_path_factory, FAST_TRAINING, LOOSE_GATE, BRANCH)


@pytest.fixture(scope="module")
def app(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("serving")
    settings = {
        **services.account("reader"),  # serving's read-only account
        "MODEL_NAME": MODEL,
        "MODEL_ALIAS": "champion",
        "RELOAD_INTERVAL_S": "1",
        "RELOAD_TOKEN": RELOAD_TOKEN,
        "PREDICTION_LOG_DIR": str(folder / "log"),
    }
    with running_app(serve_environment(HOST="127.0.0.1", **settings), folder / "serve.log", "/health") as serving:
        yield serving


@pytest.fixture(scope="module")
def loop(
    services: LocalServices, origin: Path, app: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataLoop]:
    runner = ActionsRunner(
        origin,
        tmp_path_factory.mktemp("runner"),
        machine_env={**clean_environment(), **services.aws_env(), "VENV": str(ROOT / ".venv")},
        variables={
            "AWS_REGION": "us-east-1",
            "S3_DVC_BUCKET": services.dvc_bucket,
            "MLFLOW_TRACKING_URI": services.mlflow_url,
            "MODEL_NAME": MODEL,
            "SERVE_URL": app.url,
        },
        secrets={"RELOAD_TOKEN": RELOAD_TOKEN, "MODEL_SIGNING_KEY": promotion_keys()[0].read_text(), **{
            name: value for name, value in services.account("writer").items() if name != "MLFLOW_TRACKING_URI"}},
    )
    secret_arn = services.client("secretsmanager").put_secret_value(
        SecretId=services.github_secret, SecretString=GITHUB_TOKEN
    )["ARN"]
    with (
        FakeGitHub(token=GITHUB_TOKEN, workflow_file=ROOT / WORKFLOW, branches=(BRANCH,), on_dispatch=runner) as github,
        pytest.MonkeyPatch.context() as patch,
    ):
        lambda_env = {
            "GITHUB_OWNER": "acme",
            "GITHUB_REPO": "housing-mlops",
            "GITHUB_WORKFLOW": WORKFLOW.name,
            "GITHUB_REF": BRANCH,
            "GITHUB_API_URL": github.url,
            "GITHUB_PAT_SECRET_ARN": secret_arn,
            "S3_KEY_PREFIX": KEY_PREFIX,
            "S3_KEY_SUFFIX": "housing.csv",
            **services.aws_env(),
            **services.account("writer"),  # for this test's own registry client
        }
        for name, value in lambda_env.items():
            patch.setenv(name, value)
        patch.setattr(dispatch_lambda, "_tokens", {})
        yield DataLoop(services, app, runner, github, origin)
    assert github.callback_errors == [], github.callback_errors


@pytest.fixture(scope="module")
def datasets(origin: Path) -> dict[str, pd.DataFrame]:
    v1 = synthetic_housing(1500, seed=0)
    v2 = pd.concat([v1, synthetic_housing(1500, seed=1)], ignore_index=True)
    v5 = pd.concat([v2, synthetic_housing(800, seed=5)], ignore_index=True)
    return {
        "v1": v1,
        "v2": v2,
        "corrupt": corrupt(synthetic_housing(1500, seed=2)),
        "worse": noisy_training_targets(v2, origin),
        "v5": v5,
    }


def corrupt(frame: pd.DataFrame) -> pd.DataFrame:
    """Five districts outside California and one non-numeric population."""
    frame = frame.copy()
    frame.loc[:4, "latitude"] = 51.5
    frame["population"] = frame["population"].astype(object)
    frame.loc[10, "population"] = "n/a"
    return frame


def noisy_training_targets(frame: pd.DataFrame, origin: Path) -> pd.DataFrame:
    """`frame` with the targets of its training-side rows shuffled; the holdout rows stay as they were.

    A model trained on it learns noise, and is scored on clean holdout rows, where the champion is much better.
    """
    split = yaml.safe_load(
        subprocess.run(
            ["git", "show", f"{BRANCH}:params.yaml"], cwd=origin, capture_output=True, text=True, check=True
        ).stdout
    )["split"]
    frame = pd.read_csv(io.StringIO(frame.to_csv(index=False)))  # the values split.py will read back
    training = ~holdout_mask(frame, split["holdout_fraction"], split["seed"])
    frame.loc[training, TARGET] = np.random.default_rng(0).permutation(frame.loc[training, TARGET].to_numpy())
    return frame


# --- the story, step by step -----------------------------------------------------------------------------------


@dataclass
class LoopStep:
    """The loop as a step left it, once its retrain jobs ended; `notes` holds what only that step looks at."""

    key: str
    jobs: list[Job]
    champion: str
    versions: dict[str, ModelVersion]
    served: dict
    prediction: dict
    commits: list[str]
    notes: dict[str, Any]


def observe(loop: DataLoop, key: str, jobs: list[Job], served: str | None = None, **notes: Any) -> LoopStep:
    """Record the loop now; with `served`, once the app serves that version."""
    model = loop.wait_until_served(served) if served else loop.served()
    return LoopStep(key, jobs, loop.champion(), loop.versions(), model, loop.predict(), loop.origin_commits(), notes)


@pytest.fixture(scope="module")
def v1(loop: DataLoop, datasets: dict[str, pd.DataFrame]) -> LoopStep:
    """Step 1: the first data lands while nothing is served yet."""
    ready_before = httpx.get(f"{loop.app.url}/ready", timeout=5).status_code
    key = loop.upload("v1", datasets["v1"])
    delivered = loop.deliver(key)
    [job] = loop.runner.wait_for_jobs(1)
    assert job.succeeded, job.log()  # every later step builds on this one
    return observe(
        loop, key, [job], served="1", ready_before=ready_before, delivered=delivered,
        dispatched=loop.github.dispatches[0].inputs, etag=loop.etag(key),
        artifacts=loop.bucket_keys(loop.services.mlflow_bucket, "artifacts/"),
        data_versions=loop.bucket_keys(loop.services.dvc_bucket, "dvc/files/md5/"),
    )


@pytest.fixture(scope="module")
def v2(v1: LoopStep, loop: DataLoop, datasets: dict[str, pd.DataFrame]) -> LoopStep:
    """Step 2: better data lands while a client sends predictions without a pause."""
    client = PredictionClient(loop.app.url)
    client.start()
    try:
        wait_for(lambda: len(client.versions) >= 5 or client.failures, 30, "the client's first answers")
        put_at = time.monotonic()
        key = loop.upload("v2", datasets["v2"])
        delivered = loop.deliver(key)
        loop.wait_until_served("2", timeout_s=RETRAIN_TIMEOUT_S, job=2)
        put_to_serving_s = time.monotonic() - put_at
        answered = len(client.versions)
        wait_for(lambda: len(client.versions) >= answered + 20 or client.failures, 30, "answers from version 2")
    finally:
        client.stop()
    [_, job] = loop.runner.wait_for_jobs(2)
    return observe(loop, key, [job], delivered=delivered, put_to_serving_s=put_to_serving_s,
                   answers=client.versions, failures=client.failures)


@pytest.fixture(scope="module")
def v3_corrupt(v2: LoopStep, loop: DataLoop, datasets: dict[str, pd.DataFrame]) -> LoopStep:
    """Step 3: corrupt data lands."""
    loaded_at = loop.served()["loaded_at"]
    key = loop.upload("v3", datasets["corrupt"])
    delivered = loop.deliver(key)
    job = loop.runner.wait_for_jobs(3)[-1]
    return observe(loop, key, [job], delivered=delivered, commits_before=v2.commits, loaded_at_before=loaded_at)


@pytest.fixture(scope="module")
def v4_worse(v3_corrupt: LoopStep, loop: DataLoop, datasets: dict[str, pd.DataFrame]) -> LoopStep:
    """Step 4: data that trains a worse model lands."""
    key = loop.upload("v4", datasets["worse"])
    delivered = loop.deliver(key)
    job = loop.runner.wait_for_jobs(4)[-1]
    decision = json.loads((job.workspace / "reports/decision.json").read_text()) if job.succeeded else {}
    return observe(loop, key, [job], delivered=delivered, decision=decision)


@pytest.fixture(scope="module")
def v5_twice(v4_worse: LoopStep, loop: DataLoop, datasets: dict[str, pd.DataFrame]) -> LoopStep:
    """Step 5: new data lands and its event is delivered twice."""
    key = loop.upload("v5", datasets["v5"])
    event = loop.object_created_event(key)
    delivered = [dispatch_lambda.handler(event, None), dispatch_lambda.handler(event, None)]
    jobs = loop.runner.wait_for_jobs(6)[-2:]
    served = "4" if all(job.succeeded for job in jobs) else None
    return observe(loop, key, jobs, served=served, delivered=delivered, training_runs=loop.training_runs(key))


def test_v1_upload_is_promoted_and_served(v1: LoopStep, loop: DataLoop) -> None:
    [job] = v1.jobs
    bucket = loop.services.data_bucket
    assert v1.notes["ready_before"] == 503  # nothing to serve yet
    assert v1.notes["delivered"] == 1
    assert job.succeeded, job.log()
    assert v1.notes["dispatched"] == {"s3_bucket": bucket, "s3_key": v1.key, "s3_etag": v1.notes["etag"],
                                      "s3_version_id": ""}  # the test bucket is not versioned
    assert f"fetch: s3://{bucket}/{v1.key} -> data/housing.csv" in job.output("Retrain")
    assert v1.champion == "1"
    assert v1.versions["1"].tags["gate_decision"] == "passed"
    assert v1.versions["1"].tags["promotion"] == "gate"
    assert v1.served["name"] == MODEL
    assert v1.prediction["model"] == {"name": MODEL, "version": "1"}
    # Artifacts went to S3 through the MLflow server; the data version to the DVC remote; dvc.lock to git.
    assert any(k.endswith("/MLmodel") for k in v1.notes["artifacts"])
    assert v1.notes["data_versions"]
    assert v1.commits[0] == f"retrain: dvc.lock for s3://{bucket}/{v1.key}"


def test_v2_upload_is_promoted_and_hot_reloaded_without_a_failed_request(
    v2: LoopStep, report_figure: Callable[[str], None]
) -> None:
    [job] = v2.jobs
    answers, failures = v2.notes["answers"], v2.notes["failures"]
    report_figure(f"data loop: S3 PUT of v2 -> version 2 served: {v2.notes['put_to_serving_s']:.1f} s "
                  f"({len(answers)} predictions during the reload, {len(failures)} failed)")
    assert v2.notes["delivered"] == 1
    assert job.succeeded, job.log()
    assert failures == []
    assert answers[0] == "1" and answers[-1] == "2"
    assert answers == sorted(answers), "an answer from version 1 came after version 2"
    assert v2.served["version"] == v2.champion == "2"
    assert v2.versions["2"].tags["previous_champion"] == "1"


def test_corrupt_upload_fails_the_job_clearly_and_changes_nothing(v3_corrupt: LoopStep) -> None:
    [job] = v3_corrupt.jobs
    assert v3_corrupt.notes["delivered"] == 1
    assert not job.succeeded
    assert job.steps["Retrain"].returncode != 0
    assert "Commit dvc.lock" not in job.steps and "Reload the serving app" not in job.steps
    assert "validate: latitude: 5 values outside [32.5, 42.1], e.g. 51.5 (lines 2, 3, 4, ...)" in job.output("Retrain")
    assert "validate: population: 1 values are not finite numbers, e.g. ['n/a'] (line 12)" in job.output("Retrain")
    assert "retrain: failed; dvc.lock and data/ restored to the last good version" in job.output("Retrain")
    assert set(v3_corrupt.versions) == {"1", "2"}
    assert v3_corrupt.champion == "2"
    assert v3_corrupt.commits == v3_corrupt.notes["commits_before"]
    assert v3_corrupt.served["loaded_at"] == v3_corrupt.notes["loaded_at_before"]
    assert v3_corrupt.prediction["model"]["version"] == "2"


def test_upload_that_yields_a_worse_model_is_refused_by_the_gate(v4_worse: LoopStep) -> None:
    [job] = v4_worse.jobs
    decision = v4_worse.notes["decision"]
    assert v4_worse.notes["delivered"] == 1
    assert job.succeeded, job.log()
    assert decision["decision"] == "rejected"
    assert decision["challenger"]["version"] == "3" and decision["champion"]["version"] == "2"
    holdout = {side: decision[side]["metrics"]["holdout"]["rmse"] for side in ("challenger", "champion")}
    assert holdout["challenger"] > 1.5 * holdout["champion"]
    version = v4_worse.versions["3"]
    assert version.tags["gate_decision"] == "rejected"
    assert version.tags["promotion"] == "rejected"
    assert "worse than the champion's" in version.tags["gate_reason"]
    assert "dvc.lock unchanged" in job.output("Commit dvc.lock")
    assert v4_worse.champion == "2"
    assert v4_worse.served["version"] == "2"
    assert v4_worse.prediction["model"]["version"] == "2"


def test_event_delivered_twice_retrains_once(v5_twice: LoopStep, loop: DataLoop) -> None:
    first, second = v5_twice.jobs
    assert v5_twice.notes["delivered"] == [1, 1]
    assert first.succeeded, first.log()
    assert second.succeeded, second.log()
    assert first.inputs == second.inputs
    assert set(v5_twice.versions) == {"1", "2", "3", "4"}
    assert v5_twice.champion == "4"
    assert v5_twice.served["name"] == MODEL
    assert "Running stage 'train'" in first.output("Retrain")
    assert v5_twice.notes["training_runs"] == 1
    for stage in ("validate", "split", "train", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in second.output("Retrain")
    assert "dvc.lock unchanged" in second.output("Commit dvc.lock")
    commit = f"retrain: dvc.lock for s3://{loop.services.data_bucket}/{v5_twice.key}"
    assert v5_twice.commits.count(commit) == 1
