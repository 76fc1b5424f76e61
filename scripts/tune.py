"""`make tune`: search one candidate's hyper-parameters with Optuna, track every trial in MLflow, propose the winner.

Only data/train.csv is read (the split stage's training rows). Each trial is scored by k-fold CV on those rows; the
holdout, on which the gate judges challenger against champion, is never opened, so it stays an unbiased judge.

A study is stored in Optuna's RDB storage (sqlite optuna.db next to the MLflow sqlite store), named after the
training rows and the search space: a second `make tune` resumes it, new data or a new space starts a new one.
Trial 0 of every study is today's params.yaml, which fixes the budgets: a trial is feasible when its serving cost
per row (1 row and 1,000 rows, through the serving app's prediction path) and its fit time stay within
`tune.max_latency_ratio` / `tune.max_fit_ratio` of trial 0's. The proposal is the feasible trial with the lowest CV
RMSE, written as a change to params.yaml (shown as a diff); `make tune APPLY=1` writes it into params.yaml.

Settings (environment):

    TUNE_MINUTES         time budget of this run (10); a trial that has started finishes
    TUNE_TRIALS          trial budget of the whole study, resumes included (params.yaml tune.n_trials)
    OPTUNA_STORAGE       the study's storage URL (optuna.db beside an sqlite MLFLOW_TRACKING_URI, else ./optuna.db)
    TUNE_EXPERIMENT      MLflow experiment of the study's runs (california-housing-tune)
    MLFLOW_TRACKING_URI  where the parent run and one nested run per trial go

`python -m scripts.tune --apply` runs no trial: it writes the stored study's proposal into params.yaml.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import logging
import os
import sys
import time
import timeit
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the plots only go to MLflow

import mlflow
import numpy as np
import optuna
import pandas as pd
import yaml
from matplotlib import pyplot
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq
from sklearn.metrics import root_mean_squared_error
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from features import category_codes
from names import CATEGORICAL_FEATURE, FEATURES, NUMERIC_FEATURES, TARGET
from serving.trees import compile_pipeline
from train import build_pipeline

log = logging.getLogger("tune")

PARAMS = Path("params.yaml")
TRAIN = Path("data/train.csv")  # never data/holdout.csv: see the module docstring
OUTPUT = Path("reports/tune")
FEATURE_OPTIONS = frozenset({"neighbours", "folds"})  # search-space names that go to HousingFeatures, not the model
SIGNIFICANT_DIGITS = 3  # suggested floats are rounded before use, so the proposal is exactly what was scored
LATENCY_ROWS = 1000
# TPE's random start: a 5-minute study on 2 cores runs about a dozen trials, so model-based sampling must start early.
STARTUP_TRIALS = 5
# The study's budgets compare with trial 0, today's params.yaml, measured in the same study.
BASELINE = "baseline"


@dataclass(frozen=True)
class TuneSettings:
    minutes: float
    trials: int | None  # None: params.yaml tune.n_trials
    storage: str
    experiment: str

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] = os.environ) -> TuneSettings:
        try:
            minutes = float(environ.get("TUNE_MINUTES") or 10)
            trials = int(environ["TUNE_TRIALS"]) if environ.get("TUNE_TRIALS") else None
        except ValueError as problem:
            raise SystemExit(f"tune: TUNE_MINUTES must be a number and TUNE_TRIALS an integer ({problem})") from None
        if minutes < 0 or (trials is not None and trials < 1):
            raise SystemExit("tune: TUNE_MINUTES must be >= 0 and TUNE_TRIALS >= 1")
        return cls(minutes=minutes, trials=trials,
                   storage=environ.get("OPTUNA_STORAGE") or default_storage(environ.get("MLFLOW_TRACKING_URI", "")),
                   experiment=environ.get("TUNE_EXPERIMENT") or "california-housing-tune")


def default_storage(tracking_uri: str) -> str:
    """optuna.db in the directory of an sqlite MLflow store; ./optuna.db for any other store (a server, files)."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).with_name('optuna.db')}"
    return "sqlite:///optuna.db"


