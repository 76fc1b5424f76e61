"""The server's settings: one object, read from the environment and validated once. serve.py describes each."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import names
from names import CATEGORIES, NUMERIC_FEATURES
from serving.signature import VerifyKey, load_keys

# The longest JSON a client can reasonably write for one record: every number at full float64 precision with an
# exponent (-1.2345678901234567e-05: 23 characters), the longest category, Python's default separators (", " and
# ": "; JavaScript's are shorter) and the ", " before the next record: 360 bytes. Typical records take ~220.
WORST_NUMBER = "-1.2345678901234567e-05"
BODY_BYTES_PER_RECORD = (
    2 + sum(len(f'"{name}": {WORST_NUMBER}, ') for name in NUMERIC_FEATURES)
    + len(f'"ocean_proximity": "{max(CATEGORIES, key=len)}"') + len(", ")
)
BODY_SLACK_BYTES = 64 * 1024  # `{"instances": [...]}`, line breaks, indentation of a small batch


def body_bytes_for(records: int) -> int:
    """The MAX_BODY_BYTES that MAX_BATCH_ROWS=records needs: 3,665,536 for 10,000 (360 bytes each + 64 KiB)."""
    return records * BODY_BYTES_PER_RECORD + BODY_SLACK_BYTES


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model_name: str = names.MODEL_NAME
    model_alias: str = names.CHAMPION
    model_stage: str = ""
    model_uri: str = ""
    reload_interval_s: float = 30.0
    reload_token: str = ""
    max_batch_rows: int = 10_000
    max_body_bytes: int = 0  # 0: body_bytes_for(max_batch_rows)
    prediction_log_dir: Path = Path("logs")
    prediction_log_max_bytes: int = 4 * 1024**3  # the whole directory: every worker's segments, of every container
    prediction_log_client_bytes_per_s: int = 32 * 1024  # per client address and worker; 0: no budget
    prediction_log_segment_s: float = 3600.0  # a segment is closed (and shipped) at this age at the latest
    prediction_log_s3: str = ""  # s3://bucket/prefix: ship closed segments there
    drift_window: int = 1000
    admin_port: int = 0  # 0: /reload and /metrics answer on PORT, like every endpoint
    admin_host: str = "127.0.0.1"
    model_verify_keys: str = ""  # public keys a version's signature must verify under; none: no version serves

    @functools.cached_property
    def verify_keys(self) -> tuple[VerifyKey, ...]:
        """MODEL_VERIFY_KEYS read once (files included), when the settings are made."""
        return load_keys(self.model_verify_keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Each field from the variable of its upper-cased name, converted to the type of its default."""
        values: dict[str, Any] = {}
        for setting in fields(cls):
            raw = environ.get(setting.name.upper(), "")
            if raw:
                kind: type[Any] = type(setting.default)  # every field has a default
                try:
                    values[setting.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{setting.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def __post_init__(self) -> None:
        self.verify_keys  # noqa: B018 - read now: a key that cannot be read stops the start, naming it
        if self.max_body_bytes == 0:
            object.__setattr__(self, "max_body_bytes", body_bytes_for(self.max_batch_rows))
        for name in ("workers", "max_batch_rows", "max_body_bytes", "drift_window", "prediction_log_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        if self.prediction_log_client_bytes_per_s < 0:
            raise ValueError("PREDICTION_LOG_CLIENT_BYTES_PER_S must be 0 (no budget) or positive")
        if not self.prediction_log_segment_s > 0:
            raise ValueError("PREDICTION_LOG_SEGMENT_S must be positive")
        if self.prediction_log_s3 and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?",
                                                       self.prediction_log_s3):
            raise ValueError(f"PREDICTION_LOG_S3 must be s3://bucket or s3://bucket/prefix, not "
                             f"{self.prediction_log_s3!r}")
        if self.reload_interval_s < 0:
            raise ValueError("RELOAD_INTERVAL_S must be 0 (off) or positive")
        if not 0 <= self.admin_port < 65536:
            raise ValueError("ADMIN_PORT must be 0 (off) or a TCP port")
        if self.admin_port and self.admin_port == self.port:
            raise ValueError(f"ADMIN_PORT must differ from PORT ({self.port}), or be 0 to serve everything on PORT")
