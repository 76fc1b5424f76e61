"""Pin the uploaded S3 object a retrain run trains on: the newest version of the key named in the event.

Reads S3_BUCKET, S3_KEY and what the event saw (S3_ETAG, S3_VERSION_ID, both optional). Heads the object: when it
changed since the event (a newer upload of the same key), the run trains the current object and says so; that
newer upload's own event queues a run that will find nothing new. Writes DATA_URL, DATA_S3_ETAG and (on a
versioned bucket) DATA_S3_VERSION_ID to $GITHUB_ENV, or prints them as `export` lines; scripts/fetch.py then
downloads exactly that version (an even newer upload during the run fails the fetch instead of mixing lineage).
"""

from __future__ import annotations

import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Bounded: a stalled S3 endpoint fails the run with a message instead of hanging it.
S3_CONFIG = Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})


def pin(bucket: str, key: str, event_etag: str, event_version: str) -> tuple[dict[str, str], list[str]]:
    """The settings that pin the current object, and what to say about it."""
    head = boto3.client("s3", config=S3_CONFIG).head_object(Bucket=bucket, Key=key)
    etag = head["ETag"].strip('"')
    version = head.get("VersionId") or ""
    if version == "null":  # an object written before versioning was enabled
        version = ""
    settings = {"DATA_URL": f"s3://{bucket}/{key}", "DATA_S3_ETAG": etag}
    if version:
        settings["DATA_S3_VERSION_ID"] = version
    notes = []
    changed = (event_version and version and event_version != version) or (event_etag and event_etag != etag)
    if changed:
        notes.append(f"s3://{bucket}/{key} changed since the event (etag {event_etag or '?'} -> {etag}"
                     + (f", version {event_version} -> {version}" if version else "")
                     + "): training the current object, the newest data")
    notes.append(f"training s3://{bucket}/{key} pinned at etag {etag}" + (f", version {version}" if version else ""))
    return settings, notes


def main() -> int:
    bucket, key = os.environ.get("S3_BUCKET", ""), os.environ.get("S3_KEY", "")
    if not bucket or not key:
        print("pin_upload: S3_BUCKET and S3_KEY are required (the workflow's inputs)", file=sys.stderr)
        return 2
    try:
        settings, notes = pin(bucket, key, os.environ.get("S3_ETAG", "").strip('"'),
                              os.environ.get("S3_VERSION_ID", ""))
    except (BotoCoreError, ClientError) as error:
        print(f"pin_upload: cannot read s3://{bucket}/{key}: {error}; check that the object exists and that the "
              f"role may s3:GetObject/s3:GetObjectVersion on it", file=sys.stderr)
        return 1
    for note in notes:
        print(f"pin_upload: {note}")
    lines = [f"{name}={value}" for name, value in settings.items()]
    if os.environ.get("GITHUB_ENV"):
        with open(os.environ["GITHUB_ENV"], "a", encoding="utf-8") as env:
            env.write("".join(f"{line}\n" for line in lines))
    else:
        print("\n".join(f"export {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