@dataclass(frozen=True)
class TuneConfig:
    """params.yaml's `tune` section, with the candidate it tunes."""

    candidate: str
    base: dict[str, Any]  # the candidate's spec in params.yaml: {model, features, params}
    space: dict[str, dict[str, Any]]
    cv_folds: int
    n_trials: int
    seed: int
    max_latency_ratio: float
    max_fit_ratio: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TuneConfig:
        tune = params["tune"]
        candidate = tune["candidate"]
        if candidate not in params["train"]["candidates"]:
            raise SystemExit(f"tune: params.yaml tune.candidate={candidate!r} is not in train.candidates")
        return cls(candidate=candidate, base=params["train"]["candidates"][candidate], space=tune["space"],
                   cv_folds=int(tune["cv_folds"]), n_trials=int(tune["n_trials"]), seed=int(params["split"]["seed"]),
                   max_latency_ratio=float(tune["max_latency_ratio"]), max_fit_ratio=float(tune["max_fit_ratio"]))


# --- search space ----------------------------------------------------------------------------------------------

def _label(choice: Any) -> Any:
    """Optuna's categorical choices must be scalars: a list of neighbour counts becomes "4,16,64"."""
    return ",".join(str(k) for k in choice) if isinstance(choice, list | tuple) else choice


def _unlabel(name: str, value: Any) -> Any:
    if name == "neighbours":
        return [int(k) for k in str(value).split(",") if k]
    return value


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per search-space entry: `choices`, or `low`/`high` (+ `log`, `step`); ints stay ints."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = _unlabel(name, trial.suggest_categorical(name, [_label(c) for c in spec["choices"]]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                             log=spec.get("log", False))
        else:
            values[name] = _round(trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"),
                                                      log=spec.get("log", False)))
    return values


def candidate_spec(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml candidate entry with the trial's values in place."""
    features = {**base.get("features", {}), **{k: v for k, v in values.items() if k in FEATURE_OPTIONS}}
    params = {**base.get("params", {}), **{k: v for k, v in values.items() if k not in FEATURE_OPTIONS}}
    return {**base, "features": features, "params": params}


def baseline_values(base: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Today's values of the searched names, as Optuna stores them (trial 0 of every study)."""
    sections = {**base.get("params", {}), **base.get("features", {})}
    missing = sorted(set(space) - set(sections))
    if missing:
        raise SystemExit(f"tune: the search space names {missing}, which the candidate in params.yaml does not set; "
                         "give them a value there, so that trial 0 is today's model")
    return {name: _label(sections[name]) for name in space}


def study_name(config: TuneConfig, training_rows: bytes) -> str:
    """Same training rows and same search space: same study (resumed). Anything else: a new one."""
    space = json.dumps({"base": config.base, "space": config.space, "cv_folds": config.cv_folds,
                        "seed": config.seed}, sort_keys=True)
    return (f"{config.candidate}-data-{hashlib.md5(training_rows, usedforsecurity=False).hexdigest()[:8]}"
            f"-space-{hashlib.md5(space.encode(), usedforsecurity=False).hexdigest()[:8]}")


# --- one trial ---------------------------------------------------------------------------------------------------

def serving_predictor(pipeline: Pipeline) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], str]:
    """The serving app's prediction path for this pipeline, and which path it is: as ServedModel.predict
    (serving/model.py), the compiled model of serving/trees.py, or the features step's array path then scikit-learn
    when the pipeline cannot be compiled."""
    compiled = compile_pipeline(pipeline)
    if compiled is not None:
        return compiled.predict, "serving.trees.compile_pipeline"
    features, model = pipeline.steps[0][1], pipeline[1:]
    return (lambda numeric, codes: np.asarray(model.predict(features.transform_arrays(numeric, codes)))), "sklearn"


