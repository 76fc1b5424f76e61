"""scripts/reload_serving.py, `make reload` and the retrain workflow's steps that run it: the reload token travels
only over https or to a loopback or private address, and a reload that fails after the alias moved is a warning
that names the manual step, not a failed job.

The script runs as the workflow runs it (python3 and the real curl) against HTTP servers in this process, on
loopback ports, each answering POST /reload as the test scripts it; the workflow's steps run as written
(tests/actions_runner.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.actions_runner import WORKFLOW, ActionsRunner, Job
from tests.conftest import ROOT
from tests.fake_github import Dispatch

pytestmark = pytest.mark.integration  # the script, curl and make as subprocesses, HTTP servers on loopback

SCRIPT = ROOT / "scripts" / "reload_serving.py"
TOKEN = "reload-token-0f3c9a"
INSTANCE = "i-0123456789abcdef0"
RELOADED = {"result": "reloaded", "detail": "version 2", "model": {"name": "housing", "version": "2"}}
PUBLIC = "http://ec2-54-1-2-3.compute-1.amazonaws.com"  # the shape of the stack's old ServeUrl output
HANG = -1  # an answer that never comes (until the server closes)


@dataclass
class Call:
    method: str
    path: str
    authorization: str
    command_lines: list[str]  # of every process on this machine while the call was being answered


@dataclass
class ReloadServer:
    """POST /reload as an app answers it: each call gets the next scripted (status, body, headers), the last one
    again once the script runs out."""

    answers: list[tuple[int, dict | str, dict[str, str]]]  # a dict is sent as JSON, a str as it is
    calls: list[Call] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.calls.append(Call("POST", self.path, self.headers.get("Authorization", ""), command_lines()))
                status, body, headers = server.answers[min(len(server.calls), len(server.answers)) - 1]
                if status == HANG:
                    server.released.wait()
                    return
                payload = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.http.shutdown()
        self.http.server_close()


def command_lines() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            continue
    return found


@pytest.fixture
def app() -> Iterator[Callable[..., ReloadServer]]:
    """app(answer, ...) -> a running ReloadServer; each answer a status, or (status, body), or (status, body,
    headers)."""
    servers: list[ReloadServer] = []

    def start(*answers: int | tuple) -> ReloadServer:
        scripted = [(a, RELOADED if a == 200 else {"error": f"answer {a}"}, {}) if isinstance(a, int)
                    else (a[0], a[1], a[2] if len(a) > 2 else {}) for a in answers]
        servers.append(ReloadServer(scripted))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound by this test, never listening."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def environment(**settings: str) -> dict[str, str]:
    """This machine's environment without proxies or reload settings, two attempts per reload, then `settings`."""
    kept = {k: v for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith(("SERVE_URL", "RELOAD_", "EC2_"))}
    return {**kept, "RELOAD_ATTEMPTS": "2", **settings}


def reload_serving(*args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=environment(**{"RELOAD_TOKEN": TOKEN, **settings}),
                          capture_output=True, text=True, timeout=120)


def warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("::warning::")]


# --- where the token may go --------------------------------------------------------------------------------------


@pytest.mark.parametrize("serve_url", [
    PUBLIC,
    "http://54.1.2.3:9100",
    "http://172.32.0.1:9100",  # just outside 172.16/12
    "http://100.64.0.1",  # shared address space, not private
    "http://169.254.169.254",
    "http://[2001:db8::1]:9100",
    "http://[fd00::1%25eth0]:9100",
    "http://127.1",  # an address only some parsers read
    "http://internal.example:9100",  # a name could resolve anywhere
    "HTTP://54.1.2.3",
    "http://10.0.0.1@54.1.2.3/",  # user info: the host is the public one
    "http://54.1.2.3#@10.0.0.1",
    "ftp://10.0.0.1",
])
def test_plain_http_to_a_public_host_is_refused_before_curl_starts(tmp_path: Path, serve_url: str):
    fake = tmp_path / "bin" / "curl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'curl-started'}\n")
    fake.chmod(0o755)
    for args in (["check"], ["reload"], ["reload", "--warn"]):  # a refusal is never a mere warning
        result = reload_serving(*args, SERVE_URL=serve_url, PATH=f"{fake.parent}:{os.environ['PATH']}")
        assert result.returncode == 1, result
        assert result.stdout.startswith("::error::reload refused before sending anything: SERVE_URL")
        assert TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / "curl-started").exists()


