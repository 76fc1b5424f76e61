"""train stage: fit every candidate in params.yaml and log each as a nested MLflow run.

Each candidate is one scikit-learn Pipeline from raw records to a price, so the logged model accepts
exactly what `/predict` receives. Writes reports/candidates.json (runs and model URIs, read by the
register stage), reports/metrics.json and reports/predictions.csv (for `dvc metrics` / `dvc plots`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess  # git rev-parse/status below: fixed argv, never a shell  # nosec B404
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, Schema
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.inspection import permutation_importance
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from features import PROFILE_FILE, HousingFeatures, ReferenceProfile, reference_profile
from names import CATEGORICAL_FEATURE, FEATURES, NUMERIC_FEATURES, OPTIONAL_FEATURES, TARGET
from scripts.fetch import DEFAULT_DATA_URL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("train")

DATA = Path("data/housing.csv")
TRAIN = Path("data/train.csv")
HOLDOUT = Path("data/holdout.csv")
REPORTS = Path("reports")
ESTIMATORS = {
    "ridge": Ridge,
    "hist_gradient_boosting": HistGradientBoostingRegressor,
    "random_forest": RandomForestRegressor,
}
MODEL_REQUIREMENTS = ("scikit-learn", "scipy", "numpy", "pandas", "cloudpickle")
SIGNATURE = ModelSignature(
    # mlflow annotates Schema's argument as an invariant list[ColSpec | TensorSpec]; a list[ColSpec] is one.
    inputs=Schema([ColSpec("double", name, required=name not in OPTIONAL_FEATURES)  # type: ignore[arg-type]
                   for name in NUMERIC_FEATURES]
                  + [ColSpec("string", CATEGORICAL_FEATURE)]),
    outputs=Schema([ColSpec("double", TARGET)]),
)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    level = logging.getLogger(logger).level
    logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger(logger).setLevel(level)


def build_pipeline(spec: dict[str, Any]) -> Pipeline:
    """One candidate from its params.yaml entry: {model, features, params}."""
    if spec["model"] not in ESTIMATORS:
        raise ValueError(f"unknown model {spec['model']!r} in params.yaml; choose from {sorted(ESTIMATORS)}")
    feature_args = dict(spec.get("features", {}))
    feature_args["neighbours"] = tuple(feature_args.get("neighbours", ()))
    features = HousingFeatures(**feature_args)
    model_args = dict(spec.get("params", {}))
    if spec["model"] == "hist_gradient_boosting" and features.encoding == "ordinal":
        model_args["categorical_features"] = [0]
    steps = [("features", features)]
    if spec["model"] == "ridge":
        steps.append(("scale", StandardScaler()))
    steps.append(("model", ESTIMATORS[spec["model"]](**model_args)))
    return Pipeline(steps)


def log_pipeline(pipeline: Pipeline, example: pd.DataFrame, profile: ReferenceProfile | None = None) -> ModelInfo:
    """Log a fitted pipeline to the active run as a model that loads anywhere features.py can be imported.

    `profile` (features.reference_profile) is stored in the model directory as extra_files/reference_profile.json,
    so whatever serves a version can measure drift against the data that version was trained on.
    """
    with tempfile.TemporaryDirectory() as folder, _quiet("mlflow.sklearn"):
        extra_files = []
        if profile is not None:
            extra_files.append(str(Path(folder) / PROFILE_FILE))
            Path(extra_files[0]).write_text(json.dumps(profile))
        # cloudpickle, not skops: the pipeline holds our own transformer and a cKDTree, which skops refuses.
        # mlflow.sklearn's log_model is not annotated: it returns the ModelInfo of what it logged.
        return cast(ModelInfo, mlflow.sklearn.log_model(
            pipeline, name="model", signature=SIGNATURE, input_example=example,
            code_paths=[str(Path(__file__).with_name("features.py"))], serialization_format="cloudpickle",
            pip_requirements=[f"{p}=={version(p)}" for p in MODEL_REQUIREMENTS], extra_files=extra_files,
        ))


def regression_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(root_mean_squared_error(actual, predicted)),
        "mae": float(mean_absolute_error(actual, predicted)),
        "r2": float(r2_score(actual, predicted)),
    }


def lineage() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()  # nosec B603, B607  # fixed argv, git from PATH
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],  # nosec B603, B607  # fixed argv
                           capture_output=True, text=True).stdout.strip()
    return {
        "git_commit": commit or "unknown",
        "git_dirty": str(bool(dirty)).lower(),
        # DVC 3 records a file's plain MD5, so this equals the md5 in dvc.lock.
        "data_md5": hashlib.md5(DATA.read_bytes(), usedforsecurity=False).hexdigest(),
        "data_url": os.environ.get("DATA_URL") or DEFAULT_DATA_URL,
    }


# The plot_* functions import matplotlib themselves: scripts/register.py imports regression_metrics from here and
# must not pay for (or depend on) plotting code it never draws.
def plot_predictions(actual: np.ndarray, predicted: np.ndarray, name: str) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6))
    axis = figure.subplots()
    axis.scatter(actual, predicted, s=4, alpha=0.3)
    limit = max(actual.max(), predicted.max())
    axis.plot([0, limit], [0, limit], color="black", linewidth=1)
    axis.set(xlabel="actual median house value (USD)", ylabel="predicted (USD)", title=f"{name}: holdout")
    return figure


def plot_residuals(actual: np.ndarray, predicted: np.ndarray, name: str) -> Figure:
    from matplotlib.figure import Figure

    residuals = actual - predicted
    figure = Figure(figsize=(11, 4.5), layout="tight")
    left, right = figure.subplots(1, 2)
    left.scatter(predicted, residuals, s=4, alpha=0.3)
    left.axhline(0, color="black", linewidth=1)
    left.set(xlabel="predicted (USD)", ylabel="actual - predicted (USD)", title=f"{name}: residuals")
    right.hist(residuals, bins=60)
    right.set(xlabel="actual - predicted (USD)", ylabel="districts", title="residual distribution")
    return figure


def plot_importance(pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray, name: str, seed: int) -> Figure:
    """Permutation importance of the raw input fields, comparable across candidates."""
    from matplotlib.figure import Figure

    sample = X.sample(min(len(X), 2000), random_state=seed)
    result = permutation_importance(pipeline, sample, y[X.index.get_indexer(sample.index)], n_repeats=3,
                                    random_state=seed, scoring="neg_root_mean_squared_error")
    order = np.argsort(result.importances_mean)
    figure = Figure(figsize=(7, 4.5), layout="tight")
    axis = figure.subplots()
    axis.barh(np.array(FEATURES)[order], result.importances_mean[order], xerr=result.importances_std[order])
    axis.set(xlabel="RMSE increase when the field is shuffled (USD)", title=f"{name}: permutation importance")
    return figure


def train_candidate(name: str, spec: dict[str, Any], data: dict[str, Any], cv_folds: int, seed: int) -> dict[str, Any]:
    X_train, y_train, X_holdout, y_holdout = data["X_train"], data["y_train"], data["X_holdout"], data["y_holdout"]
    pipeline = build_pipeline(spec)
    with mlflow.start_run(run_name=name, nested=True) as run:
        mlflow.set_tags({"candidate": name, "model": spec["model"]})
        mlflow.log_params({"model": spec["model"], **{f"features.{k}": v for k, v in spec.get("features", {}).items()},
                           **spec.get("params", {})})
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if cv_folds > 1:
            scores = -cross_val_score(build_pipeline(spec), X_train, y_train, scoring="neg_root_mean_squared_error",
                                      cv=KFold(cv_folds, shuffle=True, random_state=seed))
            metrics.update(cv_rmse_mean=float(scores.mean()), cv_rmse_std=float(scores.std()))
            log.info("%-8s %d-fold CV rmse %.0f +- %.0f; fitting on all training rows", name, cv_folds,
                     metrics["cv_rmse_mean"], metrics["cv_rmse_std"])
        pipeline.fit(X_train, y_train)
        metrics["fit_seconds"] = time.perf_counter() - started
        predicted = pipeline.predict(X_holdout)
        metrics.update(regression_metrics(y_holdout, predicted))
        mlflow.log_metrics(metrics)
        for figure, path in [
            (plot_predictions(y_holdout, predicted, name), "plots/predicted_vs_actual.png"),
            (plot_residuals(y_holdout, predicted, name), "plots/residuals.png"),
            (plot_importance(pipeline, X_holdout, y_holdout, name, seed), "plots/feature_importance.png"),
        ]:
            mlflow.log_figure(figure, path)
        profile = reference_profile(X_train, predicted)
        info = log_pipeline(pipeline, X_holdout.dropna().head(3), profile)
    log.info("%-8s holdout rmse %.0f  mae %.0f  r2 %.4f  (%.1f s)", name, metrics["rmse"], metrics["mae"],
             metrics["r2"], metrics["fit_seconds"])
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "metrics": metrics, "predicted": predicted}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = yaml.safe_load(Path("params.yaml").read_text())
    train_params, seed = params["train"], params["split"]["seed"]
    train, holdout = pd.read_csv(TRAIN), pd.read_csv(HOLDOUT)
    data = {"X_train": train[list(FEATURES)], "y_train": train[TARGET].to_numpy(),
            "X_holdout": holdout[list(FEATURES)], "y_holdout": holdout[TARGET].to_numpy()}
    tags = lineage()
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "california-housing"))
    with mlflow.start_run(run_name=f"retrain-{tags['data_md5'][:8]}") as parent:
        mlflow.set_tags(tags)
        mlflow.log_params({"holdout_fraction": params["split"]["holdout_fraction"], "seed": seed,
                           "train_rows": len(train), "holdout_rows": len(holdout)})
        results = {}
        for number, (name, spec) in enumerate(train_params["candidates"].items(), start=1):
            # Progress: a candidate can take minutes on the full data, and CV multiplies that by cv_folds + 1.
            log.info("candidate %d/%d: %s on %d rows%s", number, len(train_params["candidates"]), name, len(train),
                     f" ({train_params['cv_folds']}-fold CV, then the final fit)" if train_params["cv_folds"] > 1
                     else "")
            results[name] = train_candidate(name, spec, data, train_params["cv_folds"], seed)
        best = min(results, key=lambda name: results[name]["metrics"]["rmse"])
        mlflow.set_tag("best_candidate", best)
        mlflow.log_metrics({f"best_{k}": v for k, v in results[best]["metrics"].items()})

    REPORTS.mkdir(exist_ok=True)
    candidates = {name: {k: v for k, v in result.items() if k != "predicted"} for name, result in results.items()}
    record = {"parent_run_id": parent.info.run_id, "best": best, "lineage": tags, "candidates": candidates}
    (REPORTS / "candidates.json").write_text(json.dumps(record, indent=2) + "\n")
    (REPORTS / "metrics.json").write_text(json.dumps(
        {"best": best, **results[best]["metrics"], "candidates": {n: r["metrics"] for n, r in results.items()}},
        indent=2) + "\n")
    pd.DataFrame({"actual": data["y_holdout"], "predicted": results[best]["predicted"]}).to_csv(
        REPORTS / "predictions.csv", index=False)
    log.info("best candidate: %s (holdout rmse %.0f)", best, results[best]["metrics"]["rmse"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