def serving_cost(pipeline: Pipeline, X: pd.DataFrame) -> dict[str, Any]:
    """Milliseconds per row to predict 1 row and 1,000 rows on one thread, as one serving worker does.

    CPU time of this process, the minimum of several timings: on a shared machine other processes would add wall
    time that says nothing about the model (and they can only ever add).
    """
    predict, path = serving_predictor(pipeline)
    rows = X.sample(LATENCY_ROWS, replace=len(X) < LATENCY_ROWS, random_state=0)
    numeric = rows.reindex(columns=list(NUMERIC_FEATURES)).to_numpy(dtype=float, na_value=np.nan)
    codes = category_codes(rows[CATEGORICAL_FEATURE])
    cpu = time.process_time
    with threadpool_limits(limits=1, user_api="openmp"):  # what serve.py's one_openmp_thread does
        one = min(timeit.repeat(lambda: predict(numeric[:1], codes[:1]), timer=cpu, number=20, repeat=5)) / 20
        many = min(timeit.repeat(lambda: predict(numeric, codes), timer=cpu, number=1, repeat=5))
    return {"latency_ms_1_row": one * 1e3, "latency_ms_per_row_1000": many * 1e3 / LATENCY_ROWS,
            "latency_path": path}


BUDGETS = ("latency_1_row", "latency_1000_rows", "fit_time")


def budget_constraints(cost: dict[str, Any], baseline: dict[str, Any] | None, config: TuneConfig) -> dict[str, float]:
    """Optuna constraint values (<= 0 is feasible): cost ratios to trial 0's minus the budgets in params.yaml."""
    if baseline is None:  # trial 0 itself, or a study whose trial 0 failed: nothing to compare with
        return dict.fromkeys(BUDGETS, 0.0)
    return dict(zip(BUDGETS, (
        cost["latency_ms_1_row"] / baseline["latency_ms_1_row"] - config.max_latency_ratio,
        cost["latency_ms_per_row_1000"] / baseline["latency_ms_per_row_1000"] - config.max_latency_ratio,
        cost["fit_seconds"] / baseline["fit_seconds"] - config.max_fit_ratio), strict=True))


def is_feasible(trial: FrozenTrial) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


def baseline_cost(study: optuna.Study) -> dict[str, Any] | None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if trial.user_attrs.get(BASELINE):
            return trial.user_attrs.get("cost")
    return None