def test_the_refusal_says_why_and_what_to_use_instead():
    result = reload_serving("check", SERVE_URL=PUBLIC)
    assert f"SERVE_URL {PUBLIC} is plain http to a host that is not a loopback or private address" in result.stdout
    assert "RELOAD_TOKEN would travel in clear. Use https://" in result.stdout
    assert "docs/security.md#reloading-after-a-retrain" in result.stdout


def test_a_url_with_a_password_is_refused_without_repeating_it():
    result = reload_serving("check", SERVE_URL="https://admin:s3cret@serve.example.com")
    assert result.returncode == 1
    assert "carries user info" in result.stdout and "s3cret" not in result.stdout


@pytest.mark.parametrize("serve_url, reload_url", [
    ("https://serve.example.com", "https://serve.example.com/reload"),
    ("https://54.1.2.3:8443/app/", "https://54.1.2.3:8443/app/reload"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/reload"),
    ("http://localhost:9100/", "http://localhost:9100/reload"),
    ("http://10.0.1.5:9100", "http://10.0.1.5:9100/reload"),
    ("http://172.31.255.1:9100", "http://172.31.255.1:9100/reload"),
    ("http://192.168.1.20", "http://192.168.1.20/reload"),
    ("http://[::1]:9100", "http://[::1]:9100/reload"),
    ("http://[fd12:3456::1]:9100", "http://[fd12:3456::1]:9100/reload"),
])
def test_https_and_plain_http_to_a_loopback_or_private_address_pass_the_check(serve_url: str, reload_url: str):
    result = reload_serving("check", SERVE_URL=serve_url)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"reload: {reload_url} is reached over ")


@pytest.mark.parametrize("token", ["", "two words", "line\nX-Injected: 1"])
def test_an_empty_token_or_one_that_could_break_the_header_is_refused(app, token: str):
    server = app(200)
    result = reload_serving("reload", "--warn", SERVE_URL=server.url, RELOAD_TOKEN=token)
    assert result.returncode == 1
    assert result.stdout.startswith("::error::reload refused before sending anything: RELOAD_TOKEN")
    assert server.calls == []


# --- the call ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_reload_posts_the_token_to_the_app_and_prints_its_answer(app, suffix: str):
    server = app(200)
    result = reload_serving("reload", "--warn", SERVE_URL=server.url + suffix)
    assert result.returncode == 0, result.stdout + result.stderr
    [call] = server.calls
    assert (call.method, call.path, call.authorization) == ("POST", "/reload", f"Bearer {TOKEN}")
    assert result.stdout == f"reload: POST {server.url}/reload: HTTP 200 {json.dumps(RELOADED)}\n"
    assert warnings(result) == []
    assert TOKEN not in result.stdout + result.stderr


def test_the_token_is_on_no_command_line_while_curl_sends_it(app):
    server = app(200)
    assert reload_serving("reload", SERVE_URL=server.url).returncode == 0
    [call] = server.calls
    assert any("curl" in line and "/reload" in line for line in call.command_lines)  # the look saw curl running
    assert [line for line in call.command_lines if TOKEN in line] == []


