"""Each Grafana dashboard of grafana/dashboards/ drawn panel by panel from a real Prometheus: one PNG per dashboard.

    python -m scripts.render_dashboard [--prometheus URL] [--minutes M] [--out-dir DIR] [DASHBOARD.json ...]
    make dashboard-png      (after `make monitoring-up` and some traffic to `make serve`)

Grafana needs Docker (docker-compose.yml); this shows what its dashboards will show without it. Every panel sits
where its gridPos puts it, with its title, unit, decimals, thresholds and value mappings, and runs the JSON's own
queries through Prometheus's HTTP API: range queries over the dashboard's time range ("time": {"from": "now-3h"}) or
the last --minutes, instant queries at its end, `$__rate_interval` as Grafana computes it from Prometheus's scrape
interval. Rows are section headers; annotation queries are vertical marks on the time series panels. Panel types
drawn: timeseries, stat, bargauge, table, heatmap; a panel of another type is a box saying so and draws nothing.

Prints one line per panel (type, series drawn, title) and the PNG's path. Settings (environment): PROMETHEUS_URL
(default http://127.0.0.1:$PROMETHEUS_PORT, with PROMETHEUS_PORT=9090 as for `make monitoring-up`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.dates import DateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.textpath import TextPath
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "grafana" / "dashboards"
MAX_POINTS = 600  # per range query, about a panel's width in pixels as Grafana asks
ATTEMPTS, TIMEOUT_S = 3, 30.0  # per Prometheus request

# Grafana's dark theme and its colour names.
BACKGROUND, PANEL, BORDER, TEXT, DIM, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e", "#24292e"
NAMED_COLORS = {"green": "#73bf69", "red": "#f2495c", "yellow": "#fade2a", "blue": "#5794f2", "orange": "#ff9830",
                "purple": "#b877d9", "transparent": "#00000000", "text": TEXT}
CLASSIC_PALETTE = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0",
                   "#508642", "#cca300", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477")

# The page: Grafana's 24-column grid, drawn 16 inches wide; one grid row is 30 px plus an 8 px gap in Grafana.
PAGE_WIDTH_IN, MARGIN_IN, HEADER_IN, GRID_ROW_IN, GAP_IN, TITLE_IN, DPI = 16.0, 0.12, 0.55, 0.36, 0.06, 0.28, 100

log = logging.getLogger("render_dashboard")


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    times: np.ndarray  # Unix seconds
    values: np.ndarray


@dataclass
class Drawn:
    title: str
    type: str
    series: int  # series, rows or bars drawn; 0 for "No data" or a type not drawn


@dataclass
class Window:
    """The time range and Grafana's interval variables for it."""

    start: float
    end: float
    scrape_s: float
    min_step_s: float = 0.0  # a query's own lower limit ("step" of an annotation, "interval" of a target)

    @property
    def step_s(self) -> float:
        return float(max(math.ceil((self.end - self.start) / MAX_POINTS), self.scrape_s, self.min_step_s))

    @property
    def rate_interval_s(self) -> float:
        """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval)."""
        return max(self.step_s + self.scrape_s, 4 * self.scrape_s)

    def expand(self, expr: str) -> str:
        variables = {"__rate_interval": self.rate_interval_s, "__interval": self.step_s,
                     "__range": self.end - self.start}

        def value(match: re.Match[str]) -> str:
            name = match[1] or match[2]
            if name not in variables:
                raise ValueError(f"{expr}: Grafana variable ${name} is not supported here")
            return f"{round(variables[name])}s"

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


