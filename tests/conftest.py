import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One OpenMP thread in this process and every process a test starts (make retrain's scikit-learn above all): `make
# test` already runs one xdist worker per core, and OpenMP threads waiting for a core the other worker holds spin on
# it. Beside the pipeline stories, the real-data retrain took 91-214 s instead of 31. A setting of your own is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from names import CATEGORIES, COLUMNS  # noqa: E402


def synthetic_housing(rows: int = 1500, seed: int = 0, missing_bedrooms: float = 0.01) -> pd.DataFrame:
    """Housing-like data with the real CSV's columns, order, ranges, NaNs and categories.

    Prices depend on income and on location, so a model has something to learn and a deliberately
    crippled model is measurably worse.
    """
    rng = np.random.default_rng(seed)
    longitude = rng.uniform(-124.0, -114.5, rows)
    latitude = rng.uniform(32.6, 41.9, rows)
    age = rng.integers(1, 53, rows).astype(float)
    households = rng.integers(20, 1500, rows).astype(float)
    rooms = np.round(households * rng.uniform(3.0, 7.0, rows))
    bedrooms = np.round(rooms * rng.uniform(0.15, 0.25, rows))
    bedrooms[rng.random(rows) < missing_bedrooms] = np.nan
    population = np.round(households * rng.uniform(2.0, 4.0, rows))
    income = rng.gamma(4.0, 1.0, rows).clip(0.5, 15.0)
    coast = np.exp(-((longitude + 122.0) ** 2 + (latitude - 37.5) ** 2) / 4.0)
    value = 30_000 + 40_000 * income + 150_000 * coast + rng.normal(0, 20_000, rows)
    category = rng.choice(CATEGORIES, rows, p=[0.44, 0.32, 0.01, 0.11, 0.12])
    frame = pd.DataFrame({
        "longitude": longitude.round(2),
        "latitude": latitude.round(2),
        "housing_median_age": age,
        "total_rooms": rooms,
        "total_bedrooms": bedrooms,
        "population": population,
        "households": households,
        "median_income": income.round(4),
        "median_house_value": value.clip(15_000, 500_001).round(),
        "ocean_proximity": category,
    })
    return frame[list(COLUMNS)]


@pytest.fixture
def report_figure(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Show a measured figure in the run's "figures" summary: a test prints figures, it asserts no wall-clock bound.
    Recorded on the test's report, so it survives pytest-xdist, whose workers' own output is never shown."""
    return lambda line: record_property("figure", line)


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which it keeps within each group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked `long` first: pytest-xdist hands out files in this order, and a long story that starts last
    would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = [value for outcome in ("passed", "failed") for report in terminalreporter.getreports(outcome)
               for name, value in report.user_properties if name == "figure"]
    if figures:
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.line(line)


@pytest.fixture
def housing_frame() -> pd.DataFrame:
    return synthetic_housing()


def json_records(frame: pd.DataFrame) -> list[dict]:
    """`frame` as the JSON records a client sends: NaN becomes null."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


# Candidate specs (params.yaml's train.candidates shape) small enough to train in a second or two.
GBDT = {"model": "hist_gradient_boosting", "features": {"neighbours": [4, 16]}, "params": {"max_iter": 50}}
RIDGE = {"model": "ridge", "features": {"neighbours": [], "encoding": "onehot"}, "params": {"alpha": 1.0}}
# The candidates of the pipeline stories (test_retrain, test_promotion, test_data_loop): a params.yaml
# train.candidates small enough that a whole `make retrain` trains in a few seconds.
STORY_CANDIDATES = {
    "ridge": RIDGE,
    "gbdt": {"model": "hist_gradient_boosting", "features": {"neighbours": [8], "folds": 3},
             "params": {"max_iter": 60, "learning_rate": 0.15, "random_state": 0}},
}


def project_copy(destination: Path) -> Path:
    """The working tree as a fresh git repository: no data, no dvc.lock, no MLflow store."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if name == "dvc.lock" or name.startswith("reports/") or not source.is_file():
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


def seeded_origin(folders: pytest.TempPathFactory, training: dict, gate: dict, branch: str) -> Path:
    """The bare repository a job clones, standing in for GitHub: this checkout on `branch` with `training` and `gate`
    merged into params.yaml and a reference set made from synthetic data (`make reference`), committed.

    Every folder comes from `folders.mktemp`: basetemp is shared by the whole session, so a fixed name there would
    collide when two modules that seed an origin run together.
    """
    seed = project_copy(folders.mktemp("seed"))
    params = yaml.safe_load((seed / "params.yaml").read_text())
    params["train"].update(training)
    params["gate"].update(gate)
    (seed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    trusted = folders.mktemp("reference-source") / "trusted.csv"
    synthetic_housing(4000, seed=9).to_csv(trusted, index=False)
    result = run_make(seed, "reference", f"SOURCE={trusted}")
    assert result.returncode == 0, result.stdout + result.stderr
    for command in (["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qam",
                     "fast training params, synthetic reference set"],
                    ["git", "branch", "-M", branch]):
        subprocess.run(command, cwd=seed, check=True)
    origin = folders.mktemp("origin") / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(origin)], check=True)
    return origin


def run_make(project: Path, *args: str, timeout_s: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`make ARGS` in `project` with this checkout's virtualenv and only the given settings.

    make runs in its own session: if it outlives `timeout_s` (or the test is interrupted), its whole process tree
    (dvc, train.py, ...) is killed, not only make, so nothing keeps running after the test.
    """
    command = ["make", "--no-print-directory", *args, f"VENV={ROOT / '.venv'}"]
    with subprocess.Popen(command, cwd=project, env={**clean_environment(), **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def clean_environment() -> dict[str, str]:
    """This process's environment without any AWS, MLflow, DVC, data, signing or bake settings: `make test` exports
    the Makefile's (MODEL_VERIFY_KEYS names the checkout's own key), which a project copy or a server must not see."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_", "DVC_", "DATA_URL", "MODEL_SIGNING_KEY", "MODEL_VERIFY_KEYS",
                                 "BAKE_"))}


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real moto server (S3, Secrets Manager, CloudFormation, ... over HTTP) on loopback, one per test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory):
    """moto + an MLflow server with basic auth (tests/services.py), once per test process, shared by the modules
    whose models have names of their own (test_signing, test_bake). The pipeline stories (test_promotion,
    test_data_loop) override it with their own: they use the default model name and the buckets."""
    from tests.services import LocalServices  # tests/services.py imports this module

    with LocalServices.on_free_ports(tmp_path_factory.mktemp("services")) as running:
        yield running
