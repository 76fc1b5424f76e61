"""A stand-in for the `docker` CLI of scripts/deploy.sh: it accepts exactly the calls deploy.sh makes (COMMANDS)
and runs their containers for real. Any other command, option, value or nginx configuration exits 2 with
"fake docker: ... is not simulated", so that a test cannot pass on a call nothing checked.

`tests/fake_docker/docker` runs `fake_docker.py cli ARGS...`. State lives in the directory $FAKE_DOCKER_STATE:

    state.json     images, networks and containers (written under state.lock)
    calls.jsonl    one line per call: its argv, exit status, and the host ports that served /predict after it
                   ("serving") and those that served the admin endpoint /metrics ("admin")
    logs/ID.log    what a container printed: what `docker logs` shows
    registry-down  while this file exists, pulls fail as if Docker Hub were unreachable
    nginx-reload-fails, nginx-reload-ignored   see execute()

A container is a process (`fake_docker.py container SPEC`) listening on 127.0.0.1 at its published host ports and,
for an app, at an internal port that stands for its address on a docker network. By image:

    nginx*     a reverse proxy configured by the conf.d mounted at /etc/nginx/conf.d, loaded at start and by
               `nginx -s reload` (nginx_config); its upstreams are containers on its user-defined network.
    any other  the serving app (App). By image tag: "broken" never gets ready, "slow" gets ready 1 s after its
               start, "badpredict" answers /predict with 500, "crash" exits at once, "noadmin" predates ADMIN_PORT
               and ignores it; "missing" is not in the registry.

Errors use docker's messages and exit statuses (125 for `docker run`).
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
# The values the scripts pass, as patterns (COMMANDS): a value of another shape is not simulated.
NAME = r"[a-zA-Z0-9][a-zA-Z0-9_.-]+"
PUBLISH = r"(?:(\d+\.\d+\.\d+\.\d+):)?(\d+):(\d+)"  # [IP:]HOST_PORT:CONTAINER_PORT
VOLUME = r"(/[^:]*):(/[^:]*)(:ro)?"  # a bind mount: /HOST_PATH:/CONTAINER_PATH[:ro]
# What deploy.sh writes in conf.d (its proxy_server), and all the fake reads there: anything else is not simulated.
UPSTREAM = r"upstream\s+(\w+)\s*\{\s*server\s+([\w.-]+):(\d+)\s*;\s*\}"
SERVER = (
    r"server\s*\{\s*listen\s+(\d+);\s*(?:client_max_body_size\s+\w+;\s*)?location\s+/\s*\{\s*proxy_pass\s+http://(\w+);"
    r"\s*(?:proxy_set_header\s+[\w-]+\s+\$\w+;\s*)*add_header\s+([\w-]+)\s+([\w.-]+)\s+always;\s*\}\s*\}"
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


def normalise(reference: str) -> str:
    return reference if ":" in reference.rpartition("/")[2] else f"{reference}:latest"


def tag(image: str) -> str:
    return image.rpartition(":")[2]


def behaviour(image: str) -> str:
    if image.rpartition("/")[2].startswith("nginx"):
        return "proxy"
    return next((word for word in ("broken", "slow", "badpredict", "crash") if word in tag(image)), "healthy")


# --- state ---------------------------------------------------------------------------------------------------


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "state.json"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        (root / "exits").mkdir(exist_ok=True)

    def load(self) -> dict[str, Any]:
        if not self.file.exists():
            return {"images": [], "networks": ["bridge"], "containers": {}}
        data: dict[str, Any] = json.loads(self.file.read_text())
        return data

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
            restarts = container["restart"] != "no" and code != 0
            container.update(status="restarting" if restarts else "exited", pid=0)

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
    kind, age = container["behaviour"], now - container["started_at"]
    return bool(container["status"] == "running" and (kind == "healthy" or (kind == "slow" and age >= SLOW_READY_S)))


def admin_port(app: dict[str, Any]) -> int:
    """ADMIN_PORT as the app reads it (0: none); images tagged "noadmin" predate it and ignore it."""
    return 0 if "noadmin" in tag(app["image"]) else int(app["env"].get("ADMIN_PORT") or 0)


def app_ports(app: dict[str, Any]) -> dict[int, str]:
    """The app's ports reachable from outside its container, each "public" or "admin" (serving/admin.py): the admin
    port listens on ADMIN_HOST, 127.0.0.1 unless set, the container's own loopback, which neither its published
    ports nor other containers reach."""
    ports = {int(app["env"].get("PORT") or APP_PORT): "public"}
    if admin_port(app) and app["env"].get("ADMIN_HOST") == "0.0.0.0":
        ports.setdefault(admin_port(app), "admin")
    return ports


def resolve(data: dict[str, Any], proxy: dict[str, Any], host: str) -> dict[str, Any] | None:
    """The running app container `host` names on the proxy's network (docker's DNS: user-defined networks only)."""
    target: dict[str, Any] | None = data["containers"].get(host)
    if not target or target["status"] != "running" or target["behaviour"] == "proxy":
        return None
    return target if target["network"] == proxy["network"] != "bridge" else None


def server_for(proxy: dict[str, Any], container_port: int) -> dict[str, Any] | None:
    """The `server` block of the proxy's loaded configuration that listens on `container_port`."""
    return next((s for s in proxy["config"]["servers"] if s["listen"] == container_port), None)