class Objective:
    """CV RMSE of one trial on the training rows; one nested MLflow run per trial."""

    def __init__(self, config: TuneConfig, X: pd.DataFrame, y: np.ndarray) -> None:
        self.config, self.X, self.y = config, X, y
        # The same folds as train.py's cv_rmse_mean, so trial 0 reproduces the figure retrain logs.
        self.folds = list(KFold(config.cv_folds, shuffle=True, random_state=config.seed).split(X))

    def __call__(self, trial: optuna.Trial) -> float:
        # One core per trial: the machine is shared, and under oversubscription OpenMP's spinning threads cost more
        # than they save. Every trial's fit time (trial 0's too) is single-threaded, so the budget compares alike.
        with threadpool_limits(limits=1, user_api="openmp"):
            return self._run(trial)

    def _run(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        spec = candidate_spec(self.config.base, suggest(trial, self.config.space))
        trial.set_user_attr("spec", spec)
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.set_tags({"trial": trial.number, BASELINE: str(bool(trial.user_attrs.get(BASELINE))).lower()})
            mlflow.log_params({"model": spec["model"], **{f"features.{k}": v for k, v in spec["features"].items()},
                               **spec["params"]})
            scores: list[float] = []
            pruned = False
            for fold, (fit_rows, score_rows) in enumerate(self.folds):
                fit_started = time.process_time()  # CPU time: other processes' load does not count
                pipeline = build_pipeline(spec).fit(self.X.iloc[fit_rows], self.y[fit_rows])
                if fold == 0:  # the cost of the first fold's model stands for the trial's
                    self._record_cost(trial, pipeline, time.process_time() - fit_started)
                scores.append(float(root_mean_squared_error(
                    self.y[score_rows], pipeline.predict(self.X.iloc[score_rows]))))
                mlflow.log_metric("fold_rmse", scores[-1], step=fold)
                trial.report(float(np.mean(scores)), fold)
                if trial.should_prune():
                    pruned = True
                    break
            mean, std = float(np.mean(scores)), float(np.std(scores))
            mlflow.log_metric("duration_seconds", time.perf_counter() - started)
            mlflow.set_tags({"state": "pruned" if pruned else "complete",
                             "feasible": str(trial.user_attrs["feasible"]).lower()})
            if not pruned:
                trial.set_user_attr("cv_rmse_std", std)
                mlflow.log_metrics({"cv_rmse_mean": mean, "cv_rmse_std": std})
        # Raised outside the run, which MLflow would otherwise end as FAILED: a pruned trial is a finished one.
        if pruned:
            raise optuna.TrialPruned(f"running CV RMSE {mean:,.0f} after fold {len(scores)}")
        return mean

    def _record_cost(self, trial: optuna.Trial, pipeline: Pipeline, fit_seconds: float) -> None:
        cost = {**serving_cost(pipeline, self.X), "fit_seconds": fit_seconds}
        trial.set_user_attr("cost", cost)
        constraints = budget_constraints(cost, baseline_cost(trial.study), self.config)
        for key, value in constraints.items():  # TPE samples away from infeasible trials
            trial.set_constraint(key, value)
        trial.set_user_attr("feasible", all(value <= 0 for value in constraints.values()))
        mlflow.log_metrics({k: v for k, v in cost.items() if isinstance(v, float)})
        mlflow.set_tag("latency_path", cost["latency_path"])


# --- the study -----------------------------------------------------------------------------------------------------

def open_study(name: str, storage: str, seed: int) -> optuna.Study:
    # A resumed study gets a new seed per run: the same seed would replay the first run's random start.
    sampler_seed = seed
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
        sampler_seed = seed + len(existing.trials)
    except KeyError:  # a new study
        pass
    return optuna.create_study(
        study_name=name, storage=storage, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=STARTUP_TRIALS, multivariate=True),
        # Folds are the steps: a trial whose running CV RMSE is worse than the median of earlier trials at the same
        # fold stops there. The first trials always finish, to give the median something to stand on.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )


def finished(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def score(trial: FrozenTrial) -> float:
    """A complete trial's CV RMSE."""
    if trial.value is None:
        raise ValueError(f"trial {trial.number} has no CV RMSE: it is {trial.state.name.lower()}")
    return trial.value


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    return min(complete, key=score, default=None)


class Progress:
    """One terminal line per trial: trial n of N, its score and cost, the best feasible so far, time used."""

    def __init__(self, n_trials: int, minutes: float) -> None:
        self.n_trials, self.budget_s = n_trials, minutes * 60
        self.started = time.monotonic()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        cost = trial.user_attrs.get("cost", {})
        score = (f"cv rmse {trial.value:,.0f} ± {trial.user_attrs.get('cv_rmse_std', 0):,.0f}"
                 if trial.state == TrialState.COMPLETE else f"{trial.state.name.lower()}")
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            score += f" after fold {step + 1} ({trial.intermediate_values[step]:,.0f})"
        latency = (f"  1 row {cost['latency_ms_1_row']:.2f} ms, 1k rows {cost['latency_ms_per_row_1000']:.3f} ms/row"
                   if cost else "")
        flag = "" if is_feasible(trial) else "  over budget"
        best = best_feasible(study)
        best_text = f"best #{best.number} {best.value:,.0f}" if best else "no feasible trial yet"
        elapsed = time.monotonic() - self.started
        print(f"trial {len(finished(study))} of {self.n_trials} (#{trial.number}): {score}{latency}{flag}  |  "
              f"{best_text}  |  {elapsed / 60:.1f} of {self.budget_s / 60:.0f} min", flush=True)


def run_study(study: optuna.Study, config: TuneConfig, settings: TuneSettings, X: pd.DataFrame, y: np.ndarray) -> None:
    n_trials = settings.trials or config.n_trials
    if not study.trials:
        study.enqueue_trial(baseline_values(config.base, config.space), user_attrs={BASELINE: True})
    remaining = n_trials - len(finished(study))
    print(f"tune: study {study.study_name}: {len(finished(study))} trials stored, budget {n_trials} trials "
          f"and {settings.minutes:g} min for this run", flush=True)
    if remaining <= 0 or settings.minutes == 0:
        print("tune: trial budget spent" if remaining <= 0 else "tune: TUNE_MINUTES=0, no new trial", flush=True)
        return
    study.optimize(Objective(config, X, y), n_trials=remaining, timeout=settings.minutes * 60, n_jobs=1,
                   callbacks=[Progress(n_trials, settings.minutes)])


# --- from study to params.yaml -------------------------------------------------------------------------------------

def _yaml() -> YAML:
    rt = YAML()
    rt.width = 4096  # never re-wrap a line the humans wrote
    rt.preserve_quotes = True
    return rt


def proposed_params(text: str, candidate: str, spec: dict[str, Any], space: dict[str, Any]) -> str:
    """params.yaml with the searched values of `candidate` replaced by `spec`'s; comments and layout kept."""
    document = _yaml().load(text)
    entry = document["train"]["candidates"][candidate]
    for name in space:
        section = "features" if name in FEATURE_OPTIONS else "params"
        value = spec[section][name]
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        entry[section][name] = value
    out = io.StringIO()
    _yaml().dump(document, out)
    return out.getvalue()


def params_diff(old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "params.yaml", "params.yaml"))


def propose(study: optuna.Study, config: TuneConfig, apply: bool) -> str:
    """Print the best feasible trial as a diff to params.yaml; write it there when `apply`. Returns the diff."""
    best = best_feasible(study)
    if best is None:
        raise SystemExit("tune: no finished trial within the budgets yet; run `make tune` (longer: TUNE_MINUTES=...), "
                         "or loosen tune.max_latency_ratio / tune.max_fit_ratio in params.yaml")
    current = PARAMS.read_text()
    proposed = proposed_params(current, config.candidate, best.user_attrs["spec"], config.space)
    diff = params_diff(current, proposed)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "proposal.diff").write_text(diff)
    baseline = next((t for t in study.trials if t.user_attrs.get(BASELINE)), None)
    summary = (f"tune: best feasible trial #{best.number}: "
               f"CV RMSE {best.value:,.0f} ± {best.user_attrs['cv_rmse_std']:,.0f}")
    if baseline is not None and baseline.value is not None:
        summary += (f" vs today's params {baseline.value:,.0f} ± {baseline.user_attrs['cv_rmse_std']:,.0f} "
                    f"({(score(best) / baseline.value - 1) * 100:+.1f}%)")
    print(summary)
    if not diff:
        print("tune: params.yaml already holds the best feasible values; nothing to change")
    elif apply:
        PARAMS.write_text(proposed)
        print(diff + "tune: params.yaml updated; `make retrain` trains with these values and DVC records them")
    else:
        print(diff + f"tune: proposal saved in {OUTPUT / 'proposal.diff'}; apply it with `make tune APPLY=1`")
    return diff


