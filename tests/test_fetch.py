import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from scripts.fetch import fetch
from tests.conftest import ROOT


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


def run_fetch(cwd: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_URL": url, "PYTHONPATH": str(ROOT), "FETCH_TIMEOUT_S": "5"}
    return subprocess.run([sys.executable, "-m", "scripts.fetch"], cwd=cwd, env=env, capture_output=True, text=True)


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
def test_unreachable_source_keeps_previous_file_and_names_url(tmp_path, url, s3):
    (tmp_path / "data").mkdir()
    previous = tmp_path / "data" / "housing.csv"
    previous.write_text("previous version\n")
    result = run_fetch(tmp_path, url)
    assert result.returncode == 1
    assert f"cannot fetch DATA_URL={url}" in result.stderr
    assert previous.read_text() == "previous version\n"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["housing.csv"]


def test_missing_http_file_is_an_error(tmp_path, http_root):
    _, base = http_root
    result = run_fetch(tmp_path, f"{base}/missing.csv")
    assert result.returncode == 1
    assert "HTTP Error 404" in result.stderr
    assert not (tmp_path / "data" / "housing.csv").exists()
