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


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ dropped, spaces as -, repeats -1."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """The targets of a page's Markdown links and images that are not URLs: `file`, `file#anchor` or `#anchor`."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_reaches_a_file_and_heading(page: Path):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == [], f"{page.name} links to what does not exist"


def metric_names() -> set[str]:
    """Every housing_* name the code or the Prometheus rules define or export (a metric, a recording rule)."""
    files = [*(ROOT / "serving").glob("*.py"), *(ROOT / "scripts").glob("*.py"),
             *(ROOT / "prometheus" / "rules").glob("*.yml")]
    return {name for path in files for name in re.findall(r"\bhousing_[a-z0-9_]+", path.read_text())}


def python_classes() -> set[str]:
    files = [*ROOT.glob("*.py"), *(ROOT / "serving").glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    return {name for path in files for name in re.findall(r"^class (\w+)", path.read_text(), re.MULTILINE)}


def alert_names() -> set[str]:
    rules = (ROOT / "prometheus" / "rules").glob("*.yml")
    return {name for path in rules for name in re.findall(r"^\s*- alert: *(\w+)", path.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_metric_and_alert_the_docs_name_exists(page: Path):
    text = page.read_text()
    # A histogram's series are its name with _bucket, _sum and _count; a counter's exposition adds _total/_created.
    metrics = {re.sub(r"_(bucket|sum|count|total|created)$", "", name) for name in metric_names()} | metric_names()
    named = {re.sub(r"_(bucket|sum|count|total|created)$", "", name)
             for name in re.findall(r"\bhousing_[a-z0-9_]*[a-z0-9](?:_\*)?", text)}
    unknown = {name for name in named - metrics  # housing_shadow_*: some metric of that prefix
               if not (name.endswith("_*") and any(known.startswith(name[:-1]) for known in metrics))}
    assert unknown == set(), f"{page.name} names metrics that neither serving/, scripts/ nor the rules define"
    alerts = set(re.findall(r"\b(Housing[A-Z][A-Za-z0-9]+)\b", text)) - python_classes()
    assert alerts - alert_names() == set(), f"{page.name} names alerts that are not in prometheus/rules"


def test_the_link_and_name_scans_find_what_they_look_for():
    assert {"signed-models", "the-admin-port"} <= anchors(ROOT / "docs" / "security.md")
    assert "docs/configuration.md" in relative_links(ROOT / "README.md")
    assert {"housing_http_requests", "housing_drift_psi"} <= metric_names()
    assert alert_names() and all(name.startswith("Housing") for name in alert_names())


PROJECT_DIRS = ("scripts", "serving", "tests", "prometheus", "grafana", "infra", "reference", ".github", "docs", "data")
# Files a page names as an example, not as a file of the repository.
PLACEHOLDERS = {"test_x.py"}


def project_files() -> set[str]:
    """Paths (relative to ROOT) of the repository's own files: the top level and PROJECT_DIRS, recursively."""
    found = {path.name for path in ROOT.iterdir() if path.is_file()}
    for folder in PROJECT_DIRS:
        found |= {str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob("*") if path.is_file()}
    return found


def files_named(page: Path) -> set[str]:
    """Backticked source and config files a page names: `scripts/fetch.py`, `serve.py`, `retrain.yml`."""
    names = re.findall(r"`([A-Za-z0-9_./-]+\.(?:py|sh|yml|yaml|toml|in|txt))`", page.read_text())
    return {name for name in names if "/" not in name or name.split("/")[0] in PROJECT_DIRS}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_file_the_docs_name_exists(page: Path):
    files = project_files()
    basenames = {Path(path).name for path in files}
    missing = {name for name in files_named(page) - PLACEHOLDERS
               if name not in (files if "/" in name else basenames)}
    assert missing == set(), f"{page.name} names files the repository does not have"


def test_the_file_scan_finds_what_it_looks_for():
    assert "scripts/system_tools.sh" in files_named(ROOT / "README.md")
    assert "dispatch_lambda.py" in files_named(CONFIGURATION)
    assert "scripts/retrain.py" in project_files()


def test_every_make_target_has_its_page_in_development():
    page = (ROOT / "docs" / "development.md").read_text()
    table = page[page.index("## Make targets"):page.index("## Tests")]
    rows = re.findall(r"^\| (.+?) \|", table, re.MULTILINE)
    listed = {name for row in rows for name in re.findall(r"`([a-z-]+)`", row)}
    assert listed == makefile_targets() - {"help"}, "docs/development.md's target table: one row per Makefile target"


def code_text() -> str:
    """Everything that can read a setting: Python, shell, the Makefile, workflows, the stack, the image, Compose."""
    files = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "scripts").glob("*.sh"),
             *(ROOT / "serving").glob("*.py"), *(ROOT / ".github" / "workflows").glob("*.yml"),
             *(ROOT / "infra").glob("*.yml"), ROOT / "Makefile", ROOT / "Dockerfile", ROOT / "docker-compose.yml"]
    return "\n".join(path.read_text() for path in files)


def test_every_variable_the_configuration_page_lists_is_read_somewhere():
    rows = re.findall(r"^\|(.+)\|$", CONFIGURATION.read_text(), re.MULTILINE)
    listed = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]{2,})`", row)}
    code = code_text()
    assert {"SERVE_URL", "BAKE_S", "FORWARDED_ALLOW_IPS"} <= listed
    unread = {name for name in listed if not re.search(rf"\b{name}\b", code)}
    assert unread == set(), "docs/configuration.md lists variables that no code, workflow or template reads"
