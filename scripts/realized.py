"""`make realized LABELS=<path or s3://…>`: the served predictions joined with their true prices, per model version.

Reads the labels (CSV `id,median_house_value[,observed_at]`: a file, a directory of them, or every object under an
s3:// prefix) and the prediction log (PREDICTION_LOG_DIR, plus, with PREDICTION_LOG_S3, the segments shipped there
that are no longer on this disk), joins them on the prediction's id, and reports for each model version, in total and
per day of prediction (UTC): labelled predictions, coverage (labelled / logged), RMSE, MAE and bias (mean of predicted
minus true; positive means over-priced), each with a bootstrap 90% interval once there are MIN_LABELS labels.

Nothing in the labels stops the job: an invalid row, a second label for an id (the last one counts: latest
observed_at, else the last row read), an id no logged prediction has (never logged, pruned, or a typo) are counted. A
label is late when its prediction's day was already reported by the previous run (REALIZED_REPORT_DIR/realized.json)
without it; each run recomputes every day from all the labels, and the report lists the days whose figures changed.

Outputs: one line per version on stdout, REALIZED_REPORT_DIR/realized.md and realized.json; the figures as tags of
each registered version (MLflow), beside the gate's reference_rmse; and, with PUSHGATEWAY_URL, the same figures and
the gate's reference RMSE to the Pushgateway (job housing-realized), where Prometheus scrapes them for the alert
HousingRealizedAccuracyDegraded and the dashboard. A candidate scored in shadow is reported too, apart (role=shadow).

Exit status: 0; 2 when the labels cannot be read at all; 1 when the Pushgateway or the registry failed (the report is
written first).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from names import model_name

MIN_LABELS = 200  # labels before an interval is given, and before the alert trusts a version's RMSE
RESAMPLES = 1000  # bootstrap resamples
INTERVAL = (5.0, 95.0)  # percentiles: a 90% interval
SEED = 20240601  # the bootstrap's: the same labels give the same intervals
PUSH_JOB = "housing-realized"
PATTERN = "predictions-*.jsonl"
SHIPPED = ".shipped.jsonl"
TARGET = "median_house_value"
TAG_PREFIX = "realized_"
SERVED, SHADOW = "served", "shadow"
GROUP = ["name", "version", "role"]
OUTCOMES = ("joined", "duplicate", "unknown", "late", "invalid")


def say(message: str) -> None:
    print(f"realized: {message}", file=sys.stderr, flush=True)


# --- reading -------------------------------------------------------------------------------------------------------


def s3_parts(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def s3_objects(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, body) of every object under the s3:// prefix `url` (or the one object it names)."""
    import boto3  # honours AWS_ENDPOINT_URL and the usual credentials

    client = boto3.client("s3")
    bucket, prefix = s3_parts(url)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"], client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()


@dataclass
class LogRead:
    """The prediction log as one row per prediction: id, name, version, role, day, prediction."""

    frame: pd.DataFrame
    segments: int = 0  # files read, local and S3
    from_s3: int = 0
    bad_lines: int = 0  # lines that are not a JSON entry (a segment cut while being written)
    without_ids: int = 0  # entries from before predictions had ids


# What the join needs of an entry; `inputs` is skipped by the reader (most of the bytes, none of the figures).
ENTRY = pa.schema([("time", pa.string()), ("model", pa.struct([("name", pa.string()), ("version", pa.string())])),
                   ("route", pa.string()), ("ids", pa.list_(pa.string())), ("outputs", pa.list_(pa.float64()))])
PARSE = pa_json.ParseOptions(explicit_schema=ENTRY, unexpected_field_behavior="ignore")


