"""Every call the server makes to the MLflow tracking server and Model Registry, in one place."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient

from serving.settings import Settings

log = logging.getLogger("housing.serve")

# Every reload downloads a model; MLflow's progress bars would fill the server log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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

    def locate(self) -> ModelRef:
        """Raises MlflowException, LookupError or OSError when the registry cannot tell."""
        settings = self.settings
        if settings.model_uri:
            return ModelRef(settings.model_uri, None)
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
