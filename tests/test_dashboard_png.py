"""`make dashboard-png`: every Grafana dashboard drawn panel by panel, from a real Prometheus scraping the real app.

The live tests reuse the stack of tests/test_monitoring.py (a healthy `serve.py` with WORKERS=2, one without a model,
a target where nothing listens, Prometheus through scripts/monitoring.sh at a 1 s scrape interval, traffic with
refused bodies, model changes and drift). The rest specifies how values, units and thresholds are shown.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import tests.test_monitoring as monitoring
from names import FEATURES
from scripts import render_dashboard
from scripts.render_dashboard import Prometheus, Window, format_value, threshold_color
from tests.conftest import clean_environment
from tests.servers import ROOT, free_port, wait_for

live = monitoring.live  # the live stack, as a fixture of this module too

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PSI_STEPS = [{"color": "green", "value": None}, {"color": "yellow", "value": 0.1}, {"color": "red", "value": 0.25}]


def drawable(path: Path) -> list[dict]:
    return [panel for panel in json.loads(path.read_text())["panels"] if panel["type"] != "row"]


@dataclass
class Rendered:
    pictures: dict[str, Path]  # by dashboard file name
    drawn: dict[str, list[render_dashboard.Drawn]]
    end: float


@pytest.fixture(scope="module")
def traffic_window(live, tmp_path_factory) -> Rendered:
    """Every dashboard over the test's own traffic, from when Prometheus started until now."""
    out = tmp_path_factory.mktemp("dashboards")
    prometheus = Prometheus(live.prometheus)
    scrape_s = prometheus.scrape_interval_s()

    def drift_in_range() -> float:
        """Now, if range queries (what the panels run) end with a few points of the drift the traffic caused, and
        Prometheus has scraped the realized figures `make realized` pushed at the end of the traffic."""
        window = Window(live.started, time.time(), scrape_s)
        series = prometheus.range("job_field:housing_drift_psi:max", window)
        realized = prometheus.range("housing_realized_labels", window)
        drifted = any((one.values[-3:] > 0.25).sum() == 3 for one in series)
        return window.end if drifted and any(len(one.values) for one in realized) else 0.0

    end = wait_for(drift_in_range, 30, "three points of drift, and the realized figures, in a range query")
    pictures = {path.name: out / f"dashboard-{path.stem}.png" for path in DASHBOARDS}
    drawn = {path.name: render_dashboard.render(path, prometheus, live.started, end, pictures[path.name])
             for path in DASHBOARDS}
    print(f"dashboard PNGs of the test traffic: {out}")  # docs/dashboard-housing-serve.png is one of them
    return Rendered(pictures, drawn, end)


@pytest.mark.integration
def test_every_panel_with_a_query_draws_series_from_prometheus(traffic_window):
    for path in DASHBOARDS:
        panels = drawable(path)
        assert [(one.title, one.type) for one in traffic_window.drawn[path.name]] == [
            (panel["title"], panel["type"]) for panel in panels]
        empty = [one.title for one, panel in zip(traffic_window.drawn[path.name], panels, strict=True)
                 if panel.get("targets") and one.series < 1]
        assert not empty, f"{path.name}: nothing drawn for {empty}"


@pytest.mark.integration
def test_the_panels_show_what_the_traffic_did(traffic_window, live):
    drawn = {one.title: one.series for one in traffic_window.drawn["housing-serve.json"]}
    assert drawn["Targets up"] == 3  # the healthy app, the one without a model, and the dead target
    assert drawn["Model loaded"] == 2
    assert drawn["Model version in service"] == 2  # the first version, then the second
    assert drawn["Drift per field (PSI)"] == drawn["PSI now"] == len(FEATURES) + 1  # and the predictions
    alerts = monitoring.query(live.prometheus, 'ALERTS{alertname=~"Housing.+"}', at=traffic_window.end)
    assert drawn["Alerts"] == len(alerts) > 0
    assert drawn["Records per request"] >= 10  # the batch sizes sent: 1 to 500 records, and 100s


@pytest.mark.integration
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_each_panel_is_a_box_where_its_grid_position_puts_it(traffic_window, path):
    """In the PNG: inside every panel's box the panel colour, just left of it the page's background."""
    picture = traffic_window.pictures[path.name]
    panels = json.loads(path.read_text())["panels"]
    rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels)
    dpi, column_in = render_dashboard.DPI, (render_dashboard.PAGE_WIDTH_IN - 2 * render_dashboard.MARGIN_IN) / 24
    with Image.open(picture) as image:
        pixels = image.convert("RGB")
        assert image.size == (round(render_dashboard.PAGE_WIDTH_IN * dpi), round(
            (render_dashboard.HEADER_IN + rows * render_dashboard.GRID_ROW_IN + render_dashboard.MARGIN_IN) * dpi))
    panel_color, background = (tuple(int(code[i:i + 2], 16) for i in (1, 3, 5))
                               for code in (render_dashboard.PANEL, render_dashboard.BACKGROUND))
    for panel in drawable(path):
        grid = panel["gridPos"]
        left = render_dashboard.MARGIN_IN + grid["x"] * column_in + render_dashboard.GAP_IN / 2
        top = render_dashboard.HEADER_IN + grid["y"] * render_dashboard.GRID_ROW_IN + render_dashboard.GAP_IN / 2
        right = left + grid["w"] * column_in - render_dashboard.GAP_IN
        inside = (round((right - 0.05) * dpi), round((top + 0.05) * dpi))  # the title band's far end
        outside = (round(left * dpi) - 3, inside[1])
        assert pixels.getpixel(inside) == panel_color, panel["title"]
        assert pixels.getpixel(outside) == background, panel["title"]


@pytest.mark.integration
def test_make_dashboard_png_draws_each_dashboard_over_its_own_time_range(live, tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "dashboard-png", f"DASHBOARD_PNG_DIR={tmp_path}"],
                            cwd=ROOT, env={**clean_environment(), "PROMETHEUS_URL": live.prometheus},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        png = tmp_path / f"dashboard-{dashboard['uid']}.png"
        assert str(png) in lines
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    reported = [re.fullmatch(r"(\w+) +(\d+) series  (.+)", line) for line in lines if not line.startswith("/")]
    assert all(reported), lines
    assert [(match[1], match[3]) for match in reported] == [
        (panel["type"], panel["title"]) for path in DASHBOARDS for panel in drawable(path)]
    assert min(int(match[2]) for match in reported) >= 1, result.stdout


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
