"""The served model: loaded from the registry, checked before it serves, kept, and replaced when the registry moves."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import mlflow.sklearn
import numpy as np
import orjson
import pandas as pd
from mlflow.models import Model, ModelSignature
from sklearn.pipeline import Pipeline

from features import PROFILE_FILE, FloatArray
from names import (
    CANDIDATE,
    CHAMPION,
    FEATURES,
    OPTIONAL_FEATURES,
    PREVIOUS_CHAMPION,
    PROMOTION_TAG,
    REJECTED,
    REVOKED,
    TRUSTED_PROMOTIONS,
)
from serving.background import BackgroundThread
from serving.drift import DriftWindow
from serving.metrics import (
    CANDIDATE_INFO,
    COMPILE_FALLBACKS,
    LAST_RELOAD,
    MODEL_INFO,
    MODEL_LOADED,
    RELOADS,
    REVOKED_SERVING,
    SHADOW_DROPPED,
    SHADOW_ERRORS,
    SHADOW_PREDICTIONS,
    ReloadResult,
)
from serving.registry import ModelRef, Registry, RegistryUnavailable
from serving.schema import SMOKE_RECORDS, to_arrays
from serving.settings import Settings
from serving.signature import SignatureRefused, verify
from serving.trees import CompiledModel, compile_pipeline, predict

log = logging.getLogger("housing.serve")

RETRY_S = 5  # how soon to look again while no model is loaded; also the Retry-After of a 503
MAX_RETRY_S = 60  # the longest wait between checks while no model is loaded and polling is off
REFERENCE_PROFILE = Path("extra_files", PROFILE_FILE)  # in the model directory, from train.log_pipeline

# How a registered version got where it is, as the promotion pipeline records it on the version (scripts/register.py,
# `make promote`; docs/serving.md): `gate` when the gate promoted it, `human` when a person approved it, `rejected`
# when the gate refused it. A version the alias or stage leads to is loaded only with a trusted value: anyone who can
# move an alias could otherwise serve any model. MODEL_URI, an explicit choice, is loaded without this record.


class ModelLabel(TypedDict):
    """How answers and the prediction log name the model."""

    name: str
    version: str | None


@dataclass(frozen=True)
class ServedModel:
    ref: ModelRef
    name: str
    requested: dict[str, str]  # {"alias": ...} or {"stage": ...}; empty for MODEL_URI
    pipeline: Pipeline
    compiled: CompiledModel | None  # None: scikit-learn predicts (serving/trees.py could not reproduce it)
    drift: DriftWindow | None  # None: the model came without a reference profile
    run_id: str | None
    metrics: dict[str, float]
    loaded_at: datetime
    signature: ModelSignature | None = None  # as logged; check_schema made sure its inputs are FEATURES

    @property
    def label(self) -> ModelLabel:
        return {"name": self.name, "version": self.ref.version}

    def predict(self, numeric: FloatArray, codes: FloatArray) -> FloatArray:
        return predict(self.compiled, self.pipeline, numeric, codes)

    def describe(self) -> dict[str, object]:
        return {**self.label, **self.requested, "uri": public_uri(self.ref.uri), "run_id": self.run_id,
                "loaded_at": self.loaded_at.isoformat(), "metrics": self.metrics}


class ModelRefused(Exception):
    """A check this server makes refused the model; the message says which, in terms fit for a public answer."""


def public_uri(uri: str) -> str | None:
    """The model's URI as public answers show it: a registry coordinate (models:/, runs:/) names no host; a path or
    a bucket that MODEL_URI names is the server's own business, shown as None."""
    return uri if uri.startswith(("models:/", "runs:/")) else None


