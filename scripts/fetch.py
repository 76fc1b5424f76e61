"""fetch stage: copy DATA_URL to data/housing.csv atomically.

DATA_URL may be `s3://bucket/key`, `http(s)://...`, `file://...` or a local path; a source whose path ends in
`.gz` is decompressed. Unset, it is the copy shipped in the repository (data/embedded/README.md: origin, licence),
so the pipeline runs offline. The download goes to a temporary file beside the target and replaces it only when
complete and different, so a failed or interrupted fetch leaves the previous data in place and unchanged data
keeps its timestamp.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

# The one home of the default source (the Makefile and train.py refer to it); a path relative to the repository.
DEFAULT_DATA_URL = "data/embedded/housing.csv.gz"
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
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, destination.open("wb") as out:  # nosec B310  # scheme checked: http(s) only here
            shutil.copyfileobj(response, out)
    elif parsed.scheme in ("", "file"):
        shutil.copyfile(parsed.path if parsed.scheme else url, destination)
    else:
        raise ValueError(f"unsupported scheme {parsed.scheme!r}; use s3://, http(s)://, file:// or a path")


def decompress(source: Path, destination: Path) -> None:
    """gunzip `source` into `destination`; a truncated or corrupt archive raises (EOFError, gzip.BadGzipFile)."""
    with gzip.open(source, "rb") as compressed, destination.open("wb") as out:
        shutil.copyfileobj(compressed, out)


def fetch(url: str, target: Path = TARGET) -> bool:
    """Replace `target` with the content at `url` (decompressed if it ends in .gz); return whether it changed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that the final rename is atomic; removed with whatever a failure left in it.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
        downloaded = content = Path(work) / "download"
        download(url, downloaded)
        if urlparse(url).path.endswith(".gz"):
            content = Path(work) / "decompressed"
            decompress(downloaded, content)
        if target.exists() and filecmp.cmp(content, target, shallow=False):
            return False
        os.replace(content, target)
        return True


def main() -> int:
    url = os.environ.get("DATA_URL") or DEFAULT_DATA_URL
    try:
        changed = fetch(url)
    except Exception as error:  # noqa: BLE001 - any failure must name the URL and keep the old file
        print(f"fetch: cannot fetch DATA_URL={url}: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"fetch: {TARGET} left unchanged", file=sys.stderr)
        return 1
    md5 = hashlib.md5(TARGET.read_bytes(), usedforsecurity=False).hexdigest()
    state = "new content" if changed else "unchanged"
    print(f"fetch: {url} -> {TARGET} ({TARGET.stat().st_size} bytes, md5 {md5}, {state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