class Prometheus:
    """Prometheus's HTTP API: each request with a timeout and a bounded number of attempts."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: str | float) -> Any:
        address = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with urllib.request.urlopen(address, timeout=TIMEOUT_S) as response:  # nosec B310  # the Prometheus URL it is given
                    answer = json.loads(response.read())
                break
            except urllib.error.HTTPError as refused:  # 4xx/5xx, with Prometheus's own error text if it answered
                body = refused.read().decode(errors="replace")
                answer = json.loads(body) if body.startswith("{") else {"error": f"HTTP {refused.code}: {body[:200]}"}
                break
            except (urllib.error.URLError, TimeoutError) as failure:
                if attempt == ATTEMPTS:
                    raise SystemExit(f"render_dashboard: no answer from Prometheus at {self.url} ({failure}): start "
                                     f"it with `make monitoring-up`, or set PROMETHEUS_URL") from failure
                time.sleep(0.5 * attempt)  # a Prometheus still starting gets a moment
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {params.get('query', path)!r}: {answer.get('error')}")
        return answer["data"]

    def scrape_interval_s(self) -> float:
        config = yaml.safe_load(self.get("/api/v1/status/config")["yaml"])
        return duration_s(config.get("global", {}).get("scrape_interval", "1m"))

    def instant(self, expr: str, at: float) -> list[Series]:
        return [Series("", item["metric"], np.array([float(item["value"][0])]), np.array([float(item["value"][1])]))
                for item in self.get("/api/v1/query", query=expr, time=at)["result"]]

    def range(self, expr: str, window: Window) -> list[Series]:
        data = self.get("/api/v1/query_range", query=expr, start=window.start, end=window.end, step=window.step_s)
        return [Series("", item["metric"], np.array([float(t) for t, _ in item["values"]]),
                       np.array([float(v) for _, v in item["values"]])) for item in data["result"]]


def duration_s(text: str) -> float:
    """A Prometheus or Grafana duration ("15s", "1m30s", "now-3h" without "now-") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def color(name: str) -> str:
    return NAMED_COLORS.get(name, name)


def threshold_color(value: float, steps: Sequence[dict[str, Any]]) -> str:
    """The colour of the last step at or below `value` (the first step, value null, is the base)."""
    chosen = steps[0]["color"] if steps else "green"
    for step in steps[1:]:
        if value >= step["value"]:
            chosen = step["color"]
    return color(chosen)


def format_value(value: float, unit: str | None, decimals: int | None = None) -> str:
    """A value as Grafana shows it in `unit` (the units the dashboards here use; others are appended as is)."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s" and value:
        for scale, suffix in ((1e-6, "µs"), (1e-3, "ms"), (1, "s")):
            if abs(value) < scale * 1000 or suffix == "s":
                return f"{number(value / scale, decimals)} {suffix}"
    if unit == "currencyUSD":
        return "$" + short(value, decimals).replace(" ", "")
    suffix = {"reqps": " req/s", "ops": " ops/s", "short": "", "none": "", None: ""}.get(unit, f" {unit}")
    return short(value, decimals) + suffix


def number(value: float, decimals: int | None) -> str:
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def short(value: float, decimals: int | None) -> str:
    for scale, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " M"), (1e3, " K")):
        if abs(value) >= scale:
            return number(value / scale, decimals) + suffix
    return number(value, decimals)


def legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana legend format with its {{label}} filled in; the series' labels when there is none."""
    if template and template != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match[1], ""), template).strip()
    inner = ", ".join(f'{key}="{value}"' for key, value in labels.items() if key != "__name__")
    return f"{labels.get('__name__', '')}{{{inner}}}" if inner else labels.get("__name__", "value")