# --- plots ---------------------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both lower is better), by the first."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best_second = [], float("inf")
    for i in order:
        if points[i][1] < best_second:
            front.append(i)
            best_second = points[i][1]
    return front


def plot_rmse_vs_latency(study: optuna.Study, config: TuneConfig) -> Figure:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "cost" in t.user_attrs]
    best = best_feasible(study)
    baseline = baseline_cost(study)
    figure = Figure(figsize=(12, 5), layout="tight")
    for axis, key, label in zip(figure.subplots(1, 2), ("latency_ms_1_row", "latency_ms_per_row_1000"),
                                ("1 row (ms)", "1,000 rows (ms per row)"), strict=True):
        points = [(float(t.user_attrs["cost"][key]), score(t)) for t in complete]
        feasible = [is_feasible(t) for t in complete]
        for ok, colour, name in ((True, "tab:blue", "within budget"), (False, "tab:gray", "over budget")):
            chosen = [p for p, f in zip(points, feasible, strict=True) if f == ok]
            if chosen:
                axis.scatter(*zip(*chosen, strict=True), s=18, color=colour, label=name)
        front = [points[i] for i in pareto_front(points)]
        if front:
            axis.step(*zip(*front, strict=True), where="post", color="tab:orange", label="Pareto front")
        for trial, marker, name in ((next((t for t in complete if t.user_attrs.get(BASELINE)), None), "X",
                                     "today's params"), (best, "*", "proposal")):
            if trial is not None:
                axis.scatter([trial.user_attrs["cost"][key]], [trial.value], s=160, marker=marker, color="black"
                             if marker == "X" else "tab:red", label=name, zorder=3)
        if baseline:
            axis.axvline(baseline[key] * config.max_latency_ratio, color="tab:red", linestyle=":",
                         label="latency budget")
        axis.set(xlabel=f"serving cost, {label}", ylabel="CV RMSE (USD)", title=f"CV RMSE vs serving cost: {label}")
        axis.legend(fontsize=8)
    return figure


