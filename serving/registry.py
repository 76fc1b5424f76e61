"""Every call the server makes to the MLflow tracking server and Model Registry, in one place.

Every call is bounded. MLflow's client retries a dead server for minutes by default (7 retries, back-off factor 2,
120 s per attempt); a server must not wait that long to learn it cannot reload. The defaults below (MLflow's own
variables, so a setting in the environment wins) bound one registry call to 3 attempts of at most 3 s each, with
about 3 s of back-off between them: a refused connection fails in ~3 s, a hung server in ~12 s. Model files read
straight from S3 (no MLflow artifact proxy) go through boto3, bounded by its own AWS_MAX_ATTEMPTS.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.tracking import MlflowClient

from names import CANDIDATE
from serving.settings import Settings

log = logging.getLogger("housing.serve")

REGISTRY_CALL_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",  # seconds per attempt (connect, and each read)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # 0 s before the first retry, 2 s before the second
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "AWS_MAX_ATTEMPTS": "3",
    "AWS_RETRY_MODE": "standard",
}
for _name, _value in REGISTRY_CALL_BOUNDS.items():
    os.environ.setdefault(_name, _value)
# Every reload downloads a model; MLflow's progress bars would fill the server log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RegistryState = Literal["answering", "no model", "unavailable"]


# What MLflow answers for an alias that is not set (INVALID_PARAMETER_VALUE) or a model it does not know.
NO_SUCH_ALIAS = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"})


class RegistryUnavailable(Exception):
    """The registry could not tell which model to serve; the message names the registry and what went wrong."""


@dataclass(frozen=True)
class ModelRef:
    """Which model to serve: what the registry (or MODEL_URI) points at."""

    uri: str
    version: str | None


class Registry:
    """The model to serve (MODEL_URI, or what MODEL_STAGE or MODEL_ALIAS points at), its files, its training run.

    The client is made on first use, off the start-up path: an unusable MLFLOW_TRACKING_URI must not stop the server.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: MlflowClient | None = None
        self._state: RegistryState = "answering"

    @property
    def address(self) -> str:
        """The registry's URI without credentials, for messages."""
        parts = urlsplit(mlflow.get_tracking_uri())
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=host))

    def locate(self) -> ModelRef:
        """Raises RegistryUnavailable when the registry cannot tell. Logs when its state changes, not per call."""
        if self.settings.model_uri:
            return ModelRef(self.settings.model_uri, None)
        try:
            ref = self._locate()
        except (mlflow.MlflowException, LookupError, OSError) as error:
            missing = isinstance(error, LookupError) or (
                isinstance(error, mlflow.MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST")
            if missing:
                message = f"the model registry at {self.address} has no model to serve: {error}"
            else:
                message = f"the model registry at {self.address} is unavailable: {error}"
            self._note("no model" if missing else "unavailable", message)
            raise RegistryUnavailable(message) from None
        self._note("answering", f"the model registry at {self.address} answers again")
        return ref

    def _note(self, state: RegistryState, message: str) -> None:
        if state == self._state:
            return
        self._state = state
        if state == "answering":
            log.info("%s", message)
        else:
            log.warning("%s; the served model stays; logged again only when this changes", message)

    def candidate(self) -> ModelRef | None:
        """The version alias CANDIDATE points at (None: none), to serve in shadow; raises MlflowException."""
        try:
            version = self._registry().get_model_version_by_alias(self.settings.model_name, CANDIDATE).version
        except mlflow.MlflowException as error:
            if error.error_code in NO_SUCH_ALIAS:
                return None
            raise
        return ModelRef(f"models:/{self.settings.model_name}/{version}", str(version))

    def _locate(self) -> ModelRef:
        settings = self.settings
        client = self._registry()
        if settings.model_stage:
            with warnings.catch_warnings():  # stages are deprecated in MLflow 3, still used by seed deployments
                warnings.simplefilter("ignore", FutureWarning)
                versions = client.get_latest_versions(settings.model_name, [settings.model_stage])
            if not versions:
                raise LookupError(f"{settings.model_name} has no version in stage {settings.model_stage}")
            version = max(versions, key=lambda v: int(v.version)).version
        else:
            version = client.get_model_version_by_alias(settings.model_name, settings.model_alias).version
        return ModelRef(f"models:/{settings.model_name}/{version}", str(version))

    def download(self, ref: ModelRef, directory: str) -> str:
        """The model's files, in `directory`; returns the local model directory."""
        local: str = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=directory)
        return local

    def version_tags(self, ref: ModelRef) -> dict[str, str]:
        """The registry's tags on the version `ref` names, e.g. how it was promoted; raises MlflowException."""
        return dict(self._registry().get_model_version(self.settings.model_name, str(ref.version)).tags)

    def training_metrics(self, run_id: str | None) -> dict[str, float]:
        if not run_id:
            return {}
        try:
            metrics: dict[str, float] = self._registry().get_run(run_id).data.metrics
        except mlflow.MlflowException as error:  # a model copied away from its tracking server still serves
            log.warning("no training metrics for run %s: %s", run_id, error)
            return {}
        return metrics

    def _registry(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient()
        return self._client
