"""`make reference SOURCE=trusted.csv`: seed or refresh the reference set the promotion gate trusts.

The reference set is a sample of rows from a CSV a person vouches for, kept in git (reference/), apart from the
uploaded data that DVC versions: no upload and no retrain run can change it; only a reviewed commit can. Its rows
are taken from the holdout side of split.py's hash split, so no model this pipeline trains ever sees them, and the
challenger and the champion are both scored on rows neither was fitted on.

Writes reference/housing-reference.csv and reference/manifest.json (source, its md5, rows, split settings, when).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from names import COLUMNS
from scripts.split import holdout_mask

DEFAULT_ROWS = 2000


def reference_path(params: dict[str, Any]) -> Path:
    return Path(params["gate"]["reference"]["path"])


def seed(source: Path, rows: int, params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Sample up to `rows` holdout-side rows of `source` into the reference set; return its path and manifest."""
    frame = pd.read_csv(source)
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{source} lacks the columns {missing}: a reference set needs every housing column")
    frame = frame[list(COLUMNS)].dropna(subset=["median_house_value"])
    split = params["split"]
    candidates = frame[holdout_mask(frame, split["holdout_fraction"], split["seed"])]
    if len(candidates) < 100:
        raise ValueError(f"only {len(candidates)} rows of {source} fall on the holdout side; need at least 100")
    sample = candidates.sample(min(rows, len(candidates)), random_state=split["seed"]).sort_index()
    path = reference_path(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(path, index=False)
    manifest = {
        "source": str(source),
        "source_md5": hashlib.md5(source.read_bytes(), usedforsecurity=False).hexdigest(),
        "rows": len(sample),
        "md5": hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest(),
        "split": {"holdout_fraction": split["holdout_fraction"], "seed": split["seed"]},
        "seeded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.with_name("manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path, manifest


def load(params: dict[str, Any]) -> pd.DataFrame:
    """The reference set, checked to be usable with the current split settings; ValueError says the fix."""
    path = reference_path(params)
    if not path.is_file():
        raise ValueError(f"reference set {path} is missing: seed it from data you trust with "
                         f"`make reference SOURCE=path/to/trusted.csv` and commit it (docs/promotion.md)")
    frame = pd.read_csv(path)
    split = params["split"]
    on_training_side = int((~holdout_mask(frame, split["holdout_fraction"], split["seed"])).sum())
    if on_training_side:
        raise ValueError(f"reference set {path}: {on_training_side} of {len(frame)} rows fall on the training side "
                         f"of the split (seed {split['seed']}, holdout_fraction {split['holdout_fraction']}): "
                         f"the split settings changed; reseed it with `make reference SOURCE=...` and commit it")
    return frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a CSV of housing rows whose labels you trust")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"sample size (default {DEFAULT_ROWS})")
    arguments = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    try:
        path, manifest = seed(arguments.source, arguments.rows, params)
    except (OSError, ValueError) as error:
        print(f"reference: {error}", file=sys.stderr)
        return 1
    print(f"reference: {manifest['rows']} rows of {arguments.source} -> {path} (md5 {manifest['md5']}); "
          f"review and commit {path.parent}/ to make it the gate's reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
