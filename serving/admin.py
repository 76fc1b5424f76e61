"""Which endpoints answer on which port. With ADMIN_PORT set, the admin endpoints (/reload, /metrics) answer only
on it, and every other endpoint only on PORT: the public port can be published to the internet while Prometheus
and operators reach the admin port privately. Either port answers 404 for the other's endpoints.

serve.py binds both sockets before it starts the workers, so with WORKERS>1 every worker accepts on both, like on
the public port: /metrics sums all workers (multiprocess mode) whichever worker answers.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from names import ADMIN_PATHS

NOT_FOUND = b'{"error":"Not Found"}'


class AdminPortSplit:
    """404 for an admin endpoint asked on the public port, and for any other endpoint asked on the admin port."""

    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")  # the local address the connection was accepted on
            on_admin_port = server is not None and server[1] == self.admin_port
            if (scope["path"] in ADMIN_PATHS) != on_admin_port:
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(NOT_FOUND)).encode())]})
                await send({"type": "http.response.body", "body": NOT_FOUND})
                return
        await self.app(scope, receive, send)
