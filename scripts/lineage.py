"""The registry follows the data: dvc.lock and the champion must describe the same data version.

scripts/retrain.py calls both, with the champion it found when it started:
  check   before `dvc repro`: True when the configured registry has no champion trained on dvc.lock's data (an
          empty, new or different registry), so `make retrain` retrains and registers instead of reporting
          "up to date"
  report  at the end: the summary table; 1 (saying why) unless the champion's lineage matches dvc.lock's data
"""

from __future__ import annotations

import json
import os
import sys
from typing import cast

import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from names import CHAMPION, DECISION, DVC_LOCK, PROMOTION_TAG
from scripts.champion import version_by_alias
from scripts.fetch import DEFAULT_DATA_URL


def locked_data_md5() -> str | None:
    if not DVC_LOCK.is_file():
        return None
    for out in yaml.safe_load(DVC_LOCK.read_text())["stages"].get("fetch", {}).get("outs", []):
        if out["path"] == "data/housing.csv":
            return cast(str, out["md5"])  # dvc.lock: md5 is a hex string
    return None


def describe(version: ModelVersion | None) -> str:
    if version is None:
        return "none"
    return f"version {version.version} ({PROMOTION_TAG}={version.tags.get(PROMOTION_TAG, 'unrecorded')})"


def check(client: MlflowClient, name: str, registry: str, champion: ModelVersion | None) -> bool:
    data_md5 = locked_data_md5()
    if data_md5 is None:
        return False
    if champion is None:
        print(f"lineage: registry {registry} has no {name}@{CHAMPION} for dvc.lock's data (md5 {data_md5}): "
              f"retraining to register one")
        return True
    if champion.tags.get("data_md5") != data_md5:
        judged = [str(v.version) for v in client.search_model_versions(f"name='{name}'")
                  if v.tags.get("data_md5") == data_md5]
        if judged:  # e.g. `make rollback` away from it: retraining would undo a person's decision
            print(f"lineage: {name}@{CHAMPION} (version {champion.version}) is not from dvc.lock's data (md5 "
                  f"{data_md5}), which versions {', '.join(judged)} already came from (a rollback?): not retraining it")
            return False
        print(f"lineage: {name}@{CHAMPION} (version {champion.version}) was trained on data md5 "
              f"{champion.tags.get('data_md5', 'unknown')}, dvc.lock holds {data_md5}: retraining on dvc.lock's data")
        return True
    return False


def next_steps(registry: str) -> str:
    if registry.startswith(("http://", "https://")):
        return f"open {registry} (MLflow UI); reports/decision.md"
    return f"mlflow ui --backend-store-uri {registry}; reports/decision.md"


def report(client: MlflowClient, name: str, registry: str, before: ModelVersion | None) -> int:
    champion = version_by_alias(client, name, CHAMPION)
    data_md5 = locked_data_md5()
    record = json.loads(DECISION.read_text()) if DECISION.is_file() else None
    data, source = f"md5 {data_md5} in dvc.lock", os.environ.get("DATA_URL") or DEFAULT_DATA_URL  # as fetch reads it
    if record and record["data_md5"] != data_md5:
        data += f"; this run's data (md5 {record['data_md5']}, {source}) was not adopted"
    elif record:
        data += f" ({source})"
    rows = [("data version", data),
            ("champion before", describe(before)), ("champion after", describe(champion))]
    if record:
        challenger, defender = record["challenger"], record["champion"]
        for where in ("holdout", "reference"):
            theirs = f"{defender['metrics'][where]['rmse']:,.0f}" if defender else "-"
            rows.append((f"{where} RMSE", f"challenger {challenger['metrics'][where]['rmse']:,.0f} (version "
                                           f"{challenger['version']}), champion {theirs}"))
        rows.append(("decision", f"{record['decision']} ({record['check']}): {record['reason']}"))
    else:
        rows.append(("decision", "none: data, code and params unchanged, nothing retrained"))
    rows.append(("next", next_steps(registry)))
    width = max(len(label) for label, _ in rows)
    print("\nretrain summary\n" + "\n".join(f"  {label:<{width}}  {value}" for label, value in rows))

    if champion is None:
        print(f"retrain: no {name}@{CHAMPION} in {registry}: the gate promoted nothing (reports/decision.md says "
              f"why); fix the data or the model, or approve a version: make promote VERSION=n REASON=...",
              file=sys.stderr)
        return 1
    if data_md5 and champion.tags.get("data_md5") != data_md5:
        print(f"retrain: {name}@{CHAMPION} (version {champion.version}) was trained on data md5 "
              f"{champion.tags.get('data_md5', 'unknown')} but dvc.lock holds {data_md5} (after `make rollback`?): "
              f"check out the dvc.lock the champion came with (MLflow run {champion.run_id}, artifact dvc.lock) and "
              f"commit it, or approve a version of dvc.lock's data with make promote",
              file=sys.stderr)
        return 1
    return 0
