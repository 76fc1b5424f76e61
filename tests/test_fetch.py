import functools
import gzip
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from scripts import fetch as fetch_stage
from scripts.fetch import DEFAULT_DATA_URL, fetch
from tests.conftest import ROOT

EMBEDDED = ROOT / DEFAULT_DATA_URL
EMBEDDED_SHA256 = "e8aa765ce9eebecd8794854a1d4d827cc7aee2ff64872adbdcea4ff09c928269"  # data/embedded/README.md


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3")


@pytest.fixture
def run_fetch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """The fetch stage's command (`python -m scripts.fetch`) in `cwd` with `DATA_URL=url` (unset: None)."""

    def run(cwd: Path, url: str | None) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        if url is None:
            monkeypatch.delenv("DATA_URL", raising=False)
        else:
            monkeypatch.setenv("DATA_URL", url)
        monkeypatch.setattr(fetch_stage, "TIMEOUT_S", 5.0)
        status = fetch_stage.main()
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_local_path_and_file_url(tmp_path):
    source = tmp_path / "source.csv"
    source.write_text("a,b\n1,2\n")
    target = tmp_path / "data" / "housing.csv"
    assert fetch(str(source), target) is True
    assert target.read_text() == "a,b\n1,2\n"
    assert fetch(source.as_uri(), target) is False


def test_http_download_replaces_only_changed_content(tmp_path, http_root):
    root, base = http_root
    (root / "housing.csv").write_text("v1\n")
    target = tmp_path / "housing.csv"
    assert fetch(f"{base}/housing.csv", target) is True
    stamp = target.stat().st_mtime_ns
    assert fetch(f"{base}/housing.csv", target) is False
    assert target.stat().st_mtime_ns == stamp  # unchanged data is left alone
    (root / "housing.csv").write_text("v2\n")
    assert fetch(f"{base}/housing.csv", target) is True
    assert target.read_text() == "v2\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_s3_download_honours_aws_endpoint_url(tmp_path, s3):
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="incoming/housing.csv", Body=b"from s3\n")
    target = tmp_path / "housing.csv"
    assert fetch("s3://data/incoming/housing.csv", target) is True
    assert target.read_bytes() == b"from s3\n"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/housing.csv",
        "s3://no-such-bucket/housing.csv",
        "/nonexistent/housing.csv",
        "ftp://example/housing.csv",
    ],
)
def test_unreachable_source_keeps_previous_file_and_names_url(tmp_path, url, s3, run_fetch):
    (tmp_path / "data").mkdir()
    previous = tmp_path / "data" / "housing.csv"
    previous.write_text("previous version\n")
    status, _, errors = run_fetch(tmp_path, url)
    assert status == 1
    assert f"cannot fetch DATA_URL={url}" in errors
    assert previous.read_text() == "previous version\n"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["housing.csv"]


def test_missing_http_file_is_an_error(tmp_path, http_root, run_fetch):
    _, base = http_root
    status, _, errors = run_fetch(tmp_path, f"{base}/missing.csv")
    assert status == 1
    assert "HTTP Error 404" in errors
    assert not (tmp_path / "data" / "housing.csv").exists()


def test_gz_sources_are_decompressed_from_a_path_and_over_http(tmp_path, http_root):
    root, base = http_root
    (root / "housing.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    target = tmp_path / "housing.csv"
    assert fetch(str(root / "housing.csv.gz"), target) is True
    assert target.read_bytes() == b"a,b\n1,2\n"
    assert fetch(f"{base}/housing.csv.gz", target) is False  # same content, whichever way it came


def test_corrupt_gz_source_keeps_previous_file(tmp_path, run_fetch):
    (tmp_path / "data").mkdir()
    previous = tmp_path / "data" / "housing.csv"
    previous.write_text("previous version\n")
    truncated = tmp_path / "housing.csv.gz"
    truncated.write_bytes(gzip.compress(b"a,b\n" * 1000)[:-20])
    status, _, errors = run_fetch(tmp_path, str(truncated))
    assert status == 1
    assert f"cannot fetch DATA_URL={truncated}: EOFError" in errors
    assert previous.read_text() == "previous version\n"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["housing.csv"]


def test_unset_data_url_fetches_the_shipped_copy_offline(tmp_path, run_fetch):
    (tmp_path / DEFAULT_DATA_URL).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_DATA_URL).symlink_to(EMBEDDED)  # the repository's copy, seen from a project directory
    status, output, _ = run_fetch(tmp_path, None)
    assert status == 0
    assert f"fetch: {DEFAULT_DATA_URL} -> data/housing.csv (1138923 bytes" in output
    fetched = (tmp_path / "data" / "housing.csv").read_bytes()
    assert hashlib.sha256(fetched).hexdigest() == EMBEDDED_SHA256
    assert fetched.count(b"\n") == 16_512 + 1  # header and rows as published
    assert run_fetch(tmp_path, None)[1].endswith("unchanged)\n")  # a rerun leaves the file alone

