"""A model in a registry, as the gate leaves it: small pipelines fitted on synthetic data, logged to an MLflow store
only the test uses, registered with the gate's promotion tag, signed with this process's promotion key and, unless a
test says otherwise, made the champion.

Serving refuses a version without the tag (names.PROMOTION_TAG) or the signature (serving/signature.py), so every
test that serves a registered model makes it here; tests/servers.py gives every server the key's public half.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mlflow.tracking import MlflowClient
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

import train
from features import reference_profile
from names import BY_GATE, BY_PERSON, CHAMPION, FEATURES, PROMOTION_TAG, TARGET, TRUSTED_PROMOTIONS
from scripts.sign import sign_version
from tests.conftest import RIDGE, synthetic_housing


@functools.cache
def promotion_keys() -> tuple[Path, str]:
    """This test process's promotion key (its PEM file) and MODEL_VERIFY_KEYS for its public half. Made here, at
    first use: no key lives in the repository."""
    folder = Path(tempfile.mkdtemp(prefix="housing-test-keys-"))
    key = ec.generate_private_key(ec.SECP256R1())
    private = folder / "promotion.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = folder / "promotion.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, str(public)


def fitted(spec: dict, seed: int = 0) -> Pipeline:
    """`spec` (a params.yaml train.candidates entry) as train.py builds it, fitted on synthetic_housing(seed=seed)."""
    data = synthetic_housing(seed=seed)
    with threadpool_limits(1, "openmp"):  # OpenMP on a busy 2-core machine is slower than one thread
        return train.build_pipeline(spec).fit(data[list(FEATURES)], data[TARGET].to_numpy())


class RaisesAbove(RegressorMixin, BaseEstimator):
    """A fitted regressor that raises for any batch in which it would predict more than `limit`: a model that fails
    on some records and passes the smoke test. Importable, so a server can unpickle it."""

    def __init__(self, inner: Any = None, limit: float = 0.0) -> None:
        self.inner = inner
        self.limit = limit

    def fit(self, features: Any, target: Any) -> RaisesAbove:
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return True  # `inner` is

    def predict(self, features: Any) -> np.ndarray:
        predicted = np.asarray(self.inner.predict(features))
        if np.any(predicted > self.limit):
            raise ValueError(f"a prediction above {self.limit:.0f}")
        return predicted


class Prints(RaisesAbove):
    """Talks on stdout while it predicts."""

    def predict(self, features: Any) -> np.ndarray:
        print("a model that talks on stdout")  # the point of it
        return super().predict(features)


class Hangs(RaisesAbove):
    """Never answers: stops its own process (SIGSTOP), so the test needs no sleep."""

    def predict(self, features: Any) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGSTOP)
        return super().predict(features)


class Exits(RaisesAbove):
    """Ends its process, as a crash in compiled code would."""

    def predict(self, features: Any) -> np.ndarray:
        os._exit(3)


def predicting_nan() -> Pipeline:
    """A fitted ridge whose coefficients are NaN: it loads, and predicts NaN, which serving refuses to serve."""
    pipeline = fitted(RIDGE)
    pipeline.named_steps["model"].coef_[:] = np.nan
    return pipeline


@dataclass
class TemporaryRegistry:
    """An MLflow tracking store and model registry that one test module owns."""

    uri: str
    experiment_id: str
    client: MlflowClient
    downloads: Path
    _loaded: dict[str, mlflow.pyfunc.PyFuncModel] = field(default_factory=dict)

    def register(self, name: str, pipeline: Pipeline, *, alias: str | None = CHAMPION, promotion: str | None = BY_GATE,
                 profiled: bool = False) -> str:
        """A new version of `name` holding `pipeline`, tagged PROMOTION_TAG=`promotion` (as the gate tags them; None:
        no tag, as nobody promoted it), with `alias` moved to it by hand (None: left where it is).

        `profiled`: the model carries a reference profile (as train.py logs it) of synthetic_housing's distribution,
        so a server watches its drift."""
        profile = None
        if profiled:
            data, holdout = synthetic_housing(seed=0)[list(FEATURES)], synthetic_housing(500, seed=1)[list(FEATURES)]
            profile = reference_profile(data, pipeline.predict(holdout))
        with mlflow.start_run(experiment_id=self.experiment_id):
            info = train.log_pipeline(pipeline, synthetic_housing(rows=3, missing_bedrooms=0.0)[list(FEATURES)],
                                      profile)
        tags = {PROMOTION_TAG: promotion} if promotion else {}
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
        if promotion in TRUSTED_PROMOTIONS:  # signed as a promotion signs it, with this process's key
            sign_version(self.client, name, version, {"decision": promotion}, key=promotion_keys()[0])
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        return version

    def approve(self, name: str, version: str, promotion: str = BY_PERSON) -> None:
        """What a promotion records, without moving the alias: the version signed as it is now, then tagged."""
        sign_version(self.client, name, version, {"decision": promotion}, key=promotion_keys()[0])
        self.client.set_model_version_tag(name, version, PROMOTION_TAG, promotion)

    def predictions(self, name: str, version: str, frame: pd.DataFrame) -> np.ndarray:
        """What the registered model itself predicts, through MLflow's pyfunc interface."""
        uri = f"models:/{name}/{version}"
        if uri not in self._loaded:
            target = self.downloads / f"{name}-{version}"
            target.mkdir(parents=True)
            self._loaded[uri] = mlflow.pyfunc.load_model(uri, dst_path=str(target))
        return np.asarray(self._loaded[uri].predict(frame), dtype=float).ravel()


@contextmanager
def temporary_registry(root: Path, tracking_uri: str | None = None) -> Iterator[TemporaryRegistry]:
    """A registry in `root` (a SQLite store, artifacts beside it), or at `tracking_uri` (an `mlflow server`, which
    keeps the artifacts), that mlflow's module functions use until the block ends.

    The environment, not mlflow.set_tracking_uri: nothing lingers into the next test module.
    """
    uri = tracking_uri or f"sqlite:///{root}/mlflow.db"
    artifacts = None if tracking_uri else (root / "artifacts").as_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        experiment_id = mlflow.create_experiment(root.name, artifact_location=artifacts)
        yield TemporaryRegistry(uri, experiment_id, MlflowClient(uri), root / "downloads")
