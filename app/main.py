"""The FastAPI application factory: routers, templates, static files, middleware, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.core.config import get_settings
from app.core.db import (
    UNAVAILABLE_DETAIL,
    UNAVAILABLE_RETRY_AFTER,
    get_engine,
    pool_capacity,
)
from app.core.deps import LoginRequired
from app.core.errors import DomainError, http_status
from app.core.guard import RequestGuard, parse_proxies
from app.core.health import LATENCY, REQUESTS
from app.core.health import router as health_router
from app.core.resources import shared_dir
from app.images.routes import IMAGE_ROUTE, signed_image_response

log = logging.getLogger("prefloop.web")

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)


SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
)


class HeadersAndMetrics:
    """Security headers on every answer, and the request metrics.

    Plain ASGI: Starlette's `@app.middleware("http")` runs each request through an extra task
    and memory stream, a measurable share of a hot-path request's CPU.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        signed = signed_image_response(scope)
        if signed is not None:
            await signed(scope, receive, send_with_headers)
            path = IMAGE_ROUTE
        else:
            await self.app(scope, receive, send_with_headers)
            path = getattr(scope.get("route"), "path", "unmatched")
        REQUESTS.labels(scope["method"], path, str(status)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - start)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def _signed_in(request: Request) -> SimpleNamespace | None:
    """A snapshot of the browser's login (user email and role, CSRF token), or None."""
    from app.core.db import get_sessionmaker
    from app.core.deps import SESSION_COOKIE
    from app.users.service import session_for_token

    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        with get_sessionmaker()() as session:
            row = session_for_token(session, cookie)
            if row is None:
                return None
            user = SimpleNamespace(email=row.user.email, role=row.user.role)
            return SimpleNamespace(user=user, csrf_token=row.csrf_token)
    except Exception:  # noqa: BLE001 - an error page must render even with the database down
        return None


def create_app() -> FastAPI:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = FastAPI(
        title="prefloop",
        version=__version__,
        description="Human-preference alignment loop for text-to-image diffusion models.",
        # Served by app.core.apidocs from vendored files, under the CSP.
        docs_url=None,
        redoc_url=None,
    )

    from app.audit.routes import router as audit_router
    from app.core.apidocs import router as apidocs_router
    from app.exports.routes import router as exports_router
    from app.generators.routes import router as models_router
    from app.images.routes import router as images_router
    from app.jobs.routes import router as jobs_router
    from app.pages import router as pages_router
    from app.pairs.routes import router as pairs_router
    from app.projects.routes import router as projects_router
    from app.ratings.reward_routes import router as reward_models_router
    from app.ratings.routes import router as ratings_router
    from app.users.routes import router as users_router
    from app.votes.routes import router as votes_router

    for router in (
        health_router,
        apidocs_router,
        projects_router,
        models_router,
        jobs_router,
        images_router,
        pairs_router,
        votes_router,
        exports_router,
        ratings_router,
        reward_models_router,
        audit_router,
        users_router,
        pages_router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(shared_dir("static"))), name="static")
    from app.votes.fast_lane import FastLane

    # Innermost of the middlewares: the guard's checks apply to the fast lane's requests too.
    app.add_middleware(FastLane)
    app.add_middleware(
        RequestGuard,
        max_body=settings.max_upload_bytes,
        proxies=parse_proxies(settings.trusted_proxies),
    )
    # Requests working on the database at once, per process (see app.core.db.request_slot).
    app.state.db_slots = asyncio.Semaphore(pool_capacity(get_engine()))

    app.add_middleware(HeadersAndMetrics)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={exc.next_url}", status_code=303)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_down(request: Request, exc: Exception) -> Response:
        # A database outage is temporary: tell clients to come back instead of showing a 500.
        # So is an overload that leaves no pooled connection free within the pool timeout.
        log.error("web.database_unavailable path=%s error=%s", request.url.path, type(exc).__name__)
        return JSONResponse(
            {"detail": UNAVAILABLE_DETAIL},
            status_code=503,
            headers={"Retry-After": UNAVAILABLE_RETRY_AFTER},
        )

    @app.exception_handler(DataError)
    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: Exception) -> Response:
        # A value the database cannot hold (an id past 2**31 - 1 on Postgres, past 2**63 - 1
        # on SQLite, where the driver raises OverflowError) is the request's fault; answering
        # 503 would have clients retry it forever.
        log.warning("web.data_error path=%s error=%s", request.url.path, type(exc).__name__)
        return JSONResponse(
            {"detail": "a value in the request is out of the range this server stores"},
            status_code=422,
        )

    @app.exception_handler(DomainError)
    async def _refused(request: Request, exc: DomainError) -> Response:
        # Services raise domain errors; this is where they become HTTP answers.
        return JSONResponse({"detail": exc.detail}, status_code=http_status(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (401, 403, 404) and _wants_html(request):
            from app.core.web import render

            # The request's own login was detached by the rollback: look it up afresh, so the page
            # says who is signed in (and offers to log out) instead of looking signed out.
            request.state.user_session = await run_in_threadpool(_signed_in, request)
            return render(
                request,
                "pages/error.html",
                {"status": exc.status_code, "detail": exc.detail},
                status_code=exc.status_code,
            )
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("web.unhandled path=%s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
