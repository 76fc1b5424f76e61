"""AWS Lambda: start the GitHub Actions retrain workflow when a new housing CSV lands in S3.

Wire it to the data bucket with an EventBridge rule on "Object Created" (infra/housing-mlops.yml does), with an
S3 event notification, or through SQS (an event source mapping with ReportBatchItemFailures). Each new object that
passes the key filter and the name checks becomes one `workflow_dispatch` of `GITHUB_WORKFLOW` with the inputs
`s3_bucket`, `s3_key`, `s3_etag` and `s3_version_id` (empty when the bucket is not versioned): the workflow pins
that version of the object, or says so when the key has moved on since.

Configuration (environment, read at every invocation):
    GITHUB_OWNER, GITHUB_REPO, GITHUB_WORKFLOW   the workflow file name (retrain.yml) or its numeric id
    GITHUB_PAT_SECRET_ARN                        Secrets Manager secret: the token, or JSON {"token": "..."}
    GITHUB_REF=main, GITHUB_API_URL=https://api.github.com
    S3_KEY_PREFIX="", S3_KEY_SUFFIX=housing.csv  only matching keys trigger a run (never DVC's own objects)
    GITHUB_TIMEOUT_S=10, GITHUB_ATTEMPTS=4, GITHUB_BACKOFF_S=1   per-request timeout and retry policy
    BUDGET_MARGIN_S=3                            time kept free before the function's own timeout
    BUDGET_S=50                                  the budget when no Lambda context tells the time left (local runs)

Names are checked before they reach a log line, GitHub or the workflow: a bucket must be a valid S3 bucket name, a
key a path of letters, digits and ` _.()+,=@-` segments (no `..`, no control characters, no `:`, `$` or quotes),
an ETag hex. Keys arrive URL-encoded ("new housing(1).csv" -> "new+housing%281%29.csv") from S3 notifications and
EventBridge alike, so they are decoded with `unquote_plus` first. A malformed record (a body that is not a JSON
object, missing fields, a refused name, an event that is not about S3) is logged and skipped; the rest of the
batch is dispatched.

Retries (docs/security.md, "The dispatch Lambda's budget and dead-letter queue"): every object shares one time
budget, the function's remaining time (from the Lambda context) minus BUDGET_MARGIN_S. 5xx answers and connection
failures before the request was sent are retried with exponential backoff; 403/429 rate limits wait for
`Retry-After` or `X-RateLimit-Reset` only when that wait and one more attempt fit the budget; a 401 reads the secret
again once (it may have been rotated). A read timeout or a dropped connection after the request was sent is never
re-sent: GitHub may have accepted it, and a second dispatch would start a second run. Whatever did not dispatch
fails the invocation with one reason per object (SQS: only its messages, in `batchItemFailures`), and the function's
dead-letter queue keeps the event and that reason (infra/ sets no automatic retries, so nothing is dispatched twice
behind an operator's back).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, cast

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)  # Lambda's root logger stays at WARNING unless its log level is configured

API_VERSION = "2022-11-28"
USER_AGENT = "housing-mlops-dispatch-lambda"

# Allow-lists: what a name may contain before it is logged, sent to GitHub or handed to the workflow.
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
KEY_SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9_.()+,=@ -]{1,255}")
ETAG_PATTERN = re.compile(r"[0-9a-f]{32}(-[0-9]{1,5})?")  # MD5, or MD5-parts for multipart uploads
VERSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,1024}")  # S3 version ids: URL-safe characters; "null" unversioned
MAX_KEY_BYTES = 1024

# Read by Budget at each invocation, so that tests can stand in for time.
clock: Callable[[], float] = time.monotonic
sleep: Callable[[float], None] = time.sleep
wall_clock: Callable[[], float] = time.time  # X-RateLimit-Reset is an epoch time

_tokens: dict[str, str] = {}  # secret ARN -> token, kept across warm invocations


class DispatchError(RuntimeError):
    """At least one object was not dispatched; the message gives each one's reason."""


