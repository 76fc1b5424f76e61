"""Drift: the served model's recent inputs and predictions against its training data, as PSI per field."""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from features import FloatArray, NumericProfile, ReferenceProfile, bin_indices, psi
from names import CATEGORICAL_FEATURE, CATEGORIES, FEATURES, NUMERIC_FEATURES
from serving.background import BackgroundThread
from serving.metrics import DRIFT_PSI, DRIFT_ROWS

log = logging.getLogger("housing.serve")

DRIFT_FIELDS = (*FEATURES, "prediction")
DRIFT_UPDATE_S = 1.0  # how often each worker bins its new records and publishes its drift scores


class DriftWindow:
    """The last `size` records one model predicted, in the bins of its reference profile (features.py), and their PSI.

    PSI (Population Stability Index) because it is the usual score of model monitoring, with conventional thresholds
    (below 0.1 stable, above 0.25 a significant shift), it treats numeric and categorical fields alike, and over bins
    fixed at training time it needs only a bin index per value: a window is a ring of small integers, and its scores
    are bin counts. A request only queues its arrays (`add`, one deque append); `update`, on the drift thread, bins
    them into the ring and `scores` compares the ring's bin fractions with the training fractions.
    """

    def __init__(self, profile: ReferenceProfile, size: int) -> None:
        self.size = size
        self._numeric: list[NumericProfile] = [profile["fields"][name] for name in NUMERIC_FEATURES]
        self._prediction = profile["prediction"]
        if any(len(p["fractions"]) != len(p["edges"]) + 2 for p in (*self._numeric, self._prediction)):
            raise ValueError("a numeric profile needs a fraction per bin: len(edges) + 1, and one for missing values")
        category = profile["fields"][CATEGORICAL_FEATURE]
        # The profile's bin of each of this server's category codes; its last bin is for unknown categories.
        self._category_bins = np.array([category["categories"].index(c) if c in category["categories"]
                                        else len(category["categories"]) for c in CATEGORIES])
        self._expected = [np.asarray(p["fractions"], dtype=float) for p in (*self._numeric, category, self._prediction)]
        self._bins = np.zeros((size, len(DRIFT_FIELDS)), dtype=np.intp)
        self._written = 0
        # At most `size` entries of at least one record each: always the newest `size` records, if the thread lags.
        self._queued: deque[tuple[FloatArray, FloatArray, FloatArray]] = deque(maxlen=size)

    @property
    def rows(self) -> int:
        return min(self._written, self.size)

    def add(self, numeric: FloatArray, codes: FloatArray, predictions: FloatArray) -> None:
        self._queued.append((numeric, codes, predictions))

    def update(self) -> None:
        """Move the queued records into the ring, overwriting the oldest."""
        batches = [self._queued.popleft() for _ in range(len(self._queued))]
        if not batches:
            return
        numeric, codes, predictions = (np.concatenate(parts)[-self.size:] for parts in zip(*batches, strict=True))
        bins: npt.NDArray[np.intp] = np.column_stack([
            *(bin_indices(p, numeric[:, i]) for i, p in enumerate(self._numeric)),
            self._category_bins[codes.astype(np.intp)], bin_indices(self._prediction, predictions)])
        self._bins[(self._written + np.arange(len(bins))) % self.size] = bins
        self._written += len(bins)

    def scores(self) -> dict[str, float]:
        """PSI of each of DRIFT_FIELDS; NaN for an empty window."""
        window = self._bins[:self.rows]
        if not len(window):
            return dict.fromkeys(DRIFT_FIELDS, math.nan)
        return {field: psi(expected, np.bincount(window[:, i], minlength=len(expected)) / len(window))
                for i, (field, expected) in enumerate(zip(DRIFT_FIELDS, self._expected, strict=True))}


class DriftMonitor(BackgroundThread):
    """Every DRIFT_UPDATE_S, brings the served model's drift window up to date and publishes its scores.

    A new model comes with a new, empty window. A model without a reference profile gets no PSI series and a window
    of 0 records; if one with a profile served before it in this worker, its PSI series turn NaN (multiprocess mode
    cannot remove series).
    """

    name = "drift"

    def __init__(self, current_window: Callable[[], DriftWindow | None]) -> None:
        super().__init__()
        self._current_window = current_window  # the served model's window, None without one
        self._published = False

    def _run(self) -> None:
        while not self._stop.wait(DRIFT_UPDATE_S):
            try:
                self.publish()
            except Exception:  # like the poller: a surprise must not end drift monitoring silently
                log.exception("drift update failed")

    def publish(self) -> None:
        window = self._current_window()
        if window is not None:
            window.update()
            scores, rows = window.scores(), window.rows
        elif self._published:
            scores, rows = dict.fromkeys(DRIFT_FIELDS, math.nan), 0
        else:
            return
        for field, score in scores.items():
            DRIFT_PSI.labels(field).set(score)
        DRIFT_ROWS.set(rows)
        self._published = True
