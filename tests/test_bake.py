"""Live evidence before production: a promoted version serves in shadow as the candidate, and `make bake` promotes
it only after a clean bake.

Against the real stack: an MLflow server with its basic-auth app (artifacts in moto's S3), serve.py reading it as
`reader` and polling every half second, a client predicting all the while, and the promotion and bake code run as
the writer, with BAKE_S set as the AWS stack sets it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from names import BY_GATE, BY_PERSON, CANDIDATE, CHAMPION, FEATURES
from scripts import bake, promote
from serving.schema import EXAMPLE_RECORD, SMOKE_RECORDS
from tests.conftest import RIDGE
from tests.registry import RaisesAbove, TemporaryRegistry, fitted
from tests.servers import ServerProcess, SteadyClient, running_app, serve_environment, wait_for
from tests.services import LocalServices, as_writer

pytestmark = [pytest.mark.integration, pytest.mark.long,  # an MLflow server with basic auth, moto, serve.py
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow, logging

MODEL = "baked"
POLL_S = 0.5
RICH = {**EXAMPLE_RECORD, "median_income": 15.0}  # a district the failing candidate cannot score


@pytest.fixture(scope="module")
def registry(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporaryRegistry]:
    """The writer's registry, with bake on; version 1 the champion."""
    with as_writer(services, tmp_path_factory.mktemp("registry"), BAKE_S="1") as writer:
        writer.register(MODEL, fitted(RIDGE, seed=0))
        yield writer


