"""The candidate in shadow: after each answer from the champion, the candidate scores the same records, off the
request path, and the pair is measured (metrics) and kept (the prediction log). `make bake` decides on that evidence.

A request only appends its arrays to a buffer bounded in records (a full buffer drops the offer, counted): no lock, no
thread woken, about a microsecond. A background thread takes the whole buffer every SHADOW_FLUSH_S and has it scored
in one call by the candidate's own process at the lowest CPU priority (serving/scoring_process.py), then does the
bookkeeping: the candidate costs the workers neither CPU they need nor the GIL, and a slow or failing candidate
never delays or fails a client.
"""

from __future__ import annotations

import logging
import time
from collections import deque
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
from serving.scoring_process import ScoringFailed, ScoringProcess, ScoringTimedOut

log = logging.getLogger("housing.serve")

MAX_PENDING_RECORDS = 20_000  # two maximal batches: ~1.5 MB of arrays each
# At most this many records per call: a backlog (the scoring process is behind on a busy host) is worked off in
# pieces, so the thread's Python work on it never holds the GIL for long.
SHADOW_BATCH_RECORDS = 2_000
SHADOW_FLUSH_S = 0.1  # how often the buffer is scored: a wake-up per request would cost the event loop the GIL
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
        # Records buffered = offered - taken; each counter has one writer (the event loop, the thread), so no update
        # is lost between them without a lock.
        self._offered = 0
        self._taken = 0
        self._buffer: deque[Offer] = deque()
        self._scorer = ScoringProcess()

    def offer(self, numeric: FloatArray, codes: FloatArray, champion: FloatArray, ids: list[str], route: str) -> None:
        """Buffer one answered request for the candidate, if there is one and room for it; never blocks."""
        candidate = self._keeper.shadow
        if candidate is None:
            return
        if self._offered - self._taken + len(numeric) > self._max_pending:
            SHADOW_DROPPED.labels(candidate.ref.version or "").inc(len(numeric))
            return
        self._offered += len(numeric)
        self._buffer.append(Offer(candidate, numeric, codes, champion, ids, route))

    def _run(self) -> None:
        try:
            while not self._stop.wait(SHADOW_FLUSH_S):
                self._drain()
        finally:
            self._scorer.close()

    def _drain(self) -> None:
        if self._keeper.shadow is None and not self._buffer:
            self._scorer.close()  # no candidate: no process (and its memory) either
            return
        while self._buffer and not self._stop.is_set():
            offers, records = [], 0
            while self._buffer and records < SHADOW_BATCH_RECORDS:
                offers.append(self._buffer.popleft())
                records += len(offers[-1].numeric)
            self._taken += records
            for candidate in {id(offer.candidate): offer.candidate for offer in offers}.values():
                self._score(candidate, [offer for offer in offers if offer.candidate is candidate])

    def _score(self, candidate: ServedModel, offers: list[Offer]) -> None:
        """One call for every buffered record of `candidate`; each request's share of its time is its latency."""
        version = candidate.ref.version or ""
        records = sum(len(offer.numeric) for offer in offers)
        try:
            predictions, seconds = self._scorer.predict(candidate, np.concatenate([offer.numeric for offer in offers]),
                                                        np.concatenate([offer.codes for offer in offers]))
            finite = np.isfinite(predictions)
        except ScoringTimedOut as error:  # no evidence either way: the bake waits for pairs, so it cannot pass
            log.warning("candidate %s in shadow: %d records dropped: %s", version, records, error)
            SHADOW_DROPPED.labels(version).inc(records)
            return
        except ScoringFailed as error:  # a candidate that raises is evidence against it, never a client's error
            log.warning("candidate %s failed in shadow on %d records: %s", version, records, error)
            SHADOW_ERRORS.labels(version).inc(records)
            return
        per_record = seconds / records
        sizes = np.array([len(offer.numeric) for offer in offers], dtype=float)
        observe_all(SHADOW_LATENCY.labels(version), per_record * sizes)
        errors = int((~finite).sum())
        if errors:
            SHADOW_ERRORS.labels(version).inc(errors)
        # The gate's prediction shift (scripts/register.py), record by record, on the records it could score.
        champion = np.concatenate([offer.champion for offer in offers])
        observe_all(SHADOW_DIFFERENCE.labels(version), np.abs(predictions[finite] - champion[finite])
                    / np.maximum(np.abs(champion[finite]), 1.0))
        SHADOW_PREDICTIONS.labels(version).inc(records - errors)
        # Paired with the champion's entries by the same ids, one entry per route and batch (a line per request would
        # cost the event loop the GIL); a non-finite prediction is written as null.
        outputs, now = predictions.tolist(), time.time()
        starts = [0, *np.cumsum(sizes).astype(int).tolist()]
        for route in dict.fromkeys(offer.route for offer in offers):
            chosen = [index for index, offer in enumerate(offers) if offer.route == route]
            ids = [name for index in chosen for name in offers[index].ids]
            paired = [value for index in chosen for value in outputs[starts[index]:starts[index + 1]]]
            self._log.append({"request_id": ids[0].partition("/")[0], "time": now, "model": candidate.label,
                              "route": f"shadow {route}", "ids": ids, "inputs": [], "outputs": paired},
                             client=SHADOW_CLIENT)