def entries_of(data: bytes, counts: LogRead) -> pa.Table:
    """The entries of one segment, by Arrow's JSON reader (C++); line by line only if it holds a bad line."""
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last line is still being written
        counts.bad_lines += 1
    if not data[:end].strip():
        return ENTRY.empty_table()
    try:
        return pa_json.read_json(io.BytesIO(data[:end]), parse_options=PARSE)
    except pa.ArrowInvalid:
        pass
    entries = []
    for line in data[:end].splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            counts.bad_lines += 1
            continue
        if isinstance(entry, dict):
            entries.append({key: entry.get(key) for key in ENTRY.names})
        else:
            counts.bad_lines += 1
    try:
        return pa.Table.from_pylist(entries, schema=ENTRY)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a well-formed line of the wrong shape: one at a time
        kept = []
        for entry in entries:
            try:
                kept.append(pa.Table.from_pylist([entry], schema=ENTRY))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                counts.bad_lines += 1
        return pa.concat_tables(kept) if kept else ENTRY.empty_table()


def segment_name(path: str) -> str:
    """A segment's name as shipped: a local `*.shipped.jsonl` is the S3 object `*.jsonl`."""
    name = path.rsplit("/", 1)[-1]
    return name.removesuffix(SHIPPED) + ".jsonl" if name.endswith(SHIPPED) else name


def log_segments(directory: Path, s3_url: str) -> Iterator[tuple[bytes, bool]]:
    """(content, from S3) of every segment: the local ones, then the shipped ones no longer on this disk."""
    local = sorted(directory.glob(PATTERN)) if directory.is_dir() else []
    for path in local:
        try:
            yield path.read_bytes(), False
        except FileNotFoundError:  # pruned since it was listed
            continue
    if s3_url:
        here = {segment_name(path.name) for path in local}
        for key, body in s3_objects(s3_url.rstrip("/") + "/"):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("predictions-") and name.endswith(".jsonl") and segment_name(name) not in here:
                yield body, True


