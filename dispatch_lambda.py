"""AWS Lambda: start the GitHub Actions retrain workflow when a new housing CSV lands in S3.

Wire it to the data bucket with an S3 event notification (directly or through SQS) or with an EventBridge
rule on "Object Created". Each new object that passes the key filter becomes one `workflow_dispatch` of
`GITHUB_WORKFLOW` with the inputs `s3_bucket`, `s3_key` and `s3_etag`.

Configuration (environment, read at every invocation):
    GITHUB_OWNER, GITHUB_REPO, GITHUB_WORKFLOW   the workflow file name (retrain.yml) or its numeric id
    GITHUB_PAT_SECRET_ARN                        Secrets Manager secret: the token, or JSON {"token": "..."}
    GITHUB_REF=main, GITHUB_API_URL=https://api.github.com
    S3_KEY_PREFIX="", S3_KEY_SUFFIX=housing.csv  only matching keys trigger a run (never DVC's own objects)
    GITHUB_TIMEOUT_S=10, GITHUB_ATTEMPTS=4, GITHUB_BACKOFF_S=1   per-request timeout and retry policy

Object keys arrive URL-encoded ("new housing(1).csv" -> "new+housing%281%29.csv") in S3 notifications, and
EventBridge delivers them encoded the same way, so keys from both sources are decoded with `unquote_plus`.

Errors raise: 429, 5xx and connection failures after `GITHUB_ATTEMPTS` tries with exponential backoff (or
GitHub's Retry-After), any other refusal at once, so that the Lambda retry policy or the SQS redrive applies.
Give the function a timeout above attempts x (GITHUB_TIMEOUT_S + backoff), e.g. 60 s. When one object of a
batch fails, the retried batch dispatches the earlier ones again: the workflow's concurrency group queues them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any

import boto3

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)  # Lambda's root logger stays at WARNING unless its log level is configured

API_VERSION = "2022-11-28"
USER_AGENT = "housing-mlops-dispatch-lambda"
MAX_RETRY_AFTER_S = 60.0

_tokens: dict[str, str] = {}  # secret ARN -> token, kept across warm invocations


class DispatchError(RuntimeError):
    """GitHub did not accept a workflow dispatch."""


@dataclass(frozen=True)
class Config:
    owner: str
    repo: str
    workflow: str
    ref: str
    secret_arn: str
    api_url: str
    key_prefix: str
    key_suffix: str
    timeout_s: float
    attempts: int
    backoff_s: float

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        return cls(
            owner=_required("GITHUB_OWNER"),
            repo=_required("GITHUB_REPO"),
            workflow=_required("GITHUB_WORKFLOW"),
            ref=env.get("GITHUB_REF", "main"),
            secret_arn=_required("GITHUB_PAT_SECRET_ARN"),
            api_url=env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/"),
            key_prefix=env.get("S3_KEY_PREFIX", ""),
            key_suffix=env.get("S3_KEY_SUFFIX", "housing.csv"),
            timeout_s=float(env.get("GITHUB_TIMEOUT_S", "10")),
            attempts=max(1, int(env.get("GITHUB_ATTEMPTS", "4"))),
            backoff_s=float(env.get("GITHUB_BACKOFF_S", "1")),
        )

    @property
    def dispatch_url(self) -> str:
        owner, repo, workflow = (urllib.parse.quote(part, safe="") for part in (self.owner, self.repo, self.workflow))
        return f"{self.api_url}/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches"


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"environment variable {name} is not set")
    return value


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    etag: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key} (etag {self.etag or '-'})"


def handler(event: Mapping[str, Any], context: object) -> int:
    """Lambda entry point: dispatch the workflow once per new matching object; return the dispatch count."""
    config = Config.from_env()
    objects = [obj for obj in dict.fromkeys(s3_objects(event)) if _selected(obj, config)]
    if not objects:
        return 0
    token = github_token(config.secret_arn)
    for obj in objects:
        dispatch_workflow(obj, config, token)
    return len(objects)


def s3_objects(event: Mapping[str, Any]) -> Iterator[S3Object]:
    """Created objects in an S3 notification, an EventBridge event, or an SQS batch wrapping either."""
    if "Records" in event:
        for record in event["Records"]:
            yield from _objects_in_record(record)
    elif event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
        detail = event["detail"]
        yield S3Object(detail["bucket"]["name"], _decode(detail["object"]["key"]), detail["object"].get("etag", ""))
    else:
        logger.info("Ignoring event: source=%s detail-type=%s", event.get("source"), event.get("detail-type"))


def _objects_in_record(record: Mapping[str, Any]) -> Iterator[S3Object]:
    if "body" in record:  # an SQS message carrying an S3 notification or an EventBridge event
        try:
            yield from s3_objects(json.loads(record["body"]))
        except json.JSONDecodeError:
            logger.warning("Ignoring SQS message %s: body is not JSON", record.get("messageId"))
    elif "s3" in record and record.get("eventName", "").startswith("ObjectCreated:"):
        s3 = record["s3"]
        yield S3Object(s3["bucket"]["name"], _decode(s3["object"]["key"]), s3["object"].get("eTag", ""))
    else:
        logger.info("Ignoring record: eventSource=%s eventName=%s", record.get("eventSource"), record.get("eventName"))


def _decode(key: str) -> str:
    return urllib.parse.unquote_plus(key)


def _selected(obj: S3Object, config: Config) -> bool:
    if obj.key.startswith(config.key_prefix) and obj.key.endswith(config.key_suffix):
        return True
    logger.info("Ignoring %s: key does not match prefix %r and suffix %r", obj, config.key_prefix, config.key_suffix)
    return False


def github_token(secret_arn: str) -> str:
    """The GitHub token from Secrets Manager, fetched once per warm Lambda container."""
    if secret_arn not in _tokens:
        secret = boto3.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"]
        _tokens[secret_arn] = _token_from_secret(secret, secret_arn)
    return _tokens[secret_arn]


def _token_from_secret(secret: str, secret_arn: str) -> str:
    secret = secret.strip()
    if not secret.startswith("{"):
        return secret
    try:
        token = json.loads(secret)["token"]
    except (ValueError, KeyError, TypeError):  # their messages could quote the secret: leave them out
        token = None
    if not isinstance(token, str):
        raise RuntimeError(f"secret {secret_arn} is JSON without a string 'token' field")
    return token.strip()


def dispatch_workflow(obj: S3Object, config: Config, token: str, sleep: Callable[[float], None] = time.sleep) -> None:
    """POST one workflow_dispatch for `obj`, retrying 429, 5xx and connection errors; raise DispatchError."""
    request = _dispatch_request(obj, config, token)
    target = f"{config.owner}/{config.repo} workflow {config.workflow} for {obj}"
    for attempt in range(1, config.attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            message = _github_message(error)
            if not _retryable(error) or attempt == config.attempts:
                raise DispatchError(f"dispatch of {target}: GitHub answered {error.code}: {message}") from None
            delay = _retry_after(error)
            if delay is None:
                delay = config.backoff_s * 2 ** (attempt - 1)
            logger.warning("GitHub answered %s (%s), attempt %d of %d", error.code, message, attempt, config.attempts)
        except (OSError, HTTPException) as error:
            if attempt == config.attempts:
                raise DispatchError(f"dispatch of {target}: {error!r} after {attempt} attempts") from error
            delay = config.backoff_s * 2 ** (attempt - 1)
            logger.warning("Cannot reach GitHub (%r), attempt %d of %d", error, attempt, config.attempts)
        else:
            if status not in (200, 204):
                raise DispatchError(f"dispatch of {target}: unexpected status {status}")
            logger.info("Dispatched %s", target)
            return
        sleep(delay)


def _dispatch_request(obj: S3Object, config: Config, token: str) -> urllib.request.Request:
    body = {"ref": config.ref, "inputs": {"s3_bucket": obj.bucket, "s3_key": obj.key, "s3_etag": obj.etag}}
    headers = {
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-GitHub-Api-Version": API_VERSION,
    }
    return urllib.request.Request(config.dispatch_url, data=json.dumps(body).encode(), headers=headers, method="POST")


def _retryable(error: urllib.error.HTTPError) -> bool:
    """5xx and rate limits: 429, or 403 with Retry-After or an exhausted quota (GitHub uses both)."""
    if error.code == 429 or error.code >= 500:
        return True
    return error.code == 403 and ("Retry-After" in error.headers or error.headers.get("X-RateLimit-Remaining") == "0")


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    """Retry-After in seconds, capped; None when absent or given as an HTTP date."""
    try:
        return min(float(error.headers.get("Retry-After", "")), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def _github_message(error: urllib.error.HTTPError) -> str:
    body = error.read().decode(errors="replace")
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200] or error.reason
