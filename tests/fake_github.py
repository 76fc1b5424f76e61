"""A strict local fake of GitHub's "create a workflow dispatch event" endpoint.

It serves only `POST /repos/{owner}/{repo}/actions/workflows/{workflow_id}/dispatches` (workflow file name or
numeric id) and validates a request the way GitHub does: bearer token, Accept and API-version headers, a JSON
body whose `ref` names a known branch, and `inputs` that the workflow file declares under
`on.workflow_dispatch.inputs`. Refusals carry GitHub's status codes and `{"message": ...}` bodies; an accepted
dispatch is answered 204 with no body and recorded.

    with FakeGitHub(token="ghp_x", workflow_file=Path(".github/workflows/retrain.yml")) as github:
        ...  # point the client at github.url
    assert github.dispatches[0].inputs["s3_key"] == "data/housing.csv"

`on_dispatch(dispatch)` runs after the 204 has been sent, on the request's thread, as a runner would start the
job; leaving the `with` block waits for those threads, and their exceptions land in `callback_errors`.

Faults, for the client's error handling: `fail_next(n, status, retry_after=..., headers=...)` answers the next n
requests with an error (e.g. 429 with Retry-After, 403 with X-RateLimit-Remaining: 0 and X-RateLimit-Reset) before
any validation; `stall_next(n)` accepts and records the next n dispatches, then never answers, as when GitHub's
response is lost after it started the run. Rotating the token is `github.token = new`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import yaml

DOCS_URL = "https://docs.github.com/rest/actions/workflows#create-a-workflow-dispatch-event"
ACCEPTED_MEDIA_TYPES = {"application/vnd.github+json", "application/vnd.github.v3+json", "application/json", "*/*"}
SUPPORTED_API_VERSIONS = {"2022-11-28"}
MAX_INPUTS = 25


@dataclass(frozen=True)
class Request:
    """A request the fake received, accepted or not (header names lower-cased)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Dispatch:
    """An accepted workflow dispatch (header names lower-cased)."""

    workflow_id: str
    ref: str
    inputs: Mapping[str, str]
    headers: Mapping[str, str]


@dataclass
class GitHubError(Exception):
    status: int
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


