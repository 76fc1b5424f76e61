"""A stand-in for the `docker` CLI: it enforces the real CLI's argument contract and runs containers for real.

`tests/fake_docker/docker` runs `fake_docker.py cli ARGS...`. State lives in the directory $FAKE_DOCKER_STATE:

    state.json     images, networks and containers (written under state.lock)
    calls.jsonl    one line per call: its argv, exit status, and the host ports that served /predict after it
                   ("serving") and those that served the admin endpoint /metrics ("admin")
    logs/ID.log    what a container printed: what `docker logs` shows
    layers/ID/     a container's writable layer: files it writes outside its bind mounts; `docker rm` deletes it
    registry-down  while this file exists, pulls fail as if Docker Hub were unreachable
    nginx-reload-fails    while it exists, `nginx -s reload` fails to signal the master (exit 1)
    nginx-reload-ignored  while it exists, `nginx -s reload` signals (exit 0) but the master keeps its old
                          configuration, as when it cannot apply the new one (its error goes to the proxy's log)

A container is a process (`fake_docker.py container SPEC`) listening on 127.0.0.1 at its published host ports and
at an internal port that stands for its address on a docker network. What it does depends on its image:

    nginx*     a reverse proxy configured by the *.conf files mounted at /etc/nginx/conf.d: `upstream NAME
               { server HOST:PORT; }` blocks with HOST a running container on the proxy's user-defined network,
               and `server` blocks with `listen`, `proxy_pass http://NAME;` and `add_header`; a reload applies
               new `listen`s too (reachable from the host where `docker run -p` published them).
               `docker exec PROXY nginx -t` and `nginx -s reload` behave like nginx: both parse the configuration
               first and exit 1 on an error (the master keeps the old one); `add_header ... always` is added to
               nginx's own 502 as well. `docker port PROXY PORT` names where PORT is published.
    any other  the serving app on $PORT (8000): GET /health, GET /ready, POST /predict. By image tag:
               "broken" never gets ready, "slow" gets ready 1 s after its start, "badpredict" answers /predict
               with 500, "crash" exits at once. Without MLFLOW_TRACKING_URI or MODEL_URI in its environment it
               never gets ready either, like serve.py without a registry. GET /metrics answers 200; with
               ADMIN_PORT set it moves to that port, which listens on ADMIN_HOST (127.0.0.1 unless set: the
               container's own loopback, out of reach of published ports and other containers), and both ports
               answer 404 for the other's endpoints. Tags containing "noadmin" predate ADMIN_PORT: it is ignored.
               Each answered POST /predict appends a line (its X-Request-ID, the image) to a file in
               PREDICTION_LOG_DIR (/app/logs, as the image sets it): on the host if a `-v` bind mount holds that
               path, else in the container's writable layer.

Tags containing "missing" are not in the registry. Errors use docker's messages and exit statuses (125 for
`docker run` and for flag errors). A real command, option or template this fake does not simulate exits 2 with
"fake docker: ...", so that a test cannot pass on a call nothing checked.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for names.py
from names import ADMIN_PATHS, CATEGORICAL_FEATURE, NUMERIC_FEATURES

APP_PORT = 8000
SLOW_READY_S = 1.0
LOAD_ERROR = (
    "ERROR:    housing.serve: cannot load models:/California_Housing_Regression@champion: "
    "RESOURCE_DOES_NOT_EXIST: Registered model alias champion not found."
)
NGINX_CONF_DIR = "/etc/nginx/conf.d"
IMAGE_LOG_DIR = "/app/logs"  # the image's PREDICTION_LOG_DIR (Dockerfile)
# The app's input fields from names.py (standard library only): importing features.py (numpy, scipy,
# scikit-learn) would cost every `docker` call a second.
FEATURES = (*NUMERIC_FEATURES, CATEGORICAL_FEATURE)
RESTARTING_POLICIES = re.compile(r"always|unless-stopped|on-failure(:\d+)?")
DOCKER_COMMANDS = frozenset(
    "attach build builder buildx commit compose config container context cp create diff events exec export history "
    "image images import info init inspect kill load login logout logs manifest network node pause plugin port ps "
    "pull push rename restart rm rmi run save search secret service stack start stats stop swarm system tag top "
    "trust unpause update version volume wait".split()
)


class DockerError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class NotSimulated(DockerError):
    def __init__(self, what: str) -> None:
        super().__init__(f"fake docker: {what} is not simulated; extend tests/fake_docker/fake_docker.py", 2)


class NginxError(Exception):
    pass


# --- arguments -----------------------------------------------------------------------------------------------


class Spec:
    """The options of one command: "-d --detach" is a switch, "--name=" takes a value, "-e --env=*" repeats."""

    def __init__(self, command: str, *options: str, interspersed: bool = True) -> None:
        self.command = command
        self.interspersed = interspersed  # `run` and `exec` stop at the first argument: the rest is the command's
        self.options: dict[str, tuple[str, bool, bool]] = {}
        for option in options:
            names, takes_value, kind = option.partition("=")
            key = next(name for name in names.split() if name.startswith("--")).lstrip("-")
            for name in names.split():
                self.options[name] = (key, bool(takes_value), kind == "*")

    def parse(self, args: list[str]) -> tuple[dict[str, Any], list[str]]:
        options: dict[str, Any] = {}
        positional: list[str] = []
        queue = list(args)
        while queue:
            arg = queue.pop(0)
            if arg == "--":
                positional += queue
                break
            if not arg.startswith("-") or arg == "-" or (positional and not self.interspersed):
                positional.append(arg)
                if not self.interspersed:
                    positional += queue
                    break
                continue
            name, has_value, value = arg.partition("=")
            if name not in self.options:
                what = f"shorthand flag: '{name[1:]}' in {name}" if not name.startswith("--") else f"flag: {name}"
                raise DockerError(f"unknown {what}\n\n{self.help}", 125)
            key, takes_value, repeats = self.options[name]
            if not takes_value:
                if has_value and value not in ("true", "false"):
                    raise DockerError(f'invalid argument "{value}" for "{name}" flag: parse error', 125)
                options[key] = value != "false"
                continue
            if not has_value:
                if not queue:
                    raise DockerError(f"flag needs an argument: {name}\n\n{self.help}", 125)
                value = queue.pop(0)
            if repeats:
                options.setdefault(key, []).append(value)
            else:
                options[key] = value
        return options, positional

    def require(self, positional: list[str], least: int, most: int | None = None) -> None:
        if len(positional) < least or (most is not None and len(positional) > most):
            amount = f"{least}" if least == most else f"at least {least}"
            plural = "s" * (least != 1)
            raise DockerError(f"docker: 'docker {self.command}' requires {amount} argument{plural}\n\n{self.help}", 1)

    @property
    def help(self) -> str:
        return f"Run 'docker {self.command} --help' for more information"


def normalise(reference: str) -> str:
    name, tag = split_reference(reference)
    return f"{name}:{tag}"


def split_reference(reference: str) -> tuple[str, str]:
    name, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        return reference, "latest"
    return name, tag


def behaviour(image: str) -> str:
    name, tag = split_reference(image)
    if name.rpartition("/")[2].startswith("nginx"):
        return "proxy"
    return next((word for word in ("broken", "slow", "badpredict", "crash") if word in tag), "healthy")


# --- state ---------------------------------------------------------------------------------------------------


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "state.json"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        (root / "exits").mkdir(exist_ok=True)

    @classmethod
    def from_env(cls) -> Store:
        root = os.environ.get("FAKE_DOCKER_STATE", "")
        if not root:
            raise DockerError("fake docker: set FAKE_DOCKER_STATE to a state directory", 2)
        return cls(Path(root))

    def load(self) -> dict[str, Any]:
        if not self.file.exists():
            return {"images": [], "networks": ["bridge", "host", "none"], "containers": {}}
        return json.loads(self.file.read_text())

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The state, refreshed (exited processes noticed) and saved afterwards, also when the command failed."""
        with open(self.root / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.load()
            self.refresh(data)
            try:
                yield data
            finally:
                temporary = self.file.with_suffix(".tmp")
                temporary.write_text(json.dumps(data, indent=1))
                temporary.replace(self.file)

    def refresh(self, data: dict[str, Any]) -> None:
        for container in data["containers"].values():
            if container["status"] != "running" or alive(container["pid"]):
                continue
            exit_file = self.root / "exits" / container["id"]
            code = int(exit_file.read_text()) if exit_file.exists() else 137
            restarts = RESTARTING_POLICIES.fullmatch(container["restart"]) and code != 0
            container.update(status="restarting" if restarts else "exited", exit_code=code, pid=0)

    def log_file(self, container: dict[str, Any]) -> Path:
        return self.root / "logs" / f"{container['id']}.log"

    def record(self, args: list[str], status: int) -> None:
        with self.locked() as data:
            now = time.time()
            served, admin = serving_ports(data, now), serving_ports(data, now, "admin")
        with open(self.root / "calls.jsonl", "a") as calls:
            calls.write(json.dumps({"argv": args, "status": status, "serving": served, "admin": admin}) + "\n")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return pid > 0 and stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def app_serves(container: dict[str, Any], now: float) -> bool:
    """Whether the app in `container` answers /ready and /predict, as its behaviour and age say."""
    kind = container["behaviour"]
    return (
        container["status"] == "running"
        and configured(container["env"])
        and kind in ("healthy", "slow")
        and (kind != "slow" or now - container["started_at"] >= SLOW_READY_S)
    )


def configured(env: dict[str, str]) -> bool:
    return bool(env.get("MLFLOW_TRACKING_URI") or env.get("MODEL_URI"))


def app_ports(container: dict[str, Any]) -> dict[int, str]:
    """The app's listening ports reachable from outside the container, each "public" or "admin" (serving/admin.py):
    with ADMIN_PORT set (and not 0) the admin endpoints move to it, on ADMIN_HOST, 127.0.0.1 unless set: the
    container's own loopback, which neither its published ports nor other containers reach. Images tagged
    "noadmin" predate ADMIN_PORT and ignore it."""
    env = container["env"]
    ports = {int(env.get("PORT") or APP_PORT): "public"}
    admin = int(env.get("ADMIN_PORT") or 0)
    reachable = env.get("ADMIN_HOST", "127.0.0.1") in ("0.0.0.0", "::")
    if admin and admin not in ports and reachable and "noadmin" not in split_reference(container["image"])[1]:
        ports[admin] = "admin"
    return ports


def listening_ports(container: dict[str, Any]) -> list[int]:
    """Container ports something listens on (outside the container's loopback)."""
    if container["behaviour"] == "proxy":
        return [server["listen"] for server in container["config"]["servers"]]
    return list(app_ports(container))


def resolve(data: dict[str, Any], proxy: dict[str, Any], host: str) -> dict[str, Any] | None:
    """The running container that `host` names on the proxy's network (docker's DNS: user-defined networks only)."""
    target = data["containers"].get(host)
    if (
        proxy["network"] in ("bridge", "host", "none")
        or target is None
        or target["status"] != "running"
        or target["network"] != proxy["network"]
    ):
        return None
    return target


def server_for(proxy: dict[str, Any], container_port: int) -> dict[str, Any] | None:
    """The `server` block of the proxy's loaded configuration that listens on `container_port`."""
    return next((s for s in proxy["config"]["servers"] if s["listen"] == container_port), None)


def upstream_of(data: dict[str, Any], proxy: dict[str, Any], server: dict[str, Any]) -> dict[str, Any] | None:
    """The container `server` proxies to, if it resolves and listens (reachably) on the upstream's port."""
    target = resolve(data, proxy, server["upstream"])
    if target is None or server["upstream_port"] not in listening_ports(target):
        return None
    return target


def serving_ports(data: dict[str, Any], now: float, role: str = "public") -> list[int]:
    """Host ports where a request would reach an app that answers /predict ("public") or /metrics ("admin")."""
    served = []
    for container in data["containers"].values():
        if container["status"] != "running":
            continue
        for port in container["ports"]:
            if container["behaviour"] == "proxy":
                server = server_for(container, port["container_port"])
                app = upstream_of(data, container, server) if server else None
                app_port = server["upstream_port"] if server else 0
            else:
                app, app_port = container, port["container_port"]
            if app is None or app_ports(app).get(app_port) != role:
                continue
            if app_serves(app, now) if role == "public" else app["status"] == "running":
                served.append(port["host_port"])
    return sorted(served)


# --- commands ------------------------------------------------------------------------------------------------


def cli(args: list[str]) -> int:
    try:
        store = Store.from_env()
    except DockerError as error:
        print(error, file=sys.stderr)
        return error.status
    try:
        status = dispatch(store, args)
    except DockerError as error:
        print(error, file=sys.stderr)
        status = error.status
    store.record(args, status)
    return status


def dispatch(store: Store, args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        raise NotSimulated("docker without a command, or with global options,")
    command, rest = args[0], args[1:]
    if command not in DOCKER_COMMANDS:
        raise DockerError(f"docker: unknown command: docker {command}\n\nRun 'docker --help' for more information", 1)
    if command == "image" and rest[:1] == ["inspect"]:
        return inspect(store, ["--type", "image", *rest[1:]])
    handlers = {
        "pull": pull,
        "run": run,
        "inspect": inspect,
        "logs": logs,
        "exec": execute,
        "rm": remove,
        "stop": stop,
        "network": network,
        "port": port,
    }
    if command not in handlers:
        raise NotSimulated(f"`docker {' '.join(args[:2])}`")
    return handlers[command](store, rest)


def pull(store: Store, args: list[str]) -> int:
    spec = Spec("pull", "-q --quiet", "--platform=")
    options, positional = spec.parse(args)
    spec.require(positional, 1, 1)
    image = normalise(positional[0])
    with store.locked() as data:
        fetch(store, data, image)
    print(
        image
        if options.get("quiet")
        else f"{split_reference(image)[1]}: Pulling from {split_reference(image)[0]}\n"
        f"Status: Downloaded newer image for {image}\n{image}"
    )
    return 0


def fetch(store: Store, data: dict[str, Any], image: str) -> None:
    if (store.root / "registry-down").exists():
        raise DockerError(
            'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
            "lookup registry-1.docker.io: no such host"
        )
    if "missing" in split_reference(image)[1]:
        raise DockerError(
            f"Error response from daemon: manifest for {image} not found: manifest unknown: manifest unknown"
        )
    if image not in data["images"]:
        data["images"].append(image)


def run(store: Store, args: list[str]) -> int:
    spec = Spec(
        "run",
        "-d --detach",
        "--name=",
        "-e --env=*",
        "--env-file=*",
        "-p --publish=*",
        "--restart=",
        "--network --net=",
        "-v --volume=*",
        "--log-opt=*",
        interspersed=False,
    )
    options, positional = spec.parse(args)
    spec.require(positional, 1)
    if not options.get("detach"):
        raise NotSimulated("`docker run` without -d")
    if len(positional) > 1:
        raise NotSimulated("a command after the image in `docker run`")
    restart = options.get("restart", "no")
    if restart != "no" and not RESTARTING_POLICIES.fullmatch(restart):
        raise DockerError(
            f"docker: Error response from daemon: invalid restart policy: unknown policy '{restart}'; "
            "use one of 'no', 'always', 'on-failure', or 'unless-stopped'.",
            125,
        )
    for option in options.get("log-opt", []):
        if "=" not in option:
            raise DockerError(f"docker: invalid key value pair format in log-opt: {option}.", 125)
    container = {
        "id": secrets.token_hex(32),
        "image": normalise(positional[0]),
        "env": environment(options),
        "ports": [published(value) for value in options.get("publish", [])],
        "mounts": [mount(value) for value in options.get("volume", [])],
        "restart": restart,
        "network": options.get("network", "bridge"),
        "status": "created",
        "exit_code": 0,
        "pid": 0,
        "started_at": 0.0,
        "config": None,
    }
    container["behaviour"] = behaviour(container["image"])
    with store.locked() as data:
        name = options.get("name") or f"fake_{container['id'][:8]}"
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name):
            raise DockerError(
                f"docker: Error response from daemon: Invalid container name ({name}), only "
                "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed.",
                125,
            )
        if name in data["containers"]:
            raise DockerError(
                f'docker: Error response from daemon: Conflict. The container name "/{name}" is already '
                f'in use by container "{data["containers"][name]["id"]}". You have to remove (or '
                "rename) that container to be able to reuse that name.",
                125,
            )
        if container["network"] not in data["networks"]:
            raise DockerError(f"docker: Error response from daemon: network {container['network']} not found.", 125)
        if container["image"] not in data["images"]:
            print(f"Unable to find image '{container['image']}' locally", file=sys.stderr)
            try:
                fetch(store, data, container["image"])
            except DockerError as error:
                raise DockerError(f"docker: {error}", 125) from None
        container["name"] = name
        data["containers"][name] = container
        start(store, data, container)
    print(container["id"])
    return 0


def environment(options: dict[str, Any]) -> dict[str, str]:
    """--env-file files, then -e: KEY=VALUE, or KEY alone for the caller's value (skipped when unset)."""
    lines = []
    for path in options.get("env-file", []):
        try:
            lines += [line for line in Path(path).read_text().splitlines() if line.strip() and line[0] != "#"]
        except OSError:
            raise DockerError(f"docker: open {path}: no such file or directory", 125) from None
    env = {}
    for line in lines + options.get("env", []):
        key, has_value, value = line.partition("=")
        if not key or re.search(r"\s", key):
            raise DockerError(f"docker: poorly formatted environment: variable '{key}' contains whitespaces.", 125)
        if has_value:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def published(value: str) -> dict[str, Any]:
    match = re.fullmatch(r"(?:(?P<ip>\d+\.\d+\.\d+\.\d+):)?(?:(?P<host>\d*):)?(?P<port>\d+)(?:/tcp)?", value)
    if not match:
        raise DockerError(f"docker: invalid containerPort: {value}", 125)
    return {
        "host_ip": match["ip"] or "0.0.0.0",
        "host_port": int(match["host"] or 0),
        "container_port": int(match["port"]),
    }


def mount(value: str) -> dict[str, Any]:
    source, _, rest = value.partition(":")
    target, _, mode = rest.partition(":")
    if not target.startswith("/") or mode not in ("", "ro", "rw"):
        raise DockerError(f"docker: Error response from daemon: invalid volume specification: '{value}'.", 125)
    if not source.startswith("/"):
        raise NotSimulated("a named volume")
    Path(source).mkdir(parents=True, exist_ok=True)  # docker creates a missing bind source as a directory
    return {"source": source, "target": target, "read_only": mode == "ro"}


def start(store: Store, data: dict[str, Any], container: dict[str, Any]) -> None:
    """Allocate the ports and start the process, like `docker start`; a failure leaves it "created"."""
    log = store.log_file(container)
    if container["behaviour"] == "proxy":
        try:
            container["config"] = nginx_config(data, container)
        except NginxError as error:  # nginx exits at once: the container starts, then stops
            log.write_text(f"{error}\n")
            container.update(status="running", pid=0)
            (store.root / "exits" / container["id"]).write_text("1")
            store.refresh(data)
            return
    taken = [port for other in data["containers"].values() if other["status"] == "running" for port in other["ports"]]
    for port in container["ports"]:
        for theirs in taken:
            same_address = port["host_ip"] == theirs["host_ip"] or "0.0.0.0" in (port["host_ip"], theirs["host_ip"])
            if port["host_port"] == theirs["host_port"] and same_address:
                raise DockerError(
                    f"docker: Error response from daemon: driver failed programming external "
                    f"connectivity on endpoint {container['name']} ({container['id'][:12]}): Bind for "
                    f"{port['host_ip']}:{port['host_port']} failed: port is already allocated.",
                    125,
                )
    # The container's own address on its network: one socket per port something listens on, at start.
    sockets = [(bind("127.0.0.1", 0, container, None), listen) for listen in listening_ports(container)]
    try:
        for port in container["ports"]:
            sockets.append((bind("127.0.0.1", port["host_port"], container, port), port["container_port"]))
            port["host_port"] = sockets[-1][0].getsockname()[1]
    except DockerError:
        for sock, _ in sockets:
            sock.close()
        raise
    endpoints = {str(port): sock.getsockname()[1] for sock, port in sockets[: len(listening_ports(container))]}
    spec = {
        "name": container["name"],
        "id": container["id"],
        "state": str(store.root),
        "image": container["image"],
        "behaviour": container["behaviour"],
        "env": container["env"],
        "mounts": container["mounts"],
        "layer": str(store.root / "layers" / container["id"]),
        "listen": listening_ports(container),
        "started_at": time.time(),
        "sockets": [[sock.fileno(), port] for sock, port in sockets],
    }
    with open(log, "a") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, "container", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[sock.fileno() for sock, _ in sockets],
        )
    for sock, _ in sockets:
        sock.close()
    container.update(status="running", pid=process.pid, started_at=spec["started_at"], endpoints=endpoints)


