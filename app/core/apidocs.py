"""/docs: Swagger UI from vendored files (static/vendor/swagger-ui), started by static/api-docs.js.

FastAPI's own pages load Swagger UI and ReDoc from a CDN with an inline script, which the app's
Content-Security-Policy (script-src 'self') blocks. /redoc shows the same page (no ReDoc is
vendored).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

ASSETS = "/static/vendor/swagger-ui"

DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>prefloop API</title>
  <link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="{ASSETS}/swagger-ui.css">
  <script src="{ASSETS}/swagger-ui-bundle.js" defer></script>
  <script src="/static/api-docs.js" defer></script>
</head>
<body>
  <div id="swagger-ui" data-openapi-url="/openapi.json"></div>
</body>
</html>
"""

OAUTH2_REDIRECT_PAGE = f"""<!doctype html>
<html lang="en">
<body><script src="{ASSETS}/oauth2-redirect.js"></script></body>
</html>
"""


@router.get("/docs", response_class=HTMLResponse)
def docs() -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
def oauth2_redirect() -> HTMLResponse:
    return HTMLResponse(OAUTH2_REDIRECT_PAGE)


@router.get("/redoc", response_class=HTMLResponse)
def redoc() -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)
