"""Move alias `champion`: the last step of a promotion, after every check passed and the data version is pushed.

  by_gate                                         `make retrain` (scripts/retrain.py), after `dvc push`: promote
                                                  what the gate passed
  python -m scripts.promote VERSION REASON        `make promote`: a person approves a version the gate refused
  record_lock                                     `make retrain`, after `dvc repro`: keep the run's dvc.lock with
                                                  its model version, so an approval can restore its data version

Every promotion signs the version's files with the evidence (scripts/sign.py), then tags it `promotion=gate` or
`promotion=human` (with approved_by, approval_reason, approved_at), and only then moves the alias: serving loads
only what a trusted key signed for that name and version (serving/signature.py). The gate's own refusals carry
`promotion=rejected` (scripts/register.py); `make revoke` takes a version out of service (scripts/revoke.py).
"""

from __future__ import annotations

import getpass
import os
import subprocess  # git config and dvc with fixed argv, never a shell  # nosec B404
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import (
    BY_GATE,
    BY_PERSON,
    CANDIDATE,
    CANDIDATE_SINCE,
    CHAMPION,
    DVC_LOCK,
    PREVIOUS_CHAMPION,
    PROMOTION_TAG,
    model_name,
)
from scripts import sign
from scripts.champion import point_champion, version_by_alias, write_decision

LOCK_ARTIFACT = "dvc.lock"


class PromotionRefused(Exception):
    """A promotion that must not happen; the message names the cause and the fix."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def bake_seconds() -> float:
    """BAKE_S: how long a promoted version serves in shadow, as CANDIDATE, before `make bake` may make it the champion
    (docs/promotion.md); 0, the default, promotes to champion at once."""
    value = os.environ.get("BAKE_S") or "0"
    try:
        return float(value)
    except ValueError:
        raise PromotionRefused(f"BAKE_S={value!r} is not a number of seconds (0: no bake)") from None


def promote(client: MlflowClient, name: str, version: str, how: str, tags: dict[str, str]) -> tuple[str | None, str]:
    """Sign `version` with the evidence, tag it with how it was promoted, then move the alias: CANDIDATE while
    BAKE_S > 0 and there is a champion to compare with, else CHAMPION. Returns the champion it replaces (None: none,
    or `version` itself, signed again) and the alias moved."""
    current = version_by_alias(client, name, CHAMPION)
    previous = current.version if current and current.version != version else None
    baking = current is not None and previous is not None and bake_seconds() > 0
    registered = client.get_model_version(name, version)
    evidence = {"decision": how, "run_id": registered.run_id, "data_md5": registered.tags.get("data_md5"), **tags}
    try:
        sign.sign_version(client, name, version, evidence)
    except sign.SigningRefused as refusal:
        raise PromotionRefused(str(refusal)) from None
    for key, value in {PROMOTION_TAG: how, "promoted_at": now(), **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    if current and current.version == version:  # the champion signed again: the aliases stay as they are
        return None, CHAMPION
    if baking:  # the first champion of an empty registry has nothing to be compared with: it is promoted directly
        client.set_model_version_tag(name, version, CANDIDATE_SINCE, now())
        client.set_registered_model_alias(name, CANDIDATE, version)
        return previous, CANDIDATE
    if previous:
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, previous)
    point_champion(client, name, version, previous)
    return previous, CHAMPION


def by_gate(client: MlflowClient, name: str, record: dict[str, Any]) -> str:
    """Promote the challenger of this run's decision `record`, which the gate passed."""
    challenger = record["challenger"]["version"]
    decided_against = record["champion"]["version"] if record["champion"] else None
    current = version_by_alias(client, name, CHAMPION)
    if (current.version if current else None) != decided_against:
        raise PromotionRefused(f"the champion moved from {decided_against} to {current and current.version} while "
                               f"version {challenger} was being judged; nothing promoted: run `make retrain` again to "
                               f"judge it against the new champion")
    previous, alias = promote(client, name, challenger, BY_GATE, {"gate_check": record["check"]})
    record.update(decision="promoted" if alias == CHAMPION else CANDIDATE, champion_before=previous,
                  promoted_at=now())
    write_decision(record)
    if alias == CANDIDATE:
        return (f"promote: {name} alias {CANDIDATE} -> version {challenger}, promotion=gate: it serves in shadow "
                f"beside champion {previous} until `make bake` decides (BAKE_S={bake_seconds():g})")
    return f"promote: {name} alias {CHAMPION} -> version {challenger} (was {previous or 'none'}), promotion=gate"