def bind(host: str, port: int, container: dict[str, Any], published_port: dict[str, Any] | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        where = f"{published_port['host_ip']}:{port}" if published_port else f"{host}:{port}"
        raise DockerError(
            f"docker: Error response from daemon: driver failed programming external connectivity on "
            f"endpoint {container['name']} ({container['id'][:12]}): failed to bind port {where}/tcp: "
            f"Error starting userland proxy: listen tcp4 {where}: bind: address already in use.",
            125,
        ) from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def nginx_config(data: dict[str, Any], proxy: dict[str, Any]) -> dict[str, Any]:
    """What nginx would load from the mounted conf.d, or NginxError with nginx's message."""
    source = next((m["source"] for m in proxy["mounts"] if m["target"] == NGINX_CONF_DIR), None)
    if source is None:
        raise NotSimulated(f"nginx without a configuration mounted at {NGINX_CONF_DIR}")
    files = sorted(Path(source).glob("*.conf"))
    text = "\n".join(path.read_text() for path in files)
    where = f"{NGINX_CONF_DIR}/{files[-1].name}" if files else NGINX_CONF_DIR
    if text.count("{") != text.count("}"):
        raise NginxError(f'nginx: [emerg] unexpected end of file, expecting "}}" in {where}')
    upstreams = {}
    for match in re.finditer(r"\bupstream\s+(\w+)\s*\{\s*server\s+([\w.-]+):(\d+)\s*;\s*\}", text):
        if resolve(data, proxy, match[2]) is None:  # nginx resolves every upstream when it loads the configuration
            line = text[: match.start(2)].count("\n") + 1
            raise NginxError(f'nginx: [emerg] host not found in upstream "{match[2]}:{match[3]}" in {where}:{line}')
        upstreams[match[1]] = (match[2], int(match[3]))
    servers: list[dict[str, Any]] = []
    for body in server_blocks(text):
        proxy_pass = re.search(r"\bproxy_pass\s+http://(\w+)\s*;", body)
        if not proxy_pass or proxy_pass[1] not in upstreams:
            raise NotSimulated("an nginx server block without a proxy_pass to one of the upstream blocks")
        listen = re.search(r"\blisten\s+(\d+)\s*;", body)
        port = int(listen[1]) if listen else 80
        if any(server["listen"] == port for server in servers):
            raise NginxError(f"nginx: [emerg] a duplicate listen 0.0.0.0:{port} in {where}")
        headers = re.findall(r"\badd_header\s+(\S+)\s+\"?([^\s\";]+)\"?(\s+always)?\s*;", body)
        host, upstream_port = upstreams[proxy_pass[1]]
        servers.append(
            {
                "listen": port,
                "upstream": host,
                "upstream_port": upstream_port,
                "headers": [[name, value, bool(always)] for name, value, always in headers],
            }
        )
    if not servers:
        raise NotSimulated("an nginx configuration without a server block")
    return {"servers": servers}


def server_blocks(text: str) -> list[str]:
    """The bodies of the top-level `server { ... }` blocks (braces balanced: nginx_config counted them)."""
    bodies = []
    for match in re.finditer(r"(?m)^\s*server\s*\{", text):
        depth, position = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            position += 1
        bodies.append(text[match.end() : position - 1])
    return bodies


def find(data: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in data["containers"]:
        raise DockerError(f"Error response from daemon: No such container: {name}")
    return data["containers"][name]


def inspect(store: Store, args: list[str]) -> int:
    spec = Spec("inspect", "-f --format=", "--type=", "-s --size")
    options, positional = spec.parse(args)
    spec.require(positional, 1)
    kind = options.get("type")
    if kind not in (None, "container", "image"):
        raise NotSimulated(f"`docker inspect --type {kind}`")
    status, found = 0, []
    with store.locked() as data:
        for name in positional:
            if kind != "image" and name in data["containers"]:
                found.append(container_view(data["containers"][name]))
            elif kind != "container" and normalise(name) in data["images"]:
                digest = hashlib.sha256(normalise(name).encode()).hexdigest()
                found.append({"Id": f"sha256:{digest}", "RepoTags": [normalise(name)]})
            else:
                print(f"Error: No such {kind or 'object'}: {name}", file=sys.stderr)
                status = 1
    if "format" in options:
        for view in found:
            print(render(options["format"], view))
    else:
        print(json.dumps(found, indent=4))
    return status


def container_view(container: dict[str, Any]) -> dict[str, Any]:
    """Part of what `docker inspect` shows for a container."""
    status = container["status"]
    return {
        "Id": container["id"],
        "Name": f"/{container['name']}",
        "State": {
            "Status": status,
            "Running": status in ("running", "restarting"),
            "Restarting": status == "restarting",
            "ExitCode": container["exit_code"],
            "Pid": container["pid"],
        },
        "Config": {"Image": container["image"], "Env": [f"{k}={v}" for k, v in container["env"].items()]},
    }


def render(template: str, view: dict[str, Any]) -> str:
    """Go templates of the form '{{.Field.Field}}' and literal text around them."""
    field = r"\{\{\s*((?:\.[A-Za-z]\w*)+)\s*\}\}"
    if "{{" in re.sub(field, "", template):
        raise NotSimulated(f"the template {template!r}")

    def value(match: re.Match) -> str:
        current: Any = view
        for part in match[1].split(".")[1:]:
            if not isinstance(current, dict) or part not in current:
                raise DockerError(f'template: :1: executing "" at <{match[1]}>: can\'t evaluate field {part}')
            current = current[part]
        return str(current).lower() if isinstance(current, bool) else str(current)

    return re.sub(field, value, template)


def logs(store: Store, args: list[str]) -> int:
    spec = Spec("logs", "-n --tail=", "-t --timestamps", "-f --follow", "--since=", "--until=")
    options, positional = spec.parse(args)
    spec.require(positional, 1, 1)
    if options.get("follow") or "since" in options or "until" in options:
        raise NotSimulated("`docker logs` with --follow, --since or --until")
    with store.locked() as data:
        log = store.log_file(find(data, positional[0]))
    lines = log.read_text().splitlines() if log.exists() else []
    tail = options.get("tail", "all")
    if tail != "all":
        if not tail.lstrip("-").isdigit():
            raise DockerError(f'invalid argument "{tail}" for "-n, --tail" flag', 125)
        lines = lines[-int(tail) :] if int(tail) > 0 else [] if int(tail) == 0 else lines
    for line in lines:
        print(line)
    return 0


def execute(store: Store, args: list[str]) -> int:
    spec = Spec(
        "exec",
        "-i --interactive",
        "-t --tty",
        "-d --detach",
        "-e --env=*",
        "-u --user=",
        "-w --workdir=",
        interspersed=False,
    )
    _, positional = spec.parse(args)
    spec.require(positional, 2)
    name, command = positional[0], positional[1:]
    with store.locked() as data:
        container = find(data, name)
        if container["status"] != "running":
            raise DockerError(f"Error response from daemon: container {container['id']} is not running")
        if container["behaviour"] != "proxy" or command not in (["nginx", "-t"], ["nginx", "-s", "reload"]):
            raise NotSimulated(f"`docker exec {name} {' '.join(command)}`")
        try:
            config = nginx_config(data, container)
        except NginxError as error:
            if command == ["nginx", "-t"]:
                print(f"{error}\nnginx: configuration file /etc/nginx/nginx.conf test failed", file=sys.stderr)
                return 1
            print(error, file=sys.stderr)  # `nginx -s` parses the configuration before it signals: no signal sent
            return 1
        if command == ["nginx", "-t"]:
            print(
                "nginx: the configuration file /etc/nginx/nginx.conf syntax is ok\n"
                "nginx: configuration file /etc/nginx/nginx.conf test is successful",
                file=sys.stderr,
            )
        elif (store.root / "nginx-reload-fails").exists():
            print('nginx: [error] invalid PID number "" in "/run/nginx.pid"', file=sys.stderr)
            return 1
        elif (store.root / "nginx-reload-ignored").exists():
            with open(store.log_file(container), "a") as log:  # the master keeps its old configuration
                log.write("nginx: [alert] could not apply the new configuration; the old one stays\n")
            print("[notice] signal process started", file=sys.stderr)
        else:
            container["config"] = config  # the published ports stay as `docker run` set them
            print("[notice] signal process started", file=sys.stderr)
    return 0


def remove(store: Store, args: list[str]) -> int:
    spec = Spec("rm", "-f --force", "-v --volumes")
    options, positional = spec.parse(args)
    spec.require(positional, 1)
    status = 0
    with store.locked() as data:
        for name in positional:
            container = data["containers"].get(name)
            if container is None:
                print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
                status = status if options.get("force") else 1  # docker >= 20.10: -f ignores missing containers
                continue
            if container["status"] in ("running", "restarting") and not options.get("force"):
                print(
                    f'Error response from daemon: cannot remove container "/{name}": container is running: stop '
                    "the container before removing or force remove",
                    file=sys.stderr,
                )
                status = 1
                continue
            terminate(container, signal.SIGKILL, 10)
            shutil.rmtree(store.root / "layers" / container["id"], ignore_errors=True)
            del data["containers"][name]
            print(name)
    return status


def stop(store: Store, args: list[str]) -> int:
    spec = Spec("stop", "-t --timeout --time=", "-s --signal=")
    options, positional = spec.parse(args)
    spec.require(positional, 1)
    grace = options.get("timeout", "10")
    if not grace.lstrip("-").isdigit():
        raise DockerError(
            f'invalid argument "{grace}" for "-t, --timeout" flag: strconv.ParseInt: parsing "{grace}": invalid syntax',
            125,
        )
    status = 0
    with store.locked() as data:
        for name in positional:
            container = data["containers"].get(name)
            if container is None:
                print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
                status = 1
                continue
            terminate(container, signal.SIGTERM, max(int(grace), 0))
            container.update(status="exited", exit_code=0, pid=0)
            print(name)
    return status


def terminate(container: dict[str, Any], first: signal.Signals, grace_s: float) -> None:
    """Signal the container's process group; SIGKILL after `grace_s`; return once it is gone (ports released)."""
    pid = container["pid"]
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10)):
        if not alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def port(store: Store, args: list[str]) -> int:
    """`docker port CONTAINER PRIVATE_PORT[/tcp]`: the host addresses that container port is published on."""
    spec = Spec("port")
    _, positional = spec.parse(args)
    spec.require(positional, 1, 2)
    if len(positional) == 1:
        raise NotSimulated("`docker port` without a private port")
    match = re.fullmatch(r"(\d+)(?:/tcp)?", positional[1])
    if not match:
        raise NotSimulated(f"`docker port` of {positional[1]!r}")
    with store.locked() as data:
        container = find(data, positional[0])
    addresses = [f"{p['host_ip']}:{p['host_port']}" for p in container["ports"] if p["container_port"] == int(match[1])]
    if container["status"] != "running" or not addresses:
        raise DockerError(f"Error: No public port '{match[1]}/tcp' published for {positional[0]}")
    print("\n".join(addresses))
    return 0


