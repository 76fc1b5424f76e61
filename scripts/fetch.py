"""fetch stage: copy DATA_URL to data/housing.csv atomically.

DATA_URL may be `s3://bucket/key`, `http(s)://...`, `file://...` or a local path. The download goes to a
temporary file beside the target and replaces it only when complete and different, so a failed or
interrupted fetch leaves the previous data in place and unchanged data keeps its timestamp.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_DATA_URL = "https://raw.githubusercontent.com/ageron/handson-ml2/master/datasets/housing/housing.csv"
TARGET = Path("data/housing.csv")
TIMEOUT_S = float(os.environ.get("FETCH_TIMEOUT_S", "60"))


def download(url: str, destination: Path) -> None:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        import boto3  # only S3 sources need it; boto3 honours AWS_ENDPOINT_URL and the AWS_* credentials

        # scripts/pin_upload.py pins the object version it saw (a newer upload then fails the fetch, not the lineage).
        pin = {arg: os.environ[var] for arg, var in (("VersionId", "DATA_S3_VERSION_ID"), ("IfMatch", "DATA_S3_ETAG"))
               if os.environ.get(var)}
        if pin:
            body = boto3.client("s3").get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), **pin)["Body"]
            with destination.open("wb") as out:
                shutil.copyfileobj(body, out)
        else:
            boto3.client("s3").download_file(parsed.netloc, parsed.path.lstrip("/"), str(destination))
    elif parsed.scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "housing-mlops-fetch"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, destination.open("wb") as out:
            shutil.copyfileobj(response, out)
    elif parsed.scheme in ("", "file"):
        shutil.copyfile(parsed.path if parsed.scheme else url, destination)
    else:
        raise ValueError(f"unsupported scheme {parsed.scheme!r}; use s3://, http(s)://, file:// or a path")


def fetch(url: str, target: Path = TARGET) -> bool:
    """Replace `target` with the content at `url`; return whether the content changed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    temporary = Path(temporary)
    try:
        download(url, temporary)
        if target.exists() and filecmp.cmp(temporary, target, shallow=False):
            return False
        os.replace(temporary, target)
        return True
    finally:
        temporary.unlink(missing_ok=True)


def main() -> int:
    url = os.environ.get("DATA_URL") or DEFAULT_DATA_URL
    try:
        changed = fetch(url)
    except Exception as error:  # noqa: BLE001 - any failure must name the URL and keep the old file
        print(f"fetch: cannot fetch DATA_URL={url}: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"fetch: {TARGET} left unchanged", file=sys.stderr)
        return 1
    md5 = hashlib.md5(TARGET.read_bytes()).hexdigest()
    state = "new content" if changed else "unchanged"
    print(f"fetch: {url} -> {TARGET} ({TARGET.stat().st_size} bytes, md5 {md5}, {state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
