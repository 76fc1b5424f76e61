"""`make revoke VERSION=n REASON="..."`: take a version out of service, recording who, when and why.

The version is tagged `promotion=revoked`, with revoked_by, revoked_at, revoked_reason, and the promotion it had
(promotion_before_revocation). If it is the champion, the alias goes back to the version it replaced (`make
rollback`) when that one is not revoked too. Serving does the same within one poll even if the alias stays, and
keeps the model it has when there is nothing to go back to (serving/model.py; an alert fires either way).

Anyone who may tag versions may revoke one: taking a model out of service needs no key. Undoing a revocation (the
tag set back) can only bring back a version a trusted key signed.
"""

from __future__ import annotations

import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from names import CHAMPION, PREVIOUS_CHAMPION, PROMOTION_TAG, REVOKED, model_name
from scripts.champion import version_by_alias
from scripts.promote import now, who
from scripts.rollback import rollback


def revoke(client: MlflowClient, name: str, version: str, reason: str) -> str:
    """Revoke `version`; return what was done. LookupError names what is wrong with the request."""
    if not reason.strip():
        raise LookupError('a revocation needs a reason: make revoke VERSION=n REASON="what is wrong with it"')
    try:
        revoked = client.get_model_version(name, version)
    except MlflowException as error:
        raise LookupError(f"{name} has no version {version!r}: pick one from the registry (mlflow ui)") from error
    if revoked.tags.get(PROMOTION_TAG) == REVOKED:
        raise LookupError(f"version {version} is already revoked ({revoked.tags.get('revoked_reason')})")
    revoker = who()
    record = {"promotion_before_revocation": revoked.tags.get(PROMOTION_TAG, ""), "revoked_by": revoker,
              "revoked_at": now(), "revoked_reason": reason}
    for key, value in {**record, PROMOTION_TAG: REVOKED}.items():  # the promotion tag last: the record is complete
        client.set_model_version_tag(name, version, key, value)
    done = f"revoke: {name} version {version} revoked by {revoker}: {reason}"
    current = version_by_alias(client, name, CHAMPION)
    if current is None or current.version != version:
        return done
    previous = revoked.tags.get(PREVIOUS_CHAMPION)
    if previous and client.get_model_version(name, previous).tags.get(PROMOTION_TAG) != REVOKED:
        _, to = rollback(client, name)
        return f"{done}\nrevoke: {CHAMPION} moved back to version {to}; serving follows within one poll"
    return (f"{done}\nrevoke: no unrevoked version to go back to: {CHAMPION} stays on it and serving keeps the model "
            f"it has (HousingRevokedModelServing fires) until a new version is promoted")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(revoke(MlflowClient(), model_name(), *argv))
    except LookupError as refusal:
        print(f"revoke: refused: {refusal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