def declared_inputs(workflow_file: Path) -> dict[str, dict[str, Any]] | None:
    """`on.workflow_dispatch.inputs` of a workflow file ({} if none); None without a workflow_dispatch trigger."""
    workflow = yaml.safe_load(workflow_file.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the bare key `on` as the boolean True
    if isinstance(triggers, str):
        triggers = [triggers]
    if "workflow_dispatch" not in (triggers or ()):
        return None
    if isinstance(triggers, list):
        return {}
    return (triggers["workflow_dispatch"] or {}).get("inputs") or {}


class FakeGitHub:
    def __init__(
        self,
        *,
        token: str,
        workflow_file: Path,
        owner: str = "acme",
        repo: str = "housing-mlops",
        workflow_id: int = 161335,
        branches: tuple[str, ...] = ("main",),
        on_dispatch: Callable[[Dispatch], None] | None = None,
    ) -> None:
        self.token = token
        self.workflow_file = workflow_file
        self.branches = branches
        self.on_dispatch = on_dispatch
        self.requests: list[Request] = []
        self.dispatches: list[Dispatch] = []
        self.callback_errors: list[BaseException] = []
        self._routes = {
            f"/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches": workflow
            for workflow in (workflow_file.name, str(workflow_id))
        }
        self._failures: list[GitHubError] = []
        self._stalls = 0
        self.released = threading.Event()  # set on leaving the `with` block: stalled answers are dropped
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.github = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()  # joins the request threads: on_dispatch callbacks have finished
        self._thread.join()

    def fail_next(
        self, count: int, status: int, *, retry_after: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer the next `count` requests with `status` (and Retry-After or other headers), before validation."""
        headers = {**({} if retry_after is None else {"Retry-After": str(retry_after)}), **(headers or {})}
        with self._lock:
            self._failures += [GitHubError(status, HTTPStatus(status).phrase, headers) for _ in range(count)]

    def stall_next(self, count: int) -> None:
        """Accept the next `count` valid dispatches, then send no answer until the client gives up (or the
        `with` block ends): what a client sees when GitHub's response is lost after it started the run."""
        with self._lock:
            self._stalls += count

    def take_stall(self) -> bool:
        with self._lock:
            if self._stalls:
                self._stalls -= 1
                return True
            return False

    def handle(self, method: str, path: str, headers: Message, body: bytes) -> Dispatch:
        """Validate and record one request; raise GitHubError for anything GitHub would refuse."""
        with self._lock:
            self.requests.append(Request(method, path, _lower(headers), body))
            if self._failures:
                raise self._failures.pop(0)
        workflow = self._routes.get(path)
        if method != "POST" or workflow is None:
            raise GitHubError(404, "Not Found")
        self._check_headers(headers)
        ref, inputs = self._check_body(body)
        dispatch = Dispatch(workflow, ref, inputs, _lower(headers))
        with self._lock:
            self.dispatches.append(dispatch)
        return dispatch

    def _check_headers(self, headers: Message) -> None:
        authorization = headers.get("Authorization")
        if not authorization:
            raise GitHubError(401, "Requires authentication")
        if authorization != f"Bearer {self.token}":
            raise GitHubError(401, "Bad credentials")
        accept = {part.split(";")[0].strip() for part in headers.get("Accept", "").split(",")}
        if not accept & ACCEPTED_MEDIA_TYPES:
            raise GitHubError(415, f"Unsupported 'Accept' header: {headers.get('Accept')!r}")
        version = headers.get("X-GitHub-Api-Version")
        if version is not None and version not in SUPPORTED_API_VERSIONS:
            raise GitHubError(400, f"API version {version!r} is not supported.")

    def _check_body(self, body: bytes) -> tuple[str, dict[str, str]]:
        try:
            payload = json.loads(body)
        except ValueError:
            raise GitHubError(400, "Problems parsing JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("ref"), str):
            raise GitHubError(422, 'Invalid request.\n\n"ref" wasn\'t supplied.')
        if payload["ref"].removeprefix("refs/heads/") not in self.branches:
            raise GitHubError(422, f"No ref found for: {payload['ref']}")
        inputs = payload.get("inputs", {})
        self._check_inputs(inputs)
        return payload["ref"], inputs

    def _check_inputs(self, inputs: Any) -> None:
        declared = declared_inputs(self.workflow_file)
        if declared is None:
            raise GitHubError(422, "Workflow does not have 'workflow_dispatch' trigger")
        if not isinstance(inputs, dict):
            raise GitHubError(422, "Invalid request.\n\nFor 'properties/inputs', it is not an object.")
        if len(inputs) > MAX_INPUTS:
            raise GitHubError(422, f"You can only provide up to {MAX_INPUTS} inputs, got {len(inputs)}.")
        unexpected = sorted(set(inputs) - set(declared))
        if unexpected:
            raise GitHubError(422, f"Unexpected inputs provided: {json.dumps(unexpected)}")
        for name, spec in declared.items():
            spec = spec or {}
            if spec.get("required") and "default" not in spec and name not in inputs:
                raise GitHubError(422, f"Required input '{name}' not provided")
            if not isinstance(inputs.get(name, ""), str):
                raise GitHubError(
                    422, f"Invalid request.\n\nFor 'properties/{name}', {inputs[name]!r} is not a string."
                )
            if spec.get("type") == "choice" and name in inputs and inputs[name] not in spec.get("options", ()):
                raise GitHubError(
                    422, f"Provided value '{inputs[name]}' for input '{name}' not in the list of allowed values"
                )


def _lower(headers: Message) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() then waits for the request threads and their on_dispatch callbacks
    github: FakeGitHub


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        github = self.server.github
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            dispatch = github.handle(self.command, self.path, self.headers, body)
        except GitHubError as error:
            payload = {"message": error.message, "documentation_url": DOCS_URL, "status": str(error.status)}
            self._reply(error.status, json.dumps(payload).encode(), error.headers)
            return
        if github.take_stall():
            github.released.wait(timeout=30)  # the client has timed out by then; its connection is gone
            return
        self._reply(204, b"", {})
        if github.on_dispatch is not None:
            try:
                github.on_dispatch(dispatch)
            except Exception as error:  # noqa: BLE001 (handed to the test through callback_errors)
                github.callback_errors.append(error)

    def _reply(self, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # no per-request lines on stderr
        pass
