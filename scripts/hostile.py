"""`make hostile`: every prediction door of serve.py under hostile bodies, on the current champion.

For each door (/predict; /invocations in JSON and in CSV; /v2/models/{name}/infer in JSON and with binary tensor
data) one client posts that door's hostile bodies back to back, while another process asks GET /health in a loop.
Every body is under MAX_BODY_BYTES. Per door it prints the statuses (0: the connection broke), the slowest
refusal, /health's worst latency meanwhile, and the server's memory growth: its peak resident size during the door's
bodies (the kernel's VmHWM, reset before each door) less its size before them. Targets: every refusal and every
/health answer under 100 ms, growth under 50 MB. tests/test_hostile.py sends the same bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess  # the /health prober: this interpreter on a fixed program, never a shell  # nosec B404
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from names import CATEGORICAL_FEATURE, CHAMPION, FEATURES, model_name
from scripts.bench import start, wait_ready
from serving.settings import Settings

LIMITS = Settings()  # the defaults: MAX_BATCH_ROWS=10000, MAX_BODY_BYTES=3665536
NESTED = b"[" * 5_000 + b"]" * 5_000  # deeper than any JSON parser's recursion limit, far under MAX_BODY_BYTES
V2_INFER = "/v2/models/{name}/infer"


@dataclass(frozen=True)
class Hostile:
    door: str  # as the report names it
    path: str  # V2_INFER's {name} is the served model's name
    name: str
    body: bytes
    status: int  # the answer it must get
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def filled(prefix: bytes, item: bytes, suffix: bytes, size: int = LIMITS.max_body_bytes) -> bytes:
    """prefix, then `item` repeated with commas, then suffix: about `size` bytes in all."""
    count = (size - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


def many_keys(size: int = LIMITS.max_body_bytes) -> bytes:
    """One JSON object of about `size` bytes: {"k0":0,"k1":0,...}, ~300k keys under MAX_BODY_BYTES."""
    parts: list[str] = []
    total = 2
    while total < size - 16:
        parts.append(f'"k{len(parts)}":0')
        total += len(parts[-1]) + 1
    return ("{" + ",".join(parts) + "}").encode()


def every_field_wrong(rows: int = LIMITS.max_batch_rows) -> list[dict[str, str]]:
    """MAX_BATCH_ROWS records, every field of every record wrong: the costliest body that is parsed and checked."""
    return [{name: "x" for name in FEATURES}] * rows


def tensor(name: str, shape: list[int], **rest: object) -> dict[str, object]:
    return {"name": name, "datatype": "BYTES" if name == CATEGORICAL_FEATURE else "FP64", "shape": shape, **rest}


def binary_request(name: str, datatype: str, raw: bytes, records: int) -> tuple[bytes, dict[str, str]]:
    """One tensor in the binary tensor data extension: the JSON, then its raw bytes."""
    head = orjson.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": [records],
                                     "parameters": {"binary_data_size": len(raw)}}]})
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def hostile_bodies() -> list[Hostile]:
    columns = orjson.dumps(list(FEATURES))
    wrong = every_field_wrong()
    half_float_count = LIMITS.max_body_bytes // 2 - 200
    fp16, fp16_headers = binary_request("longitude", "FP16", b"\0" * 2 * half_float_count, half_float_count)
    empty_strings = LIMITS.max_body_bytes // 4 - 200
    strings, strings_headers = binary_request(CATEGORICAL_FEATURE, "BYTES", b"\0" * 4 * empty_strings, empty_strings)
    short, short_headers = binary_request("longitude", "FP64", b"\0" * 8, 1)
    v2_wrong = {"inputs": [tensor(name, [len(wrong)], data=["x"] * len(wrong)) for name in FEATURES]}
    return [
        Hostile("/predict", "/predict", "object of ~300k keys", many_keys(), 413),
        Hostile("/predict", "/predict", "~900k empty records", filled(b'{"instances": [', b"{}", b"]}"), 413),
        Hostile("/predict", "/predict", "arrays nested a million deep", b"[" * 1_000_000 + b"]" * 1_000_000, 413),
        Hostile("/predict", "/predict", "arrays nested 5,000 deep", NESTED, 400),
        Hostile("/predict", "/predict", "10,000 records, every field wrong", orjson.dumps({"instances": wrong}), 422),

        Hostile("/invocations JSON", "/invocations", "dataframe_split of ~1.2M empty rows",
                filled(b'{"dataframe_split": {"columns": ' + columns + b', "data": [', b"[]", b"]}}"), 413),
        Hostile("/invocations JSON", "/invocations", "dataframe_records of ~900k empty records",
                filled(b'{"dataframe_records": [', b"{}", b"]}"), 413),
        Hostile("/invocations JSON", "/invocations", "one column of ~1.8M values",
                filled(b'{"inputs": {"longitude": [', b"0", b"]}}"), 413),
        Hostile("/invocations JSON", "/invocations", "object of ~300k keys", many_keys(), 413),
        Hostile("/invocations JSON", "/invocations", "arrays nested 5,000 deep", NESTED, 400),
        Hostile("/invocations JSON", "/invocations", "10,000 records, every field wrong",
                orjson.dumps({"dataframe_records": wrong}), 400),

        Hostile("/invocations CSV", "/invocations", "~1.8M one-cell rows",
                b"longitude\n" + b"1\n" * (LIMITS.max_body_bytes // 2 - 10), 413, "text/csv"),
        Hostile("/invocations CSV", "/invocations", "a header of ~1.8M columns",
                filled(b"", b"a", b"\n"), 413, "text/csv"),
        Hostile("/invocations CSV", "/invocations", "10,000 rows, every field wrong",
                (",".join(FEATURES) + "\n" + (",".join(["x"] * len(FEATURES)) + "\n") * len(wrong)).encode(), 400,
                "text/csv"),

        Hostile("/v2 infer JSON", V2_INFER, "a tensor of ~1.8M values",
                filled(b'{"inputs": [{"name": "longitude", "datatype": "FP64", "shape": [1800000], "data": [',
                       b"0", b"]}]}"), 413),
        Hostile("/v2 infer JSON", V2_INFER, "a tensor of ~900k one-value lists",
                filled(b'{"inputs": [{"name": "longitude", "datatype": "FP64", "shape": [900000, 1], "data": [',
                       b"[0]", b"]}]}"), 413),
        Hostile("/v2 infer JSON", V2_INFER, "a shape of 10^12 records",
                orjson.dumps({"inputs": [tensor("longitude", [10**12], data=[0])]}), 413),
        Hostile("/v2 infer JSON", V2_INFER, "arrays nested 5,000 deep", NESTED, 400),
        Hostile("/v2 infer JSON", V2_INFER, "10,000 records, every value wrong", orjson.dumps(v2_wrong), 400),

        Hostile("/v2 infer binary", V2_INFER, "~1.8M FP16 values", fp16, 413, headers=fp16_headers),
        Hostile("/v2 infer binary", V2_INFER, "~900k empty BYTES elements", strings, 413, headers=strings_headers),
        Hostile("/v2 infer binary", V2_INFER, "binary_data_size past the end of the body", short[:-4], 400,
                headers=short_headers),
    ]


# The prober runs in its own process, so that sending large bodies from this one cannot delay it: it measures the
# server alone. It asks until its standard input closes, then prints (started, finished, status) of each answer.
PROBE = """
import http.client, json, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
answers = []
while not stop.is_set():
    started = time.time()
    connection.request("GET", "/health")
    response = connection.getresponse()
    response.read()
    answers.append((started, time.time(), response.status))
    if len(answers) == 1:
        print("answering", flush=True)