def mapped(value: float, mappings: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The value mapping result ({"text": ..., "color": ...}) for `value`, or {}."""
    for mapping in mappings:
        options = mapping["options"]
        if mapping["type"] == "value":
            for key, result in options.items():
                if re.fullmatch(r"-?\d+(\.\d+)?", key) and float(key) == value:
                    return cast("dict[str, str]", result)  # dashboard JSON: text and color
        elif mapping["type"] == "range":
            low, high = options.get("from"), options.get("to")
            if (low is None or value >= low) and (high is None or value <= high):
                return cast("dict[str, str]", options["result"])
    return {}


REDUCERS: dict[str, Callable[[np.ndarray], float]] = {
    "lastNotNull": lambda values: float(values[~np.isnan(values)][-1]) if (~np.isnan(values)).any() else math.nan,
    "last": lambda values: float(values[-1]),
    "mean": lambda values: float(np.nanmean(values)),
    "max": lambda values: float(np.nanmax(values)),
    "min": lambda values: float(np.nanmin(values)),
    "sum": lambda values: float(np.nansum(values)),
}


def reduce(series: Series, panel: dict[str, Any]) -> float:
    (calc,) = panel.get("options", {}).get("reduceOptions", {}).get("calcs", ["lastNotNull"])
    return REDUCERS[calc](series.values)


# --- panels ----------------------------------------------------------------------------------------------------


def fetch(prometheus: Prometheus, panel: dict[str, Any], window: Window) -> list[Series]:
    """Every target's series, named by its legend format, instant or range as the target says."""
    found = []
    for target in panel.get("targets", []):
        if target.get("hide"):
            continue
        own = replace(window, min_step_s=duration_s(target["interval"])) if target.get("interval") else window
        expr = own.expand(target["expr"])
        instant = target.get("instant") and not target.get("range", False)
        results = prometheus.instant(expr, own.end) if instant else prometheus.range(expr, own)
        for series in results:
            series.name = legend(target.get("legendFormat", ""), series.labels)
            found.append(series)
    return found


def with_gaps(series: Series, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Times (as datetime64) and values with a NaN wherever a point is missing: Grafana's spanNulls false."""
    times, values = series.times, series.values
    missing = np.flatnonzero(np.diff(times) > 1.5 * step_s) + 1
    times = np.insert(times, missing, times[missing - 1] + step_s)
    values = np.insert(values, missing, np.nan)
    return (times * 1000).astype("datetime64[ms]"), values


def style_axes(axes: Axes, unit: str | None, decimals: int | None) -> None:
    axes.set_facecolor(PANEL)
    axes.tick_params(colors=DIM, labelsize=7, length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.grid(color=GRID, linewidth=0.6)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_value(value, unit, decimals)))
    axes.yaxis.set_major_locator(MaxNLocator(5, integer=decimals == 0))


def draw_timeseries(panel: dict[str, Any], series: list[Series], place: Place, window: Window,
                    marks: list[Mark]) -> int:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    per_row = max(1, int(place.width / 2.0))
    legend_in = 0.17 * math.ceil(len(series) / per_row) + 0.05 if series else 0
    axes = place.axes(bottom_in=legend_in + 0.22, left_in=0.62)
    style_axes(axes, defaults.get("unit"), defaults.get("decimals"))
    for index, one in enumerate(series):
        times, values = with_gaps(one, window.step_s)
        line_color = CLASSIC_PALETTE[index % len(CLASSIC_PALETTE)]
        axes.plot(times, values, color=line_color, linewidth=0.75 * custom.get("lineWidth", 1), label=one.name,
                  marker="o" if custom.get("showPoints") == "always" else None, markersize=2)
        if custom.get("fillOpacity"):
            axes.fill_between(times, values, color=line_color, alpha=custom["fillOpacity"] / 100, linewidth=0)
    start, end = (np.array([window.start, window.end]) * 1000).astype("datetime64[ms]")
    axes.set_xlim(start, end)
    # matplotlib.dates is not annotated.
    axes.xaxis.set_major_formatter(DateFormatter(  # type: ignore[no-untyped-call]
        "%H:%M:%S" if window.end - window.start < 600 else "%H:%M"))
    axes.xaxis.set_major_locator(MaxNLocator(6))
    if "min" in defaults:
        axes.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        axes.set_ylim(top=defaults["max"])
    mode = custom.get("thresholdsStyle", {}).get("mode", "off")
    steps = defaults.get("thresholds", {}).get("steps", [])
    if mode != "off":
        for step in steps[1:]:
            if "line" in mode or "dashed" in mode:
                axes.axhline(step["value"], color=color(step["color"]), linewidth=1,
                             linestyle="--" if "dashed" in mode else "-")
        if "area" in mode:
            bounds = [-math.inf] + [step["value"] for step in steps[1:]] + [math.inf]
            for step, low, high in zip(steps, bounds, bounds[1:], strict=False):
                axes.axhspan(low, high, color=color(step["color"]), alpha=0.12, linewidth=0)
    for mark in marks:
        for moment in mark.moments:
            axes.axvline(date2num(np.datetime64(int(moment * 1000), "ms")),  # type: ignore[no-untyped-call]
                         color=mark.color, linewidth=0.8,
                         linestyle=":")
    if series:
        handles = [Line2D([], [], color=CLASSIC_PALETTE[i % len(CLASSIC_PALETTE)], linewidth=2) for i in
                   range(len(series))]
        place.figure.legend(handles, [one.name for one in series], ncol=per_row, frameon=False, fontsize=7,
                            labelcolor=TEXT, loc="upper left", handlelength=1.2, columnspacing=1.2,
                            bbox_to_anchor=place.fraction(0.1, place.height - legend_in), borderaxespad=0)
    else:
        no_data(axes)
    return len(series)


def draw_stat(panel: dict[str, Any], series: list[Series], place: Place, window: Window, marks: list[Mark]) -> int:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    options = panel.get("options", {})
    axes = place.axes(bottom_in=0.06, left_in=0.06, right_in=0.06)
    axes.set_axis_off()
    if not series:
        no_data(axes)
        return 0
    across = place.width >= place.height - TITLE_IN  # Grafana's auto orientation: side by side when wide
    count = len(series)
    box_w, box_h = (place.width - 0.12) / (count if across else 1), (place.height - TITLE_IN - 0.06) / (
        1 if across else count)
    text_mode = options.get("textMode", "auto")
    for index, one in enumerate(series):
        value = reduce(one, panel)
        mapping = mapped(value, defaults.get("mappings", []))
        shown = mapping.get("text") or format_value(value, defaults.get("unit"), defaults.get("decimals"))
        fill = color(mapping["color"]) if "color" in mapping else threshold_color(value, defaults.get("thresholds",
                                                                                              {}).get("steps", []))
        x, y = (index / count, 0) if across else (0, 1 - (index + 1) / count)
        width, height = (1 / count, 1) if across else (1, 1 / count)
        background = options.get("colorMode", "value") == "background"
        axes.add_patch(Rectangle((x + 0.01, y + 0.02), width - 0.02, height - 0.04, transform=axes.transAxes,
                                 color=fill if background else PANEL, linewidth=0))
        name, value_text = {"name": (one.name, ""), "value": ("", shown), "value_and_name": (one.name, shown),
                            "auto": (one.name if count > 1 else "", shown), "none": ("", "")}[text_mode]
        ink = "white" if background else fill
        if name and value_text:  # the name small above the value
            axes.text(x + width / 2, y + height * 0.72, name, transform=axes.transAxes, ha="center", va="center",
                      fontsize=min(9.0, fitting_font(name, box_w, box_h * 0.3)), color=ink)
            axes.text(x + width / 2, y + height * 0.35, value_text, transform=axes.transAxes, ha="center",
                      va="center", fontsize=fitting_font(value_text, box_w, box_h * 0.5), fontweight="bold",
                      color=ink)
        elif name or value_text:
            axes.text(x + width / 2, y + height / 2, name or value_text, transform=axes.transAxes, ha="center",
                      va="center", fontsize=fitting_font(name or value_text, box_w, box_h), fontweight="bold",
                      color=ink)
    return count


def fitting_font(text: str, width_in: float, height_in: float) -> float:
    """The largest bold font size (points, 5 to 26) at which `text` fits 80% of a box of width x height inches."""
    extents = TextPath((0, 0), text, size=1, prop=FontProperties(weight="bold")).get_extents()
    by_width = 72 * width_in * 0.8 / max(extents.width, 0.01)
    by_height = 72 * height_in * 0.8 / 1.2
    return max(5.0, min(26.0, by_width, by_height))


def draw_bargauge(panel: dict[str, Any], series: list[Series], place: Place, window: Window, marks: list[Mark]) -> int:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    axes = place.axes(bottom_in=0.08, left_in=0.08, right_in=0.08)
    axes.set_axis_off()
    if not series:
        no_data(axes)
        return 0
    values = [reduce(one, panel) for one in series]
    low = defaults.get("min", min(0.0, *values))
    high = defaults.get("max", max(values))
    steps = defaults.get("thresholds", {}).get("steps", [])
    rows = len(series)
    size = min(9.0, 72 * (place.height - TITLE_IN) / rows * 0.45)
    for index, (one, value) in enumerate(zip(series, values, strict=True)):
        y = 1 - (index + 1) / rows
        height = 0.7 / rows
        share = 0 if high == low else min(max((value - low) / (high - low), 0), 1)
        axes.text(0, y + 0.5 / rows, one.name, transform=axes.transAxes, ha="left", va="center", fontsize=size,
                  color=TEXT)
        if panel.get("options", {}).get("showUnfilled", True):
            axes.add_patch(Rectangle((0.38, y + 0.15 / rows), 0.44, height, transform=axes.transAxes,
                                     color=GRID, linewidth=0))
        axes.add_patch(Rectangle((0.38, y + 0.15 / rows), 0.44 * share, height, transform=axes.transAxes,
                                 color=threshold_color(value, steps), linewidth=0))
        axes.text(1, y + 0.5 / rows, format_value(value, defaults.get("unit"), defaults.get("decimals")),
                  transform=axes.transAxes, ha="right", va="center", fontsize=size,
                  color=threshold_color(value, steps), fontweight="bold")
    return rows


def draw_table(panel: dict[str, Any], series: list[Series], place: Place, window: Window, marks: list[Mark]) -> int:
    axes = place.axes(bottom_in=0.06, left_in=0.08, right_in=0.08)
    axes.set_axis_off()
    if not series:
        no_data(axes)
        return 0
    excluded = {name for transformation in panel.get("transformations", []) if transformation["id"] == "organize"
                for name, hidden in transformation["options"].get("excludeByName", {}).items() if hidden}
    columns = [name for name in ["Time", *sorted({key for one in series for key in one.labels}), "Value"]
               if name not in excluded]
    rows = [[time.strftime("%H:%M:%S", time.gmtime(one.times[-1])) if name == "Time" else
             format_value(one.values[-1], None) if name == "Value" else one.labels.get(name, "")
             for name in columns] for one in series]
    for order in reversed(panel.get("options", {}).get("sortBy", [])):
        if order["displayName"] in columns:
            where = columns.index(order["displayName"])
            rows.sort(key=itemgetter(where), reverse=order.get("desc", False))
    fits = max(1, int((place.height - TITLE_IN - 0.1) / 0.2) - 1)
    shown = rows if len(rows) <= fits else [*rows[:fits - 1], [f"… {len(rows) - fits + 1} more", *[""] * (
        len(columns) - 1)]]
    header = panel.get("options", {}).get("showHeader", True)
    row_height = 0.2 / (place.height - TITLE_IN - 0.1)  # 0.2 in per row, in axes coordinates
    height = row_height * (len(shown) + header)
    table = axes.table(cellText=shown, colLabels=columns if header else None, cellLoc="left", colLoc="left",
                       edges="horizontal", bbox=Bbox.from_bounds(0, 1 - height, 1, height))
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    widths = np.array([max(len(str(cell)) for cell in [name, *(row[i] for row in shown)]) + 2
                       for i, name in enumerate(columns)], dtype=float)
    for (row, column), cell in table.get_celld().items():
        cell.set_width(widths[column] / widths.sum())
        cell.set_facecolor(PANEL)
        cell.set_edgecolor(BORDER)
        cell.get_text().set_color(DIM if header and row == 0 else TEXT)
        if header and row == 0:
            cell.get_text().set_fontweight("bold")
    return len(rows)


def draw_heatmap(panel: dict[str, Any], series: list[Series], place: Place, window: Window, marks: list[Mark]) -> int:
    """Prometheus buckets as Grafana's "heatmap" format shows them: cumulative `le` series made per-bucket counts."""
    options = panel.get("options", {})
    unit = options.get("yAxis", {}).get("unit")
    axes = place.axes(bottom_in=0.25, left_in=0.62, right_in=0.1)
    style_axes(axes, None, None)
    axes.grid(False)
    if not series:
        no_data(axes)
        return 0
    buckets = sorted(series, key=lambda one: float(one.labels.get("le", one.name)))
    times = np.unique(np.concatenate([one.times for one in buckets]))
    cumulative = np.zeros((len(buckets), len(times)))
    for row, one in enumerate(buckets):
        cumulative[row, np.searchsorted(times, one.times)] = one.values
    counts = np.diff(cumulative, axis=0, prepend=0).clip(min=0)
    edges = np.append(times - window.step_s / 2, times[-1] + window.step_s / 2)
    # Grafana's dark theme runs a scheme from dark (few) to bright (many): reversed, without its near-white end.
    scheme = colormaps.get(options.get("color", {}).get("scheme", "Oranges"), colormaps["Oranges"])
    axes.pcolormesh((edges * 1000).astype("datetime64[ms]"), np.arange(len(buckets) + 1),
                    np.ma.masked_equal(counts, 0), cmap=ListedColormap(scheme.reversed()(np.linspace(0, 0.8, 64))),
                    edgecolors=PANEL, linewidth=options.get("cellGap", 1) * 0.3)
    bounds = [one.labels.get("le", one.name) for one in buckets]
    labels = [("≤ " + format_value(float(bound), unit, None)) if bound != "+Inf" else "+Inf" for bound in bounds]
    every = max(1, math.ceil(len(labels) / max(2, (place.height - TITLE_IN - 0.3) / 0.16)))
    axes.set_yticks(np.arange(len(labels))[::every] + 0.5, labels[::every])
    start, end = (np.array([window.start, window.end]) * 1000).astype("datetime64[ms]")
    axes.set_xlim(start, end)
    # matplotlib.dates is not annotated.
    axes.xaxis.set_major_formatter(DateFormatter(  # type: ignore[no-untyped-call]
        "%H:%M:%S" if window.end - window.start < 600 else "%H:%M"))
    axes.xaxis.set_major_locator(MaxNLocator(4))
    return len(buckets)


def no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "No data", transform=axes.transAxes, ha="center", va="center", color=DIM, fontsize=11)