def load(ref: ModelRef, settings: Settings, registry: Registry) -> ServedModel:
    """Download, check and load the model; raise unless it is fit to serve."""
    with tempfile.TemporaryDirectory(prefix="housing-model-") as scratch:
        local = registry.download(ref, scratch)
        if not settings.model_uri:  # MODEL_URI is an explicit choice; a registry version must be what the gate signed
            verify(Path(local), settings.verify_keys, settings.model_name, ref.version)
        metadata = Model.load(local)
        check_schema(metadata)
        pipeline = mlflow.sklearn.load_model(local)
        drift = drift_window(ref, Path(local) / REFERENCE_PROFILE, settings.drift_window)
    if not hasattr(pipeline.steps[0][1], "transform_arrays"):
        raise ModelRefused("the first pipeline step is not features.HousingFeatures")
    compiled = compile_pipeline(pipeline)  # checked against the pipeline on probe rows; None, logged, if it differs
    if compiled is None:
        COMPILE_FALLBACKS.inc()
    model = ServedModel(ref=ref, name=settings.model_name, requested=requested_model(settings), pipeline=pipeline,
                        compiled=compiled, drift=drift, run_id=metadata.run_id,
                        metrics=registry.training_metrics(metadata.run_id), loaded_at=datetime.now(UTC),
                        signature=metadata.signature)
    smoke_test(model)
    return model


def drift_window(ref: ModelRef, profile: Path, size: int) -> DriftWindow | None:
    """An empty drift window against the model's reference profile; None, logged, without a usable profile."""
    if not profile.is_file():
        log.warning("drift is not measured for %s: it has no %s", ref.uri, REFERENCE_PROFILE)
        return None
    try:
        return DriftWindow(orjson.loads(profile.read_bytes()), size)
    except (KeyError, TypeError, ValueError) as error:
        log.warning("drift is not measured for %s: unusable %s (%s: %s)", ref.uri, REFERENCE_PROFILE,
                    type(error).__name__, error)
        return None


def requested_model(settings: Settings) -> dict[str, str]:
    if settings.model_uri:
        return {}
    if settings.model_stage:
        return {"stage": settings.model_stage}
    return {"alias": settings.model_alias}


def check_schema(metadata: Model) -> None:
    """Refuse a model whose input signature is not the schema this server checks requests against."""
    expected = [(name, name not in OPTIONAL_FEATURES) for name in FEATURES]
    inputs = metadata.signature.inputs.inputs if metadata.signature else []
    actual = [(column.name, column.required) for column in inputs]
    if actual != expected:
        raise ModelRefused(f"model inputs {actual} differ from the served schema {expected}")


def promotion_refusal(ref: ModelRef, tags: Mapping[str, str]) -> str | None:
    """Why the registry's record does not let `ref` serve; None when the gate promoted it or a person approved it."""
    promotion = tags.get(PROMOTION_TAG)
    if promotion in TRUSTED_PROMOTIONS:
        return None
    if promotion is None:
        why = f"has no {PROMOTION_TAG} tag: neither the gate nor a person promoted it"
    elif promotion == REJECTED:
        why = f"is tagged {PROMOTION_TAG}=rejected: the gate refused it"
    else:
        why = f"is tagged {PROMOTION_TAG}={promotion!r}, not one of {', '.join(TRUSTED_PROMOTIONS)}"
    return (f"{ref.uri} {why}. Point the alias back (`make rollback`), or approve this version: "
            f"`make promote VERSION={ref.version} REASON=\"...\"`")


def revocation(ref: ModelRef, tags: Mapping[str, str]) -> str:
    """Why `ref` is out of service, as `make revoke` recorded it."""
    return (f"{ref.uri} was revoked by {tags.get('revoked_by', 'someone')} at {tags.get('revoked_at', '?')}: "
            f"{tags.get('revoked_reason', 'no reason given')}")


def smoke_test(model: ServedModel) -> None:
    fast = model.predict(*to_arrays(list(SMOKE_RECORDS)))
    reference = model.pipeline.predict(pd.DataFrame(list(SMOKE_RECORDS), columns=list(FEATURES)))
    if not np.all(np.isfinite(fast)):
        raise ModelRefused(f"smoke predictions are not all finite: {fast.tolist()}")
    if not np.allclose(fast, reference, rtol=1e-6, atol=0):
        raise ModelRefused(f"fast path {fast.tolist()} disagrees with the pipeline {reference.tolist()}")


@dataclass(frozen=True)
class Reload:
    result: ReloadResult
    detail: str = ""


class NotServing(TypedDict):
    """The version the registry points at, which this server refused or failed to load, and why (in /model)."""

    version: str | None
    uri: str | None  # public_uri
    result: ReloadResult
    reason: str


