"""GET /docs: Swagger UI for this server's own /openapi.json, from the pinned package swagger-ui-bundle-v2.

Everything the page loads comes from this server (no CDN), and its Content-Security-Policy allows nothing else: no
inline script, no inline style element, no other origin, no frames, no forms. "Try it out" on POST /predict starts
from the example record that /openapi.json carries (serving/openapi.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import swagger_ui_bundle  # type: ignore[import-untyped]  # it ships no type information
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

SWAGGER_UI = Path(str(swagger_ui_bundle.swagger_ui_path))  # .../vendor/swagger-ui-5.31.0: the version is its name
ASSET_PATH = f"/docs/{SWAGGER_UI.name}/"  # a new Swagger UI is a new URL, so browsers may keep these files for good
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",  # Swagger UI's icons are data: URIs in its stylesheet
    "connect-src 'self'",  # /openapi.json and "Try it out"
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
ASSET_HEADERS = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
START_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

# URLs relative to /docs, so the page also works behind a proxy that serves the app under a path prefix.
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>California housing price regressor: API</title>
  <link rel="stylesheet" href="docs/{SWAGGER_UI.name}/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/{SWAGGER_UI.name}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/{SWAGGER_UI.name}/swagger-ui-bundle.js"></script>
  <script src="docs/start.js"></script>
</body>
</html>
"""

# A file, not an inline script, so that the policy can forbid inline scripts. No validator: it is another origin.
START = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  displayRequestDuration: true,
});
"""


async def page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html", headers=PAGE_HEADERS)


async def start(request: Request) -> Response:
    return Response(START, media_type="text/javascript", headers=START_HEADERS)


def asset(name: str) -> Callable[[Request], Awaitable[Response]]:
    file, media_type = SWAGGER_UI / name, ASSETS[name]

    async def endpoint(request: Request) -> Response:
        return FileResponse(file, media_type=media_type, headers=ASSET_HEADERS)

    return endpoint


def routes() -> list[Route]:
    """/docs, its start script, and the three Swagger UI files it uses: one route each, so metrics stay bounded."""
    return [Route("/docs", page), Route("/docs/start.js", start),
            *(Route(ASSET_PATH + name, asset(name)) for name in ASSETS)]
