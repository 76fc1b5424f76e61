"""schemathesis against the live app's own /openapi.json: every check it has, over 1,000 generated requests, no
failure. Its status_code_conformance check is what holds the document to every status the app answers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import clean_environment
from tests.registry import fitted, temporary_registry
from tests.servers import ServerProcess, running_app, serve_environment

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow's pyfunc

TOKEN = "schemathesis-reload-token"
MIN_CASES = 1000
EXAMPLES_PER_OPERATION = 40  # /predict and /reload reach it; the endpoints without inputs need a few
CONFIG = Path(__file__).with_name("schemathesis.toml")
# A small model: the run sends over a thousand requests, many of them batches, each predicted by it.
FUZZED = {"model": "hist_gradient_boosting", "features": {"neighbours": [4]}, "params": {"max_iter": 20}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves a gradient-boosted champion from a temporary registry, with /reload enabled."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    with temporary_registry(tmp) as registry:
        registry.register("fuzzed", fitted(FUZZED))
    env = serve_environment(MLFLOW_TRACKING_URI=registry.uri, MODEL_NAME="fuzzed", RELOAD_INTERVAL_S="0",
                            RELOAD_TOKEN=TOKEN, PREDICTION_LOG_DIR=str(tmp / "predictions"))
    with running_app(env, tmp / "serve.log") as server:
        yield server


# Every operation, every check: positive_data_acceptance (what the document allows is accepted) and
# negative_data_rejection (what it forbids is refused) hold the document to exactly what each operation takes.
RUNS = {"every operation, every check": ["--checks", "all"]}


def test_every_schemathesis_check_passes_on_over_a_thousand_cases(server, tmp_path, report_figure):
    entries = []
    for name, selection in RUNS.items():
        har = tmp_path / f"requests-{len(entries)}.har"
        command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG),
                   "run", f"{server.url}/openapi.json", *selection,
                   "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "20261203",
                   "--header", f"Authorization: Bearer {TOKEN}", "--workers", "1", "--no-color",
                   "--report", "har", "--report-har-path", str(har)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean_environment(),
                             cwd=tmp_path)  # its example database (.schemathesis/) stays out of the repository
        found = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
        summary = run.stdout[run.stdout.find("=== SUMMARY"):]
        print(f"\nschemathesis, {name}: {len(found)} requests\n{summary}")
        shortened = "\n".join(line[:300] for line in run.stdout.splitlines())  # request bodies can be megabytes
        assert run.returncode == 0, shortened[-8000:] + run.stderr[-2000:]
        entries += found
    statuses = Counter(entry["response"]["status"] for entry in entries)
    report_figure(f"schemathesis: {len(entries)} requests in all, statuses {dict(sorted(statuses.items()))}")
    assert len(entries) >= MIN_CASES
    assert 500 not in statuses
