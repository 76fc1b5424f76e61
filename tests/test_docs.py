"""The docs name only what exists, and every setting the code reads is documented.

README.md and docs/*.md are read as text: a `make X` must be a Makefile target, an endpoint (`GET /x`, `/x`) must be
one of the app's routes, and each environment variable the code reads (Python's os.environ, a shell script's
`${X:-default}`, the Makefile's `X ?=`) must be in docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.routing import Route

from serve import create_app
from serving.settings import Settings
from tests.servers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGURATION = ROOT / "docs" / "configuration.md"
# Backticked absolute paths that are files on a host or in the image, not endpoints.
HOST_PATHS = ("/etc/", "/var/", "/opt/", "/app/")
# Variables the code reads that are not settings of ours: set by the platform, or passed from one of our steps to the
# next (the workflow's inputs to pin_upload, pin_upload to the fetch stage, deploy.sh to itself after a checkout).
NOT_SETTINGS = {
    "PATH", "GITHUB_ENV", "GITHUB_ACTIONS", "GITHUB_SERVER_URL",  # the runner's, set by GitHub Actions
    "S3_BUCKET", "S3_KEY", "S3_ETAG", "S3_VERSION_ID", "DATA_S3_ETAG", "DATA_S3_VERSION_ID",
    "DEPLOY_LOCK_FD",
}


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def routes() -> set[tuple[str, str]]:
    """(method, path with every {parameter} as {}) of each route of the app."""
    app = create_app(Settings())
    found = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                found.add((method, re.sub(r"\{[^}]*\}", "{}", route.path)))
    return found


def settings_the_code_reads() -> dict[str, str]:
    """Each environment variable the code reads -> the first file that reads it."""
    patterns = {
        ".py": re.compile(r"""(?:environ|env)(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']"""),
        ".sh": re.compile(r"\$\{([A-Z][A-Z0-9_]+):-"),
        "Makefile": re.compile(r"^(?:export )?([A-Z][A-Z0-9_]+) \?=", re.MULTILINE),
    }
    files = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "scripts").glob("*.sh"),
             *(ROOT / "serving").glob("*.py"), ROOT / "Makefile"]
    found: dict[str, str] = {}
    for path in sorted(files):
        pattern = patterns["Makefile" if path.name == "Makefile" else path.suffix]
        for name in pattern.findall(path.read_text()):
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_make_target_the_docs_name_exists(page: Path):
    named = set(re.findall(r"`make ([a-z][a-z-]*)", page.read_text()))
    assert named - makefile_targets() == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_endpoint_the_docs_name_is_a_route(page: Path):
    known = routes()
    paths = {path for _, path in known}
    for method, path in re.findall(r"`(?:(GET|POST) )?(/[A-Za-z0-9_{}./-]+)`", page.read_text()):
        if path.startswith(HOST_PATHS):
            continue
        normalized = re.sub(r"\{[^}]*\}", "{}", path)
        if method:
            assert (method, normalized) in known, f"{page.name}: `{method} {path}` is not a route of serve.py"
        else:
            assert normalized in paths, f"{page.name}: `{path}` is not a route of serve.py"


def test_the_scan_finds_what_it_looks_for():
    assert {"retrain", "test", "tools"} <= makefile_targets()
    assert {("POST", "/predict"), ("GET", "/v2/models/{}/ready")} <= routes()
    assert {"MODEL_NAME", "DATA_URL", "SERVICES_DIR", "BUDGET_S"} <= set(settings_the_code_reads())


def test_every_setting_the_code_reads_is_in_the_configuration_page():
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", CONFIGURATION.read_text()))
    serving = {field.upper() for field in Settings.__dataclass_fields__}
    missing = {name: where for name, where in settings_the_code_reads().items()
               if name not in documented | NOT_SETTINGS}
    missing |= {name: "serving/settings.py" for name in serving - documented}
    assert missing == {}, "document these in docs/configuration.md (variable, default, meaning)"