def _fit_labels(axis: Any) -> None:
    """Optuna's figures are 6.4 x 4.8 in without a layout: long parameter names would be cut off."""
    axis.figure.set_size_inches(9, 5)
    axis.figure.tight_layout()


def log_plots(study: optuna.Study, config: TuneConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axis = optuna.visualization.matplotlib.plot_optimization_history(study)
        _fit_labels(axis)
        mlflow.log_figure(axis.figure, "plots/optimization_history.png")
        pyplot.close("all")
        try:
            warnings.simplefilter("error", UserWarning)  # "too few trials": Optuna would plot equal importances
            axis = optuna.visualization.matplotlib.plot_param_importances(study)
            _fit_labels(axis)
            mlflow.log_figure(axis.figure, "plots/param_importances.png")
            pyplot.close("all")
        except (RuntimeError, ValueError, UserWarning) as problem:  # too few complete trials, or no variation yet
            log.warning("no parameter-importance plot yet: %s", problem)
            pyplot.close("all")
    mlflow.log_figure(plot_rmse_vs_latency(study, config), "plots/rmse_vs_latency.png")


# --- entry point ---------------------------------------------------------------------------------------------------

def load_training_rows() -> tuple[pd.DataFrame, np.ndarray, bytes]:
    if not TRAIN.exists():
        raise SystemExit(f"tune: no {TRAIN}; run `make retrain` first: tuning uses the training split it made")
    raw = TRAIN.read_bytes()
    frame = pd.read_csv(io.BytesIO(raw))
    return frame[list(FEATURES)], frame[TARGET].to_numpy(dtype=float), raw


def parent_run(study: optuna.Study, settings: TuneSettings, config: TuneConfig) -> mlflow.ActiveRun:
    """The study's parent run: the one a previous `make tune` of this study started, else a new one."""
    mlflow.set_experiment(settings.experiment)
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("parent run %s is not in this MLflow store; starting a new one", run_id)
    run = mlflow.start_run(run_name=f"tune-{study.study_name}")
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    mlflow.set_tags({"study": study.study_name, "candidate": config.candidate})
    mlflow.log_params({"cv_folds": config.cv_folds, "n_trials": config.n_trials, "seed": config.seed,
                       "max_latency_ratio": config.max_latency_ratio, "max_fit_ratio": config.max_fit_ratio,
                       "search_space": json.dumps(config.space)[:6000]})
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apply", action="store_true", help="write the stored study's proposal into params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Progress prints one line per trial instead
    settings = TuneSettings.from_env()
    config = TuneConfig.from_params(yaml.safe_load(PARAMS.read_text()))
    X, y, raw = load_training_rows()
    name = study_name(config, raw)
    if args.apply:
        try:
            study = optuna.load_study(study_name=name, storage=settings.storage)
        except KeyError:
            raise SystemExit(f"tune: no study {name} in {settings.storage} for these training rows and this search "
                             "space; run `make tune` first") from None
        propose(study, config, apply=True)
        return 0
    study = open_study(name, settings.storage, config.seed)
    with parent_run(study, settings, config):
        run_study(study, config, settings, X, y)
        best = best_feasible(study)
        counts = {state: len(study.get_trials(deepcopy=False, states=(state,)))
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        mlflow.log_metrics({f"trials_{state.name.lower()}": n for state, n in counts.items()})
        if best is not None:
            mlflow.log_metrics({"best_cv_rmse_mean": score(best), "best_cv_rmse_std": best.user_attrs["cv_rmse_std"]})
            mlflow.set_tag("best_trial", best.number)
        log_plots(study, config)
        diff = propose(study, config, apply=False)
        mlflow.log_text(diff or "(no change)\n", "proposal.diff")
    return 0


if __name__ == "__main__":
    sys.exit(main())