def upstream_of(data: dict[str, Any], proxy: dict[str, Any], server: dict[str, Any]) -> dict[str, Any] | None:
    """The container `server` proxies to, if it resolves and listens (reachably) on the upstream's port."""
    target = resolve(data, proxy, server["upstream"])
    return target if target and server["upstream_port"] in app_ports(target) else None


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


def find(data: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in data["containers"]:
        raise DockerError(f"Error response from daemon: No such container: {name}")
    container: dict[str, Any] = data["containers"][name]
    return container


# --- commands: each takes the store, the options (flag -> its values) and the arguments ------------------------

Options = dict[str, list[str]]


def pull(store: Store, options: Options, args: list[str]) -> int:
    image = normalise(args[0])
    with store.locked() as data:
        fetch(store, data, image)
    print(image)
    return 0


def fetch(store: Store, data: dict[str, Any], image: str) -> None:
    if (store.root / "registry-down").exists():
        raise DockerError(
            'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: '
            "lookup registry-1.docker.io: no such host"
        )
    if "missing" in tag(image):
        raise DockerError(
            f"Error response from daemon: manifest for {image} not found: manifest unknown: manifest unknown"
        )
    if image not in data["images"]:
        data["images"].append(image)


def image_inspect(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        if normalise(args[0]) not in data["images"]:
            raise DockerError(f"Error: No such image: {args[0]}")
    print(json.dumps([{"RepoTags": [normalise(args[0])]}], indent=4))
    return 0


def inspect(store: Store, options: Options, args: list[str]) -> int:
    """`docker inspect --type container [--format '{{.State.Status}}'] NAME` (COMMANDS allows no other template)."""
    with store.locked() as data:
        container = find(data, args[0])
    view = {"Id": container["id"], "Name": f"/{args[0]}", "State": {"Status": container["status"]}}
    print(container["status"] if "--format" in options else json.dumps([view], indent=4))
    return 0


def run(store: Store, options: Options, args: list[str]) -> int:
    if "-d" not in options or "--name" not in options:
        raise NotSimulated("`docker run` without -d and --name")
    image, name = normalise(args[0]), options["--name"][-1]
    with store.locked() as data:
        try:
            container = {
                "id": secrets.token_hex(32),
                "name": name,
                "image": image,
                "behaviour": behaviour(image),
                "env": environment(options),
                "ports": [published(value) for value in options.get("-p", [])],
                "mounts": [mount(value) for value in options.get("-v", [])],
                "restart": options.get("--restart", ["no"])[-1],
                "network": options.get("--network", ["bridge"])[-1],
                "status": "created",
                "pid": 0,
                "started_at": 0.0,
                "config": None,
            }
            if name in data["containers"]:
                raise DockerError(
                    f'Error response from daemon: Conflict. The container name "/{name}" is already in use by '
                    f'container "{data["containers"][name]["id"]}". You have to remove (or rename) that container '
                    "to be able to reuse that name."
                )
            if container["network"] not in data["networks"]:
                raise DockerError(f"Error response from daemon: network {container['network']} not found.")
            if image not in data["images"]:
                print(f"Unable to find image '{image}' locally", file=sys.stderr)
                fetch(store, data, image)
            data["containers"][name] = container
            start(store, data, container)
        except NotSimulated:
            raise
        except DockerError as error:  # `docker run` exits 125 when docker fails, whatever the reason
            raise DockerError(f"docker: {error}", 125) from None
    print(container["id"])
    return 0


def environment(options: Options) -> dict[str, str]:
    """--env-file files, then -e: KEY=VALUE, or KEY alone for the caller's value (skipped when unset)."""
    lines = []
    for path in options.get("--env-file", []):
        try:
            lines += [line for line in Path(path).read_text().splitlines() if line.strip() and line[0] != "#"]
        except OSError:
            raise DockerError(f"open {path}: no such file or directory") from None
    env = {}
    for line in lines + options.get("-e", []):
        key, has_value, value = line.partition("=")
        if has_value:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def published(value: str) -> dict[str, Any]:
    match = re.fullmatch(PUBLISH, value)
    assert match  # COMMANDS checked it
    return {"host_ip": match[1] or "0.0.0.0", "host_port": int(match[2]), "container_port": int(match[3])}


def mount(value: str) -> dict[str, Any]:
    match = re.fullmatch(VOLUME, value)
    assert match  # COMMANDS checked it
    Path(match[1]).mkdir(parents=True, exist_ok=True)  # docker creates a missing bind source as a directory
    return {"source": match[1], "target": match[2], "read_only": bool(match[3])}


def start(store: Store, data: dict[str, Any], container: dict[str, Any]) -> None:
    """Bind the ports and start the process, like `docker start`; a failure leaves the container "created"."""
    listening: list[int] = []  # the container ports something listens on, outside the container's loopback
    if container["behaviour"] == "proxy":
        try:
            container["config"] = nginx_config(data, container)
        except NginxError:
            raise NotSimulated("an nginx container whose configuration nginx rejects at start") from None
    else:
        listening = list(app_ports(container))
        if any(port["container_port"] not in listening for port in container["ports"]):
            raise NotSimulated("publishing a port the app does not listen on")
    # The container's own address on its network: one socket per port its app listens on. (After a failure the
    # CLI exits at once: the sockets it bound close with it.)
    sockets = [(bind(0), port) for port in listening]
    for port in container["ports"]:
        try:
            sockets.append((bind(port["host_port"]), port["container_port"]))
        except OSError:
            where = f"{port['host_ip']}:{port['host_port']}"
            raise DockerError(
                f"Error response from daemon: driver failed programming external connectivity on endpoint "
                f"{container['name']} ({container['id'][:12]}): failed to bind port {where}/tcp: Error starting "
                f"userland proxy: listen tcp4 {where}: bind: address already in use."
            ) from None
    spec = {key: container[key] for key in ("name", "id", "image", "behaviour", "env", "mounts")}
    spec.update(state=str(store.root), started_at=time.time(), sockets=[[s.fileno(), port] for s, port in sockets])
    with open(store.log_file(container), "a") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, "container", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[sock.fileno() for sock, _ in sockets],
        )
    endpoints = {str(port): sock.getsockname()[1] for sock, port in sockets[: len(listening)]}
    for sock, _ in sockets:
        sock.close()
    container.update(status="running", pid=process.pid, started_at=spec["started_at"], endpoints=endpoints)


def bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def nginx_config(data: dict[str, Any], proxy: dict[str, Any]) -> dict[str, Any]:
    """What nginx would load from the mounted conf.d, or NginxError with nginx's message."""
    source = next((m["source"] for m in proxy["mounts"] if m["target"] == NGINX_CONF_DIR), None)
    if source is None:
        raise NotSimulated(f"nginx without a configuration mounted at {NGINX_CONF_DIR}")
    files = sorted(Path(source).glob("*.conf"))
    text = re.sub(r"#.*", "", "\n".join(path.read_text() for path in files))
    upstreams = {}
    for match in re.finditer(UPSTREAM, text):
        if resolve(data, proxy, match[2]) is None:  # nginx resolves every upstream when it loads the configuration
            line = text[: match.start(2)].count("\n") + 1
            raise NginxError(
                f'nginx: [emerg] host not found in upstream "{match[2]}:{match[3]}" in '
                f"{NGINX_CONF_DIR}/{files[-1].name}:{line}"
            )
        upstreams[match[1]] = (match[2], int(match[3]))
    servers: list[dict[str, Any]] = []
    for match in re.finditer(SERVER, text):
        if match[2] not in upstreams or int(match[1]) in [server["listen"] for server in servers]:
            raise NotSimulated("an nginx server block without its own listen port and a proxy_pass to an upstream")
        host, upstream_port = upstreams[match[2]]
        servers.append(
            {"listen": int(match[1]), "upstream": host, "upstream_port": upstream_port, "header": match.group(3, 4)}
        )
    if not servers or re.sub(f"{UPSTREAM}|{SERVER}", "", text).strip():
        raise NotSimulated("an nginx configuration of another shape than deploy.sh's")
    return {"servers": servers}


def logs(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        log = store.log_file(find(data, args[0]))
    lines = log.read_text().splitlines() if log.exists() else []
    for line in lines[len(lines) - int(options.get("--tail", [str(len(lines))])[-1]) :]:
        print(line)
    return 0


def execute(store: Store, options: Options, args: list[str]) -> int:
    """`docker exec PROXY nginx -t` and `nginx -s reload`: both parse the configuration first and exit 1 on an
    error, the master keeping the old one. The files nginx-reload-fails and nginx-reload-ignored in the state
    directory make a reload fail to signal the master, or signal a master that cannot apply the new configuration."""
    if args[1:] not in (["nginx", "-t"], ["nginx", "-s", "reload"]):
        raise NotSimulated(f"`docker exec {' '.join(args)}`")
    with store.locked() as data:
        proxy = find(data, args[0])
        if proxy["status"] != "running":
            raise DockerError(f"Error response from daemon: container {proxy['id']} is not running")
        if proxy["behaviour"] != "proxy":
            raise NotSimulated(f"`docker exec` in {args[0]}, which is not nginx,")
        try:
            config = nginx_config(data, proxy)
        except NginxError as error:
            print(error, file=sys.stderr)
            return 1
        if args[2] == "-t":
            print("nginx: the configuration file /etc/nginx/nginx.conf syntax is ok", file=sys.stderr)
        elif (store.root / "nginx-reload-fails").exists():
            print('nginx: [error] invalid PID number "" in "/run/nginx.pid"', file=sys.stderr)
            return 1
        elif (store.root / "nginx-reload-ignored").exists():
            with open(store.log_file(proxy), "a") as log:  # the master keeps its old configuration
                log.write("nginx: [alert] could not apply the new configuration; the old one stays\n")
        else:
            proxy["config"] = config  # the published ports stay as `docker run` set them
    return 0


def remove(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        if args[0] not in data["containers"] and "-f" in options:
            return 0  # docker >= 20.10: -f ignores a missing container
        container = find(data, args[0])
        if container["status"] in ("running", "restarting") and "-f" not in options:
            raise DockerError(
                f'Error response from daemon: cannot remove container "/{args[0]}": container is running: stop '
                "the container before removing or force remove"
            )
        terminate(container, signal.SIGKILL, 10)
        del data["containers"][args[0]]
    print(args[0])
    return 0


def stop(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        container = find(data, args[0])
        terminate(container, signal.SIGTERM, int(options.get("-t", ["10"])[-1]))
        container.update(status="exited", pid=0)
    print(args[0])
    return 0


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


def port(store: Store, options: Options, args: list[str]) -> int:
    """`docker port CONTAINER PORT`: the host addresses the container's PORT is published on."""
    if not args[1].isdigit():
        raise NotSimulated(f"`docker port` of {args[1]!r}")
    with store.locked() as data:
        container = find(data, args[0])
    addresses = [f"{p['host_ip']}:{p['host_port']}" for p in container["ports"] if p["container_port"] == int(args[1])]
    if container["status"] != "running" or not addresses:
        raise DockerError(f"Error: No public port '{args[1]}/tcp' published for {args[0]}")
    print("\n".join(addresses))
    return 0


def network_create(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        if args[0] in data["networks"]:
            raise DockerError(f"Error response from daemon: network with name {args[0]} already exists")
        data["networks"].append(args[0])
    print(secrets.token_hex(32))
    return 0


def network_inspect(store: Store, options: Options, args: list[str]) -> int:
    with store.locked() as data:
        if args[0] not in data["networks"]:
            raise DockerError(f"Error: No such network: {args[0]}")
    print(json.dumps([{"Name": args[0], "Driver": "bridge"}], indent=4))
    return 0


# The calls the scripts make, and no others: each command's handler, its options as the scripts write them, each
# with the pattern its value must match ("": a switch), and its number of arguments (None: a command follows).
COMMANDS: dict[str, tuple[Callable[[Store, Options, list[str]], int], dict[str, str], int | None]] = {
    "pull": (pull, {"--quiet": ""}, 1),
    "image inspect": (image_inspect, {}, 1),
    "inspect": (inspect, {"--type": "container", "--format": r"\{\{\.State\.Status\}\}"}, 1),
    "run": (
        run,
        {
            "-d": "",
            "--name": NAME,
            "--restart": "unless-stopped",
            "--network": NAME,
            "-p": PUBLISH,
            "--env-file": "/.*",
            "-e": r"[A-Z][A-Z0-9_]*(=.*)?",
            "-v": VOLUME,
            "--log-opt": r"max-(size|file)=\w+",
        },
        1,
    ),
    "logs": (logs, {"--tail": r"\d+"}, 1),
    "exec": (execute, {}, None),
    "stop": (stop, {"-t": r"\d+"}, 1),
    "rm": (remove, {"-f": ""}, 1),
    "port": (port, {}, 2),
    "network inspect": (network_inspect, {}, 1),
    "network create": (network_create, {}, 1),
}


def parse(command: str, args: list[str]) -> tuple[Options, list[str]]:
    """The options, which come first as the scripts write them, and the arguments; any other call is not simulated."""
    _, flags, count = COMMANDS[command]
    options: Options = {}
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag not in flags:
            raise NotSimulated(f"`docker {command} {flag}`")
        value = (args.pop(0) if args else "") if flags[flag] else "true"
        if flags[flag] and not re.fullmatch(flags[flag], value):
            raise NotSimulated(f"`docker {command} {flag} {value!r}`")
        options.setdefault(flag, []).append(value)
    if count is not None and (len(args) != count or any(arg.startswith("-") for arg in args)):
        raise NotSimulated(f"`docker {command}` with the arguments {args}")
    return options, args


def cli(args: list[str]) -> int:
    if not os.environ.get("FAKE_DOCKER_STATE"):
        print("fake docker: set FAKE_DOCKER_STATE to a state directory", file=sys.stderr)
        return 2
    store = Store(Path(os.environ["FAKE_DOCKER_STATE"]))
    command = " ".join(args[:2] if args[:1] in (["image"], ["network"]) else args[:1])
    try:
        if command not in COMMANDS:
            raise NotSimulated(f"`docker {' '.join(args[:2])}`")
        options, positional = parse(command, args[len(command.split()) :])
        status = COMMANDS[command][0](store, options, positional)
    except DockerError as error:
        print(error, file=sys.stderr)
        status = error.status
    store.record(args, status)
    return status


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

    def reply(self, status: int, content: Any, *headers: tuple[str, str]) -> None:
        """Answer with `content`: bytes as they are, anything else as JSON."""
        if not isinstance(content, bytes):
            content, headers = json.dumps(content).encode(), (("Content-Type", "application/json"), *headers)
        self.send_response(status)
        for name, value in (*headers, ("Content-Length", str(len(content)))):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content)


class App(Handler):
    """serve.py's contract: GET /health, GET /ready (200 once a model is loaded), POST /predict of one record, GET
    /metrics. With ADMIN_PORT set the admin endpoints answer only on it, the others only on PORT: each port answers
    404 for the other's (serving/admin.py)."""

    def answer(self) -> None:
        spec, request, image = self.spec, (self.command, self.path), ("X-Fake-Image", self.spec["image"])
        try:
            record = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        except ValueError:
            record = None
        ready = app_serves({**spec, "status": "running"}, time.time()) or spec["behaviour"] == "badpredict"
        if admin_port(spec) and (self.path in ADMIN_PATHS) != (self.port == admin_port(spec)):
            self.reply(404, {"error": "Not Found"})
        elif request == ("GET", "/metrics"):
            self.reply(200, b"housing_model_loaded 1.0\n", ("Content-Type", "text/plain; version=0.0.4"), image)
        elif request == ("GET", "/health"):
            self.reply(200, {"status": "ok"})
        elif request in (("GET", "/ready"), ("POST", "/predict")) and not ready:
            if spec["behaviour"] == "broken":  # serve.py retries the registry, and logs each failure
                print(LOAD_ERROR, flush=True)
            self.reply(503, {"error": "no model loaded yet"}, ("Retry-After", "5"))
        elif request == ("GET", "/ready"):
            self.reply(200, {"status": "ready"})
        elif request != ("POST", "/predict"):
            self.reply(404, {"error": "Not Found"})
        elif self.headers.get("Content-Type", "").partition(";")[0] != "application/json":
            self.reply(415, {"error": "send the records as Content-Type: application/json"})
        elif not isinstance(record, dict) or set(record) != set(FEATURES):
            self.reply(422, {"error": "send one JSON object with exactly the nine features"})
        elif spec["behaviour"] == "badpredict":
            self.reply(500, {"error": "Internal Server Error"})
        else:
            self.log_prediction()
            self.reply(200, {"prediction": 452600.0}, image)

    do_GET = do_POST = answer

    def log_prediction(self) -> None:
        """One line (the request's X-Request-ID, the image) in PREDICTION_LOG_DIR, if a bind mount holds it: else it
        would go to the container's writable layer, which the host never sees and `docker rm` deletes."""
        inside = PurePosixPath(self.spec["env"].get("PREDICTION_LOG_DIR") or IMAGE_LOG_DIR)
        for mount in self.spec["mounts"]:
            target = PurePosixPath(mount["target"])
            if inside == target or target in inside.parents:
                directory = Path(mount["source"]) / inside.relative_to(target)
                directory.mkdir(parents=True, exist_ok=True)
                line = {"request_id": self.headers.get("X-Request-ID", ""), "image": self.spec["image"]}
                with open(directory / f"predictions-{self.spec['id'][:12]}.jsonl", "a") as log:
                    log.write(json.dumps(line) + "\n")
                return


class Proxy(Handler):
    """nginx: a request goes to the upstream of the server block, in the configuration loaded last, that listens on
    the port it came in on; with no such block the connection closes unanswered."""

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = Store(Path(self.spec["state"])).load()
        me = data["containers"].get(self.spec["name"])
        server = server_for(me, self.port) if me else None
        if server is None:
            self.close_connection = True
            return
        target = upstream_of(data, me, server)
        if target is None or not alive(target["pid"]):
            status, content, headers = 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", []
        else:
            endpoint = target["endpoints"][str(server["upstream_port"])]
            connection = http.client.HTTPConnection("127.0.0.1", endpoint, timeout=10)
            hop = ("connection", "host", "transfer-encoding", "server", "date", "content-length")
            connection.request(
                self.command, self.path, body or None, {k: v for k, v in self.headers.items() if k.lower() not in hop}
            )
            answer = connection.getresponse()
            status, content = answer.status, answer.read()
            headers = [(name, value) for name, value in answer.getheaders() if name.lower() not in hop]
        # `add_header ... always` adds the header to every answer, nginx's own 502 too
        self.reply(status, content, *headers, tuple(server["header"]))

    do_GET = do_POST = forward


def run_container(spec: dict[str, Any]) -> int:
    if spec["behaviour"] == "crash":
        print("Traceback (most recent call last):\nRuntimeError: cannot start: simulated crash", flush=True)
        (Path(spec["state"]) / "exits" / spec["id"]).write_text("1")
        return 1
    handler = Proxy if spec["behaviour"] == "proxy" else App
    # nginx opens the ports of a reloaded configuration's new `listen`s: a proxy answers on every published port.
    for fd, port in spec["sockets"]:
        server = ContainerPortServer(socket.socket(fileno=fd), type("Bound", (handler,), {"spec": spec, "port": port}))
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(
        "[notice] start worker processes" if handler is Proxy else "INFO:     Application startup complete.", flush=True
    )
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print("INFO:     Shutting down", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["container"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        sys.exit(run_container(json.loads(sys.argv[2])))
    sys.exit(cli(sys.argv[2:]))
