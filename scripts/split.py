"""split stage: data/housing.csv -> data/train.csv + data/holdout.csv.

A row's side is decided by a CRC32 of its feature values (salted with the seed), not by shuffling:
when new rows arrive, every existing row stays on its side. So the champion, re-scored on the new
holdout, is never scored on rows it was trained on, and challenger and champion compete fairly.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from names import FEATURES

DATA = Path("data/housing.csv")
TRAIN = Path("data/train.csv")
HOLDOUT = Path("data/holdout.csv")


def holdout_mask(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    keys = frame[list(FEATURES)].to_csv(header=False, index=False).splitlines()
    threshold = fraction * 2**32
    return np.array([zlib.crc32(f"{seed}:{key}".encode()) < threshold for key in keys])


def main() -> int:
    params = yaml.safe_load(Path("params.yaml").read_text())["split"]
    frame = pd.read_csv(DATA)
    holdout = holdout_mask(frame, params["holdout_fraction"], params["seed"])
    frame[~holdout].to_csv(TRAIN, index=False)
    frame[holdout].to_csv(HOLDOUT, index=False)
    print(f"split: {(~holdout).sum()} training rows -> {TRAIN}, {holdout.sum()} holdout rows -> {HOLDOUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
