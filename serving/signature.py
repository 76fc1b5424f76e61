"""What the gate signed, checked before anything of a model is deserialised.

At promotion (scripts/sign.py) the version's files, with promotion.json (the evidence: model name, version, run,
data, decision), are signed with OpenSSF model signing's elliptic-key signer: model.sig is a Sigstore bundle whose
DSSE envelope holds an in-toto statement listing every file's sha256. This module verifies that bundle with
`cryptography` alone, so the serving image carries no signing library; tests/test_signing.py checks it against
model-signing's own verifier.

A version is accepted only if (1) the envelope's signature verifies under one of MODEL_VERIFY_KEYS; (2) the files
in the directory are exactly the statement's, each with its sha256; (3) promotion.json names this model and this
version: a copy of signed files under another version number is refused, so a revocation, which names a version,
cannot be side-stepped by a copy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from names import EVIDENCE_FILE, SIGNATURE_FILE

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# MLflow writes registered_model_meta into every registry download (the model's name and version): not an artifact.
UNSIGNED_FILES = frozenset({SIGNATURE_FILE, "registered_model_meta"})
_HASHES: dict[int, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {  # by curve size, as model-signing signs
    256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}


class SignatureRefused(Exception):
    """Why a version's files are not what a trusted key signed: for the log and the admin port, not the public."""


@dataclass(frozen=True)
class VerifyKey:
    key: ec.EllipticCurvePublicKey
    hint: str  # sha256 of the key's PEM: how a model-signing bundle names the key that signed it

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size not in _HASHES:
            raise ValueError("not an elliptic-curve public key on P-256, P-384 or P-521")
        canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(key, hashlib.sha256(canonical).hexdigest())


def load_keys(spec: str) -> tuple[VerifyKey, ...]:
    """MODEL_VERIFY_KEYS: public keys separated by commas (several while keys rotate), each a PEM file's path or the
    one-line base64 of its DER (what `python -m scripts.sign public-key` prints). Raises ValueError naming the entry."""
    keys = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        try:
            path = Path(entry)
            if path.is_file():
                keys.append(VerifyKey.from_pem(path.read_bytes()))
            else:
                der = base64.b64decode(entry, validate=True)
                keys.append(VerifyKey.from_pem(b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der)
                                               + b"-----END PUBLIC KEY-----\n"))
        except (ValueError, binascii.Error) as error:
            raise ValueError(f"MODEL_VERIFY_KEYS entry {entry[:40]!r} is neither a PEM public key file nor a "
                             f"base64 public key ({error})") from None
    return tuple(keys)


def pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    return b"DSSEv1 %d %s %d " % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload)) + payload


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` but the unsigned ones, by its path relative to it."""
    digests = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise SignatureRefused(f"{name} is a symbolic link: a signed model has none")
        if path.is_file() and name not in UNSIGNED_FILES:
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def verify(directory: Path, keys: tuple[VerifyKey, ...], model_name: str, version: str | None) -> dict[str, Any]:
    """The version's evidence (promotion.json) once its signature and every file check out; SignatureRefused if not."""
    if not keys:
        raise SignatureRefused("MODEL_VERIFY_KEYS is empty: no signature can be checked, so no version is served")
    bundle_path = directory / SIGNATURE_FILE
    if not bundle_path.is_file():
        raise SignatureRefused(f"unsigned: no {SIGNATURE_FILE} beside the model (promote it: the gate signs)")
    statement = _verified_statement(bundle_path, keys)
    predicate = statement.get("predicate", {})
    if statement.get("predicateType") != PREDICATE_TYPE or predicate.get("serialization", {}).get(
            "hash_type") != "sha256" or predicate.get("serialization", {}).get("method") != "files":
        raise SignatureRefused("the signed statement is not a sha256 file manifest of model signing v1.0")
    signed = {resource["name"]: resource["digest"] for resource in predicate.get("resources", [])
              if resource.get("algorithm") == "sha256"}
    found = file_digests(directory)
    if found != signed:
        changed = sorted(name for name in signed.keys() & found.keys() if signed[name] != found[name])
        added, missing = sorted(found.keys() - signed.keys()), sorted(signed.keys() - found.keys())
        raise SignatureRefused("the files differ from what was signed: "
                               + "; ".join(f"{what} {', '.join(names)}" for what, names in
                                           (("changed", changed), ("not signed", added), ("missing", missing))
                                           if names))
    try:
        evidence: dict[str, Any] = json.loads((directory / EVIDENCE_FILE).read_bytes())
    except (OSError, ValueError) as error:
        raise SignatureRefused(f"no readable {EVIDENCE_FILE} among the signed files ({error})") from None
    if (evidence.get("model_name"), str(evidence.get("version"))) != (model_name, str(version)):
        raise SignatureRefused(f"signed for {evidence.get('model_name')!r} version {evidence.get('version')!r}, "
                               f"not {model_name!r} version {version!r}: a copy of another version's files")
    return evidence


def _verified_statement(bundle_path: Path, keys: tuple[VerifyKey, ...]) -> dict[str, Any]:
    try:
        bundle = json.loads(bundle_path.read_bytes())
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        hint = bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint", "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error) as error:
        raise SignatureRefused(f"{SIGNATURE_FILE} is not a model signing bundle ({type(error).__name__})") from None
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureRefused(f"{SIGNATURE_FILE} signs a {envelope.get('payloadType')!r}, not an in-toto statement")
    for candidate in (key for key in keys if key.hint == hint):
        try:
            candidate.key.verify(signature, pae(payload), ec.ECDSA(_HASHES[candidate.key.curve.key_size]()))
        except InvalidSignature:
            raise SignatureRefused(f"the signature does not verify under key {hint[:16]}: the statement was "
                                   "changed after signing") from None
        try:
            statement: dict[str, Any] = json.loads(payload)
        except ValueError:
            raise SignatureRefused("the signed statement is not JSON") from None
        return statement
    raise SignatureRefused(f"signed by key {hint[:16] or '(unnamed)'}, which is not in MODEL_VERIFY_KEYS "
                           f"({', '.join(key.hint[:16] for key in keys)})")
