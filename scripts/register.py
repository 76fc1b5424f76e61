"""register stage: register the best candidate, score it against the champion, and record the gate's verdict.

The gate (`decide`) promotes only on evidence the upload cannot forge:
1. absolute bars (params.yaml gate.max_rmse, gate.min_r2) on the holdout split from the upload AND on the
   reference set, trusted rows kept in git apart from the uploads (scripts/reference.py);
2. against the champion, on the reference set: the challenger must not be worse there, and its predictions
   must not move further than gate.reference.max_prediction_shift from the champion's;
3. against the champion, on the same holdout rows: strictly better (gate.min_improvement). Equal is rejected.

Before judging, it measures the champion on every labelled row of the upload (data/housing.csv): the production
model's error on new data, the first realized figure a user gets without any label pipeline (rows the champion was
trained on, if the upload repeats earlier data, make it optimistic). It goes to the run (champion_upload_* metrics),
the decision record and reports/decision.md.

This stage changes no alias. It tags the new version with the verdict (gate_decision, gate_check, gate_reason,
the scores; promotion=rejected when refused), logs the decision to the training run and writes
reports/decision.json + .md. `make retrain` moves the alias afterwards (scripts/promote.py), and only once the
data version is pushed: a failure before then leaves the champion and dvc.lock as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from names import CHAMPION, DECISION_TABLE, FEATURES, PROMOTION_TAG, REJECTED, TARGET, model_name
from scripts import reference, sign
from scripts.champion import decision_table, version_by_alias, write_decision
from serving.signature import SignatureRefused
from train import regression_metrics

log = logging.getLogger("register")

HOLDOUT = Path("data/holdout.csv")
# Read, not a declared dependency: any change to it changes data/holdout.csv or reports/candidates.json, which are.
UPLOAD = Path("data/housing.csv")
CANDIDATES = Path("reports/candidates.json")


@dataclass(frozen=True)
class Scores:
    """A model's metrics on the holdout and on the reference set, and its reference predictions."""

    holdout: dict[str, float]
    reference: dict[str, float]
    reference_predictions: np.ndarray
    upload: dict[str, float] | None = None  # on the whole upload, with bias and rows: the champion's only

    def summary(self) -> dict[str, dict[str, float]]:
        return {"holdout": self.holdout, "reference": self.reference}


def score(model_uri: str, holdout: pd.DataFrame, trusted: pd.DataFrame, upload: pd.DataFrame | None = None) -> Scores:
    model = mlflow.pyfunc.load_model(model_uri)

    def metrics(frame: pd.DataFrame) -> tuple[dict[str, float], np.ndarray]:
        predicted = np.asarray(model.predict(frame[list(FEATURES)]), dtype=float).ravel()
        return regression_metrics(frame[TARGET].to_numpy(), predicted), predicted

    on_holdout, _ = metrics(holdout)
    on_reference, predictions = metrics(trusted)
    on_upload = None
    if upload is not None:
        on_upload, predicted = metrics(upload)
        on_upload.update(bias=float(np.mean(predicted - upload[TARGET].to_numpy())), rows=float(len(upload)))
    return Scores(on_holdout, on_reference, predictions, on_upload)


def prediction_shift(challenger: np.ndarray, champion: np.ndarray) -> float:
    """Median absolute relative change of the challenger's predictions from the champion's."""
    return float(np.median(np.abs(challenger - champion) / np.maximum(np.abs(champion), 1.0)))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    check: str  # which rule decided: the name a person greps the docs for
    reason: str


def decide(challenger: Scores, champion: Scores | None, gate: dict[str, Any]) -> Verdict:
    """The gate as a pure function of the scores and params.yaml's `gate` section."""
    for where in ("holdout", "reference"):
        metrics = getattr(challenger, where)
        if metrics["rmse"] > gate["max_rmse"]:
            return Verdict(False, f"{where}_bar", f"{where} RMSE {metrics['rmse']:,.0f} is above the bar of "
                           f"{gate['max_rmse']:,.0f}; a better model or better data is needed")
        if metrics["r2"] < gate["min_r2"]:
            return Verdict(False, f"{where}_bar", f"{where} R2 {metrics['r2']:.4f} is below the bar of "
                           f"{gate['min_r2']:.4f}; a better model or better data is needed")
    if champion is None:
        return Verdict(True, "first_champion", "no champion yet; the challenger clears the bars on the holdout "
                       "and on the reference set")
    limits = gate["reference"]
    ours, theirs = challenger.reference["rmse"], champion.reference["rmse"]
    if ours > theirs * (1 + limits["max_rmse_increase"]):
        return Verdict(False, "reference_rmse", f"reference set: RMSE {ours:,.0f} is worse than the champion's "
                       f"{theirs:,.0f} on the trusted rows (the upload's labels may be wrong); check the data, "
                       f"or approve by hand: make promote VERSION=n REASON=...")
    shift = prediction_shift(challenger.reference_predictions, champion.reference_predictions)
    if shift > limits["max_prediction_shift"]:
        return Verdict(False, "prediction_shift", f"reference set: predictions moved {shift:.1%} (median) from "
                       f"the champion's, above the limit of {limits['max_prediction_shift']:.1%}; if the shift is "
                       f"real, approve by hand: make promote VERSION=n REASON=...")
    ours, theirs = challenger.holdout["rmse"], champion.holdout["rmse"]
    needed = theirs * (1 - gate["min_improvement"])
    if not ours < needed:
        return Verdict(False, "not_better", f"not better: holdout RMSE {ours:,.0f} is not below the champion's "
                       f"{theirs:,.0f} on the same rows (min_improvement {gate['min_improvement']:.1%}); "
                       f"the champion stays")
    return Verdict(True, "better", f"holdout RMSE {ours:,.0f} < champion's {theirs:,.0f} on the same rows; "
                   f"reference RMSE {challenger.reference['rmse']:,.0f} vs {champion.reference['rmse']:,.0f}, "
                   f"predictions moved {shift:.1%}")


