"""scripts/deploy.sh, the real script in real bash, against the stand-in docker of tests/fake_docker/.

The stand-in runs every container as a real process serving HTTP on its published ports, so deploy.sh's curl checks
and the requests below are real; it records every docker call with the host ports that served /predict right after
it, which lets each test check that port 80 (here a free port) never went without a serving container.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from serving.schema import EXAMPLE_RECORD
from tests.conftest import ROOT
from tests.servers import free_port

pytestmark = pytest.mark.integration  # real processes throughout

DEPLOY = ROOT / "scripts" / "deploy.sh"
FAKE_DOCKER = ROOT / "tests" / "fake_docker"
IMAGE = "acme/housing-serve"
BLUE, GREEN, PROXY = "housing-serve-blue", "housing-serve-green", "housing-proxy"


class Host:
    """An EC2 host in a temporary directory: deploy.sh's state, the app's env file, the fake docker's state."""

    def __init__(self, root: Path) -> None:
        self.docker_state = root / "docker"
        self.state_dir = root / "deploy"
        self.env_file = root / "serve.env"
        self.env_file.write_text(
            "MLFLOW_TRACKING_URI=http://mlflow.internal:5000\nMODEL_NAME=California_Housing_Regression\n"
            "MODEL_ALIAS=champion\n"
        )
        self.prediction_log = root / "predictions"  # the host directory every colour mounts
        self.http_port = free_port()
        self.admin_port = free_port()  # used once deploy.env sets ADMIN_PORT (`admin_host`)
        self.settings = {
            "PATH": f"{FAKE_DOCKER}{os.pathsep}{os.environ['PATH']}",
            "FAKE_DOCKER_PYTHON": sys.executable,
            "FAKE_DOCKER_STATE": str(self.docker_state),
            "DEPLOY_CONFIG": str(root / "deploy.env"),
            "STATE_DIR": str(self.state_dir),
            "PREDICTION_LOG_HOST_DIR": str(self.prediction_log),
            "ENV_FILE": str(self.env_file),
            "IMAGE": IMAGE,
            "HTTP_PORT": str(self.http_port),
            "BLUE_PORT": str(free_port()),
            "GREEN_PORT": str(free_port()),
            "READY_TIMEOUT_S": "3",
            "SWITCH_TIMEOUT_S": "3",
            "POLL_INTERVAL_S": "0.05",
            "STOP_TIMEOUT_S": "5",
        }

    def run(self, *args: str, script: Path = DEPLOY, **settings: str) -> subprocess.CompletedProcess:
        return self.execute(["bash", str(script), *args], settings)

    def shell(self, command: str) -> subprocess.CompletedProcess:
        """`bash -c COMMAND` on this host, as SSM Run Command runs a script."""
        return self.execute(["bash", "-c", command], {})

    def execute(self, argv: list[str], settings: dict[str, str]) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RELOAD_TOKEN", "DOCKER_", "GIT_"))}
        return subprocess.run(
            argv,
            env={**env, **self.settings, **settings},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def deploy(self, tag: str, script: Path = DEPLOY, **settings: str) -> subprocess.CompletedProcess:
        return self.run("deploy", script=script, IMAGE_TAG=tag, **settings)

    def docker(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(FAKE_DOCKER / "docker"), *args],
            env={**os.environ, **self.settings},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[dict]:
        lines = (self.docker_state / "calls.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def containers(self) -> dict[str, dict]:
        return json.loads((self.docker_state / "state.json").read_text())["containers"]

    def state(self) -> str:
        return (self.state_dir / "state").read_text()

    def served_image(self, request_id: str = "") -> str:
        """POST /predict to port 80 of the host, as a client would: which image answered, through which container."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/predict",
            data=json.dumps(EXAMPLE_RECORD).encode(),
            headers={"Content-Type": "application/json", **({"X-Request-ID": request_id} if request_id else {})},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert isinstance(json.loads(response.read())["prediction"], float)
            return f"{response.headers['X-Fake-Image']} by {response.headers['X-Served-By']}"

    def logged(self) -> dict[str, str]:
        """The prediction log on the host: request id -> the image that answered it."""
        lines = [line for path in self.prediction_log.glob("*.jsonl") for line in path.read_text().splitlines()]
        return {entry["request_id"]: entry["image"] for entry in map(json.loads, lines)}

    def get(self, port: int, path: str) -> tuple[int, dict[str, str]]:
        """GET a path on a host port: the status and the headers (an error status is an answer too)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers)

    def admin_image(self) -> str:
        """GET /metrics on the admin port, as Prometheus scrapes it: which image answered, through which container."""
        status, headers = self.get(self.admin_port, "/metrics")
        assert status == 200, (status, headers)
        return f"{headers['X-Fake-Image']} by {headers['X-Served-By']}"

    def stop_containers(self) -> None:
        if not (self.docker_state / "state.json").exists():
            return
        for container in self.containers().values():
            if container["pid"] > 0:
                try:
                    os.killpg(container["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    host = Host(tmp_path)
    yield host
    host.stop_containers()


def first_release(host: Host) -> Host:
    """Deploy v1 to `host` (the blue container serves it), then forget the docker calls of that first release."""
    result = host.deploy("v1")
    assert result.returncode == 0, result.stderr
    (host.docker_state / "calls.jsonl").unlink()
    return host


@pytest.fixture
def serving(host: Host) -> Host:
    """A host serving v1 from the blue container, with the calls of that first release forgotten."""
    return first_release(host)


def assert_port_kept_serving(
    host: Host, calls: list[dict], from_the_start: bool, port: int | None = None, kind: str = "serving"
) -> None:
    """Once port HTTP_PORT served /predict (`port` /metrics, with kind "admin"), it did after every later docker
    call."""
    port = port or host.http_port
    serving = from_the_start
    for number, call in enumerate(calls):
        if port in call[kind]:
            serving = True
        else:
            assert not serving, f"nothing served port {port} after call {number}: docker {' '.join(call['argv'])}"
    assert serving


@pytest.fixture
def admin_host(host: Host) -> Host:
    """A host whose deploy.env sets ADMIN_PORT, as the stack writes it."""
    Path(host.settings["DEPLOY_CONFIG"]).write_text(f"ADMIN_PORT={host.admin_port}\n")
    return host


@pytest.fixture
def admin_serving(admin_host: Host) -> Host:
    """An admin-port host serving v1 from the blue container, with the calls of that first release forgotten."""
    return first_release(admin_host)


def test_first_release_starts_the_app_and_the_proxy_on_port_80(host: Host):
    result = host.deploy("v1")
    assert result.returncode == 0, result.stderr
    assert f"port {host.http_port} serves {IMAGE}:v1 ({BLUE})" in result.stdout
    assert host.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert host.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS=\n"

    containers = host.containers()
    assert set(containers) == {BLUE, PROXY}
    app = containers[BLUE]
    assert app["env"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "PORT": "8000",
        "MODEL_NAME": "California_Housing_Regression",
        "MODEL_ALIAS": "champion",
        "PREDICTION_LOG_DIR": "/app/logs",
        "FORWARDED_ALLOW_IPS": "*",
    }
    assert app["mounts"] == [{"source": str(host.prediction_log), "target": "/app/logs", "read_only": False}]
    assert [(p["host_ip"], p["container_port"]) for p in app["ports"]] == [("127.0.0.1", 8000)]
    assert app["restart"] == containers[PROXY]["restart"] == "unless-stopped"
    assert app["network"] == containers[PROXY]["network"] == "housing"
    assert [(p["host_port"], p["container_port"]) for p in containers[PROXY]["ports"]] == [(host.http_port, 80)]
    assert host.get(host.http_port, "/metrics")[0] == 200  # without ADMIN_PORT, /metrics stays on port 80
    assert "admin" not in (host.state_dir / "nginx" / "default.conf").read_text()
    assert_port_kept_serving(host, host.calls(), from_the_start=False)


def test_healthy_release_switches_port_80_then_removes_the_old_container(serving: Host):
    result = serving.deploy("v2")
    assert result.returncode == 0, result.stderr
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"
    assert set(serving.containers()) == {GREEN, PROXY}
    assert serving.state() == f"CURRENT={IMAGE}:v2\nPREVIOUS={IMAGE}:v1\n"

    calls = serving.calls()
    assert_port_kept_serving(serving, calls, from_the_start=True)
    commands = [call["argv"] for call in calls]
    reload, stop = commands.index(["exec", PROXY, "nginx", "-s", "reload"]), commands.index(["stop", "-t", "5", BLUE])
    assert commands.index(["exec", PROXY, "nginx", "-t"]) < reload < stop < commands.index(["rm", BLUE])


@pytest.mark.parametrize(
    ("tag", "reason", "log_line"),
    [
        (
            "broken",
            "did not answer GET /ready on 127.0.0.1:{port} within 3s",
            "Registered model alias champion not found",
        ),
        ("crash", "is restarting, not running", "RuntimeError: cannot start: simulated crash"),
        ("badpredict", "failed the smoke POST /predict: curl: (22)", '"POST /predict HTTP/1.1" 500'),
    ],
)
def test_unhealthy_release_is_removed_and_the_old_container_keeps_serving(serving: Host, tag, reason, log_line):
    blue = serving.containers()[BLUE]
    result = serving.deploy(tag)
    assert result.returncode == 1
    assert f"deploy: {GREEN} " in result.stderr
    assert reason.format(port=serving.settings["GREEN_PORT"]) in result.stderr
    assert f"last 40 log lines of {GREEN}" in result.stderr and log_line in result.stderr
    assert f"removed {GREEN}; port {serving.http_port} is served as before, by {BLUE}" in result.stderr

    assert set(serving.containers()) == {BLUE, PROXY}
    assert serving.containers()[BLUE] == blue  # same container, process and settings
    calls = serving.calls()
    assert not any(BLUE in call["argv"] for call in calls)  # not stopped, not removed, not even looked at
    assert ["exec", PROXY, "nginx", "-s", "reload"] not in [call["argv"] for call in calls]
    assert_port_kept_serving(serving, calls, from_the_start=True)
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert serving.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS=\n"


def test_release_that_gets_ready_slowly_is_waited_for(serving: Host):
    result = serving.deploy("slow", READY_TIMEOUT_S="30")
    assert result.returncode == 0, result.stderr
    statuses = [c for c in serving.calls() if c["argv"][:2] == ["inspect", "--type"] and GREEN in c["argv"]]
    assert len(statuses) > 1  # it polled while the container loaded its model
    assert serving.served_image() == f"{IMAGE}:slow by {GREEN}"
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)


def test_switch_refused_by_nginx_restores_its_configuration(serving: Host):
    conf = (serving.state_dir / "nginx" / "default.conf").read_text()
    result = serving.deploy("v2", NETWORK="elsewhere")  # the new container is on a network the proxy cannot see
    assert result.returncode == 1
    assert (
        'nginx refused the new configuration: nginx: [emerg] host not found in upstream "housing-serve-green:8000"'
        in result.stderr
    )
    assert (serving.state_dir / "nginx" / "default.conf").read_text() == conf
    assert set(serving.containers()) == {BLUE, PROXY}
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"


def test_predictions_logged_before_a_deploy_and_a_rollback_are_on_the_host_after_them(serving: Host):
    assert serving.served_image("before the deploy") == f"{IMAGE}:v1 by {BLUE}"
    assert serving.deploy("v2").returncode == 0  # removes the blue container, and its writable layer
    assert serving.served_image("after the deploy") == f"{IMAGE}:v2 by {GREEN}"
    assert serving.run("rollback").returncode == 0  # removes the green one
    assert serving.served_image("after the rollback") == f"{IMAGE}:v1 by {BLUE}"

    assert serving.logged().items() >= {
        "before the deploy": f"{IMAGE}:v1", "after the deploy": f"{IMAGE}:v2", "after the rollback": f"{IMAGE}:v1",
    }.items()
    owner = 10001 if os.geteuid() == 0 else os.geteuid()  # the image's user, when deploy.sh runs as root
    assert serving.prediction_log.stat().st_uid == owner


def test_the_log_directory_is_given_to_the_user_the_image_runs_as():
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    uid = re.search(r"^APP_UID=(\d+) ", DEPLOY.read_text(), re.MULTILINE)
    assert user and uid and user[1] == uid[1] == "10001"


def test_live_container_is_the_one_nginx_serves_not_the_one_its_conf_file_names(serving: Host):
    """A reload that never took effect leaves conf.d naming green while nginx serves blue: blue is the live one."""
    conf = serving.state_dir / "nginx" / "default.conf"
    conf.write_text(conf.read_text().replace(BLUE, GREEN))

    result = serving.deploy("v2")

    assert result.returncode == 0, result.stderr
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"
    assert set(serving.containers()) == {GREEN, PROXY}
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)


def test_reload_that_nginx_refuses_fails_the_deploy_and_restores_everything(serving: Host):
    conf = (serving.state_dir / "nginx" / "default.conf").read_text()
    (serving.docker_state / "nginx-reload-fails").touch()

    result = serving.deploy("v2")

    assert result.returncode == 1
    assert 'nginx -s reload failed in housing-proxy: nginx: [error] invalid PID number ""' in result.stderr
    assert f"removed {GREEN}; port {serving.http_port} is served as before, by {BLUE}" in result.stderr
    assert "ALERT" not in result.stderr
    assert (serving.state_dir / "nginx" / "default.conf").read_text() == conf
    assert set(serving.containers()) == {BLUE, PROXY}
    assert serving.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS=\n"
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"


def test_reload_that_nginx_does_not_apply_fails_the_deploy_and_the_next_one_still_works(serving: Host):
    conf = (serving.state_dir / "nginx" / "default.conf").read_text()
    (serving.docker_state / "nginx-reload-ignored").touch()

    result = serving.deploy("v2")

    assert result.returncode == 1
    assert f"port {serving.http_port} did not answer from {GREEN} within 3s (nginx did not apply" in result.stderr
    assert (serving.state_dir / "nginx" / "default.conf").read_text() == conf
    assert set(serving.containers()) == {BLUE, PROXY}
    assert serving.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS=\n"
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"

    (serving.docker_state / "nginx-reload-ignored").unlink()
    assert serving.deploy("v3").returncode == 0
    assert serving.served_image() == f"{IMAGE}:v3 by {GREEN}"
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)


