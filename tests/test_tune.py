"""`make tune`: the study scores trials on training rows only, resumes, and proposes params.yaml changes."""

import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from features import HousingFeatures
from scripts import tune
from scripts.split import holdout_mask
from tests.conftest import ROOT, synthetic_housing

# A search space small enough for a few seconds per study, with every kind of entry the real one has.
SMALL_SPACE = {
    "learning_rate": {"low": 0.05, "high": 0.3, "log": True},
    "max_iter": {"low": 5, "high": 15, "step": 5},
    "max_features": {"low": 0.5, "high": 1.0, "step": 0.1},
    "neighbours": {"choices": [[4, 16], [8]]},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with params.yaml, the split of small synthetic data, and its own MLflow + Optuna stores.

    total_rooms is unique per row, so a row can be recognised wherever it goes.
    """
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    gbdt = params["train"]["candidates"]["gbdt"]
    gbdt["features"]["neighbours"] = [4, 16]
    gbdt["params"].update(max_iter=10, max_leaf_nodes=7, learning_rate=0.1, max_features=0.7)  # inside SMALL_SPACE
    params["tune"].update(space=SMALL_SPACE, n_trials=4, cv_folds=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    frame = synthetic_housing(rows=600, seed=3)
    frame["total_rooms"] = 5000.0 + np.arange(len(frame))
    holdout = holdout_mask(frame, 0.2, params["split"]["seed"])
    (tmp_path / "data").mkdir()
    frame[~holdout].to_csv(tmp_path / "data/train.csv", index=False)
    frame[holdout].to_csv(tmp_path / "data/holdout.csv", index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TUNE_MINUTES", "5")
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("TUNE_TRIALS", raising=False)
    yield {"train_rooms": set(frame.loc[~holdout, "total_rooms"]),
           "holdout_rooms": set(frame.loc[holdout, "total_rooms"])}
    mlflow.end_run()


def stored_study() -> optuna.Study:
    (name,) = optuna.get_all_study_names("sqlite:///optuna.db")
    return optuna.load_study(study_name=name, storage="sqlite:///optuna.db")


@pytest.mark.integration
def test_tuning_never_reads_a_holdout_row(project, monkeypatch):
    opened: list[str] = []
    watching = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                     if watching[0] and event == "open" and args and isinstance(args[0], str | Path) else None)
    seen: set[float] = set()

    def spy(method):
        def wrapper(self, X, *args, **kwargs):
            rooms = X[:, 3] if isinstance(X, np.ndarray) else X["total_rooms"].to_numpy()
            seen.update(rooms.tolist())
            return method(self, X, *args, **kwargs)
        return wrapper

    for name in ("fit", "fit_transform", "transform", "transform_arrays"):
        monkeypatch.setattr(HousingFeatures, name, spy(getattr(HousingFeatures, name)))
    try:
        assert tune.main([]) == 0
    finally:
        watching[0] = False
    assert not [path for path in opened if "holdout" in path]
    assert project["train_rooms"] <= seen, "the spy missed training rows: it watches the wrong methods"
    assert not seen & project["holdout_rooms"]  # (it also sees the serving app's random probe rows)


@pytest.mark.integration
def test_a_study_records_every_trial_in_mlflow_under_one_parent_run_and_resumes(project, monkeypatch, capsys):
    monkeypatch.setenv("TUNE_TRIALS", "2")
    assert tune.main([]) == 0
    first = capsys.readouterr().out
    assert "trial 1 of 2 (#0)" in first and "trial 2 of 2" in first
    monkeypatch.setenv("TUNE_TRIALS", "4")
    assert tune.main([]) == 0
    assert "2 trials stored" in capsys.readouterr().out

    study = stored_study()
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert study.trials[0].user_attrs["baseline"] is True
    assert study.trials[0].params["max_iter"] == 10  # trial 0 is today's params.yaml
    runs = mlflow.search_runs(experiment_names=["california-housing-tune"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert sorted(children["tags.trial"].astype(int)) == [0, 1, 2, 3]
    assert set(children["status"]) == {"FINISHED"}
    cost = study.trials[0].user_attrs["cost"]
    assert cost["latency_path"] == "serving.trees.compile_pipeline"  # the serving app's own compiled model
    assert cost["latency_ms_1_row"] > 0 and cost["latency_ms_per_row_1000"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parents["run_id"].iloc[0], "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png", "plots/rmse_vs_latency.png"} <= artifacts


@pytest.mark.integration
def test_a_pruned_trial_stops_after_the_fold_that_condemned_it_and_its_run_still_finishes(project, monkeypatch,
                                                                                          capsys):
    monkeypatch.setenv("TUNE_TRIALS", "2")
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number >= 1)
    assert tune.main([]) == 0
    assert "trial 2 of 2 (#1): pruned after fold 1" in capsys.readouterr().out
    pruned = stored_study().trials[1]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    runs = mlflow.search_runs(experiment_names=["california-housing-tune"], filter_string="tags.trial = '1'")
    assert list(runs["tags.state"]) == ["pruned"] and list(runs["status"]) == ["FINISHED"]


@pytest.mark.integration
def test_apply_writes_the_best_feasible_trial_into_params_yaml_and_nothing_else(project, monkeypatch, capsys):
    monkeypatch.setenv("TUNE_TRIALS", "3")
    before = Path("params.yaml").read_text()
    assert tune.main([]) == 0
    assert Path("params.yaml").read_text() == before  # proposing changes nothing
    best = tune.best_feasible(stored_study())
    capsys.readouterr()

    assert tune.main(["--apply"]) == 0
    out = capsys.readouterr().out
    after = yaml.safe_load(Path("params.yaml").read_text())
    assert after["train"]["candidates"]["gbdt"] == best.user_attrs["spec"]
    assert {k: v for k, v in after.items() if k != "train"} == {
        k: v for k, v in yaml.safe_load(before).items() if k != "train"}
    assert "params.yaml updated" in out or "nothing to change" in out


def test_apply_without_a_study_names_the_fix(project):
    with pytest.raises(SystemExit, match="run `make tune` first"):
        tune.main(["--apply"])


def test_a_proposal_changes_only_the_searched_values_and_keeps_the_comments():
    text = (ROOT / "params.yaml").read_text()
    today = yaml.safe_load(text)["train"]["candidates"]["gbdt"]
    spec = tune.candidate_spec(today, {"learning_rate": 0.123, "max_iter": 7, "neighbours": [8, 32]})
    proposed = tune.proposed_params(text, "gbdt", spec, {"learning_rate": {}, "max_iter": {}, "neighbours": {}})
    diff = tune.params_diff(text, proposed)
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    features = ", ".join(f"{k}: {v}" for k, v in today["features"].items() if k != "neighbours")
    assert sorted(changed) == sorted([
        f"-      features: {{neighbours: {today['features']['neighbours']}, {features}}}",
        f"+      features: {{neighbours: [8, 32], {features}}}",
        f"-        max_iter: {today['params']['max_iter']}", "+        max_iter: 7",
        f"-        learning_rate: {today['params']['learning_rate']}", "+        learning_rate: 0.123"])
    assert yaml.safe_load(proposed)["train"]["candidates"]["gbdt"] == spec
    assert [line for line in text.splitlines() if "#" in line] == [
        line for line in proposed.splitlines() if "#" in line]


def test_an_over_budget_trial_is_never_proposed_however_good():
    study = optuna.create_study()
    for value, latency in ((40_000, 0.0), (38_000, 0.4), (39_000, -0.1)):
        trial = create_trial(value=value, params={"x": 1.0}, distributions={"x": FloatDistribution(0, 2)},
                             system_attrs={"constraints:latency_1_row": latency})
        study.add_trial(trial)
    assert tune.best_feasible(study).value == 39_000


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_cost_and_error():
    points = [(1.0, 50.0), (2.0, 40.0), (2.5, 45.0), (3.0, 39.0), (0.5, 60.0)]
    assert sorted(tune.pareto_front(points)) == [0, 1, 3, 4]


def test_the_study_is_stored_next_to_an_sqlite_mlflow_store():
    assert tune.default_storage("sqlite:////srv/ml/mlflow.db") == "sqlite:////srv/ml/optuna.db"
    assert tune.default_storage("http://127.0.0.1:5000") == "sqlite:///optuna.db"