class RecordRefused(ValueError):
    """A record that cannot be dispatched as it is: malformed, not about S3, or with a name outside the allow-list."""


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
    margin_s: float
    budget_s: float

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        api_url = env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
        if not api_url.startswith(("https://", "http://")):
            raise RuntimeError(f"GITHUB_API_URL must be an http(s) URL, not {api_url!r}")
        return cls(
            owner=_required("GITHUB_OWNER"),
            repo=_required("GITHUB_REPO"),
            workflow=_required("GITHUB_WORKFLOW"),
            ref=env.get("GITHUB_REF", "main"),
            secret_arn=_required("GITHUB_PAT_SECRET_ARN"),
            api_url=api_url,
            key_prefix=env.get("S3_KEY_PREFIX", ""),
            key_suffix=env.get("S3_KEY_SUFFIX", "housing.csv"),
            timeout_s=float(env.get("GITHUB_TIMEOUT_S", "10")),
            attempts=max(1, int(env.get("GITHUB_ATTEMPTS", "4"))),
            backoff_s=float(env.get("GITHUB_BACKOFF_S", "1")),
            margin_s=float(env.get("BUDGET_MARGIN_S", "3")),
            budget_s=float(env.get("BUDGET_S", "50")),
        )

    @property
    def dispatch_url(self) -> str:
        owner, repo, workflow = (urllib.parse.quote(part, safe="") for part in (self.owner, self.repo, self.workflow))
        return f"{self.api_url}/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches"

    def worst_case_s(self) -> float:
        """The longest one object can take without rate limits: every attempt times out after its backoff."""
        # int ** int is Any to mypy (a negative power is a float); every term here is a number of seconds.
        return cast(float, self.attempts * self.timeout_s
                    + sum(self.backoff_s * 2**n for n in range(self.attempts - 1)))


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"environment variable {name} is not set")
    return value


@dataclass
class Budget:
    """The time this invocation may still spend on GitHub: shared by every object of the batch."""

    deadline: float  # a clock() value
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def for_invocation(cls, context: object, config: Config) -> Budget:
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        left_s = remaining() / 1000 if callable(remaining) else config.budget_s
        return cls(clock() + left_s - config.margin_s, clock, sleep)

    def left(self) -> float:
        return self.deadline - self.clock()


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    etag: str
    version_id: str = ""

    def __str__(self) -> str:  # safe to log: every field passed its allow-list
        return f"s3://{self.bucket}/{self.key} (etag {self.etag or '-'}, version {self.version_id or '-'})"


def checked_object(bucket: Any, key: Any, etag: Any, version_id: Any = "") -> S3Object:
    """An S3Object whose names (the key decoded already) passed the allow-lists, or RecordRefused naming the field (its
    value quoted, escaped). scripts/check_s3_object.py applies the same checks to the retrain workflow's inputs."""
    if not isinstance(bucket, str) or not BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket:
        raise RecordRefused(f"bucket {_quoted(bucket)} is not a valid S3 bucket name")
    if not isinstance(key, str):
        raise RecordRefused(f"key {_quoted(key)} is not a string")
    segments = key.split("/")
    if (
        len(key.encode()) > MAX_KEY_BYTES
        or not all(KEY_SEGMENT_PATTERN.fullmatch(segment) for segment in segments)
        or any(segment in (".", "..") for segment in segments)
    ):
        raise RecordRefused(
            f"key {_quoted(key)} is outside the allowed pattern (segments of letters, digits and ' _.()+,=@-', "
            "no '.' or '..' segments): rename the object"
        )
    etag = "" if etag is None else etag
    if not isinstance(etag, str) or not (etag == "" or ETAG_PATTERN.fullmatch(etag.strip('"'))):
        raise RecordRefused(f"etag {_quoted(etag)} is not an S3 ETag")
    version_id = "" if version_id is None else version_id
    if not isinstance(version_id, str) or not (version_id == "" or VERSION_ID_PATTERN.fullmatch(version_id)):
        raise RecordRefused(f"version id {_quoted(version_id)} is not an S3 version id")
    return S3Object(bucket, key, etag.strip('"'), version_id)


def _decoded(key: Any) -> Any:
    """Keys arrive URL-encoded in S3 notifications and EventBridge events alike."""
    return urllib.parse.unquote_plus(key) if isinstance(key, str) else key


