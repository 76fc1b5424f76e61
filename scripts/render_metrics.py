"""Draw key panels of the housing-serve Grafana dashboard to a PNG, from Prometheus's HTTP API.

    python -m scripts.render_metrics [--prometheus http://127.0.0.1:9090] [--minutes 30] [--out monitoring.png]

Where Grafana cannot run (`make monitoring-up` starts Prometheus only), this shows what the dashboard would: each
plot runs the queries of the dashboard panel of the same title (grafana/dashboards/housing-serve.json) over the last
--minutes, with the panel's threshold lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "housing-serve.json"
PANELS = (
    "Requests per second by route and status",
    "/predict error ratio",
    "/predict latency",
    "Records predicted per second",
    "Validation failures by field",
    "Model version in service",
    "Drift per field (PSI)",
    "Drift window",
)
MAX_POINTS = 300

log = logging.getLogger("render_metrics")


def dashboard_panels(path: Path = DASHBOARD) -> dict[str, dict]:
    return {panel["title"]: panel for panel in json.loads(path.read_text())["panels"] if panel["type"] != "row"}


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The series of a PromQL range query: [{"metric": {labels}, "values": [[time, "value"], ...]}, ...]."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:  # nosec B310  # the Prometheus URL it is given
        answer = json.loads(response.read())
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer.get('error')}")
    return answer["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana legend format, {{label}} filled in."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match[1], ""), template).strip() or str(labels)


def render(prometheus: str, start: float, end: float, out: Path, rate_interval: str = "1m") -> dict[str, int]:
    """Draw PANELS between `start` and `end` (Unix seconds) into `out`; return the number of series of each."""
    panels = dashboard_panels()
    step = max(1.0, (end - start) / MAX_POINTS)
    figure = Figure(figsize=(14, 3.2 * ((len(PANELS) + 1) // 2)), layout="constrained")
    drawn = {}
    for axis, title in zip(figure.subplots((len(PANELS) + 1) // 2, 2).ravel(), PANELS, strict=False):
        panel = panels[title]
        defaults = panel["fieldConfig"]["defaults"]
        drawn[title] = 0
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for series in query_range(prometheus, expr, start, end, step):
                times, values = zip(*((float(t) - end, float(v)) for t, v in series["values"]), strict=True)
                axis.plot(times, values, label=legend(target.get("legendFormat", ""), series["metric"]))
                drawn[title] += 1
        if defaults.get("custom", {}).get("thresholdsStyle"):
            for threshold in defaults["thresholds"]["steps"][1:]:
                axis.axhline(threshold["value"], color=threshold["color"], linestyle="--", linewidth=1)
        unit = defaults.get("unit", "short")
        axis.set(title=title, xlabel="seconds before the end", ylabel="" if unit == "short" else unit)
        if drawn[title]:
            axis.legend(fontsize="x-small", loc="upper left")
    figure.suptitle(f"housing-serve from {prometheus}, {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))}")
    figure.savefig(out, dpi=80)
    return drawn


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL (default %(default)s)")
    parser.add_argument("--minutes", type=float, default=30.0, help="time span up to now (default %(default)s)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("monitoring.png"), help="PNG to write (default %(default)s)")
    args = parser.parse_args()
    end = time.time()
    drawn = render(args.prometheus.rstrip("/"), end - 60 * args.minutes, end, args.out, args.rate_interval)
    for title, count in drawn.items():
        if not count:
            log.warning("no data for %r", title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