@pytest.fixture(scope="module")
def server(services: LocalServices, registry: TemporaryRegistry,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("serve")
    env = serve_environment(**{**services.account("reader"), **services.aws_env(), "MODEL_NAME": MODEL,
                               "RELOAD_INTERVAL_S": str(POLL_S), "PREDICTION_LOG_DIR": str(tmp / "predictions")})
    with running_app(env, tmp / "serve.log") as server:
        yield server


def decide(server: ServerProcess, registry: TemporaryRegistry, workdir: Path) -> int:
    """`make bake` in `workdir` (where it writes dvc.lock and reports/), for a one-second bake on 50 paired
    predictions, asking this server."""
    settings = replace(bake.BakeSettings.from_env({}), bake_s=1.0, min_predictions=50, timeout_s=120, poll_s=0.2,
                       metrics_url=f"{server.url}/metrics")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        return bake.bake(registry.client, MODEL, settings)


def champion(registry: TemporaryRegistry) -> str:
    return registry.client.get_model_version_by_alias(MODEL, CHAMPION).version


def in_shadow(server: ServerProcess, version: str) -> bool:
    return f'housing_candidate_info{{version="{version}"}} 1.0' in server.http.get("/metrics").text


def make_candidate(registry: TemporaryRegistry, server: ServerProcess, pipeline, how: str = BY_GATE) -> str:
    """A version promoted with bake on: the candidate alias moves, and the server scores it in shadow."""
    version = registry.register(MODEL, pipeline, promotion=None, alias=None)
    # As `make retrain` records it with every judged version: the data version a promotion restores.
    registry.client.log_text(registry.client.get_model_version(MODEL, version).run_id, "stages: {}\n", "dvc.lock")
    before = champion(registry)
    _, alias = promote.promote(registry.client, MODEL, version, how, {})
    assert alias == CANDIDATE
    assert champion(registry) == before
    wait_for(lambda: in_shadow(server, version), 60, f"version {version} in shadow")
    return version


def halved() -> object:
    """A ridge fitted on prices halved: a 50% shift from the champion on every record."""
    pipeline = fitted(RIDGE, seed=0)
    pipeline.named_steps["model"].coef_ *= 0.5
    pipeline.named_steps["model"].intercept_ *= 0.5
    return pipeline


def failing_on_rich_districts() -> object:
    pipeline = fitted(RIDGE, seed=0)
    smoke = pipeline.predict(pd.DataFrame(list(SMOKE_RECORDS), columns=list(FEATURES)))
    rich = pipeline.predict(pd.DataFrame([RICH], columns=list(FEATURES)))[0]
    assert rich > smoke.max()
    pipeline.steps[-1] = ("model", RaisesAbove(pipeline.named_steps["model"], (smoke.max() + rich) / 2))
    return pipeline


def test_a_half_price_candidate_a_person_approved_is_refused_and_the_champion_never_changes(server, registry,
                                                                                           tmp_path):
    served = champion(registry)
    candidate = make_candidate(registry, server, halved(), how=BY_PERSON)

    with SteadyClient(server.http, EXAMPLE_RECORD) as client:
        outcome = decide(server, registry, tmp_path)
    assert outcome == 1
    assert client.failures == [] and set(client.versions_seen()) == {served}  # clients saw the champion only
    assert champion(registry) == served
    tags = registry.client.get_model_version(MODEL, candidate).tags
    assert (tags["bake_decision"], tags["bake_check"]) == ("refused", "shift")
    # 50%, read from the histogram: its (0.3, 0.5] and (0.5, 1] buckets, as rounding puts each record
    assert 0.3 <= float(tags["bake_median_shift"]) <= 1.0
    assert registry.client.get_registered_model(MODEL).aliases.get(CANDIDATE) is None
    wait_for(lambda: not in_shadow(server, candidate), 30, "the refused candidate out of shadow")


def test_a_healthy_candidate_is_promoted_and_served_within_one_poll(server, registry, tmp_path, report_figure):
    moved = time.monotonic()
    candidate = make_candidate(registry, server, fitted(RIDGE, seed=3))
    in_shadow_s = time.monotonic() - moved

    with SteadyClient(server.http, EXAMPLE_RECORD) as client:
        outcome = decide(server, registry, tmp_path)
        decided_s = time.monotonic() - moved
        assert outcome == 0
        assert champion(registry) == candidate
        wait_for(lambda: client.versions_seen() and client.versions_seen()[-1] == candidate, 10 * POLL_S + 10,
                 "the baked candidate serving")
        served_s = time.monotonic() - moved
    paired = registry.client.get_model_version(MODEL, candidate).tags["bake_paired"]
    report_figure(f"bake timeline (BAKE_S=1, 50 paired predictions wanted, poll {POLL_S:g} s): candidate alias "
                  f"moved at 0 s, scored in shadow from {in_shadow_s:.1f} s, promoted at {decided_s:.1f} s on "
                  f"{paired} paired predictions, served from {served_s:.1f} s")
    assert client.failures == []
    assert registry.client.get_model_version(MODEL, candidate).tags["bake_decision"] == "passed"
    assert (tmp_path / "dvc.lock").read_text() == "stages: {}\n"  # the data behind the new champion
    assert "promoted" in (tmp_path / "reports" / "bake.md").read_text()


def test_a_candidate_that_raises_on_some_records_costs_clients_nothing_and_is_refused(server, registry, tmp_path):
    served = champion(registry)
    candidate = make_candidate(registry, server, failing_on_rich_districts())

    with SteadyClient(server.http, RICH) as client:
        outcome = decide(server, registry, tmp_path)
    assert outcome == 1
    assert client.failures == [] and len(client.answers) > 0
    assert champion(registry) == served
    assert registry.client.get_model_version(MODEL, candidate).tags["bake_check"] == "errors"
    errors = [line for line in server.http.get("/metrics").text.splitlines()
              if line.startswith(f'housing_shadow_errors_total{{version="{candidate}"}}')]
    assert errors and float(errors[0].split()[-1]) > 0


def test_the_bake_quantile_is_prometheus_histogram_quantile():
    buckets = {0.01: 10.0, 0.1: 30.0, 1.0: 40.0, float("inf"): 40.0}
    assert bake.histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * (20 - 10) / 20)
    assert bake.histogram_quantile(1.0, buckets) == pytest.approx(1.0)
    assert np.isnan(bake.histogram_quantile(0.5, {float("inf"): 0.0}))
