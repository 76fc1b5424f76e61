"""Sign a version at its promotion: its files and the evidence, with the promotion key (OpenSSF model signing).

    python -m scripts.sign key          create the local key pair if missing (`make retrain` does, on first use)
    python -m scripts.sign public-key   print the public key in MODEL_VERIFY_KEYS' one-line form

MODEL_SIGNING_KEY is the private key: its PEM file, or the PEM itself (the CI secret, handed to the Retrain step
only). Unset, it is .services/model-signing.key, created on first use (mode 600) with its public half beside it
(.services/model-signing.pub, what `make serve` trusts by default); never on a CI runner. The private key exists only
where promotion happens; serving holds public keys only (serving/signature.py verifies; docs/security.md: rotation).
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mlflow.tracking import MlflowClient
from model_signing import hashing, signing

from names import EVIDENCE_FILE, SIGNATURE_FILE, SIGNING_KEY, VERIFY_KEY
from serving.signature import UNSIGNED_FILES, SignatureRefused, VerifyKey, load_keys, verify


class SigningRefused(Exception):
    """A version that cannot be signed; the message names the fix."""


def signing_key() -> Path:
    """MODEL_SIGNING_KEY's PEM file; or, when it holds the PEM itself (the CI secret), a private copy for this
    process; or the local default, created with its public half on first use (never on a CI runner, where it would
    vanish with the runner and sign what no server trusts)."""
    given = os.environ.get("MODEL_SIGNING_KEY", "")
    if given.lstrip().startswith("-----BEGIN"):
        return _private_copy(given)
    path = Path(given or SIGNING_KEY)
    if path.is_file():
        return path
    if given or os.environ.get("GITHUB_ACTIONS") == "true":
        raise SigningRefused(f"MODEL_SIGNING_KEY={given or '(unset)'} is not a key file: in CI set the secret "
                             "MODEL_SIGNING_KEY to the promotion key's PEM (docs/security.md); locally unset it")
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    VERIFY_KEY.write_bytes(public_pem(path))
    print(f"sign: created the local promotion key {path} (mode 600) and its public half {VERIFY_KEY}")
    return path


def _write_private(path: Path, pem: bytes) -> None:
    # Created with mode 600: never readable by others, even for an instant.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as private:
        private.write(pem)


@functools.cache
def _private_copy(pem: str) -> Path:
    """The key given in the environment, as the file model-signing reads, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="housing-signing-"))  # mode 700
    path = folder / "promotion.key"
    _write_private(path, pem.strip().encode() + b"\n")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return path


def public_pem(private: Path) -> bytes:
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def logged_model_id(client: MlflowClient, name: str, version: str) -> str:
    source = client.get_model_version(name, version).source or ""
    if not source.startswith("models:/m-"):
        raise SigningRefused(f"version {version} of {name} comes from {source!r}, not a logged model: register "
                             "models through `make retrain`")
    return source.removeprefix("models:/")


def sign_version(client: MlflowClient, name: str, version: str, evidence: dict[str, Any],
                 key: Path | None = None) -> str:
    """Sign every file of `version` with `evidence` (promotion.json) and store both beside its files; return the
    key's hint. The signature covers the bytes downloaded here, as serving will download them. `key`: the private
    key's PEM file (default: signing_key())."""
    key = key or signing_key()
    model_id = logged_model_id(client, name, version)
    with tempfile.TemporaryDirectory(prefix="housing-sign-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=scratch))
        (local / SIGNATURE_FILE).unlink(missing_ok=True)  # a version promoted again is signed afresh
        hint = VerifyKey.from_pem(public_pem(key)).hint
        (local / EVIDENCE_FILE).write_text(json.dumps(
            {**evidence, "model_name": name, "version": str(version), "signed_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "key": hint}, indent=2) + "\n")
        # model-signing's Config classes have untyped __init__s.
        files = hashing.Config().use_file_serialization(  # type: ignore[no-untyped-call]
            hashing_algorithm="sha256", allow_symlinks=False)
        files.set_ignored_paths(paths=sorted(UNSIGNED_FILES), ignore_git_paths=False)
        signer = signing.Config().set_hashing_config(files)  # type: ignore[no-untyped-call]
        signer.use_elliptic_key_signer(private_key=key).sign(local, local / SIGNATURE_FILE)
        for made in (EVIDENCE_FILE, SIGNATURE_FILE):
            client.log_model_artifact(model_id, str(local / made))
    return hint


def verify_keys() -> tuple[VerifyKey, ...]:
    """MODEL_VERIFY_KEYS, or the public half of the key this pipeline signs with."""
    listed = os.environ.get("MODEL_VERIFY_KEYS", "")
    return load_keys(listed) if listed.strip() else (VerifyKey.from_pem(public_pem(signing_key())),)


def verified_download(name: str, version: str, directory: str) -> str:
    """`version`'s files in `directory`, once their signature verifies (SignatureRefused if not): nothing of them is
    deserialised before."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=directory)
    verify(Path(local), verify_keys(), name, version)
    return str(local)


def verifies(name: str, version: str) -> bool:
    with tempfile.TemporaryDirectory(prefix="housing-verify-") as scratch:
        try:
            verified_download(name, version, scratch)
        except SignatureRefused:
            return False
    return True


def main(argv: list[str]) -> int:
    try:
        if argv == ["key"]:
            signing_key()
        elif argv == ["public-key"]:
            der = serialization.load_pem_public_key(public_pem(signing_key())).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            print(base64.b64encode(der).decode())
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except SigningRefused as refusal:
        print(f"sign: {refusal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
