"""Refuse a retrain trigger whose S3 names fall outside the dispatch Lambda's allow-lists, before any step uses them.

The retrain workflow's inputs come from dispatch_lambda.py, which checks them, but also from anyone who may run the
workflow by hand or send a repository_dispatch: this checks them again with the same rules. Run it first, on the
runner's own python3 (no virtualenv needed), with the names in the environment:

    S3_BUCKET=landing S3_KEY=data/housing.csv S3_ETAG=... python3 scripts/check_s3_object.py

Exit 0 when they pass; else exit 1 after one `::error::` line naming the field, its value escaped (repr), so that a
newline or `::` in a name can never start a workflow command of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatch_lambda import RecordRefused, checked_object


def main() -> int:
    env = os.environ
    try:
        obj = checked_object(env.get("S3_BUCKET", ""), env.get("S3_KEY", ""), env.get("S3_ETAG", ""),
                             env.get("S3_VERSION_ID", ""))
    except RecordRefused as refused:
        print(f"::error::retrain refused: {refused}")
        return 1
    print(f"retrain: {obj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