def network(store: Store, args: list[str]) -> int:
    if args[:1] not in (["create"], ["inspect"]):
        raise NotSimulated(f"`docker network {' '.join(args[:1])}`")
    option = "-d --driver=" if args[0] == "create" else "-f --format="
    spec = Spec(f"network {args[0]}", option)
    options, positional = spec.parse(args[1:])
    spec.require(positional, 1, 1 if args[0] == "create" else None)
    with store.locked() as data:
        if args[0] == "create":
            if positional[0] in data["networks"]:
                raise DockerError(f"Error response from daemon: network with name {positional[0]} already exists")
            data["networks"].append(positional[0])
            print(secrets.token_hex(32))
            return 0
        missing = [name for name in positional if name not in data["networks"]]
    for name in positional:
        if name not in missing:
            view = {"Name": name, "Driver": options.get("driver", "bridge")}
            print(render(options["format"], view) if "format" in options else json.dumps([view], indent=4))
    for name in missing:
        print(f"Error: No such network: {name}", file=sys.stderr)
    return 1 if missing else 0


# --- containers ----------------------------------------------------------------------------------------------


class ContainerPortServer(ThreadingHTTPServer):
    """An HTTP server on a socket the CLI bound. Clients that hang up early (curl -f on an error) are not errors."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(sock.getsockname(), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    spec: dict[str, Any]
    port: int  # the container port this server listens on
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        print(f"INFO:     {self.address_string()} - {format % args}", flush=True)

    def reply(self, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(content).encode()
        self.send_response(status)
        for name, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **(headers or {}),
        }.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class App(Handler):
    """serve.py's contract: /health, /ready (200 once a model is loaded), POST /predict with one record, GET /metrics.
    With ADMIN_PORT set, /metrics answers only on it and everything else only on PORT; each port answers 404 for the
    other's endpoints (serving/admin.py)."""

    def misplaced(self) -> bool:
        """Whether the path belongs to the other port: then it has answered 404."""
        admin = int(self.spec["env"].get("ADMIN_PORT") or 0)
        if "noadmin" in split_reference(self.spec["image"])[1]:
            admin = 0
        if admin and (self.path in ADMIN_PATHS) != (self.port == admin):
            self.reply(404, {"error": "Not Found"})
            return True
        return False

    def metrics(self) -> None:
        content = b"# TYPE housing_model_loaded gauge\nhousing_model_loaded 1.0\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("X-Fake-Image", self.spec["image"])
        self.end_headers()
        self.wfile.write(content)

    def ready(self) -> bool:
        spec = self.spec
        return app_serves({**spec, "status": "running"}, time.time()) or (
            spec["behaviour"] == "badpredict" and configured(spec["env"])
        )

    @staticmethod
    def broken(spec: dict[str, Any]) -> bool:
        return spec["behaviour"] == "broken" or not configured(spec["env"])

    def do_GET(self) -> None:
        if self.misplaced():
            return
        if self.path == "/metrics":
            self.metrics()
        elif self.path == "/health":
            self.reply(200, {"status": "ok"})
        elif self.path == "/ready":
            if self.ready():
                self.reply(200, {"status": "ready", "model": self.model()})
            else:
                if self.broken(self.spec):  # serve.py retries the registry, and logs each failure
                    print(LOAD_ERROR, flush=True)
                self.reply(503, {"error": "no model loaded yet"}, {"Retry-After": "5"})
        else:
            self.reply(404, {"error": "Not Found"})

    def do_POST(self) -> None:
        body = self.body()
        if self.misplaced():
            return
        if self.path != "/predict":
            self.reply(404, {"error": "Not Found"})
        elif not self.ready():
            self.reply(503, {"error": "no model loaded yet"}, {"Retry-After": "5"})
        elif self.headers.get("Content-Type", "").partition(";")[0] != "application/json":
            self.reply(415, {"error": "send the records as Content-Type: application/json"})
        else:
            try:
                record = json.loads(body)
            except ValueError:
                self.reply(400, {"error": "malformed JSON"})
                return
            if not isinstance(record, dict) or set(record) != set(FEATURES):
                self.reply(422, {"error": "the record must have exactly the nine features"})
            elif self.spec["behaviour"] == "badpredict":
                self.reply(500, {"error": "Internal Server Error"})
            else:
                self.log_prediction()
                self.reply(200, {"prediction": 452600.0, "model": self.model()}, {"X-Fake-Image": self.spec["image"]})

    def log_prediction(self) -> None:
        directory = host_path(self.spec, self.spec["env"].get("PREDICTION_LOG_DIR") or IMAGE_LOG_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        line = {"request_id": self.headers.get("X-Request-ID", ""), "image": self.spec["image"]}
        with open(directory / f"predictions-{self.spec['id'][:12]}.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")

    def model(self) -> dict[str, Any]:
        return {"name": self.spec["env"].get("MODEL_NAME", "California_Housing_Regression"), "version": "1"}


def host_path(spec: dict[str, Any], path: str) -> Path:
    """Where the container's absolute `path` is on the host: in the bind mount that holds it, else in its layer."""
    inside = PurePosixPath(path)
    for mount in spec["mounts"]:
        target = PurePosixPath(mount["target"])
        if inside == target or target in inside.parents:
            return Path(mount["source"]) / inside.relative_to(target)
    return Path(spec["layer"]) / inside.relative_to("/")


class Proxy(Handler):
    """nginx: a request goes to the upstream of the server block, in the configuration loaded last, that listens on
    the port it came in on; with no such block the connection closes unanswered."""

    def forward(self) -> None:
        body = self.body()
        data = Store(Path(self.spec["state"])).load()
        me = data["containers"].get(self.spec["name"])
        server = server_for(me, self.port) if me else None
        if server is None:
            self.close_connection = True
            return
        target = upstream_of(data, me, server)
        if target is None or not alive(target["pid"]):
            content = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(502)
            for name, value, always in server["headers"]:
                if always:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            return
        endpoint = target["endpoints"][str(server["upstream_port"])]
        connection = http.client.HTTPConnection("127.0.0.1", endpoint, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
        connection.request(self.command, self.path, body or None, headers)
        answer = connection.getresponse()
        content = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "server", "date", "content-length"):
                self.send_header(name, value)
        for name, value, always in server["headers"]:
            if always or answer.status < 400:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = forward


class Closed(socketserver.BaseRequestHandler):
    """A published port that nothing in the container listens on: the connection closes without an answer."""

    def handle(self) -> None:
        return


def run_container(spec: dict[str, Any]) -> int:
    if spec["behaviour"] == "crash":
        print(
            'Traceback (most recent call last):\n  File "/app/serve.py", line 1, in <module>\n'
            "RuntimeError: cannot start: simulated crash",
            flush=True,
        )
        (Path(spec["state"]) / "exits" / spec["id"]).write_text("1")
        return 1
    proxy = spec["behaviour"] == "proxy"

    def handler(port: int) -> type[socketserver.BaseRequestHandler]:
        if not proxy and port not in spec["listen"]:
            return Closed
        return type("Bound", (Proxy if proxy else App,), {"spec": spec, "port": port})

    # nginx opens the ports of a reloaded configuration's new `listen`s: every socket of a proxy gets the handler.
    servers = [ContainerPortServer(socket.socket(fileno=fd), handler(port)) for fd, port in spec["sockets"]]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if spec["behaviour"] == "proxy":
        print("[notice] start worker processes", flush=True)
    elif App.broken(spec):
        print(LOAD_ERROR, flush=True)
    else:
        print(f"INFO:     Uvicorn running on http://0.0.0.0:{spec['listen'][0]} (Press CTRL+C to quit)", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print("INFO:     Shutting down", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["container"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        sys.exit(run_container(json.loads(sys.argv[2])))
    sys.exit(cli(sys.argv[2:]))
