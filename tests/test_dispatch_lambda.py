"""dispatch_lambda against a real moto server (Secrets Manager over HTTP) and the strict fake GitHub API."""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

import dispatch_lambda
from tests.conftest import ROOT
from tests.fake_github import Dispatch, FakeGitHub, declared_inputs

RETRAIN_WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
TOKEN = "ghp_" + "T0k3n" * 7
ETAG = "b1946ac92492d2347c6235b4d2611184"


@pytest.fixture
def secrets(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:  # a botocore Secrets Manager client
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dispatch_lambda, "_tokens", {})
    return boto3.client("secretsmanager")


def create_secret(secrets: Any, value: str) -> str:
    return secrets.create_secret(Name=f"github-pat-{uuid.uuid4().hex}", SecretString=value)["ARN"]


@pytest.fixture
def github(secrets: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with FakeGitHub(token=TOKEN, workflow_file=RETRAIN_WORKFLOW) as fake:
        configure(monkeypatch, fake, create_secret(secrets, TOKEN))
        yield fake


def configure(monkeypatch: pytest.MonkeyPatch, fake: FakeGitHub, secret_arn: str) -> None:
    for name, value in {
        "GITHUB_OWNER": "acme",
        "GITHUB_REPO": "housing-mlops",
        "GITHUB_WORKFLOW": fake.workflow_file.name,
        "GITHUB_PAT_SECRET_ARN": secret_arn,
        "GITHUB_API_URL": fake.url,
        "GITHUB_BACKOFF_S": "0",
    }.items():
        monkeypatch.setenv(name, value)


def s3_notification(*objects: tuple[str, str, str], event_name: str = "ObjectCreated:Put") -> dict:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": event_name,
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag, "size": 1024}},
            }
            for bucket, key, etag in objects
        ]
    }


def eventbridge_event(obj: tuple[str, str, str]) -> dict:
    bucket, key, etag = obj
    return {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "region": "us-east-1",
        "detail": {"bucket": {"name": bucket}, "object": {"key": key, "etag": etag, "size": 5}, "reason": "PutObject"},
    }


def inputs(bucket: str, key: str, etag: str = ETAG) -> dict[str, str]:
    return {"s3_bucket": bucket, "s3_key": key, "s3_etag": etag}


def test_s3_notification_dispatches_the_workflow(github: FakeGitHub) -> None:
    assert dispatch_lambda.handler(s3_notification(("landing", "data/housing.csv", ETAG)), None) == 1

    [dispatch] = github.dispatches
    assert dispatch.workflow_id == "retrain.yml"
    assert dispatch.ref == "main"
    assert dispatch.inputs == inputs("landing", "data/housing.csv")
    assert dispatch.headers["authorization"] == f"Bearer {TOKEN}"
    assert dispatch.headers["accept"] == "application/vnd.github+json"
    assert dispatch.headers["x-github-api-version"] == "2022-11-28"
    assert dispatch.headers["content-type"] == "application/json"
    assert dispatch.headers["user-agent"] == dispatch_lambda.USER_AGENT
    assert [request.path for request in github.requests] == [
        "/repos/acme/housing-mlops/actions/workflows/retrain.yml/dispatches"
    ]