def git(*args: str, cwd: Path) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def host_checkout(tmp_path: Path) -> tuple[Path, str, str]:
    """The host's clone of a bare origin at commit `first`; origin has a later commit `second` whose deploy.sh
    announces itself. Returns (clone, first, second)."""
    work, origin, clone = tmp_path / "work", tmp_path / "origin.git", tmp_path / "host-checkout"
    (work / "scripts").mkdir(parents=True)
    script = DEPLOY.read_text()
    (work / "scripts" / "deploy.sh").write_text(script)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "first", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    git("clone", "-q", "--bare", str(work), str(origin), cwd=tmp_path)
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    (work / "scripts" / "deploy.sh").write_text(
        script.replace("set -euo pipefail\n", 'set -euo pipefail\necho "deploy.sh of the second commit"\n', 1)
    )
    git("commit", "-qam", "second", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    git("push", "-q", str(origin), "main", cwd=work)
    return clone, first, second


def test_checkout_runs_under_the_lock_and_the_deployed_commits_script_does_the_release(
    host: Host, host_checkout: tuple[Path, str, str]
):
    clone, _, second = host_checkout

    result = host.deploy("v1", script=clone / "scripts" / "deploy.sh", GIT_REF=second)

    assert result.returncode == 0, result.stderr
    assert f"checked out {second} in {clone}" in result.stdout
    assert "deploy.sh of the second commit" in result.stdout  # the new script ran, still holding the lock
    assert git("rev-parse", "HEAD", cwd=clone) == second
    assert host.served_image() == f"{IMAGE}:v1 by {BLUE}"


def test_checkout_waits_for_no_one_while_another_deploy_holds_the_lock(
    host: Host, host_checkout: tuple[Path, str, str]
):
    clone, first, second = host_checkout
    host.state_dir.mkdir(parents=True)
    with open(host.state_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another deploy is running
        result = host.deploy("v1", script=clone / "scripts" / "deploy.sh", GIT_REF=second)

    assert result.returncode == 1
    assert "another deploy holds" in result.stderr
    assert git("rev-parse", "HEAD", cwd=clone) == first  # not even the checkout happened
    assert not (host.docker_state / "calls.jsonl").exists()


@pytest.mark.parametrize("ref", ["main", "HEAD~1", "--upload-pack=touch${IFS}pwned", "a" * 39, "$(id)"])
def test_git_ref_must_be_a_full_commit_sha(host: Host, host_checkout: tuple[Path, str, str], ref: str):
    clone, first, _ = host_checkout

    result = host.deploy("v1", script=clone / "scripts" / "deploy.sh", GIT_REF=ref)

    assert result.returncode == 1
    assert "GIT_REF must be a full 40-character commit SHA" in result.stderr
    assert git("rev-parse", "HEAD", cwd=clone) == first


def test_first_release_failing_at_the_switch_leaves_nothing_behind(host: Host):
    with socket.socket() as squatter:  # something else holds port 80
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do; free_port() needs it
        squatter.bind(("127.0.0.1", host.http_port))
        squatter.listen()
        result = host.deploy("v1")
    assert result.returncode == 1
    assert "address already in use" in result.stderr and f"could not start {PROXY}" in result.stderr
    assert host.containers() == {}
    assert not (host.state_dir / "nginx" / "default.conf").exists()
    assert not (host.state_dir / "state").exists()


def test_rollback_serves_the_previous_image_and_again_the_one_after(serving: Host):
    assert serving.deploy("v2").returncode == 0

    result = serving.run("rollback")
    assert result.returncode == 0, result.stderr
    assert f"rolling back from {IMAGE}:v2 to {IMAGE}:v1" in result.stdout
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert serving.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS={IMAGE}:v2\n"

    (serving.docker_state / "registry-down").touch()  # rolling back must not depend on Docker Hub
    result = serving.run("rollback")
    assert result.returncode == 0, result.stderr
    assert f"cannot pull {IMAGE}:v2; using the copy on this host" in result.stdout
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"
    assert_port_kept_serving(serving, serving.calls(), from_the_start=True)


def test_rollback_without_a_previous_image_changes_nothing(serving: Host):
    result = serving.run("rollback")
    assert result.returncode == 1
    assert "records no previous image: nothing to roll back to" in result.stderr
    assert not (serving.docker_state / "calls.jsonl").exists()


def test_unknown_tag_fails_before_anything_starts(serving: Host):
    result = serving.deploy("missing-tag")
    assert result.returncode == 1
    assert f"manifest for {IMAGE}:missing-tag not found" in result.stderr
    assert f"cannot pull {IMAGE}:missing-tag and it is not on this host; check the tag" in result.stderr
    assert [call["argv"][0] for call in serving.calls()] == ["pull", "image"]


def test_settings_are_checked_first(host: Host):
    result = host.run("deploy")
    assert result.returncode == 1 and "set IMAGE and IMAGE_TAG" in result.stderr
    result = host.deploy("v1", ENV_FILE=str(host.env_file.with_name("absent.env")))
    assert result.returncode == 1 and "absent.env is missing" in result.stderr
    assert not (host.docker_state / "calls.jsonl").exists()


def test_host_config_file_fills_in_unset_settings(host: Host):
    Path(host.settings["DEPLOY_CONFIG"]).write_text("IMAGE=acme/other\nIMAGE_TAG=v7\nHTTP_PORT=1\n")
    result = host.run("deploy")  # IMAGE_TAG from the file; IMAGE and HTTP_PORT from the environment win
    assert result.returncode == 0, result.stderr
    assert host.served_image() == f"{IMAGE}:v7 by {BLUE}"


def test_leftover_container_of_an_interrupted_release_is_replaced(serving: Host):
    leftover = serving.docker("run", "-d", "--name", GREEN, f"{IMAGE}:v0")
    assert leftover.returncode == 0, leftover.stderr
    result = serving.deploy("v2")
    assert result.returncode == 0, result.stderr
    assert serving.containers()[GREEN]["image"] == f"{IMAGE}:v2"
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"


def test_reload_token_comes_from_secrets_manager_and_stays_off_command_lines(serving: Host, moto_endpoint: str):
    aws = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    token = uuid.uuid4().hex
    secrets = boto3.client(
        "secretsmanager",
        region_name="eu-west-1",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    secret = secrets.create_secret(Name="housing/reload-token", SecretString=token)

    result = serving.deploy("v2", RELOAD_TOKEN_SECRET_ARN=secret["ARN"], **aws)
    assert result.returncode == 0, result.stderr
    assert serving.containers()[GREEN]["env"]["RELOAD_TOKEN"] == token
    assert not any(token in arg for call in serving.calls() for arg in call["argv"])

    result = serving.deploy("v3", RELOAD_TOKEN_SECRET_ARN=secret["ARN"].replace("reload-token", "absent"), **aws)
    assert result.returncode == 1
    assert "the instance role needs secretsmanager:GetSecretValue on it" in result.stderr
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"


@pytest.mark.parametrize("setup", ["serving", "admin_serving"])
def test_every_docker_call_is_accepted_by_the_real_docker_cli(setup: str, request, tmp_path: Path):
    """The real client parses its arguments before it needs a daemon: all of deploy.sh's calls must get that far."""
    serving: Host = request.getfixturevalue(setup)
    assert serving.deploy("v2").returncode == 0
    assert serving.deploy("broken").returncode == 1
    assert serving.run("rollback").returncode == 0
    real = shutil.which("docker")  # this process's PATH, without the stand-in
    assert real, "this test needs the docker CLI (the client is enough)"
    shapes = {tuple(call["argv"]) for call in serving.calls()}
    assert {shape[0] for shape in shapes} >= {"pull", "network", "inspect", "run", "exec", "logs", "rm", "stop"}
    assert ("port" in {shape[0] for shape in shapes}) == (setup == "admin_serving")
    for argv in sorted(shapes):
        result = subprocess.run(
            [real, *argv],
            env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Cannot connect to the Docker daemon" in result.stderr, (argv, result.stderr)


def deploy_job_commands(image: str, sha: str, checkout: Path) -> str:
    """The shell script ci-cd.yml's deploy job sends with SSM Run Command, for this host's checkout."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci-cd.yml").read_text())
    [step] = [s for s in workflow["jobs"]["deploy"]["steps"] if s.get("name", "").startswith("make deploy")]
    program = re.search(r"jq -nc --arg image \"\$IMAGE\" --arg sha \"\$SHA\" '(.*?)'\)", step["run"], re.S)
    assert program, step["run"]
    parameters = subprocess.run(
        ["jq", "-nc", "--arg", "image", image, "--arg", "sha", sha, program[1]],
        capture_output=True,
        text=True,
        check=True,
    )
    commands = json.loads(parameters.stdout)["commands"]
    assert "cd /opt/housing-mlops" in commands
    return "\n".join(f"cd {checkout}" if c == "cd /opt/housing-mlops" else c for c in commands)


@pytest.mark.parametrize("host_script", ["current", "before GIT_REF"])
def test_the_deploy_jobs_commands_leave_the_host_on_the_deployed_commit(host: Host, tmp_path: Path, host_script: str):
    """Run as SSM runs them (one shell script) on a host checkout; a host whose deploy.sh predates GIT_REF still
    ends on the deployed commit, so that its next deploy runs under the lock."""
    work, origin, clone = tmp_path / "work", tmp_path / "origin.git", tmp_path / "opt-housing-mlops"
    (work / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "Makefile", work / "Makefile")
    script = DEPLOY.read_text()
    if host_script == "before GIT_REF":  # the same script, but one that knows nothing of GIT_REF
        ignored = 'if [[ -n ${GIT_REF:-} ]]; then check_out "$GIT_REF" "$@"; fi'
        assert ignored in script
        script = script.replace(ignored, ":")
    (work / "scripts" / "deploy.sh").write_text(script)
    (work / "scripts" / "deploy.sh").chmod(0o755)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-qm", "what the host has", cwd=work)
    git("clone", "-q", "--bare", str(work), str(origin), cwd=tmp_path)
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    (work / "scripts" / "deploy.sh").write_text(DEPLOY.read_text())
    git("commit", "-qam", "the deployed commit", "--allow-empty", cwd=work)
    deployed = git("rev-parse", "HEAD", cwd=work)
    git("push", "-q", str(origin), "main", cwd=work)

    result = host.shell(deploy_job_commands(IMAGE, deployed, clone))

    assert result.returncode == 0, result.stdout + result.stderr
    assert git("rev-parse", "HEAD", cwd=clone) == deployed
    assert host.served_image() == f"{IMAGE}:{deployed} by {BLUE}"


def test_with_admin_port_metrics_answer_there_from_the_live_colour_and_404_on_port_80(admin_host: Host):
    result = admin_host.deploy("v1")
    assert result.returncode == 0, result.stderr
    admin = admin_host.admin_port
    assert admin_host.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_host.admin_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_host.get(admin_host.http_port, "/metrics")[0] == 404
    assert admin_host.get(admin, "/ready")[0] == 404  # the admin port serves the admin endpoints only

    containers = admin_host.containers()
    env = containers[BLUE]["env"]
    assert (env["ADMIN_PORT"], env["ADMIN_HOST"]) == (str(admin), "0.0.0.0")  # nginx cannot reach its loopback
    assert [(p["host_ip"], p["container_port"]) for p in containers[BLUE]["ports"]] == [("127.0.0.1", 8000)]
    assert [(p["host_port"], p["container_port"]) for p in containers[PROXY]["ports"]] == [
        (admin_host.http_port, 80),
        (admin, admin),
    ]

    result = admin_host.deploy("v2")
    assert result.returncode == 0, result.stderr
    assert admin_host.served_image() == f"{IMAGE}:v2 by {GREEN}"
    assert admin_host.admin_image() == f"{IMAGE}:v2 by {GREEN}"
    assert admin_host.get(admin_host.http_port, "/metrics")[0] == 404
    assert set(admin_host.containers()) == {GREEN, PROXY}
    calls = admin_host.calls()
    assert_port_kept_serving(admin_host, calls, from_the_start=False)
    assert_port_kept_serving(admin_host, calls, from_the_start=False, port=admin, kind="admin")


def test_with_admin_port_rollback_moves_both_ports_together(admin_serving: Host):
    assert admin_serving.deploy("v2").returncode == 0

    result = admin_serving.run("rollback")

    assert result.returncode == 0, result.stderr
    assert admin_serving.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_serving.admin_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_serving.get(admin_serving.http_port, "/metrics")[0] == 404
    calls = admin_serving.calls()
    assert_port_kept_serving(admin_serving, calls, from_the_start=True)
    assert_port_kept_serving(admin_serving, calls, from_the_start=True, port=admin_serving.admin_port, kind="admin")
    # after every call, the two ports were served by the same colour's app or by no app at all
    for call in calls:
        assert (admin_serving.http_port in call["serving"]) == (admin_serving.admin_port in call["admin"]), call


def test_with_admin_port_an_image_that_predates_it_is_not_switched_to(admin_serving: Host):
    """Rolling forward (or back) to an app without ADMIN_PORT would publish /metrics on port 80 and leave the admin
    port answering 502: the check after the switch catches it, and both ports go back to the live colour."""
    conf = (admin_serving.state_dir / "nginx" / "default.conf").read_text()

    result = admin_serving.deploy("v0-noadmin")

    assert result.returncode == 1
    assert f"port {admin_serving.admin_port} did not answer GET /metrics from {GREEN}" in result.stderr
    assert f"removed {GREEN}; port {admin_serving.http_port} is served as before, by {BLUE}" in result.stderr
    assert (admin_serving.state_dir / "nginx" / "default.conf").read_text() == conf
    assert set(admin_serving.containers()) == {BLUE, PROXY}
    assert admin_serving.state() == f"CURRENT={IMAGE}:v1\nPREVIOUS=\n"
    assert admin_serving.served_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_serving.admin_image() == f"{IMAGE}:v1 by {BLUE}"
    assert admin_serving.get(admin_serving.http_port, "/metrics")[0] == 404
    assert_port_kept_serving(admin_serving, admin_serving.calls(), from_the_start=True)


def test_setting_admin_port_on_a_host_whose_proxy_predates_it_fails_before_anything_starts(serving: Host):
    """The running nginx does not publish the admin port; recreating it would take port 80 down: that is the
    operator's call, so the deploy says how and changes nothing."""
    result = serving.deploy("v2", ADMIN_PORT=str(serving.admin_port))

    assert result.returncode == 1
    assert f"{PROXY} does not publish port {serving.admin_port}: it started before ADMIN_PORT was set" in result.stderr
    assert f"docker rm -f {PROXY}, then deploy again" in result.stderr
    assert "run" not in [call["argv"][0] for call in serving.calls()]
    assert set(serving.containers()) == {BLUE, PROXY}
    assert serving.served_image() == f"{IMAGE}:v1 by {BLUE}"

    assert serving.docker("rm", "-f", PROXY).returncode == 0  # the fix the message names
    result = serving.deploy("v2", ADMIN_PORT=str(serving.admin_port))
    assert result.returncode == 0, result.stderr
    assert serving.served_image() == f"{IMAGE}:v2 by {GREEN}"
    assert serving.admin_image() == f"{IMAGE}:v2 by {GREEN}"
    assert set(serving.containers()) == {GREEN, PROXY}


@pytest.mark.parametrize("value", ["80", "8000", "HTTP_PORT", "9100x", "-1", "70000"])
def test_admin_port_must_be_a_free_port_number(host: Host, value: str):
    value = str(host.http_port) if value == "HTTP_PORT" else value
    result = host.deploy("v1", ADMIN_PORT=value)
    assert result.returncode == 1
    assert "ADMIN_PORT must be a port number other than 80 and 8000" in result.stderr and value in result.stderr
    assert not (host.docker_state / "calls.jsonl").exists()


def test_admin_port_0_means_none(host: Host):
    result = host.deploy("v1", ADMIN_PORT="0")
    assert result.returncode == 0, result.stderr
    assert "ADMIN_PORT" not in host.containers()[BLUE]["env"]
    assert host.get(host.http_port, "/metrics")[0] == 200


def test_admin_port_in_the_apps_settings_only_fails_before_anything_starts(host: Host):
    """The app would move /metrics to its container's loopback, where neither nginx nor Prometheus reaches it."""
    host.env_file.write_text(host.env_file.read_text() + "ADMIN_PORT=9100\n")
    result = host.deploy("v1")
    assert result.returncode == 1
    assert "serve.env sets ADMIN_PORT but this deploy has none: set the same ADMIN_PORT in" in result.stderr
    assert not (host.docker_state / "calls.jsonl").exists()
