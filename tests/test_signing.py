"""Serving runs only what the gate signed: the trust chain from a promotion to the bytes that serve traffic.

Against the real stack: an MLflow server with its basic-auth app whose artifacts live in an S3 bucket (moto), the
retraining `writer` account for everything the pipeline (and an attacker holding its password) can do, and serve.py
reading the registry as `reader`, trusting this test process's promotion key (tests/registry.py).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, verifying

from names import BY_GATE, CHAMPION, PREVIOUS_CHAMPION, PROMOTION_TAG, REVOKED, SIGNATURE_FILE
from scripts import promote, revoke, sign
from serving.signature import UNSIGNED_FILES, SignatureRefused, load_keys, verify
from tests.conftest import RIDGE
from tests.registry import TemporaryRegistry, fitted, promotion_keys
from tests.servers import ServerProcess, running_app, serve_environment, wait_for
from tests.services import LocalServices, as_writer

pytestmark = [pytest.mark.integration, pytest.mark.long,  # an MLflow server with basic auth, moto, serve.py
              pytest.mark.filterwarnings("ignore:Operation with range is deprecated")]  # inside MLflow, logging

MODEL = "signed"
TOKEN = "signing-reload-token"
POLL_S = 1.0


@pytest.fixture(scope="module")
def registry(services: LocalServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporaryRegistry]:
    """The registry as the writer sees it: what retraining, `make promote` and `make revoke` use."""
    with as_writer(services, tmp_path_factory.mktemp("registry")) as writer:
        yield writer


def serving(services: LocalServices, log: Path, ready: bool = True, **settings: str) -> Iterator[ServerProcess]:
    """serve.py as the reader; once /ready answers (a model loaded), or /health when `ready` is False."""
    env = serve_environment(**{**services.account("reader"), **services.aws_env(), "MODEL_NAME": MODEL,
                               "RELOAD_TOKEN": TOKEN, "RELOAD_INTERVAL_S": str(POLL_S),
                               "PREDICTION_LOG_DIR": str(log.parent), **settings})
    return running_app(env, log, "/ready" if ready else "/health")


def served(server: ServerProcess) -> str | None:
    return server.http.get("/model").json().get("version")


def reload(server: ServerProcess) -> dict:
    return server.http.post("/reload", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def artifact_key(services: LocalServices, registry: TemporaryRegistry, version: str, file: str) -> str:
    """The S3 key of one file of `version` in the artifact bucket."""
    model_id = registry.client.get_model_version(MODEL, version).source.removeprefix("models:/")
    s3 = services.client("s3")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=services.mlflow_bucket)["Contents"]
            if model_id in item["Key"] and item["Key"].endswith(f"/{file}")]
    assert len(keys) == 1, keys
    return keys[0]


@pytest.fixture(scope="module")
def champion(registry: TemporaryRegistry) -> str:
    """Version 1, promoted by the gate: signed, then the champion."""
    return registry.register(MODEL, fitted(RIDGE, seed=0))


def forge(services: LocalServices, registry: TemporaryRegistry, signed: str, seed: int) -> str:
    """What the writer's password allows: a working model of its own, registered, with every tag of the signed
    version and a copy of its signature and evidence beside its files, made the champion."""
    version = registry.register(MODEL, fitted(RIDGE, seed=seed), promotion=None, alias=None)
    original = registry.client.get_model_version(MODEL, signed)
    for key, value in original.tags.items():
        registry.client.set_model_version_tag(MODEL, version, key, value)
    s3 = services.client("s3")
    for file in (SIGNATURE_FILE, "promotion.json"):
        body = s3.get_object(Bucket=services.mlflow_bucket, Key=artifact_key(services, registry, signed, file))
        forged_key = artifact_key(services, registry, version, "MLmodel").rsplit("/", 1)[0] + f"/{file}"
        s3.put_object(Bucket=services.mlflow_bucket, Key=forged_key, Body=body["Body"].read())
    registry.client.set_registered_model_alias(MODEL, CHAMPION, version)
    return version


def test_a_forged_champion_with_a_signed_versions_tags_and_signature_is_not_served(services, registry, champion,
                                                                                    tmp_path, report_figure):
    registry.client.set_registered_model_alias(MODEL, CHAMPION, champion)
    with serving(services, tmp_path / "serve.log") as server:
        assert served(server) == champion
        forged = forge(services, registry, champion, seed=7)

        outcome = reload(server)
        assert outcome["result"] == "refused"
        assert "the files differ from what was signed: changed MLmodel, model.pkl" in outcome["detail"]  # token only
        assert served(server) == champion
        public = server.http.get("/model").json()["not_serving"]
        assert public["version"] == forged and "model.pkl" not in public["reason"]

        # The signed files themselves, registered again under a new number: every byte verifies, the number not.
        copy = str(mlflow.register_model(registry.client.get_model_version(MODEL, champion).source, MODEL).version)
        for key, value in registry.client.get_model_version(MODEL, champion).tags.items():
            registry.client.set_model_version_tag(MODEL, copy, key, value)
        registry.client.set_registered_model_alias(MODEL, CHAMPION, copy)
        outcome = reload(server)
        assert outcome["result"] == "refused"
        assert f"signed for 'signed' version '{champion}', not 'signed' version '{copy}'" in outcome["detail"]
        assert served(server) == champion

        # The control: a version the gate promotes properly is served at once.
        started = time.perf_counter()
        proper = registry.register(MODEL, fitted(RIDGE, seed=8))
        assert reload(server)["result"] == "loaded"
        assert served(server) == proper
        report_figure(f"signing: register + sign + reload of a ridge model: {time.perf_counter() - started:.2f} s")


def test_one_byte_changed_in_the_stored_model_after_promotion_is_refused_at_the_next_start(services, registry,
                                                                                             tmp_path):
    version = registry.register(MODEL, fitted(RIDGE, seed=9))
    s3 = services.client("s3")
    key = artifact_key(services, registry, version, "model.pkl")
    body = bytearray(s3.get_object(Bucket=services.mlflow_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=services.mlflow_bucket, Key=key, Body=bytes(body))

    with serving(services, tmp_path / "serve.log", ready=False, RELOAD_INTERVAL_S="0") as server:
        outcome = reload(server)
        assert outcome["result"] == "refused"
        assert "the files differ from what was signed: changed model.pkl" in outcome["detail"]
        assert server.http.get("/ready").status_code == 503  # nothing unpickled, nothing served
    assert "changed model.pkl" in server.output()


def test_a_signature_by_a_key_no_longer_listed_is_refused_and_both_keys_serve_during_a_rotation(services, registry,
                                                                                               tmp_path):
    version = registry.register(MODEL, fitted(RIDGE, seed=10))
    retired = promotion_keys()[1]
    new_key = base64.b64encode(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()

    with serving(services, tmp_path / "new-only.log", ready=False, MODEL_VERIFY_KEYS=new_key,
                 RELOAD_INTERVAL_S="0") as server:
        outcome = reload(server)
        assert outcome["result"] == "refused"
        assert "which is not in MODEL_VERIFY_KEYS" in outcome["detail"]
    with serving(services, tmp_path / "rotation.log", MODEL_VERIFY_KEYS=f"{new_key},{retired}") as server:
        assert served(server) == version


def test_a_revoked_champion_is_replaced_within_one_poll_by_the_version_it_replaced(services, registry, tmp_path):
    """Revocation by tag alone (the alias left where it is): serving goes back by itself."""
    first = registry.register(MODEL, fitted(RIDGE, seed=11), alias=None)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, first)
    second = registry.register(MODEL, fitted(RIDGE, seed=12), promotion=None, alias=None)
    promote.promote(registry.client, MODEL, second, BY_GATE, {})  # signs, tags previous_champion, moves the alias
    assert registry.client.get_model_version(MODEL, second).tags[PREVIOUS_CHAMPION] == first

    with serving(services, tmp_path / "serve.log") as server:
        assert served(server) == second
        registry.client.set_model_version_tag(MODEL, second, PROMOTION_TAG, REVOKED)
        wait_for(lambda: served(server) == first, 10 * POLL_S + 30, "the version the revoked one replaced")
        assert registry.client.get_model_version_by_alias(MODEL, CHAMPION).version == second


def test_make_revoke_records_who_and_why_moves_the_alias_back_and_never_leaves_serving_empty(services, registry,
                                                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("PROMOTED_BY", "oncall@example.com")
    lone = registry.register(MODEL, fitted(RIDGE, seed=13), alias=None)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, lone)  # a champion that replaced nothing
    with serving(services, tmp_path / "serve.log", RELOAD_INTERVAL_S="0") as server:
        assert served(server) == lone
        said = revoke.revoke(registry.client, MODEL, lone, "leaks a feature")
        assert "no unrevoked version to go back to" in said
        assert reload(server)["result"] == "refused"
        assert served(server) == lone  # the model in hand keeps serving
        assert "housing_model_revoked_serving 1.0" in server.http.get("/metrics").text

        good = registry.register(MODEL, fitted(RIDGE, seed=14), promotion=None, alias=None)
        promote.promote(registry.client, MODEL, good, BY_GATE, {})
        bad = registry.register(MODEL, fitted(RIDGE, seed=15), promotion=None, alias=None)
        promote.promote(registry.client, MODEL, bad, BY_GATE, {})
        assert "moved back to version " + good in revoke.revoke(registry.client, MODEL, bad, "wrong prices")
        assert reload(server)["result"] == "loaded"
        assert served(server) == good
    tags = registry.client.get_model_version(MODEL, bad).tags
    assert (tags[PROMOTION_TAG], tags["revoked_by"], tags["revoked_reason"], tags["promotion_before_revocation"]) == (
        REVOKED, "oncall@example.com", "wrong prices", BY_GATE)


def test_the_gate_verifies_the_champion_before_it_loads_it(services, registry, champion, tmp_path):
    """scripts/register.py scores the champion from sign.verified_download, which refuses a forgery unread."""
    forged = forge(services, registry, champion, seed=16)
    with pytest.raises(SignatureRefused, match="the files differ from what was signed"):
        sign.verified_download(MODEL, forged, str(tmp_path))


def test_our_verifier_and_model_signings_own_agree_on_a_signed_version_and_on_a_tampered_one(registry, champion,
                                                                                             tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/{champion}",
                                                     dst_path=str(tmp_path)))
    keys = load_keys(promotion_keys()[1])
    theirs = verifying.Config().use_elliptic_key_verifier(public_key=promotion_keys()[1]).set_hashing_config(
        hashing.Config().set_ignored_paths(paths=sorted(UNSIGNED_FILES), ignore_git_paths=False))

    assert verify(local, keys, MODEL, champion)["decision"] == BY_GATE
    theirs.verify(local, local / SIGNATURE_FILE)

    pickle = local / "model.pkl"
    pickle.write_bytes(pickle.read_bytes()[:-1] + bytes([pickle.read_bytes()[-1] ^ 0x01]))
    with pytest.raises(SignatureRefused, match=r"changed model\.pkl"):
        verify(local, keys, MODEL, champion)
    with pytest.raises(ValueError):
        theirs.verify(local, local / SIGNATURE_FILE)