def test_eventbridge_object_created_dispatches(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_REF", "release")
    github.branches = ("main", "release")

    assert dispatch_lambda.handler(eventbridge_event(("landing", "housing.csv", ETAG)), None) == 1

    assert [(d.ref, d.inputs) for d in github.dispatches] == [("release", inputs("landing", "housing.csv"))]


@pytest.mark.parametrize("make_event", [s3_notification, eventbridge_event])
def test_url_encoded_keys_are_decoded(
    github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, make_event: Callable[..., dict]
) -> None:
    monkeypatch.setenv("S3_KEY_PREFIX", "data/")
    monkeypatch.setenv("S3_KEY_SUFFIX", ").csv")
    event = make_event(("landing", "data/new+housing%281%29.csv", ETAG))

    assert dispatch_lambda.handler(event, None) == 1

    assert github.dispatches[0].inputs["s3_key"] == "data/new housing(1).csv"


@pytest.mark.parametrize(
    "event",
    [
        s3_notification(("landing", "dvc/files/md5/ab/cdef0123456789", ETAG)),
        s3_notification(("landing", "data/housing.csv.dvc", ETAG)),
        s3_notification(("landing", "data/housing.csv", ETAG), event_name="ObjectRemoved:Delete"),
        {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}},
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "landing"},
        {"Records": [{"messageId": "1", "eventSource": "aws:sqs", "body": "not json"}]},
    ],
    ids=["dvc-object", "other-suffix", "object-removed", "scheduled", "s3-test-event", "sqs-garbage"],
)
def test_other_objects_and_events_are_ignored(
    github: FakeGitHub, event: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_lambda")

    assert dispatch_lambda.handler(event, None) == 0

    assert github.requests == []
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("Ignoring")


def test_prefix_filter(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_KEY_PREFIX", "incoming/")
    event = s3_notification(("landing", "archive/housing.csv", ETAG), ("landing", "incoming/housing.csv", ETAG))

    assert dispatch_lambda.handler(event, None) == 1

    assert [d.inputs["s3_key"] for d in github.dispatches] == ["incoming/housing.csv"]


def test_batch_dispatches_once_per_distinct_object_version(github: FakeGitHub) -> None:
    first, second = ("landing", "data/housing.csv", "etag-1"), ("landing", "data/housing.csv", "etag-2")
    other_bucket = ("staging", "data/housing.csv", "etag-1")
    direct = s3_notification(first, second, first, other_bucket)
    via_sqs = {
        "Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": json.dumps(s3_notification(second))},
            {"messageId": "m2", "eventSource": "aws:sqs", "body": json.dumps(eventbridge_event(first))},
        ]
    }

    assert dispatch_lambda.handler(direct, None) == 3
    assert dispatch_lambda.handler(via_sqs, None) == 2

    assert [tuple(d.inputs.values()) for d in github.dispatches] == [first, second, other_bucket, second, first]


