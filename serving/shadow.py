"""The candidate in shadow: after each answer from the champion, the candidate scores the same records, off the
request path, and the pair is measured (metrics) and kept (the prediction log). `make bake` decides on that evidence.

A request only offers its arrays to a bounded queue, which a background thread drains: a full queue drops the offer
(counted), so a slow or failing candidate never delays or fails a client. The queue is bounded in records, not
requests: a few maximal batches cannot pile up hundreds of MB of arrays.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass

import numpy as np

from features import FloatArray
from serving.background import BackgroundThread
from serving.metrics import (
    SHADOW_DIFFERENCE,
    SHADOW_DROPPED,
    SHADOW_ERRORS,
    SHADOW_LATENCY,
    SHADOW_PREDICTIONS,
    observe_all,
)
from serving.model import ModelKeeper, ServedModel
from serving.prediction_log import PredictionLog

log = logging.getLogger("housing.serve")

MAX_PENDING_RECORDS = 20_000  # two maximal batches: ~1.5 MB of arrays each
SHADOW_CLIENT = "(shadow)"  # the prediction log's budget key for paired rows: never a client's


@dataclass(frozen=True)
class Offer:
    candidate: ServedModel
    numeric: FloatArray
    codes: FloatArray
    champion: FloatArray  # the champion's answers, in the records' order
    ids: list[str]
    route: str


class ShadowScorer(BackgroundThread):
    name = "shadow"

    def __init__(self, keeper: ModelKeeper, prediction_log: PredictionLog,
                 max_pending_records: int = MAX_PENDING_RECORDS) -> None:
        super().__init__()
        self._keeper = keeper
        self._log = prediction_log
        self._max_pending = max_pending_records
        self._pending = 0  # records queued; changed by one request or the thread at a time, under the GIL
        self._queue: queue.SimpleQueue[Offer] = queue.SimpleQueue()

    def offer(self, numeric: FloatArray, codes: FloatArray, champion: FloatArray, ids: list[str], route: str) -> None:
        """Queue one answered request for the candidate, if there is one and room for it; never blocks."""
        candidate = self._keeper.shadow
        if candidate is None:
            return
        if self._pending + len(numeric) > self._max_pending:
            SHADOW_DROPPED.labels(candidate.ref.version or "").inc(len(numeric))
            return
        self._pending += len(numeric)
        self._queue.put(Offer(candidate, numeric, codes, champion, ids, route))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                offer = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._pending -= len(offer.numeric)
            self._score(offer)

    def _score(self, offer: Offer) -> None:
        version = offer.candidate.ref.version or ""
        started = time.perf_counter()
        try:
            predictions = offer.candidate.predict(offer.numeric, offer.codes)
            finite = np.isfinite(predictions)
        except Exception:  # a candidate that raises is evidence against it, never a client's error
            log.warning("candidate %s raised in shadow on %d records", version, len(offer.numeric), exc_info=True)
            SHADOW_ERRORS.labels(version).inc(len(offer.numeric))
            return
        SHADOW_LATENCY.labels(version).observe(time.perf_counter() - started)
        errors = int((~finite).sum())
        if errors:
            SHADOW_ERRORS.labels(version).inc(errors)
        # The gate's prediction shift (scripts/register.py), record by record, on the records it could score.
        champion = offer.champion[finite]
        observe_all(SHADOW_DIFFERENCE.labels(version),
                    np.abs(predictions[finite] - champion) / np.maximum(np.abs(champion), 1.0))
        SHADOW_PREDICTIONS.labels(version).inc(len(champion))
        # Paired with the champion's entry by the same ids; a non-finite prediction is written as null.
        self._log.append({"request_id": offer.ids[0].partition("/")[0], "time": time.time(),
                          "model": offer.candidate.label, "route": f"shadow {offer.route}", "ids": offer.ids,
                          "inputs": [], "outputs": predictions.tolist()}, client=SHADOW_CLIENT)
