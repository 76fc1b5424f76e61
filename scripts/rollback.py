"""`make rollback`: point alias `champion` back at the version it replaced.

Each promoted version carries a `previous_champion` tag naming the version it replaced, so repeated
rollbacks walk back through the promotion history.
"""

from __future__ import annotations

import sys

from mlflow.tracking import MlflowClient

from names import CHAMPION, PREVIOUS_CHAMPION, model_name
from scripts.champion import point_champion, version_by_alias


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Return (from_version, to_version)."""
    current = version_by_alias(client, name, CHAMPION)
    if current is None:
        raise LookupError(f"model {name!r} has no {CHAMPION!r} alias: nothing to roll back")
    target = current.tags.get(PREVIOUS_CHAMPION)
    if not target:
        raise LookupError(f"{name} version {current.version} has no {PREVIOUS_CHAMPION!r} tag: it replaced no champion")
    before_target = client.get_model_version(name, target).tags.get(PREVIOUS_CHAMPION)
    point_champion(client, name, target, before_target)
    client.set_model_version_tag(name, current.version, "rolled_back", "true")
    return current.version, target


def main() -> int:
    name = model_name()
    try:
        old, new = rollback(MlflowClient(), name)
    except LookupError as error:
        print(f"rollback: {error}", file=sys.stderr)
        return 1
    print(f"rollback: {name} alias {CHAMPION} moved from version {old} to version {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