def test_token_is_read_once_and_never_logged(
    github: FakeGitHub, secrets: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatch_lambda")
    event = s3_notification(("landing", "data/housing.csv", ETAG))
    assert dispatch_lambda.handler(event, None) == 1
    secrets.put_secret_value(SecretId=os.environ["GITHUB_PAT_SECRET_ARN"], SecretString="ghp_rotated")

    assert dispatch_lambda.handler(event, None) == 1  # the fake refuses any other token: the cached one was used

    assert [d.headers["authorization"] for d in github.dispatches] == [f"Bearer {TOKEN}"] * 2
    assert caplog.records
    assert TOKEN not in caplog.text


def test_json_secret(github: FakeGitHub, secrets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_PAT_SECRET_ARN", create_secret(secrets, json.dumps({"token": TOKEN})))

    assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None) == 1

    assert github.dispatches[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_bad_gateway_is_retried(github: FakeGitHub) -> None:
    github.fail_next(1, 502)

    assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None) == 1

    assert len(github.requests) == 2
    assert len(github.dispatches) == 1


def test_retry_after_is_honoured(github: FakeGitHub) -> None:
    github.fail_next(2, 429, retry_after=7)
    delays: list[float] = []
    config = dispatch_lambda.Config.from_env()
    obj = dispatch_lambda.S3Object("landing", "housing.csv", ETAG)

    dispatch_lambda.dispatch_workflow(obj, config, TOKEN, sleep=delays.append)

    assert delays == [7, 7]
    assert len(github.dispatches) == 1


def test_backoff_grows_exponentially(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_BACKOFF_S", "0.5")
    github.fail_next(3, 503)
    delays: list[float] = []
    obj = dispatch_lambda.S3Object("landing", "housing.csv", ETAG)

    dispatch_lambda.dispatch_workflow(obj, dispatch_lambda.Config.from_env(), TOKEN, sleep=delays.append)

    assert delays == [0.5, 1.0, 2.0]
    assert len(github.dispatches) == 1


def test_persistent_server_error_raises_after_all_attempts(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatch_lambda")
    github.fail_next(10, 500)

    with pytest.raises(dispatch_lambda.DispatchError, match="500: Internal Server Error") as raised:
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)

    assert len(github.requests) == 4
    assert github.dispatches == []
    assert [r.levelname for r in caplog.records if r.name == "dispatch_lambda"] == ["WARNING"] * 3  # one per retry
    assert_not_leaked(TOKEN, raised.value, caplog)


def test_undeclared_inputs_fail_at_once_with_githubs_message(
    secrets: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    workflow = tmp_path / "retrain.yml"
    workflow.write_text("on:\n  workflow_dispatch:\n  push:\njobs: {}\n")
    with FakeGitHub(token=TOKEN, workflow_file=workflow) as fake:
        configure(monkeypatch, fake, create_secret(secrets, TOKEN))

        with pytest.raises(dispatch_lambda.DispatchError) as raised:
            dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)

    assert 'Unexpected inputs provided: ["s3_bucket", "s3_etag", "s3_key"]' in str(raised.value)
    assert "422" in str(raised.value)
    assert len(fake.requests) == 1


def test_wrong_token_fails_at_once(
    github: FakeGitHub, secrets: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatch_lambda")
    wrong = "ghp_" + "wr0ng" * 7
    monkeypatch.setenv("GITHUB_PAT_SECRET_ARN", create_secret(secrets, json.dumps({"token": wrong})))

    with pytest.raises(dispatch_lambda.DispatchError, match="401: Bad credentials") as raised:
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)

    assert len(github.requests) == 1
    assert_not_leaked(wrong, raised.value, caplog)


def test_unreachable_github_raises_after_all_attempts(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GITHUB_ATTEMPTS", "2")

    with pytest.raises(dispatch_lambda.DispatchError, match="after 2 attempts"):
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)


def test_lambda_sends_exactly_the_inputs_retrain_yml_declares(github: FakeGitHub) -> None:
    declared = declared_inputs(RETRAIN_WORKFLOW)

    dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)

    assert set(github.dispatches[0].inputs) == set(declared)
    assert {name for name, spec in declared.items() if spec.get("required")} == {"s3_bucket", "s3_key"}


def assert_not_leaked(token: str, error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert token not in "".join(traceback.format_exception(error))
    assert token not in caplog.text


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"headers": {"Authorization": None}}, 401, "Requires authentication"),
        ({"headers": {"Accept": "text/html"}}, 415, "Unsupported 'Accept' header"),
        ({"path": "/repos/acme/housing-mlops/actions/workflows/deploy.yml/dispatches"}, 404, "Not Found"),
        ({"body": {"inputs": inputs("landing", "housing.csv")}}, 422, '"ref" wasn\'t supplied'),
        ({"body": {"ref": "nope", "inputs": inputs("landing", "housing.csv")}}, 422, "No ref found for: nope"),
        ({"body": {"ref": "main", "inputs": {"s3_key": "housing.csv"}}}, 422, "Required input 's3_bucket'"),
        ({"body": {"ref": "main", "inputs": {"s3_bucket": "b", "s3_key": 1}}}, 422, "is not a string"),
    ],
)
def test_fake_github_refuses_what_github_refuses(change: dict, status: int, message: str) -> None:
    headers = {"Accept": "application/vnd.github+json", "Authorization": f"Bearer {TOKEN}", **change.get("headers", {})}
    body = change.get("body", {"ref": "main", "inputs": inputs("landing", "housing.csv")})
    with FakeGitHub(token=TOKEN, workflow_file=RETRAIN_WORKFLOW) as fake:
        path = change.get("path", "/repos/acme/housing-mlops/actions/workflows/161335/dispatches")
        request = urllib.request.Request(
            fake.url + path,
            data=json.dumps(body).encode(),
            headers={name: value for name, value in headers.items() if value is not None},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)

    assert refused.value.code == status
    assert message in json.load(refused.value)["message"]
    assert fake.dispatches == []


def test_fake_github_runs_on_dispatch_after_answering(secrets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    def runner(dispatch: Dispatch) -> None:
        seen.append(dict(dispatch.inputs))
        raise RuntimeError("make retrain failed")

    with FakeGitHub(token=TOKEN, workflow_file=RETRAIN_WORKFLOW, on_dispatch=runner) as fake:
        configure(monkeypatch, fake, create_secret(secrets, TOKEN))
        assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None) == 1

    assert seen == [inputs("landing", "housing.csv")]  # leaving the block waited for the callback
    assert [str(error) for error in fake.callback_errors] == ["make retrain failed"]