print(json.dumps(answers))
"""


@dataclass
class HealthProbe:
    """GET /health in a loop, from another process, on one keep-alive connection."""

    port: int
    answers: list[tuple[float, float, int]] = field(default_factory=list)

    def __enter__(self) -> HealthProbe:
        self._process = subprocess.Popen([sys.executable, "-c", PROBE, str(self.port)],  # nosec B603  # fixed argv
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._process.stdout is None or self._process.stdout.readline() != "answering\n":
            raise RuntimeError("the /health prober did not get its first answer")
        return self

    def __exit__(self, *exc_info: object) -> None:
        output, _ = self._process.communicate(timeout=60)
        self.answers = [tuple(answer) for answer in json.loads(output)]


@dataclass
class DoorReport:
    door: str
    answers: list[tuple[Hostile, int, float]]  # each body, the status it got, seconds to the answer
    health: list[tuple[float, int]]  # /health's latencies (ms) and statuses while this door's bodies were sent
    growth_mb: float

    @property
    def health_ms(self) -> list[float]:
        return [latency for latency, _ in self.health]

    @property
    def wrong(self) -> list[str]:
        return [f"{body.name}: {status} (wanted {body.status})" for body, status, _ in self.answers
                if status != body.status]

    def line(self) -> str:
        slowest = max(seconds for _, _, seconds in self.answers) * 1000
        statuses = ",".join(sorted({str(status) for _, status, _ in self.answers}))
        health = max(self.health_ms, default=float("nan"))
        return (f"{self.door:<18} {len(self.answers):>3} bodies  statuses {statuses:<11} slowest refusal "
                f"{slowest:7.1f} ms  /health worst {health:6.1f} ms ({len(self.health_ms)} asked)  "
                f"memory +{self.growth_mb:6.1f} MB")


def memory_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for process {pid}")


def attack(url: str, pid: int, model: str, bodies: list[Hostile], rounds: int = 1) -> list[DoorReport]:
    """Each door's bodies back to back, `rounds` times, with /health asked meanwhile; one report per door."""
    port = int(url.rsplit(":", 1)[1])
    reports = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for door in dict.fromkeys(body.door for body in bodies):
            mine = [body for body in bodies if body.door == door]
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current size
            before_kb = memory_kb(pid, "VmRSS")
            answers = []
            with HealthProbe(port) as probe:
                started = time.time()
                for _ in range(rounds):
                    for body in mine:
                        sent = time.perf_counter()
                        try:
                            status = client.post(body.path.format(name=model), content=body.body, headers={
                                "Content-Type": body.content_type, **body.headers}).status_code
                        except httpx.TransportError:  # the server broke the connection: reported as status 0
                            status = 0
                        answers.append((body, status, time.perf_counter() - sent))
                ended = time.time()
            health = [((finished - asked) * 1000, status) for asked, finished, status in probe.answers
                      if started <= asked and finished <= ended]
            growth = (memory_kb(pid, "VmHWM") - before_kb) / 1024
            reports.append(DoorReport(door, answers, health, growth))
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="times each door's bodies are sent (default 3)")
    parser.add_argument("--model-uri", default=f"models:/{model_name()}@{CHAMPION}",
                        help="the model to serve (default: the registry's champion)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="housing-hostile-"))
    env = {**os.environ, "WORKERS": "1", "RELOAD_INTERVAL_S": "0", "MODEL_URI": args.model_uri,
           "PREDICTION_LOG_DIR": str(scratch / "predictions")}
    server = start("serve", [sys.executable, "serve.py"], "/predict", env, scratch)
    try:
        wait_ready(server, "/ready")
        print(f"serve.py, one worker, default limits (MAX_BATCH_ROWS={LIMITS.max_batch_rows}, "
              f"MAX_BODY_BYTES={LIMITS.max_body_bytes}); each door's bodies x{args.rounds}, back to back")
        reports = attack(server.url(""), server.process.pid, model_name(), hostile_bodies(), args.rounds)
        for report in reports:
            print(report.line())
            for wrong in report.wrong:
                print(f"    {wrong}")
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(report.wrong for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
