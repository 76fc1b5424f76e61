"""The server's settings: one object, read from the environment and validated once. serve.py describes each."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model_name: str = "California_Housing_Regression"
    model_alias: str = "champion"
    model_stage: str = ""
    model_uri: str = ""
    reload_interval_s: float = 30.0
    reload_token: str = ""
    max_batch_rows: int = 10_000
    max_body_bytes: int = 8 * 1024 * 1024
    prediction_log_dir: Path = Path("logs")
    drift_window: int = 1000

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
        for name in ("workers", "max_batch_rows", "max_body_bytes", "drift_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1")
        if self.reload_interval_s < 0:
            raise ValueError("RELOAD_INTERVAL_S must be 0 (off) or positive")