def data_pin() -> dict[str, str]:
    """The S3 object version the fetch stage was pinned to (scripts/pin_upload.py), for the version's lineage."""
    pins = {"data_s3_etag": os.environ.get("DATA_S3_ETAG", ""),
            "data_s3_version_id": os.environ.get("DATA_S3_VERSION_ID", "")}
    return {key: value for key, value in pins.items() if value}


def champion_on_upload(version: str, upload: dict[str, float]) -> str:
    return (f"The champion (version {version}) on the upload's {upload['rows']:,.0f} labelled rows, before any "
            f"retraining: RMSE {upload['rmse']:,.2f}, MAE {upload['mae']:,.2f}, bias {upload['bias']:,.2f}.")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = yaml.safe_load(Path("params.yaml").read_text())
    try:
        trusted = reference.load(params)
    except ValueError as error:
        print(f"register: {error}", file=sys.stderr)
        return 1
    candidates = json.loads(CANDIDATES.read_text())
    holdout = pd.read_csv(HOLDOUT)
    client, name = MlflowClient(), model_name()
    best = candidates["candidates"][candidates["best"]]

    champion_version = version_by_alias(client, name, CHAMPION)
    champion_scores = None
    if champion_version:
        champion_uri = f"models:/{name}/{champion_version.version}"
        log.info("scoring the champion (version %s) on %d holdout and %d reference rows",
                 champion_version.version, len(holdout), len(trusted))
        try:
            with tempfile.TemporaryDirectory(prefix="housing-champion-") as scratch:
                # Verified before it is unpickled: a champion someone replaced in the registry runs no code here.
                champion_scores = score(sign.verified_download(name, champion_version.version, scratch), holdout,
                                        trusted, pd.read_csv(UPLOAD))
        except SignatureRefused as refusal:
            print(f"register: the champion {champion_uri} is not what a trusted key signed: {refusal}\n"
                  f"register: nothing promoted; point {CHAMPION} back (`make rollback`), or, for a champion from "
                  f"before signing, sign it: make promote VERSION={champion_version.version} REASON=\"...\"",
                  file=sys.stderr)
            return 1
        except Exception as error:  # noqa: BLE001 - whatever broke, the champion stays and we stop
            print(f"register: cannot score the champion {champion_uri}: {error}\n"
                  f"register: nothing promoted; fix or `make rollback` the champion, then retry", file=sys.stderr)
            return 1

    registered = mlflow.register_model(best["model_uri"], name, tags={
        "candidate": candidates["best"], "run_id": best["run_id"], "parent_run_id": candidates["parent_run_id"],
        **candidates["lineage"], **data_pin()})
    log.info("registered version %s; scoring it on the same rows", registered.version)
    challenger_scores = score(f"models:/{name}/{registered.version}", holdout, trusted)
    verdict = decide(challenger_scores, champion_scores, params["gate"])
    shift = (prediction_shift(challenger_scores.reference_predictions, champion_scores.reference_predictions)
             if champion_scores else None)

    reference_md5 = hashlib.md5(reference.reference_path(params).read_bytes(), usedforsecurity=False).hexdigest()
    record = {
        "model_name": name,
        "decision": "passed" if verdict.passed else "rejected",
        "check": verdict.check,
        "reason": verdict.reason,
        "challenger": {"version": registered.version, "candidate": candidates["best"], "run_id": best["run_id"],
                       "metrics": challenger_scores.summary()},
        # champion_scores is only set when champion_version is.
        "champion": champion_scores and {"version": champion_version.version,  # type: ignore[union-attr]
                                         "metrics": champion_scores.summary(),
                                         "upload": champion_scores.upload},
        "prediction_shift": shift,
        "gate": params["gate"],
        "data_md5": candidates["lineage"]["data_md5"],
        "reference_md5": reference_md5,
        "holdout_rows": len(holdout),
        "reference_rows": len(trusted),
        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tags = {"gate_decision": record["decision"], "gate_check": verdict.check, "gate_reason": verdict.reason,
            "holdout_rmse": f"{challenger_scores.holdout['rmse']:.2f}",
            "reference_rmse": f"{challenger_scores.reference['rmse']:.2f}", "reference_md5": reference_md5}
    if shift is not None:
        tags["prediction_shift"] = f"{shift:.4f}"
    if not verdict.passed:
        tags[PROMOTION_TAG] = REJECTED
    for key, value in tags.items():
        client.set_model_version_tag(name, registered.version, key, value)
    client.log_dict(candidates["parent_run_id"], record, "decision.json")
    client.set_tag(candidates["parent_run_id"], "gate_decision", record["decision"])
    write_decision(record)
    if champion_scores and champion_scores.upload:
        upload_line = champion_on_upload(champion_version.version, champion_scores.upload)  # type: ignore[union-attr]
        for key, value in champion_scores.upload.items():
            client.log_metric(candidates["parent_run_id"], f"champion_upload_{key}", value)
        with DECISION_TABLE.open("a") as table:
            table.write(f"\n{upload_line}\n")
        print(f"register: {upload_line}")
    print(decision_table(record))
    print(f"register: {name} version {registered.version} {record['decision']} by the gate ({verdict.check})"
          + ("; the alias moves once the data version is pushed" if verdict.passed else f"; {CHAMPION} unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
