"""The champion alias and the gate's decision record: the registry calls and files every promotion shares.

register (the gate) writes the decision; retrain, promote and rollback move the alias. MLflow only, no model code,
so the steps of `make retrain` that judge nothing (lineage, promotion) start fast.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import CHAMPION, DECISION, DECISION_TABLE, PREVIOUS_CHAMPION
from serving.registry import NO_SUCH_ALIAS


def registry_failure(registry: str, error: Exception) -> str:
    """One line for a registry that refused or failed, naming what to check."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"registry {registry} refused or failed: {first_line}; check MLFLOW_TRACKING_URI and the "
            f"MLFLOW_TRACKING_USERNAME/PASSWORD of the writer account")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in NO_SUCH_ALIAS:
            return None
        raise


def point_champion(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    """Make `version` the champion; `previous` becomes the rollback target. The last step of any promotion."""
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
    elif version_by_alias(client, name, PREVIOUS_CHAMPION):
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    with warnings.catch_warnings():  # stages are deprecated but still honoured by MODEL_STAGE deployments
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, "Production", archive_existing_versions=True)


def decision_table(record: dict[str, Any]) -> str:
    challenger, champion = record["challenger"], record["champion"]
    rows = ["| | challenger | champion |", "|---|---|---|",
            f"| version | {challenger['version']} ({challenger['candidate']}) | "
            f"{champion['version'] if champion else 'none'} |"]
    for where in ("holdout", "reference"):
        for metric, fmt in (("rmse", "{:,.0f}"), ("mae", "{:,.0f}"), ("r2", "{:.4f}")):
            theirs = fmt.format(champion["metrics"][where][metric]) if champion else "-"
            rows.append(f"| {where} {metric} | {fmt.format(challenger['metrics'][where][metric])} | {theirs} |")
    if record.get("prediction_shift") is not None:
        rows.append(f"| reference prediction shift | {record['prediction_shift']:.1%} | |")
    return "\n".join([*rows, "", f"**Decision: {record['decision']}** — check `{record['check']}`: "
                      f"{record['reason']}", ""])


def write_decision(record: dict[str, Any]) -> None:
    DECISION.write_text(json.dumps(record, indent=2) + "\n")
    DECISION_TABLE.write_text(f"### {record['model_name']}: challenger vs champion on {record['holdout_rows']} "
                              f"holdout rows and {record['reference_rows']} reference rows\n\n"
                              + decision_table(record))