class ModelKeeper:
    """Holds the served model; replaces it only with one the registry records as promoted (PROMOTION_TAG), that
    loaded and passed the smoke test.

    A request reads `current` once and finishes on that model, so swapping is one assignment.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self.not_serving: NotServing | None = None  # None while the registry points at the served model
        self.shadow: ServedModel | None = None  # the CANDIDATE alias's version, scored in shadow (serving/shadow.py)
        self._shadow_refused: ModelRef | None = None  # a candidate that failed its checks: not tried again
        self._registry = Registry(settings)
        self._lock = threading.Lock()

    def refresh(self) -> Reload:
        with self._lock:
            outcome = self._refresh()
            if self.settings.model_alias == CHAMPION and not self.settings.model_uri:
                self._refresh_shadow()
        RELOADS.labels(outcome.result).inc()
        return outcome

    def _refresh_shadow(self) -> None:
        """Load the version alias CANDIDATE points at, on the champion's path: promoted, signed, checked. A candidate
        never serves a client; it only scores in shadow, so any failure here leaves the champion untouched."""
        ref: ModelRef | None = None
        try:
            ref = self._registry.candidate()
            if ref is None or ref in (self._shadow_refused, self.shadow and self.shadow.ref):
                if ref is None:
                    self._set_shadow(None)
                return
            refusal = promotion_refusal(ref, self._registry.version_tags(ref))
            if refusal:
                raise ModelRefused(refusal)
            model = load(ref, self.settings, self._registry)
        except (mlflow.MlflowException, OSError) as error:  # the registry: keep what is in shadow, ask again later
            log.warning("cannot check the candidate: %s", error)
            return
        except Exception as error:  # refused or failed: counted once, not retried until the alias moves
            log.warning("not scoring candidate %s in shadow: %s", ref, error, exc_info=True)
            self._shadow_refused = ref
            self._set_shadow(None)
            return
        self._set_shadow(replace(model, requested={"alias": CANDIDATE}, drift=None))
        log.info("scoring candidate version %s in shadow", model.ref.version)

    def _set_shadow(self, model: ServedModel | None) -> None:
        if self.shadow is not None:
            CANDIDATE_INFO.labels(self.shadow.ref.version or "").set(0)
        if model is not None:
            version = model.ref.version or ""
            CANDIDATE_INFO.labels(version).set(1)
            # Its series exist at 0 from the start: rate() and increase() cannot count the value a series is born
            # with, so a first burst of errors would go unseen.
            for counter in (SHADOW_PREDICTIONS, SHADOW_ERRORS, SHADOW_DROPPED):
                counter.labels(version)
        self.shadow = model

    @property
    def registry_address(self) -> str:
        return self._registry.address

    def drift_window(self) -> DriftWindow | None:
        model = self.current
        return model.drift if model is not None else None

    def _refresh(self) -> Reload:
        try:
            located = self._registry.locate()
        except RegistryUnavailable as error:  # logged by the registry, once per change of its state
            return Reload("unavailable", str(error))
        target: ModelRef | None = located
        revoked = ""  # why the version the registry points at is revoked ("" while it is not)
        # The record is read at every look, before anything is downloaded or unpickled: a later approval, or a
        # revocation of the version being served, takes effect within one poll.
        if not self.settings.model_uri:  # MODEL_URI is an explicit choice
            try:
                tags = self._registry.version_tags(located)
                if tags.get(PROMOTION_TAG) == REVOKED:
                    revoked = revocation(located, tags)
                    target, tags = self._rollback_target(tags)
            except (mlflow.MlflowException, OSError) as error:
                log.warning("cannot read the promotion record of %s: %s", located.uri, error)
                return Reload("unavailable", str(error))
            if target is None:  # revoked, and nothing to go back to: the model in hand keeps serving
                REVOKED_SERVING.set(1)
                return Reload("refused", f"{revoked}; no unrevoked version to go back to: the served model stays")
            refusal = promotion_refusal(target, tags)
            if refusal:
                self._not_serving(target, "refused", refusal)
                return Reload("refused", refusal)
        ref = target if target is not None else located  # None only for a revocation, which returned above
        REVOKED_SERVING.set(0)
        if self.current is not None and self.current.ref == ref:
            self.not_serving = None
            return Reload("refused", f"{revoked}; serving version {ref.version}") if revoked else Reload(
                "unchanged")
        try:
            model = load(ref, self.settings, self._registry)
        except SignatureRefused as error:
            log.warning("refused %s: %s", ref.uri, error)
            # Which key or file failed is for the log and /reload's answer (behind the token), not for /model.
            self._not_serving(ref, "refused", f"{public_uri(ref.uri)}: not what a key this server trusts signed "
                                              "for it (the server log and /reload say why)")
            return Reload("refused", f"{ref.uri}: {error}")
        except Exception as error:  # whatever went wrong, keep serving the model we have
            log.exception("refused %s", ref.uri)
            # /model is public: it says which check refused the model, never an exception's text, which names
            # buckets, paths and hosts. Those go to the log, and to /reload's answer (behind the token).
            public = str(error) if isinstance(error, ModelRefused) else "could not be loaded (the server log says why)"
            self._not_serving(ref, "failed", f"{public_uri(ref.uri)}: {public}")
            return Reload("failed", f"{ref.uri}: {type(error).__name__}: {error}")
        self.not_serving = None
        self._swap(model)
        log.info("serving %s version %s (%s)", model.name, model.ref.version, ref.uri)
        return Reload("refused", f"{revoked}; went back to version {ref.version}") if revoked else Reload(
            "loaded", ref.uri)

    def _rollback_target(self, tags: Mapping[str, str]) -> tuple[ModelRef | None, dict[str, str]]:
        """The version the revoked one replaced (its PREVIOUS_CHAMPION tag) and its record, unless it is revoked too
        or missing; (None, {}) then."""
        previous = tags.get(PREVIOUS_CHAMPION)
        if not previous:
            return None, {}
        ref = ModelRef(f"models:/{self.settings.model_name}/{previous}", previous)
        previous_tags = self._registry.version_tags(ref)
        return (None, {}) if previous_tags.get(PROMOTION_TAG) == REVOKED else (ref, previous_tags)

    def _not_serving(self, ref: ModelRef, result: ReloadResult, reason: str) -> None:
        noted: NotServing = {"version": ref.version, "uri": public_uri(ref.uri), "result": result, "reason": reason}
        if noted != self.not_serving and result == "refused":  # once, not at every poll
            log.warning("not serving %s", reason)
        self.not_serving = noted

    def _swap(self, model: ServedModel) -> None:
        previous, self.current = self.current, model
        if previous is not None:
            MODEL_INFO.labels(previous.name, previous.ref.version or "").set(0)
        MODEL_INFO.labels(model.name, model.ref.version or "").set(1)
        MODEL_LOADED.set(1)
        LAST_RELOAD.set(model.loaded_at.timestamp())


class Poller(BackgroundThread):
    """Loads the first model, then asks the registry every interval.

    Until a model loads it retries sooner, backing off: RETRY_S, twice that, and so on, up to the interval (up to
    MAX_RETRY_S with polling off). With a model loaded it never waits longer than the interval, failures or not, so
    a registry that comes back has its champion served within two intervals.
    """

    name = "model-poller"

    def __init__(self, keeper: ModelKeeper, interval_s: float) -> None:
        super().__init__()
        self._keeper = keeper
        self._interval_s = interval_s

    def _run(self) -> None:
        failures = 0  # checks in a row that failed (registry unavailable, or the new version refused)
        while not self._stop.is_set():
            try:
                result = self._keeper.refresh().result
            except Exception:  # the poller must outlive any surprise, or reloading would stop silently
                log.exception("model refresh failed")
                result = "failed"
            failures = failures + 1 if result in ("failed", "unavailable") else 0
            wait = self._next_wait(failures)
            if wait is None or self._stop.wait(wait):
                return

    def _next_wait(self, failures: int) -> float | None:
        if self._keeper.current is None:
            ceiling = self._interval_s or MAX_RETRY_S
            return float(min(ceiling, RETRY_S * 2 ** min(max(failures - 1, 0), 8)))
        return self._interval_s or None
