"""What the request path records per prediction, done per batch: the same series as per-value bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serving.metrics import observe_all


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_a_batch_observed_at_once_exports_what_observing_each_value_exports(size):
    values = np.concatenate([[50_000.0, 550_000.0, 1e9], np.random.default_rng(0).uniform(0, 600_000, size)])[-size:]
    values[0] = 50_000.0
    exported = []
    for observe in (lambda h: [h.observe(v) for v in values.tolist()], lambda h: observe_all(h, values)):
        registry = CollectorRegistry()
        histogram = Histogram("value", "v", buckets=tuple(range(50_000, 550_001, 50_000)), registry=registry)
        observe(histogram)
        exported.append({line for line in generate_latest(registry).decode().splitlines()
                         if "_bucket" in line or "_count" in line})
    assert exported[0] == exported[1]
    assert 'value_bucket{le="50000.0"}' in "".join(exported[1])  # a value on a bound counts in that bucket