@pytest.mark.parametrize("answer, said", [
    (404, "HTTP 404: curl: (22) The requested URL returned error: 404"),  # port 80 of a host with ADMIN_PORT
    (403, "HTTP 403"),
    (502, "HTTP 502"),
    (503, "HTTP 503"),
])
def test_a_failed_reload_after_the_promotion_is_a_warning_naming_the_manual_step(app, answer: int, said: str):
    server = app(answer)
    result = reload_serving("reload", "--warn", SERVE_URL=server.url, EC2_INSTANCE_ID=INSTANCE)
    assert result.returncode == 0, result.stdout + result.stderr
    [warning] = warnings(result)
    assert warning.startswith(f"::warning::reload: POST {server.url}/reload failed after up to 2 attempt(s): {said}")
    assert f'{{"error": "answer {answer}"}}' in warning  # the app's own words
    assert "Not a failed promotion: the alias stays where make retrain put it" in warning
    assert "the app's registry poller serves the champion within RELOAD_INTERVAL_S" in warning
    assert (f"aws ssm start-session --target {INSTANCE} --document-name AWS-StartPortForwardingSession "
            "--parameters portNumber=9100,localPortNumber=9100") in warning
    assert "make reload SERVE_URL=http://127.0.0.1:9100" in warning
    assert TOKEN not in result.stdout + result.stderr


def test_a_404_names_the_admin_port(app):
    [warning] = warnings(reload_serving("reload", "--warn", SERVE_URL=app(404).url))
    assert "with ADMIN_PORT set the app answers it on the admin port only" in warning


def test_an_unreachable_app_is_a_warning_too(closed_port: int):
    result = reload_serving("reload", "--warn", SERVE_URL=f"http://127.0.0.1:{closed_port}")
    assert result.returncode == 0
    [warning] = warnings(result)
    assert "failed after up to 2 attempt(s): no answer: curl: (7) Failed to connect to 127.0.0.1" in warning
    assert "--target <EC2_INSTANCE_ID>" in warning  # no instance given: the placeholder


def test_an_app_that_does_not_answer_in_time_is_a_warning(app):
    server = app(HANG)
    result = reload_serving("reload", "--warn", SERVE_URL=server.url, RELOAD_TIMEOUT_S="1", RELOAD_ATTEMPTS="1")
    assert result.returncode == 0
    [warning] = warnings(result)
    assert "failed after up to 1 attempt(s): no answer: curl: (28) Operation timed out" in warning
    assert len(server.calls) == 1


def test_transient_failures_are_tried_again_a_bounded_number_of_times(app, closed_port: int):
    unavailable, missing = app(503), app(404)
    reload_serving("reload", "--warn", SERVE_URL=unavailable.url)
    reload_serving("reload", "--warn", SERVE_URL=missing.url)
    assert len(unavailable.calls) == 2  # RELOAD_ATTEMPTS
    assert len(missing.calls) == 1  # a 404 will not change


def test_a_registry_outage_that_passes_is_a_reload(app):
    server = app((503, {"error": "the registry did not answer"}, {"Retry-After": "1"}), 200)
    result = reload_serving("reload", "--warn", SERVE_URL=server.url)
    assert result.returncode == 0
    assert warnings(result) == []
    assert result.stdout.startswith(f"reload: POST {server.url}/reload: HTTP 200")
    assert len(server.calls) == 2


def test_a_redirect_is_not_followed(app):
    elsewhere = app(200)
    server = app((307, {}, {"Location": f"{elsewhere.url}/reload"}))
    result = reload_serving("reload", "--warn", SERVE_URL=server.url)
    assert result.returncode == 0
    [warning] = warnings(result)
    assert "failed after up to 2 attempt(s): HTTP 307" in warning
    assert elsewhere.calls == []


def test_an_answer_cannot_start_a_workflow_command_of_its_own(app):
    server = app((502, "refused\n::error::forged\r\n::add-mask::x"))
    result = reload_serving("reload", "--warn", SERVE_URL=server.url)
    assert [line for line in result.stdout.splitlines() if line.startswith("::")] == warnings(result)
    assert len(warnings(result)) == 1


