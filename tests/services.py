"""Real local services as subprocesses on 127.0.0.1, for end-to-end tests.

`LocalServices` runs `scripts/services.sh up|down` (moto for S3 + Secrets Manager, an MLflow server whose artifacts
live in a moto bucket) with its own state directory and free ports. `ServingApp` runs `python serve.py`. Each
process tree gets its own session and is stopped by its process group, whatever happened in the test.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import boto3
import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVICES_SCRIPT = ROOT / "scripts" / "services.sh"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"

log = logging.getLogger(__name__)
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def clean_environment() -> dict[str, str]:
    """This process's environment without any AWS, MLflow, DVC or data settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DVC_", "DATA_URL"))}


@dataclass(frozen=True)
class LocalServices:
    """moto + MLflow server, started and stopped by scripts/services.sh."""

    state_dir: Path
    moto_port: int
    mlflow_port: int
    data_bucket: str = "housing-data"
    dvc_bucket: str = "housing-dvc"
    mlflow_bucket: str = "housing-mlflow"
    github_secret: str = "housing-mlops/github-pat"  # placeholder value until a test stores a token

    @classmethod
    def on_free_ports(cls, state_dir: Path) -> LocalServices:
        return cls(state_dir, free_port(), free_port())

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def aws_env(self) -> dict[str, str]:
        """What a client of moto needs: endpoint, dummy credentials, region."""
        return {"AWS_ENDPOINT_URL": self.moto_url, "AWS_DEFAULT_REGION": REGION, **DUMMY_CREDENTIALS}

    def client(self, service: str) -> Any:
        """A boto3 client of `service` ("s3", "secretsmanager") talking to this moto."""
        return boto3.client(
            service,
            endpoint_url=self.moto_url,
            region_name=REGION,
            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def __enter__(self) -> Self:
        try:
            self._script("up")
        except BaseException:
            self._script("down")
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._script("down")

    def _script(self, command: str) -> None:
        settings = {
            "SERVICES_DIR": str(self.state_dir),
            "MOTO_PORT": str(self.moto_port),
            "MLFLOW_PORT": str(self.mlflow_port),
            "DATA_BUCKET": self.data_bucket,
            "S3_DVC_BUCKET": self.dvc_bucket,
            "MLFLOW_BUCKET": self.mlflow_bucket,
            "GITHUB_PAT_SECRET_NAME": self.github_secret,
        }
        result = subprocess.run(
            [str(SERVICES_SCRIPT), command],
            env={**clean_environment(), **settings},
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"scripts/services.sh {command} failed:\n{result.stdout}{result.stderr}")
        log.info("services.sh %s:\n%s", command, result.stderr.strip())


class ServingApp:
    """`python serve.py` from this checkout, in its own process group, on a free port."""

    def __init__(self, settings: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.settings = {**settings, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        with self.log_path.open("w") as output:
            self._process = subprocess.Popen(
                [sys.executable, "serve.py"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**clean_environment(), **self.settings},
            )
        try:
            wait_for(self._healthy, 60, f"serve.py answering /health on {self.url} (log: {self.log_path})")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            stop_group(self._process)

    def _healthy(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"serve.py exited with {self._process.returncode}; see {self.log_path}")
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


def stop_group(process: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process group led by `process` (started with start_new_session), SIGKILL after `grace_s`."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("process group %d ignored SIGTERM for %.0f s: killing it", process.pid, grace_s)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children the leader left behind
    except ProcessLookupError:
        pass
    process.wait()
