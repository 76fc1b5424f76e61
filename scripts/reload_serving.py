"""POST the serving app's /reload, only over a path where its bearer token cannot be read on the way.

The retrain workflow runs it twice, on the runner's own python3 (standard library and curl only), and `make reload`
runs it for a person. The app's base URL is SERVE_URL and its token RELOAD_TOKEN, both from the environment:

    python3 scripts/reload_serving.py check          # may RELOAD_TOKEN travel to SERVE_URL? exit 0, or 1 (::error::)
    python3 scripts/reload_serving.py reload         # check, then POST $SERVE_URL/reload; a failed call exits 1
    python3 scripts/reload_serving.py reload --warn  # the same, but a failed call is a ::warning:: and exit 0

The token travels encrypted (https://), or over plain http:// only to a loopback or private address written as an
address: 127.0.0.0/8, ::1, `localhost`, 10/8, 172.16/12, 192.168/16, fc00::/7. A name is refused over http, since
it could resolve anywhere. So is a URL with user info, a query or a fragment; curl gets the URL rebuilt from the
checked parts, so that curl and this check cannot read it differently. curl reads the token's header from stdin
(never from its command line), follows no redirect, bypasses proxies for http://, gives each attempt
RELOAD_TIMEOUT_S seconds, and makes up to RELOAD_ATTEMPTS attempts when the failure is transient (connection
refused, timeout, 408, 429, 5xx). Only a 2xx answer is a reload.

--warn is for the workflow, whose reload step runs after `make retrain`: the registry's alias has moved by then and
stays moved whatever the call does, and the app's poller serves the new champion within RELOAD_INTERVAL_S anyway.
A failed call there is one warning naming the manual step, not a failed job that would read as a failed promotion.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess  # curl with an argv built here, never a shell  # nosec B404
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PRIVATE_NETWORKS = tuple(ipaddress.ip_network(network) for network in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
PATH = re.compile(r"[A-Za-z0-9._~/%-]*")  # a base path, e.g. behind a proxy; nothing curl could read as more
TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: no line break can end the header early
DEFAULT_TIMEOUT_S = 15.0  # per attempt: the app answers /reload within 8 s (RELOAD_ANSWER_S)
DEFAULT_ATTEMPTS = 3
ADMIN_PORT = 9100  # the stack's AdminPort default, for the manual step
HINTS = {
    403: "RELOAD_TOKEN is not the app's token (the stack's ReloadTokenSecret)",
    404: "this address does not answer /reload: with ADMIN_PORT set the app answers it on the admin port only, "
         "and without RELOAD_TOKEN nowhere",
}


class Refused(Exception):
    """SERVE_URL or RELOAD_TOKEN is not one the token may be sent to, or with."""


@dataclass(frozen=True)
class Target:
    url: str  # the reload URL, rebuilt from checked parts
    private: bool  # plain http to a loopback or private address (else https)


def command_text(text: str) -> str:
    """`text` as the data of one workflow command: a line break or `%` cannot end it or start another."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def target(serve_url: str) -> Target:
    """The reload URL of `serve_url`, or Refused when the token would travel in clear over a public network."""
    if not serve_url:
        raise Refused("SERVE_URL is empty")
    if not serve_url.isascii() or not serve_url.isprintable() or any(c in serve_url for c in " \\"):
        raise Refused(f"SERVE_URL {serve_url!r} has spaces, backslashes or characters outside printable ASCII")
    parts = urlsplit(serve_url)
    if "@" in parts.netloc:  # the URL is not echoed: user info may be a password
        raise Refused("SERVE_URL carries user info (user:password@): the app takes only the bearer token")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"SERVE_URL {serve_url!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or "?" in serve_url or "#" in serve_url:
        raise Refused(f"SERVE_URL {serve_url!r} has a query or a fragment: give the app's base URL")
    if not PATH.fullmatch(parts.path):
        raise Refused(f"SERVE_URL {serve_url!r} has a path curl could read differently")
    try:
        port = parts.port
    except ValueError:
        raise Refused(f"SERVE_URL {serve_url!r} has no valid port") from None
    host = parts.hostname
    if parts.scheme == "http" and host != "localhost" and not private_address(host):
        raise Refused(f"SERVE_URL {parts.scheme}://{parts.netloc} is plain http to a host that is not a loopback or "
                      "private address: RELOAD_TOKEN would travel in clear. Use https://, or run the workflow on a "
                      "runner inside the VPC with SERVE_URL=http://<the host's private address>:<AdminPort> "
                      "(docs/security.md#reloading-after-a-retrain)")
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{port}" if port is not None else ""
    return Target(f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/reload", parts.scheme == "http")


def private_address(host: str) -> bool:
    if "%" in host:  # an IPv6 zone: link-local, and read differently by different parsers
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, or a shorthand such as 127.1 that only some parsers read as an address
        return False
    return any(address in network for network in PRIVATE_NETWORKS)


def checked_token(token: str) -> str:
    if not token:
        raise Refused("RELOAD_TOKEN is empty: set the repository secret RELOAD_TOKEN (the stack's ReloadTokenSecret)")
    if not TOKEN.fullmatch(token):  # the token is not echoed
        raise Refused("RELOAD_TOKEN has spaces, line breaks or characters outside printable ASCII")
    return token


def positive(name: str, default: float, whole: bool = False) -> float:
    raw = os.environ.get(name, "") or f"{default:g}"
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise Refused(f"{name} must be a positive {'whole ' if whole else ''}number, not {raw!r}")
    return value


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer
    body: str
    error: str  # curl's message when it failed

    @property
    def reloaded(self) -> bool:
        return 200 <= self.status < 300 and not self.error


def post_reload(where: Target, token: str, timeout_s: float, attempts: int) -> Answer:
    with tempfile.TemporaryDirectory() as folder:
        body = Path(folder) / "body"
        argv = ["curl", "--silent", "--show-error", "--fail-with-body", "--proto", "=http,https", "--max-redirs", "0",
                "--max-time", f"{timeout_s:g}", "--retry", str(attempts - 1), "--retry-connrefused",
                "--retry-max-time", f"{timeout_s * attempts:g}", "--header", "@-", "--data", "",
                "--output", str(body), "--write-out", "%{http_code}", where.url]
        if where.private:  # the direct path that was checked, not a proxy elsewhere
            argv[1:1] = ["--noproxy", "*"]
        try:
            done = subprocess.run(argv, input=f"Authorization: Bearer {token}\n", capture_output=True,  # nosec B603
                                  text=True, timeout=timeout_s * attempts + 30)
        except (OSError, subprocess.TimeoutExpired) as broken:  # no curl, or it outlived its own limits
            return Answer(0, "", f"curl: {broken}")
        text = body.read_text(errors="replace").strip() if body.exists() else ""
    written = done.stdout.strip()
    lines = done.stderr.strip().splitlines() or [f"curl exited with {done.returncode}"]
    error = lines[-1] if done.returncode else ""  # the last attempt's; the earlier ones were retried
    return Answer(int(written) if written.isdigit() else 0, text.replace(token, "***"), error.replace(token, "***"))


def failure(answer: Answer) -> str:
    said = f"HTTP {answer.status}" if answer.status else "no answer"
    detail = f"{said}: {answer.error}" if answer.error else said
    hint = HINTS.get(answer.status)
    body = f" {answer.body[:300]}" if answer.body else ""
    return f"{detail}{body}{f' ({hint})' if hint else ''}"


def manual_step(instance: str) -> str:
    return ("Not a failed promotion: the alias stays where make retrain put it, and the app's registry poller serves "
            "the champion within RELOAD_INTERVAL_S (30 s by default) without this call. To reload now, forward the "
            f"admin port over SSM (aws ssm start-session --target {instance or '<EC2_INSTANCE_ID>'} --document-name "
            f"AWS-StartPortForwardingSession --parameters portNumber={ADMIN_PORT},localPortNumber={ADMIN_PORT}; "
            f"{ADMIN_PORT}: the stack's AdminPort) and run `make reload SERVE_URL=http://127.0.0.1:{ADMIN_PORT}` "
            "with RELOAD_TOKEN set (docs/security.md#reloading-after-a-retrain)")


def main(argv: list[str]) -> int:
    if argv not in (["check"], ["reload"], ["reload", "--warn"]):
        print(f"usage: {sys.argv[0]} check | reload [--warn]", file=sys.stderr)
        return 2
    env = os.environ
    try:
        where = target(env.get("SERVE_URL", ""))
        token = checked_token(env.get("RELOAD_TOKEN", ""))
        timeout_s = positive("RELOAD_TIMEOUT_S", DEFAULT_TIMEOUT_S)
        attempts = int(positive("RELOAD_ATTEMPTS", DEFAULT_ATTEMPTS, whole=True))
    except Refused as refused:
        print(f"::error::reload refused before sending anything: {command_text(str(refused))}")
        return 1
    path = "plain http to a loopback or private address" if where.private else "https"
    if argv == ["check"]:
        print(f"reload: {where.url} is reached over {path}; RELOAD_TOKEN may go there")
        return 0
    answer = post_reload(where, token, timeout_s, attempts)
    if answer.reloaded:
        print(f"reload: POST {where.url}: HTTP {answer.status} {command_text(answer.body)}")
        return 0
    said = f"reload: POST {where.url} failed after up to {attempts} attempt(s): {failure(answer)}"
    if argv == ["reload", "--warn"]:
        step = manual_step(env.get("EC2_INSTANCE_ID", ""))
        print(f"::warning::{command_text(f'{said}. {step}')}")
        return 0
    print(command_text(said), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