def test_without_warn_a_failed_reload_exits_1(app):
    result = reload_serving("reload", SERVE_URL=app(404).url)
    assert result.returncode == 1
    assert warnings(result) == []
    assert "failed after up to 2 attempt(s): HTTP 404" in result.stderr


def test_make_reload_is_the_same_call_for_a_person(app):
    server = app(200)
    env = environment(RELOAD_TOKEN=TOKEN)
    done = subprocess.run(["make", "--no-print-directory", "reload", f"SERVE_URL={server.url}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(c.path, c.authorization) for c in server.calls] == [("/reload", f"Bearer {TOKEN}")]
    refused = subprocess.run(["make", "--no-print-directory", "reload", f"SERVE_URL={PUBLIC}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "::error::reload refused before sending anything" in refused.stdout


# --- the workflow, as written ------------------------------------------------------------------------------------


def retrain_job(tmp_path: Path, serve_url: str, only: tuple[str, ...] = ()) -> Job:
    """retrain.yml's job on a dispatch, with SERVE_URL, RELOAD_TOKEN and EC2_INSTANCE_ID set; its workspace holds
    the workflow and the script only, enough for every step up to the first that needs the repository."""
    workspace = tmp_path / "job"
    for path in (WORKFLOW, SCRIPT.relative_to(ROOT)):
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, workspace / path)
    runner = ActionsRunner(
        origin=tmp_path / "origin.git",
        workdir=tmp_path,
        machine_env=environment(),
        variables={"S3_DVC_BUCKET": "dvc", "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
                   "SERVE_URL": serve_url, "EC2_INSTANCE_ID": INSTANCE},
        secrets={"RELOAD_TOKEN": TOKEN},
    )
    dispatch = Dispatch("retrain.yml", "refs/heads/main", {"s3_bucket": "landing", "s3_key": "data/housing.csv"}, {})
    return runner.run_job(dispatch, "main", workspace, only)


def test_the_workflow_checks_serve_url_before_make_retrain_and_reloads_after_it():
    steps = [step.get("name", step.get("uses")) for step in
             yaml.safe_load((ROOT / WORKFLOW).read_text())["jobs"]["retrain"]["steps"]]
    assert steps.index("Check SERVE_URL") < steps.index("Retrain") < steps.index("Reload the serving app")


def test_a_public_http_serve_url_stops_the_job_before_anything_changes(tmp_path: Path):
    job = retrain_job(tmp_path, PUBLIC)
    assert list(job.steps) == ["Check the trigger and the settings", "Check SERVE_URL"]  # no make retrain
    assert not job.succeeded
    assert "::error::reload refused before sending anything" in job.output("Check SERVE_URL")
    assert TOKEN not in job.log()


def test_the_reload_step_warns_and_the_job_succeeds_when_the_app_answers_404(app, tmp_path: Path):
    port_80 = app(404)  # the measured case: the public port, which does not serve /reload
    job = retrain_job(tmp_path, port_80.url, only=("Check SERVE_URL", "Reload the serving app"))
    assert list(job.steps) == ["Check SERVE_URL", "Reload the serving app"]
    assert job.succeeded, job.log()
    [warning] = [line for line in job.output("Reload the serving app").splitlines() if line.startswith("::warning::")]
    assert "HTTP 404" in warning and f"--target {INSTANCE}" in warning
    assert [call.authorization for call in port_80.calls] == [f"Bearer {TOKEN}"]
    assert TOKEN not in job.log()


def test_the_reload_step_reloads_a_private_app(app, tmp_path: Path):
    admin_port = app(200)
    job = retrain_job(tmp_path, admin_port.url, only=("Check SERVE_URL", "Reload the serving app"))
    assert job.succeeded, job.log()
    assert "::warning::" not in job.log()
    assert f"reload: POST {admin_port.url}/reload: HTTP 200" in job.output("Reload the serving app")