def column(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def read_log(directory: Path, s3_url: str = "") -> LogRead:
    counts = LogRead(pd.DataFrame())
    tables = []
    for data, from_s3 in log_segments(directory, s3_url):
        counts.segments += 1
        counts.from_s3 += from_s3
        tables.append(entries_of(data, counts))
    table = pa.concat_tables(tables) if tables else ENTRY.empty_table()
    sizes = pc.fill_null(pc.list_value_length(table["ids"]), 0)
    usable = pc.and_(pc.greater(sizes, 0), pc.equal(sizes, pc.fill_null(pc.list_value_length(table["outputs"]), 0)))
    counts.without_ids = table.num_rows - pc.sum(usable).as_py() if table.num_rows else 0
    table = table.filter(usable)
    repeat = column(pc.list_value_length(table["ids"])).astype(np.int64)
    model = table["model"].combine_chunks() if table.num_rows else pa.array([], ENTRY.field("model").type)
    shadow = pc.fill_null(pc.starts_with(table["route"], "shadow"), False)
    counts.frame = pd.DataFrame({
        "id": column(pc.list_flatten(table["ids"])),
        "name": np.repeat(column(pc.fill_null(pc.struct_field(model, [0]), "")), repeat),
        "version": np.repeat(column(pc.fill_null(pc.struct_field(model, [1]), "")), repeat),
        "role": np.repeat(np.where(column(shadow), SHADOW, SERVED), repeat),
        # written in UTC: the first ten characters are the day
        "day": np.repeat(column(pc.utf8_slice_codeunits(pc.fill_null(table["time"], ""), 0, 10)), repeat),
        "prediction": column(pc.list_flatten(table["outputs"])).astype(float),
    })
    return counts


@dataclass
class Labels:
    frame: pd.DataFrame  # id, truth: one row per id
    rows: int = 0
    invalid: int = 0
    duplicate: int = 0  # rows beyond the first for an id
    conflicting: int = 0  # ids whose labels disagree
    files: int = 0


def label_files(source: str) -> Iterator[tuple[str, bytes]]:
    if source.startswith("s3://"):
        for key, body in s3_objects(source):
            if key.endswith(".csv"):
                yield f"s3://{s3_parts(source)[0]}/{key}", body
        return
    path = Path(source)
    for one in sorted(path.glob("*.csv")) if path.is_dir() else [path]:
        yield str(one), one.read_bytes()


class LabelsUnreadable(Exception):
    pass


def read_labels(source: str) -> Labels:
    frames = []
    for where, body in label_files(source):
        try:
            frame = pd.read_csv(io.BytesIO(body), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise LabelsUnreadable(f"{where}: not a CSV ({error})") from error
        missing = {"id", TARGET} - set(frame.columns)
        if missing:
            raise LabelsUnreadable(f"{where}: no column {', '.join(sorted(missing))} (expected id,{TARGET}"
                                   "[,observed_at])")
        frames.append(frame.reindex(columns=["id", TARGET, "observed_at"], fill_value=""))
    if not frames:
        raise LabelsUnreadable(f"no labels in {source} (a CSV file, a directory of them, or an s3:// prefix)")
    raw = pd.concat(frames, ignore_index=True)
    labels = Labels(pd.DataFrame(), rows=len(raw), files=len(frames))
    ids = raw["id"].str.strip()
    truth = pd.to_numeric(raw[TARGET].str.strip(), errors="coerce")
    observed = pd.to_datetime(raw["observed_at"].str.strip().replace("", None), errors="coerce", utc=True,
                              format="ISO8601")
    valid = (ids != "") & np.isfinite(truth.to_numpy(dtype=float))
    labels.invalid = int((~valid).sum())
    frame = pd.DataFrame({"id": ids, "truth": truth.astype(float), "observed": observed, "order": np.arange(len(raw))})
    frame = frame[valid.to_numpy()]
    repeated = frame["id"].duplicated(keep=False)
    labels.conflicting = int((frame[repeated].groupby("id")["truth"].nunique() > 1).sum())
    frame = frame.sort_values(["observed", "order"], na_position="first", kind="stable")
    labels.duplicate = int(frame["id"].duplicated().sum())
    labels.frame = frame.drop_duplicates("id", keep="last")[["id", "truth"]]
    return labels


# --- the figures ---------------------------------------------------------------------------------------------------


def bootstrap(errors: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """90% percentile intervals of RMSE, MAE and bias over RESAMPLES resamples, in chunks of ~2M values."""
    n = len(errors)
    chunk = max(1, 2_000_000 // n)
    rmse, mae, bias = [], [], []
    for start in range(0, RESAMPLES, chunk):
        sample = errors[rng.integers(0, n, size=(min(chunk, RESAMPLES - start), n))]
        rmse.append(np.sqrt(np.mean(sample**2, axis=1)))
        mae.append(np.mean(np.abs(sample), axis=1))
        bias.append(np.mean(sample, axis=1))

    def interval(values: list[np.ndarray]) -> tuple[float, float]:
        low, high = np.percentile(np.concatenate(values), INTERVAL)
        return float(low), float(high)

    return {"rmse": interval(rmse), "mae": interval(mae), "bias": interval(bias)}


def figures(errors: np.ndarray, logged: int, rng: np.random.Generator) -> dict[str, Any]:
    n = len(errors)
    found: dict[str, Any] = {"labelled": n, "logged": logged, "coverage": n / logged if logged else 0.0}
    if n:
        found.update(rmse=float(np.sqrt(np.mean(errors**2))), mae=float(np.mean(np.abs(errors))),
                     bias=float(np.mean(errors)))
    if n >= MIN_LABELS:
        found["interval"] = bootstrap(errors, rng)
    return found


@dataclass
class Result:
    versions: list[dict[str, Any]]  # name, version, role, figures..., days: [{day, figures...}]
    labels: dict[str, int]
    log: dict[str, int]
    recomputed: list[str] = field(default_factory=list)  # "name version role day" whose figures changed
    as_of: str = ""

    def key(self, one: dict[str, Any]) -> str:
        return f"{one['name']} {one['version']} {one['role']}"


def day_counts(report: dict[str, Any] | None) -> dict[str, int]:
    """`name version role day` -> labelled predictions, as a previous realized.json recorded them."""
    if not report:
        return {}
    return {f"{one['name']} {one['version']} {one['role']} {day['day']}": day["labelled"]
            for one in report.get("versions", []) for day in one.get("days", [])}


def compute(log: LogRead, labels: Labels, previous: dict[str, Any] | None = None) -> Result:
    """Join and measure: vectorised (pandas, numpy), one pass over the log's rows."""
    rng = np.random.default_rng(SEED)
    predictions = log.frame
    predictions = predictions[np.isfinite(predictions["prediction"].to_numpy())]
    repeated = predictions.duplicated(["id", "role"], keep="first")  # a client reusing its X-Request-ID
    predictions = predictions[~repeated]
    joined = labels.frame.merge(predictions, on="id", how="inner")
    joined["error"] = joined["prediction"] - joined["truth"]
    known = column(pc.is_in(pa.array(labels.frame["id"], pa.string()),
                            value_set=pa.array(log.frame["id"], pa.string())))
    logged = predictions.groupby([*GROUP, "day"]).size()

    before = day_counts(previous)
    versions, recomputed, late = [], [], 0
    for group, rows in joined.groupby(GROUP, sort=True):
        name, version, role = (str(part) for part in group)
        total_logged = int(logged.loc[(name, version, role)].sum())
        one: dict[str, Any] = {"name": name, "version": version, "role": role,
                               **figures(rows["error"].to_numpy(), total_logged, rng), "days": []}
        for day, day_rows in rows.groupby("day", sort=True):
            day_figures = figures(day_rows["error"].to_numpy(), int(logged.loc[(name, version, role, day)]), rng)
            key = f"{name} {version} {role} {day}"
            if key in before and before[key] != day_figures["labelled"]:
                recomputed.append(key)
                if role == SERVED:
                    late += max(0, day_figures["labelled"] - before[key])
            one["days"].append({"day": day, **day_figures})
        versions.append(one)
    # Versions with logged predictions and no label yet: their coverage is 0, and they are listed.
    labelled_groups = {(one["name"], one["version"], one["role"]) for one in versions}
    for (name, version, role), count in logged.groupby(level=[0, 1, 2]).sum().items():
        if (name, version, role) not in labelled_groups:
            versions.append({"name": name, "version": version, "role": role, "labelled": 0, "logged": int(count),
                             "coverage": 0.0, "days": []})
    versions.sort(key=lambda one: (one["name"], version_order(one["version"]), one["role"]))
    served_joined = int((joined["role"] == SERVED).sum())
    counts = {"rows": labels.rows, "joined": served_joined, "duplicate": labels.duplicate,
              "conflicting": labels.conflicting, "unknown": int((~known.astype(bool)).sum()), "late": late,
              "invalid": labels.invalid, "files": labels.files}
    log_counts = {"segments": log.segments, "from_s3": log.from_s3, "predictions": len(log.frame),
                  "repeated_ids": int(repeated.sum()), "bad_lines": log.bad_lines, "without_ids": log.without_ids}
    return Result(versions, counts, log_counts, recomputed, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (sys.maxsize, version)


# --- outputs -------------------------------------------------------------------------------------------------------


def money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def line(one: dict[str, Any], model: str) -> str:
    who = f"version {one['version']}" if one["name"] == model else f"{one['name']} version {one['version']}"
    if one["role"] == SHADOW:
        who += " (shadow)"
    if not one["labelled"]:
        return f"{who}: 0 labelled predictions of {one['logged']:,} logged"
    return (f"{who}: {one['labelled']} labelled predictions, RMSE {money(one['rmse'])}, MAE {money(one['mae'])}, "
            f"bias {money(one['bias'])}")


def with_interval(one: dict[str, Any], metric: str) -> str:
    if metric not in one:
        return "-"
    interval = one.get("interval", {}).get(metric)
    return money(one[metric]) + (f" [{money(interval[0])}, {money(interval[1])}]" if interval else "")


def markdown(result: Result, model: str) -> str:
    labels, log = result.labels, result.log
    out = [f"# Realized accuracy of {model}, as of {result.as_of}", "",
           f"Predictions joined with their true prices by id. Intervals: bootstrap 90% ({RESAMPLES} resamples), from "
           f"{MIN_LABELS} labels. Bias is predicted minus true: positive means over-priced. Coverage: labelled / "
           "logged predictions.", "",
           f"Labels: {labels['rows']:,} rows in {labels['files']} file(s); {labels['joined']:,} joined to served "
           f"predictions, {labels['duplicate']:,} duplicate ({labels['conflicting']:,} ids with conflicting values: "
           f"the latest counts), {labels['unknown']:,} unknown ids, {labels['late']:,} late (for days already "
           f"reported), {labels['invalid']:,} invalid.",
           f"Prediction log: {log['predictions']:,} predictions in {log['segments']} segment(s) ({log['from_s3']} "
           f"from S3); {log['repeated_ids']:,} repeated ids (the first counts), {log['bad_lines']} unreadable "
           f"lines, {log['without_ids']} entries without ids.", "",
           "| version | role | labelled | coverage | RMSE [90%] | MAE [90%] | bias [90%] | reference RMSE | ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for one in result.versions:
        reference = one.get("reference_rmse")
        ratio = f"{one['rmse'] / reference:.2f}" if reference and "rmse" in one else "-"
        out.append(f"| {one['name']} {one['version']} | {one['role']} | {one['labelled']:,} | "
                   f"{one['coverage']:.1%} | {with_interval(one, 'rmse')} | {with_interval(one, 'mae')} | "
                   f"{with_interval(one, 'bias')} | {money(reference)} | {ratio} |")
    for one in result.versions:
        if not one["days"]:
            continue
        out += ["", f"## {one['name']} version {one['version']} ({one['role']}), per day of prediction (UTC)", "",
                "| day | labelled | coverage | RMSE [90%] | MAE [90%] | bias [90%] |", "|---|---|---|---|---|---|"]
        out += [f"| {day['day']} | {day['labelled']:,} | {day['coverage']:.1%} | {with_interval(day, 'rmse')} | "
                f"{with_interval(day, 'mae')} | {with_interval(day, 'bias')} |" for day in one["days"]]
    out += ["", "Recomputed since the previous run (more labels): "
            + (", ".join(result.recomputed) if result.recomputed else "none"), ""]
    return "\n".join(out)


def push(result: Result, url: str) -> None:
    """Every figure to the Pushgateway, replacing the job's previous push (a version gone from the log goes too)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    labels = [*GROUP]

    def gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, [*labels, *extra], registry=registry)

    labelled = gauge("housing_realized_labelled_predictions", "Predictions joined with their true price")
    coverage = gauge("housing_realized_coverage_ratio", "Labelled / logged predictions")
    metrics = {metric: gauge(f"housing_realized_{metric}_dollars", f"Realized {metric.upper()} on the labels")
               for metric in ("rmse", "mae", "bias")}
    bounds = gauge("housing_realized_rmse_interval_dollars", "Bootstrap 90% interval of the realized RMSE",
                   ("bound",))
    reference = Gauge("housing_reference_rmse_dollars", "The gate's RMSE of the version on the reference set",
                      ["name", "version"], registry=registry)
    outcomes = Gauge("housing_realized_labels", "Label rows of the last run, by outcome", ["outcome"],
                     registry=registry)
    for one in result.versions:
        key = [one[label] for label in labels]
        labelled.labels(*key).set(one["labelled"])
        coverage.labels(*key).set(one["coverage"])
        for metric, series in metrics.items():
            if metric in one:
                series.labels(*key).set(one[metric])
        if "interval" in one:
            low, high = one["interval"]["rmse"]
            bounds.labels(*key, "low").set(low)
            bounds.labels(*key, "high").set(high)
        if one.get("reference_rmse") is not None:
            reference.labels(one["name"], one["version"]).set(one["reference_rmse"])
    for outcome in OUTCOMES:
        outcomes.labels(outcome).set(result.labels[outcome])
    push_to_gateway(url, job=PUSH_JOB, registry=registry, timeout=30)


def reference_rmses(result: Result) -> str | None:
    """The gate's reference_rmse of each version (a tag of the version), added to its figures; an error, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for one in result.versions:
        try:
            tags = client.get_model_version(one["name"], one["version"]).tags
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                continue  # served from MODEL_URI, or deleted since
            return str(error).splitlines()[0]
        if "reference_rmse" in tags:
            one["reference_rmse"] = float(tags["reference_rmse"])
    return None


def tag_versions(result: Result) -> str | None:
    """The served figures as tags of each registered version (see docs/monitoring.md for why tags)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for one in result.versions:
        if one["role"] != SERVED or not one["labelled"]:
            continue
        tags = {"labelled": str(one["labelled"]), "coverage": f"{one['coverage']:.4f}", "as_of": result.as_of}
        for metric in ("rmse", "mae", "bias"):
            if metric in one:
                tags[metric] = f"{one[metric]:.2f}"
            if metric in one.get("interval", {}):
                low, high = one["interval"][metric]
                tags[f"{metric}_90"] = f"{low:.2f} {high:.2f}"
        try:
            for key, value in tags.items():
                client.set_model_version_tag(one["name"], one["version"], TAG_PREFIX + key, value)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                continue
            return str(error).splitlines()[0]
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        say("usage: make realized LABELS=<a CSV, a directory of CSVs, or s3://bucket/prefix>")
        return 2
    directory = Path(os.environ.get("REALIZED_REPORT_DIR") or "reports")
    log_dir = Path(os.environ.get("PREDICTION_LOG_DIR") or "logs")
    s3_log, pushgateway = os.environ.get("PREDICTION_LOG_S3", ""), os.environ.get("PUSHGATEWAY_URL", "")
    model = model_name()
    try:
        labels = read_labels(argv[0])
    except (LabelsUnreadable, OSError) as error:
        say(str(error))
        return 2
    if not log_dir.is_dir() and not s3_log:
        say(f"no prediction log in {log_dir} (PREDICTION_LOG_DIR) and no PREDICTION_LOG_S3: every label is unknown")
    started = time.perf_counter()
    log = read_log(log_dir, s3_log)
    previous_file = directory / "realized.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else None
    result = compute(log, labels, previous)
    say(f"joined {len(labels.frame):,} labels with {log.frame.shape[0]:,} logged predictions "
        f"in {time.perf_counter() - started:.1f} s")
    failures = []
    registry_problem = reference_rmses(result)
    if registry_problem is not None:
        failures.append(f"registry {os.environ.get('MLFLOW_TRACKING_URI', '')}: {registry_problem}")
    directory.mkdir(parents=True, exist_ok=True)
    previous_file.write_text(json.dumps(result.__dict__, indent=1) + "\n")
    (directory / "realized.md").write_text(markdown(result, model))
    for one in result.versions:
        print(line(one, model))
    counts = result.labels
    print(f"labels: {counts['joined']} joined, {counts['duplicate']} duplicate, {counts['unknown']} unknown, "
          f"{counts['late']} late, {counts['invalid']} invalid; report {directory / 'realized.md'}")
    if pushgateway:
        try:
            push(result, pushgateway)
        except OSError as error:
            failures.append(f"Pushgateway {pushgateway}: {error}")
    else:
        say("PUSHGATEWAY_URL unset: nothing sent to Prometheus")
    if registry_problem is None and (problem := tag_versions(result)) is not None:
        failures.append(f"registry {os.environ.get('MLFLOW_TRACKING_URI', '')}: {problem}")
    for failure in failures:
        say(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
