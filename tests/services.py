"""Real local services as subprocesses on 127.0.0.1, for end-to-end tests.

`LocalServices` runs `scripts/services.sh up|down` (moto for S3 + Secrets Manager, an MLflow server with basic auth
whose artifacts live in a moto bucket) with its own state directory and free ports. Each process tree gets its own
session and is stopped by its process group, whatever happened in the test.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import boto3
import pytest

from tests.conftest import clean_environment
from tests.registry import TemporaryRegistry, promotion_keys, temporary_registry
from tests.servers import ROOT, free_port

SERVICES_SCRIPT = ROOT / "scripts" / "services.sh"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"

log = logging.getLogger(__name__)


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

    def account(self, role: str) -> dict[str, str]:
        """The MLflow settings of `role`: "writer" (retraining) or "reader" (serving); passwords from services.sh."""
        secrets = dict(line.split("=", 1) for line in (self.state_dir / "credentials").read_text().splitlines())
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_TRACKING_USERNAME": role,
                "MLFLOW_TRACKING_PASSWORD": secrets[f"{role.upper()}_PASSWORD"]}

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


@contextmanager
def as_writer(services: LocalServices, root: Path, **env: str) -> Iterator[TemporaryRegistry]:
    """A registry on `services` as the retraining writer sees it (its account, S3, this process's promotion key),
    with `env` too, until the block ends."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**services.account("writer"), **services.aws_env(),
                            "MODEL_SIGNING_KEY": str(promotion_keys()[0]), "MODEL_VERIFY_KEYS": promotion_keys()[1],
                            **env}.items():
            patch.setenv(name, value)
        with temporary_registry(root, services.mlflow_url) as writer:
            yield writer