DRAWERS: dict[str, Callable[[dict[str, Any], list[Series], Place, Window, list[Mark]], int]] = {
    "timeseries": draw_timeseries, "stat": draw_stat, "bargauge": draw_bargauge, "table": draw_table,
    "heatmap": draw_heatmap,
}


# --- the page --------------------------------------------------------------------------------------------------


@dataclass
class Mark:
    """An annotation query's events: the first moment of each run of points it returned."""

    name: str
    color: str
    moments: list[float]


@dataclass
class Place:
    """A panel's box on the page, in inches from the page's top left."""

    figure: Figure
    left: float
    top: float
    width: float
    height: float

    def fraction(self, x_in: float, y_in: float) -> tuple[float, float]:
        """Figure coordinates of a point `x_in` right of and `y_in` below the box's top left."""
        page_w, page_h = self.figure.get_size_inches()
        return (self.left + x_in) / page_w, 1 - (self.top + y_in) / page_h

    def axes(self, bottom_in: float, left_in: float, right_in: float = 0.15) -> Axes:
        """Axes inside the box under its title, leaving the margins given."""
        x0, y1 = self.fraction(left_in, TITLE_IN + 0.04)
        x1, y0 = self.fraction(self.width - right_in, self.height - bottom_in)
        return self.figure.add_axes((x0, y0, x1 - x0, y1 - y0))