def lock_of(client: MlflowClient, name: str, version: str) -> str:
    """The dvc.lock of the retrain run that produced `version` (logged by `record-lock`)."""
    run_id = client.get_model_version(name, version).run_id
    try:
        with tempfile.TemporaryDirectory() as folder:
            # run_id is None only for a version registered without a run; ours come from register.py's runs.
            return Path(client.download_artifacts(run_id, LOCK_ARTIFACT, folder)).read_text()  # type: ignore[arg-type]
    except (MlflowException, OSError) as error:
        raise PromotionRefused(f"version {version} has no {LOCK_ARTIFACT} in run {run_id} ({error}): its data version "
                               f"is unknown; retrain on its data instead (make retrain DATA_URL=...)") from error


def by_human(client: MlflowClient, name: str, version: str, reason: str) -> str:
    if not reason.strip():
        raise PromotionRefused('an approval needs a reason: make promote VERSION=n REASON="why this shift is real"')
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as error:
        raise PromotionRefused(f"{name} has no version {version!r}: pick one from the registry (mlflow ui)") from error
    if "gate_decision" not in candidate.tags:
        raise PromotionRefused(f"version {version} was never scored by the gate (no gate_decision tag): a person "
                               f"approves a judged version, not an arbitrary model; register it through `make retrain`")
    current = version_by_alias(client, name, CHAMPION)
    if current and current.version == version and sign.verifies(name, version):
        raise PromotionRefused(f"version {version} is already the champion, and signed")
    lock = lock_of(client, name, version)
    approver = who()
    approval: dict[str, Any] = {"version": version, "approved_by": approver, "reason": reason, "approved_at": now(),
                "champion_before": current.version if current else None,
                "gate_check": candidate.tags.get("gate_check"), "gate_reason": candidate.tags.get("gate_reason")}
    client.log_dict(candidate.run_id, approval,  # type: ignore[arg-type]  # gate-judged versions come from runs
                    f"approval-{approval['approved_at']}.json")
    old_lock = DVC_LOCK.read_text() if DVC_LOCK.is_file() else None
    DVC_LOCK.write_text(lock)
    try:
        _, alias = promote(client, name, version, BY_PERSON, {"approved_by": approver, "approval_reason": reason,
                                                            "approved_at": approval["approved_at"]})
    except BaseException:
        restore_lock(old_lock)
        raise
    if alias == CANDIDATE:  # dvc.lock stays the champion's until `make bake` promotes the candidate
        restore_lock(old_lock)
        return (f"promote: {name} alias {CANDIDATE} -> version {version}, promotion=human, approved by {approver}: "
                f"{reason}\npromote: it serves in shadow until `make bake` decides (BAKE_S={bake_seconds():g})")
    moved = (f"version {version}, the {CHAMPION}, signed again" if approval["champion_before"] == version else
             f"alias {CHAMPION} -> version {version} (was {approval['champion_before'] or 'none'})")
    return (f"promote: {name} {moved}, promotion=human, approved by {approver}: {reason}\n"
            f"promote: dvc.lock now describes version {version}'s data: `dvc checkout`, then commit dvc.lock "
            f"(scripts/publish_lock.sh publish does it in CI)")


def restore_lock(old_lock: str | None) -> None:
    if old_lock is None:
        DVC_LOCK.unlink(missing_ok=True)
    else:
        DVC_LOCK.write_text(old_lock)


def who() -> str:
    """Who a person's promotion or revocation is recorded as: PROMOTED_BY, else git's user.email, else the login."""
    return os.environ.get("PROMOTED_BY") or git_identity() or getpass.getuser()


def git_identity() -> str:
    found = subprocess.run(["git", "config", "user.email"], capture_output=True, text=True)  # nosec B603 B607  # fixed argv, git from PATH
    return found.stdout.strip()


def record_lock(client: MlflowClient, record: dict[str, Any]) -> str:
    """Log dvc.lock with the run of the challenger that this run's decision `record` judged, passed or not."""
    run_id = record["challenger"]["run_id"]
    client.log_artifact(run_id, str(DVC_LOCK))
    return f"promote: dvc.lock recorded with run {run_id}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    client, name = MlflowClient(), model_name()
    try:
        message = by_human(client, name, *argv)
    except PromotionRefused as refusal:
        print(f"promote: refused: {refusal}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
