"""`make dashboard-png` (scripts/render_dashboard.py): how it shows values, units and thresholds, and what it says
without a Prometheus. Every dashboard drawn from a real Prometheus scraping the real app: tests/test_monitoring.py.
"""

from __future__ import annotations

import math

import pytest

from scripts import render_dashboard
from scripts.render_dashboard import Window, format_value, threshold_color
from tests.servers import free_port

PSI_STEPS = [{"color": "green", "value": None}, {"color": "yellow", "value": 0.1}, {"color": "red", "value": 0.25}]


def test_without_prometheus_it_says_how_to_start_one(tmp_path):
    with pytest.raises(SystemExit, match=r"make monitoring-up"):
        render_dashboard.main(["--prometheus", f"http://127.0.0.1:{free_port()}", "--out-dir", str(tmp_path)])


# --- how values are shown ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "unit", "decimals", "shown"), [
    (0.1337, "percentunit", 2, "13.37%"),
    (0.25, "s", None, "250 ms"),
    (0.0, "s", None, "0 s"),
    (0.00042, "s", None, "420 µs"),
    (1.5, "s", None, "1.5 s"),
    (12.0, "reqps", None, "12 req/s"),
    (1500.0, "ops", None, "1.5 K ops/s"),
    (550000.0, "currencyUSD", None, "$550K"),
    (5.98123, None, 2, "5.98"),
    (3.0, "short", 0, "3"),
    (math.nan, "percentunit", 2, "NaN"),
])
def test_values_are_shown_in_the_panel_unit(value, unit, decimals, shown):
    assert format_value(value, unit, decimals) == shown


@pytest.mark.parametrize(("value", "text"), [(1.0, "UP"), (0.0, "DOWN"), (0.5, None)])
def test_value_mappings_replace_the_value_with_their_text(value, text):
    mappings = [{"type": "value", "options": {"0": {"text": "DOWN"}, "1": {"text": "UP"}}}]
    assert render_dashboard.mapped(value, mappings).get("text") == text


@pytest.mark.parametrize(("value", "color"), [(0.0, "green"), (0.0999, "green"), (0.1, "yellow"), (0.25, "red"),
                                              (5.98, "red")])
def test_a_value_takes_the_colour_of_the_last_threshold_it_reaches(value, color):
    assert threshold_color(value, PSI_STEPS) == render_dashboard.NAMED_COLORS[color]


def test_rate_interval_is_grafanas_four_scrapes_or_one_step_more():
    three_hours = Window(0, 3 * 3600, scrape_s=15)
    assert three_hours.step_s == 18  # 3 h over 600 points
    assert three_hours.rate_interval_s == 60  # 4 x 15 s beats 18 s + 15 s
    two_days = Window(0, 2 * 86400, scrape_s=15)
    assert two_days.rate_interval_s == two_days.step_s + 15
    assert Window(0, 60, scrape_s=1, min_step_s=15).step_s == 15  # an annotation's own step


def test_grafana_variables_are_expanded_and_unknown_ones_refused():
    window = Window(0, 120, scrape_s=1)
    assert window.expand("rate(x[$__rate_interval]) + rate(y[${__interval}])") == "rate(x[4s]) + rate(y[1s])"
    with pytest.raises(ValueError, match=r"\$instance"):
        window.expand('up{instance="$instance"}')