def _quoted(value: Any) -> str:
    """repr() escapes newlines and control characters: a refused value cannot forge log lines."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class Unit:
    """What one SQS message (message_id) or the whole event (None) asked for."""

    message_id: str | None
    objects: list[S3Object]


def handler(event: Mapping[str, Any], context: object) -> int | dict[str, list[dict[str, str]]]:
    """Lambda entry point. SQS batches get {"batchItemFailures": [...]}; other events the number of dispatches,
    or DispatchError (the reason for each object) so that the event goes to the dead-letter queue."""
    config = Config.from_env()
    if not isinstance(event, Mapping):
        # Lambda hands over whatever JSON the trigger sent, whatever the annotation says.
        logger.warning("Ignoring an event that is not a JSON object: %s", _quoted(event))  # type: ignore[unreachable]
        return 0
    units = list(_units(event, config))
    objects = list(dict.fromkeys(obj for unit in units for obj in unit.objects))  # each distinct object once
    failures = Dispatcher(config, Budget.for_invocation(context, config)).dispatch_all(objects)
    if _is_sqs_batch(event):
        failed = [u.message_id for u in units if u.message_id and any(o in failures for o in u.objects)]
        return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in dict.fromkeys(failed)]}
    if failures:
        reasons = "; ".join(f"{obj}: {reason}" for obj, reason in failures.items())
        raise DispatchError(f"{len(failures)} of {len(objects)} objects not dispatched: {reasons}")
    return len(objects)


def _is_sqs_batch(event: Mapping[str, Any]) -> bool:
    records = event.get("Records")
    return isinstance(records, list) and any(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)


def _units(event: Mapping[str, Any], config: Config) -> Iterator[Unit]:
    if _is_sqs_batch(event):
        for record in event["Records"]:
            message_id = record.get("messageId") if isinstance(record, dict) else None
            if not isinstance(message_id, str):
                logger.warning("Skipping an SQS record without a messageId: %s", _quoted(record))
                continue
            yield Unit(message_id, _selected(_objects_in_message(record, message_id), config))
    else:
        yield Unit(None, _selected(_objects_in_event(event, "event"), config))


def _objects_in_message(record: Mapping[str, Any], message_id: str) -> Iterator[S3Object]:
    try:
        body = json.loads(record.get("body"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        logger.warning("Skipping SQS message %s: its body is not JSON", _quoted(message_id))
        return
    if not isinstance(body, dict):
        logger.warning("Skipping SQS message %s: its body is JSON but not an object", _quoted(message_id))
        return
    yield from _objects_in_event(body, f"SQS message {_quoted(message_id)}")


def _objects_in_event(event: Mapping[str, Any], where: str) -> Iterator[S3Object]:
    """Created objects in an S3 notification or an EventBridge event; anything malformed is logged and skipped."""
    if "Records" in event:
        records = event["Records"]
        if not isinstance(records, list):
            logger.warning("Skipping %s: Records is not a list", where)
            return
        for number, record in enumerate(records):
            try:
                obj = _object_in_record(record)
            except RecordRefused as refused:
                logger.warning("Skipping record %d of %s: %s", number, where, refused)
            else:
                if obj is not None:
                    yield obj
    elif event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
        try:
            detail = event["detail"]
            key = _decoded(detail["object"]["key"])
            yield checked_object(detail["bucket"]["name"], key, detail["object"].get("etag"),
                                 detail["object"].get("version-id"))
        except (KeyError, TypeError, AttributeError):
            logger.warning(
                "Skipping %s: an Object Created event without detail.bucket.name and detail.object.key", where
            )
        except RecordRefused as refused:
            logger.warning("Skipping %s: %s", where, refused)
    else:
        logger.info(
            "Ignoring %s: source=%s detail-type=%s",
            where,
            _quoted(event.get("source")),
            _quoted(event.get("detail-type")),
        )


def _object_in_record(record: Any) -> S3Object | None:
    if not isinstance(record, dict):
        raise RecordRefused("the record is not an object")
    event_name = record.get("eventName")
    if "s3" not in record or not isinstance(event_name, str):
        logger.info(
            "Ignoring record: eventSource=%s eventName=%s", _quoted(record.get("eventSource")), _quoted(event_name)
        )
        return None
    if not event_name.startswith("ObjectCreated:"):
        logger.info("Ignoring record: eventName=%s", _quoted(event_name))
        return None
    try:
        s3 = record["s3"]
        return checked_object(s3["bucket"]["name"], _decoded(s3["object"]["key"]), s3["object"].get("eTag"),
                              s3["object"].get("versionId"))
    except (KeyError, TypeError, AttributeError):
        raise RecordRefused("an ObjectCreated record without s3.bucket.name and s3.object.key") from None


def _selected(objects: Iterator[S3Object], config: Config) -> list[S3Object]:
    selected = []
    for obj in objects:
        if obj.key.startswith(config.key_prefix) and obj.key.endswith(config.key_suffix):
            selected.append(obj)
        else:
            logger.info(
                "Ignoring %s: key does not match prefix %r and suffix %r", obj, config.key_prefix, config.key_suffix
            )
    return selected


def github_token(secret_arn: str, *, fresh: bool = False) -> str:
    """The GitHub token from Secrets Manager, fetched once per warm Lambda container (again when `fresh`)."""
    if fresh or secret_arn not in _tokens:
        import boto3  # here, not at the top: scripts/check_s3_object.py imports this module on a bare runner

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


class GiveUp(Exception):
    """This object is not dispatched; the message is the reason recorded for the dead-letter queue."""


class Dispatcher:
    def __init__(self, config: Config, budget: Budget) -> None:
        self.config = config
        self.budget = budget
        self.token: str | None = None
        self.secret_reread = False

    def dispatch_all(self, objects: list[S3Object]) -> dict[S3Object, str]:
        """Dispatch each object once; the ones that were not, with their reason."""
        failures: dict[S3Object, str] = {}
        for obj in objects:
            try:
                self.dispatch(obj)
            except GiveUp as reason:
                logger.error("Not dispatched: %s: %s", obj, reason)
                failures[obj] = str(reason)
        return failures

    def dispatch(self, obj: S3Object) -> None:
        """POST one workflow_dispatch for `obj` within the budget; GiveUp with the reason otherwise."""
        config = self.config
        attempt = 0
        while True:
            attempt += 1
            if self.budget.left() < config.timeout_s:  # an attempt starts only when its whole timeout fits
                raise GiveUp(f"the function's time budget is spent ({attempt - 1} attempts made): redrive later")
            if self.token is None:
                self.token = github_token(config.secret_arn)
            try:
                request = self._request(obj)  # to GITHUB_API_URL, checked to be http(s) in Config.from_env
                with urllib.request.urlopen(request, timeout=config.timeout_s) as response:  # nosec B310
                    status = response.status
            except urllib.error.HTTPError as error:
                delay, why = self._after_refusal(error, attempt)
            except urllib.error.URLError as error:  # raised before the request was sent: safe to send again
                if attempt >= config.attempts:
                    raise GiveUp(f"cannot reach GitHub ({error.reason!r}) after {attempt} attempts") from None
                delay, why = config.backoff_s * 2 ** (attempt - 1), "backoff"
                logger.warning("Cannot reach GitHub (%r), attempt %d of %d", error.reason, attempt, config.attempts)
            except (OSError, HTTPException) as error:  # sent, then no answer: GitHub may have accepted it
                raise GiveUp(
                    f"no answer after the request was sent ({error!r}): GitHub may have started the run, so it is "
                    "not sent again; check the workflow's runs before redriving this event"
                ) from None
            else:
                if status not in (200, 204):
                    raise GiveUp(f"unexpected status {status} from GitHub")
                logger.info("Dispatched %s/%s workflow %s for %s", config.owner, config.repo, config.workflow, obj)
                return
            if delay + config.timeout_s > self.budget.left():
                raise GiveUp(
                    f"{why}: waiting {delay:.0f}s, then up to {config.timeout_s:.0f}s for another attempt, does not "
                    f"fit the {max(self.budget.left(), 0):.0f}s left of the function's budget: redrive this event later"
                )
            if delay:
                self.budget.sleep(delay)

    def _after_refusal(self, error: urllib.error.HTTPError, attempt: int) -> tuple[float, str]:
        """The delay before the next attempt after an HTTP error and what it is for, or GiveUp when there is none."""
        message = _github_message(error)
        answer = f"GitHub answered {error.code}: {message}"
        if error.code == 401 and not self.secret_reread:  # the secret may have been rotated since it was cached
            self.secret_reread = True
            old, self.token = self.token, github_token(self.config.secret_arn, fresh=True)
            if self.token != old:
                logger.warning("%s; read the token again from Secrets Manager and retrying once", answer)
                return 0.0, "retry with the token read again"
        rate_limited = error.code == 429 or (
            error.code == 403 and ("Retry-After" in error.headers or error.headers.get("X-RateLimit-Remaining") == "0")
        )
        if not (rate_limited or error.code >= 500):
            raise GiveUp(answer)
        if attempt >= self.config.attempts:
            raise GiveUp(f"{answer} (after {attempt} attempts)")
        wait = _rate_limit_wait(error) if rate_limited else None
        logger.warning("%s, attempt %d of %d", answer, attempt, self.config.attempts)
        if wait is None:
            return self.config.backoff_s * 2 ** (attempt - 1), f"{answer}; backoff"
        return wait, f"{answer}; GitHub's rate limit asks to wait"

    def _request(self, obj: S3Object) -> urllib.request.Request:
        body = {"ref": self.config.ref, "inputs": {"s3_bucket": obj.bucket, "s3_key": obj.key, "s3_etag": obj.etag,
                                                   "s3_version_id": obj.version_id}}
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-GitHub-Api-Version": API_VERSION,
        }
        return urllib.request.Request(self.config.dispatch_url, json.dumps(body).encode(), headers, method="POST")


def _rate_limit_wait(error: urllib.error.HTTPError) -> float | None:
    """Seconds GitHub asks to wait: Retry-After (seconds), else X-RateLimit-Reset (epoch); None when neither."""
    for header, to_wait in (("Retry-After", float), ("X-RateLimit-Reset", lambda v: float(v) - wall_clock())):
        value = error.headers.get(header)
        if value is not None:
            try:
                return max(0.0, to_wait(value))
            except ValueError:  # an HTTP date, or garbage: fall back to backoff
                return None
    return None


def _github_message(error: urllib.error.HTTPError) -> str:
    body = error.read().decode(errors="replace")
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return _quoted(body[:200] or error.reason)
