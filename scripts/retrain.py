"""`make retrain` in the safe order (docs/promotion.md), in one process:

  1. check the registry against dvc.lock: an empty or different registry forces a retrain (scripts/lineage.py)
  2. dvc repro: fetch, validate, split, train, register + score + tag + log the gate's decision (no alias moves);
     the run's dvc.lock is kept with its model version (scripts/promote.py record_lock)
  3. dvc push the data version
  4. only then move alias `champion` (scripts/promote.py by_gate)
  5. the summary table; exit non-zero unless the champion's lineage matches dvc.lock

A failure in steps 2 to 4, or a rejection, puts the last good dvc.lock and data back: dvc.lock always describes the
data behind the champion. DVC runs as its own command (its stages are processes anyway); everything else runs here,
so MLflow is imported and the registry opened once.
"""

from __future__ import annotations

import json
import os
import subprocess  # dvc with fixed argv, never a shell  # nosec B404
import sys
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import CANDIDATE, CHAMPION, DECISION, DECISION_TABLE, DVC_LOCK, REJECTED, model_name
from scripts import lineage, promote, sign
from scripts.champion import registry_failure, version_by_alias

# Bounded retries for every call to the registry (MLflow's client would otherwise retry a dead server for minutes).
# MLflow reads them at each call; the register stage that dvc repro starts inherits them.
REGISTRY_CALL_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
DATA_STAGES = ("fetch", "split")  # what a restore checks out by default: the data the restored dvc.lock names


def say(message: str) -> None:
    print(f"retrain: {message}", file=sys.stderr, flush=True)


def dvc(*args: str) -> bool:
    """`dvc ARGS` (the virtualenv's, from PATH), its output going straight to ours; True when it succeeded."""
    return subprocess.run(["dvc", *args]).returncode == 0  # nosec B603 B607  # fixed argv, dvc from PATH


def last_good_lock(remote: str) -> str | None:
    """The dvc.lock this run starts from (None: none yet). A fresh clone (a CI runner) has it without its outputs:
    they are fetched, or every stage would re-run."""
    if not DVC_LOCK.is_file():
        return None
    if not Path("data/train.csv").exists():
        say(f"fetching the outputs of dvc.lock from remote '{remote}'")
        dvc("pull", "--remote", remote, "--allow-missing", "--quiet")  # what is missing is produced by repro
    return DVC_LOCK.read_text()


def restore(good_lock: str | None, why: str, stages: tuple[str, ...] = DATA_STAGES) -> None:
    """Put back the last good dvc.lock and the outputs of `stages` from the DVC cache."""
    if good_lock is None:
        DVC_LOCK.unlink(missing_ok=True)
        say(f"{why}; no earlier data version to restore")
        return
    DVC_LOCK.write_text(good_lock)
    if not dvc("checkout", "--force", "--quiet", *stages):
        say("some outputs of the restored dvc.lock are not in the cache")
    say(f"{why}; dvc.lock and data/ restored to the last good version")


def main() -> int:
    for setting, value in REGISTRY_CALL_BOUNDS.items():
        os.environ.setdefault(setting, value)
    try:  # the promotion key first: a CI job without its secret stops before it trains anything
        sign.signing_key()
    except sign.SigningRefused as refusal:
        say(str(refusal))
        return 1
    remote = os.environ.get("DVC_REMOTE", "local")
    registry, name = mlflow.get_tracking_uri(), model_name()  # the registry MlflowClient() talks to
    client = MlflowClient()
    good_lock = last_good_lock(remote)

    say("1/5 checking the registry against dvc.lock")
    try:
        before = version_by_alias(client, name, CHAMPION)
        retrain_needed = lineage.check(client, name, registry, before)
    except MlflowException as error:
        say(registry_failure(registry, error))
        return 1
    # reports/decision.* belong to this run only: a skipped register stage must not replay an old decision.
    DECISION.unlink(missing_ok=True)
    DECISION_TABLE.unlink(missing_ok=True)

    try:
        say("2/5 dvc repro: fetch, validate, split, train, register + gate")
        # --no-run-cache: a stage whose inputs changed really runs (training logs to MLflow, the gate consults the
        # registry as it is now) instead of restoring outputs of an earlier identical run.
        if not dvc("repro", "--no-run-cache", *(["--force"] if retrain_needed else [])):
            restore(good_lock, "failed")
            return 1
        record = json.loads(DECISION.read_text()) if DECISION.is_file() else None
        if record:
            print(promote.record_lock(client, record))

        say(f"3/5 dvc push to remote '{remote}'")
        if not dvc("push", "--remote", remote):
            restore(good_lock, f"dvc push to remote '{remote}' failed (see above), so nothing was promoted and the "
                    "champion is unchanged")
            say(f"fix the remote (credentials, bucket, network: dvc push --remote {remote} -v), then run make "
                "retrain again")
            return 1

        decision = record["decision"] if record else "none"
        say(f"4/5 promotion (gate decision: {decision})")
        if record and decision == "passed":
            print(promote.by_gate(client, name, record))
            if record["decision"] == CANDIDATE:  # baking: dvc.lock stays the champion's until `make bake` decides
                restore(good_lock, "the challenger bakes as the candidate", ("fetch", "split", "train"))
        elif decision == REJECTED:
            restore(good_lock, "the gate rejected the challenger (reports/decision.md), champion unchanged",
                    ("fetch", "split", "train"))
        else:
            say("nothing retrained: the champion and dvc.lock stay")
    except promote.PromotionRefused as refusal:
        say(f"promotion refused: {refusal}")
        restore(good_lock, "promotion failed, champion unchanged")
        return 1
    except MlflowException as error:
        say(registry_failure(registry, error))
        restore(good_lock, "the registry failed before the champion moved, champion unchanged")
        return 1

    say("5/5 summary")
    try:
        return lineage.report(client, name, registry, before)
    except MlflowException as error:
        say(registry_failure(registry, error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
