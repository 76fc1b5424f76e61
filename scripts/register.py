"""register stage: register the best candidate, then promote it only if it passes the gate.

The gate: the challenger must meet the absolute bars in params.yaml, and its holdout RMSE must be no
worse than the current champion's RMSE re-measured on the same holdout rows (within `tolerance`).
Promotion moves alias `champion`, keeps the replaced version as alias `previous_champion` (and as a tag
on the new one, for `make rollback`), and mirrors it to stage Production for stage-pinned deployments.
A rejected challenger stays registered, tagged with the reason; the champion is untouched.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features import FEATURES, TARGET
from train import regression_metrics

HOLDOUT = Path("data/holdout.csv")
CANDIDATES = Path("reports/candidates.json")
DECISION = Path("reports/decision.json")
DECISION_TABLE = Path("reports/decision.md")
CHAMPION, PREVIOUS = "champion", "previous_champion"


def model_name() -> str:
    return os.environ.get("MODEL_NAME", "California_Housing_Regression")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def evaluate(model_uri: str, holdout: pd.DataFrame) -> dict[str, float]:
    model = mlflow.pyfunc.load_model(model_uri)
    predicted = model.predict(holdout[list(FEATURES)])
    return regression_metrics(holdout[TARGET].to_numpy(), pd.Series(predicted).to_numpy())


def decide(challenger: dict[str, float], champion: dict[str, float] | None, gate: dict) -> tuple[bool, str]:
    """The gate as a pure function: (promote?, reason)."""
    if challenger["rmse"] > gate["max_rmse"]:
        return False, f"holdout RMSE {challenger['rmse']:,.0f} is above the bar of {gate['max_rmse']:,.0f}"
    if challenger["r2"] < gate["min_r2"]:
        return False, f"holdout R2 {challenger['r2']:.4f} is below the bar of {gate['min_r2']:.4f}"
    if champion is None:
        return True, "no champion yet; the challenger meets the absolute bars"
    allowed = champion["rmse"] * (1 + gate["tolerance"])
    if challenger["rmse"] > allowed:
        return False, (f"holdout RMSE {challenger['rmse']:,.0f} is worse than the champion's {champion['rmse']:,.0f} "
                       f"on the same rows (tolerance {gate['tolerance']:.1%})")
    return True, (f"holdout RMSE {challenger['rmse']:,.0f} <= champion's {champion['rmse']:,.0f} "
                  f"on the same rows (tolerance {gate['tolerance']:.1%})")


def point_champion(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    """Make `version` the champion; `previous` becomes the rollback target."""
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    elif version_by_alias(client, name, PREVIOUS):
        client.delete_registered_model_alias(name, PREVIOUS)
    with warnings.catch_warnings():  # stages are deprecated but still honoured by MODEL_STAGE deployments
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, "Production", archive_existing_versions=True)


def decision_table(record: dict) -> str:
    challenger, champion = record["challenger"], record["champion"]
    rows = ["| | challenger | champion |", "|---|---|---|",
            f"| version | {challenger['version']} ({challenger['candidate']}) | "
            f"{champion['version'] if champion else 'none'} |"]
    for metric, fmt in (("rmse", "{:,.0f}"), ("mae", "{:,.0f}"), ("r2", "{:.4f}")):
        theirs = fmt.format(champion["metrics"][metric]) if champion else "-"
        rows.append(f"| {metric} | {fmt.format(challenger['metrics'][metric])} | {theirs} |")
    return "\n".join([*rows, "", f"**Decision: {record['decision']}** ({record['reason']})", ""])


def main() -> int:
    params = yaml.safe_load(Path("params.yaml").read_text())
    candidates = json.loads(CANDIDATES.read_text())
    holdout = pd.read_csv(HOLDOUT)
    client, name = MlflowClient(), model_name()
    best = candidates["candidates"][candidates["best"]]

    champion_version = version_by_alias(client, name, CHAMPION)
    champion = None
    if champion_version:
        champion_uri = f"models:/{name}/{champion_version.version}"
        try:
            champion = {"version": champion_version.version, "metrics": evaluate(champion_uri, holdout)}
        except Exception as error:  # noqa: BLE001 - whatever broke, the champion stays and we stop
            print(f"register: cannot re-evaluate the champion {champion_uri}: {error}\n"
                  f"register: nothing promoted; fix or `make rollback` the champion, then retry", file=sys.stderr)
            return 1

    registered = mlflow.register_model(best["model_uri"], name, tags={
        "candidate": candidates["best"], "run_id": best["run_id"], **candidates["lineage"]})
    challenger = {"version": registered.version, "candidate": candidates["best"], "run_id": best["run_id"],
                  "metrics": evaluate(f"models:/{name}/{registered.version}", holdout)}
    promote, reason = decide(challenger["metrics"], champion and champion["metrics"], params["gate"])

    record = {"model_name": name, "decision": "promoted" if promote else "rejected", "reason": reason,
              "challenger": challenger, "champion": champion, "gate": params["gate"],
              "holdout_rows": len(holdout), "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in {"gate_decision": record["decision"], "gate_reason": reason,
                       "holdout_rmse": f"{challenger['metrics']['rmse']:.2f}"}.items():
        client.set_model_version_tag(name, registered.version, key, value)
    # Before the alias moves: serving loads only versions tagged promotion=gate or human (serving/model.py).
    client.set_model_version_tag(name, registered.version, "promotion", "gate" if promote else "rejected")
    if promote:
        previous = champion["version"] if champion else None
        if previous:
            client.set_model_version_tag(name, registered.version, PREVIOUS, previous)
        point_champion(client, name, registered.version, previous)
    client.log_dict(candidates["parent_run_id"], record, "decision.json")
    client.set_tag(candidates["parent_run_id"], "gate_decision", record["decision"])

    DECISION.write_text(json.dumps(record, indent=2) + "\n")
    DECISION_TABLE.write_text(f"### {name}: challenger vs champion on {len(holdout)} holdout rows\n\n"
                              + decision_table(record))
    print(decision_table(record))
    print(f"register: {name} version {registered.version} {record['decision']}"
          + (f"; alias {CHAMPION} -> {registered.version}" if promote else f"; {CHAMPION} unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