def annotation_marks(prometheus: Prometheus, dashboard: dict[str, Any], window: Window) -> list[Mark]:
    marks = []
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if not annotation.get("enable", True) or "expr" not in annotation:
            continue
        own = replace(window, min_step_s=duration_s(annotation["step"])) if "step" in annotation else window
        moments = []
        for series in prometheus.range(own.expand(annotation["expr"]), own):
            starts = np.flatnonzero(np.diff(series.times, prepend=-math.inf) > 1.5 * own.step_s)
            moments += [float(series.times[i]) for i in starts]
        marks.append(Mark(annotation["name"], color(annotation.get("iconColor", "purple")), sorted(moments)))
    return marks


def render(dashboard_path: Path, prometheus: Prometheus, start: float, end: float, out: Path) -> list[Drawn]:
    """Draw the dashboard between `start` and `end` (Unix seconds) into the PNG `out`; say what each panel drew."""
    dashboard = json.loads(dashboard_path.read_text())
    window = Window(start, end, prometheus.scrape_interval_s())
    panels = dashboard["panels"]
    grid_rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels)
    column_in = (PAGE_WIDTH_IN - 2 * MARGIN_IN) / 24
    figure = Figure(figsize=(PAGE_WIDTH_IN, HEADER_IN + grid_rows * GRID_ROW_IN + MARGIN_IN), facecolor=BACKGROUND)
    title = dashboard.get("title", dashboard_path.stem)
    span = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start))} to {time.strftime('%H:%M:%S', time.gmtime(end))}"
    figure.text(MARGIN_IN / PAGE_WIDTH_IN, 1 - 0.22 / figure.get_figheight(), title, fontsize=15, color=TEXT,
                fontweight="bold", va="center")
    figure.text(1 - MARGIN_IN / PAGE_WIDTH_IN, 1 - 0.22 / figure.get_figheight(),
                f"{span} UTC from {prometheus.url}: step {window.step_s:.0f}s, $__rate_interval "
                f"{window.rate_interval_s:.0f}s (scrape interval {window.scrape_s:.0f}s)",
                fontsize=8, color=DIM, ha="right", va="center")
    marks = annotation_marks(prometheus, dashboard, window)
    drawn = []
    for panel in panels:
        grid = panel["gridPos"]
        place = Place(figure, MARGIN_IN + grid["x"] * column_in + GAP_IN / 2,
                      HEADER_IN + grid["y"] * GRID_ROW_IN + GAP_IN / 2, grid["w"] * column_in - GAP_IN,
                      grid["h"] * GRID_ROW_IN - GAP_IN)
        if panel["type"] == "row":
            x, y = place.fraction(0, place.height / 2)
            figure.text(x, y, panel["title"], fontsize=11, color=TEXT, fontweight="bold", va="center")
            continue
        frame = figure.add_axes((*place.fraction(0, place.height), *(np.array([place.width, place.height]) /
                                                                     figure.get_size_inches())))
        frame.set_xticks([])
        frame.set_yticks([])
        frame.set_facecolor(PANEL)
        for spine in frame.spines.values():
            spine.set_color(BORDER)
        frame.text(0.1 / place.width, 1 - (TITLE_IN / 2) / place.height, panel["title"], transform=frame.transAxes,
                   fontsize=9, color=TEXT, fontweight="bold", va="center")
        drawer = DRAWERS.get(panel["type"])
        if drawer is None:
            frame.text(0.5, 0.5, f"panel type {panel['type']!r} is not drawn here", transform=frame.transAxes,
                       ha="center", va="center", color=DIM, fontsize=9)
            drawn.append(Drawn(panel["title"], panel["type"], 0))
            continue
        count = drawer(panel, fetch(prometheus, panel, window), place, window, marks)
        drawn.append(Drawn(panel["title"], panel["type"], count))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, facecolor=BACKGROUND)
    return drawn


def default_prometheus() -> str:
    return os.environ.get("PROMETHEUS_URL") or f"http://127.0.0.1:{os.environ.get('PROMETHEUS_PORT', '9090')}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dashboards", nargs="*", type=Path, help="dashboard JSON files (default: grafana/dashboards/)")
    parser.add_argument("--prometheus", default=default_prometheus(), help="Prometheus URL (default %(default)s)")
    parser.add_argument("--minutes", type=float, help="time span up to now (default: each dashboard's own range)")
    parser.add_argument("--out-dir", type=Path, default=Path(".monitoring/dashboards"),
                        help="where dashboard-<uid>.png go (default %(default)s)")
    args = parser.parse_args(argv)
    prometheus = Prometheus(args.prometheus)
    for path in args.dashboards or sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        end = time.time()
        span_s = 60 * args.minutes if args.minutes else duration_s(dashboard["time"]["from"].removeprefix("now-"))
        out = args.out_dir / f"dashboard-{dashboard.get('uid', path.stem)}.png"
        for panel in render(path, prometheus, end - span_s, end, out):
            print(f"{panel.type:<10} {panel.series:>3} series  {panel.title}")
            if not panel.series:
                log.warning("%s: nothing drawn for %r", path.name, panel.title)
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
