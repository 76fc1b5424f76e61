"""One real `make retrain` on the shared 16,512-row sample of the California Housing CSV, default params."""

import json

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, project_copy, run_make

SAMPLE = ROOT.parent / "shared" / "data" / "housing.csv"


def test_champion_on_the_real_sample_beats_the_book(tmp_path):
    project = project_copy(tmp_path)
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    result = run_make(project, "retrain", DATA_URL=str(SAMPLE), MLFLOW_TRACKING_URI=tracking_uri)
    assert result.returncode == 0, result.stdout + result.stderr
    decision = json.loads((project / "reports/decision.json").read_text())
    assert decision["decision"] == "promoted"
    assert decision["holdout_rows"] > 3000
    # handson-ml2's final model: 47,730; a plain tuned GBDT: ~45,600.
    assert decision["challenger"]["metrics"]["holdout"]["rmse"] < 44_000
    champion = MlflowClient(tracking_uri, tracking_uri).get_model_version_by_alias(
        "California_Housing_Regression", "champion")
    assert str(champion.version) == str(decision["challenger"]["version"])
