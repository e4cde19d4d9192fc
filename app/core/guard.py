"""Checks made on every request before any body is read: who is asking, how big the body is,
and whether it carries NUL characters; plus the client address used by throttles and audit.

A pure ASGI middleware, so that a refused request is answered without buffering its body: an
anonymous write is refused from its headers alone, an oversized one from its Content-Length,
and a body that grows past the limit while streaming is cut off there.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from app.audit.service import CLIENT_ADDRESS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_COOKIE = "prefloop_session"  # app.core.deps.SESSION_COOKIE (no import cycle here)
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Writes anyone may send: logging in and out, and accepting an invite.
PUBLIC_WRITES = ("/login", "/logout", "/invite/")
# Room for a multipart envelope around a file of exactly the upload limit.
ENVELOPE_BYTES = 64 * 1024
NUL_MARKERS = {
    "application/json": (b"\x00", b"\\u0000"),
    "application/x-www-form-urlencoded": (b"\x00", b"%00"),
}
NUL_DETAIL = "NUL characters are not accepted in requests"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxies(value: str | None) -> list[Network]:
    """`PREFLOOP_TRUSTED_PROXIES`: comma-separated addresses or networks (CIDR)."""
    nets = []
    for part in (value or "").split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return nets


def _trusted(address: str, proxies: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(peer: str, forwarded_for: str | None, proxies: list[Network]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the last
    address in X-Forwarded-For that is not itself a trusted proxy (the ones before it could
    have been written by the client)."""
    if not forwarded_for or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body: int, proxies: list[Network]) -> None:
        self.app = app
        self.max_body = max_body + ENVELOPE_BYTES
        self.proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        peer = scope["client"][0] if scope.get("client") else "?"
        address = client_address(peer, headers.get("x-forwarded-for"), self.proxies)
        scope.setdefault("state", {})["client_address"] = address
        token = CLIENT_ADDRESS.set(address)
        try:
            await self._guarded(scope, receive, send, headers)
        finally:
            CLIENT_ADDRESS.reset(token)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        path: str = scope["path"]
        query: bytes = scope.get("query_string", b"")
        # (A NUL in the path is left to the routes: an unknown id answers 404 as any other.)
        if b"%00" in query or b"\x00" in query:
            await _answer(send, 422, {"detail": NUL_DETAIL})
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if not _has_credentials(headers) and not path.startswith(PUBLIC_WRITES):
            if path.startswith("/api/"):
                await _answer(
                    send, 401, {"detail": "authentication required"}, {"WWW-Authenticate": "Bearer"}
                )
            else:
                await _answer(send, 303, None, {"Location": f"/login?next={path}"})
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _answer(send, 413, {"detail": self._too_big()})
            return
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        await self.app(scope, self._counting(receive, NUL_MARKERS.get(media, ())), send)

    def _too_big(self) -> str:
        return f"request body over the limit of {self.max_body - ENVELOPE_BYTES} bytes"

    def _counting(self, receive: Receive, markers: tuple[bytes, ...]) -> Receive:
        seen = 0
        tail = b""

        async def wrapped() -> Message:
            nonlocal seen, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_body:
                    raise HTTPException(413, self._too_big())
                if markers:
                    window = tail + chunk
                    if any(m in window for m in markers):
                        raise HTTPException(422, NUL_DETAIL)
                    tail = window[-8:]
            return message

        return wrapped


def _has_credentials(headers: Headers) -> bool:
    if headers.get("authorization", "").lower().startswith("bearer "):
        return True
    return SESSION_COOKIE in cookie_parser(headers.get("cookie", ""))


async def _answer(
    send: Send, status: int, body: dict[str, Any] | None, extra: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode() if body is not None else b""
    raw = [(b"content-length", str(len(payload)).encode())]
    if body is not None:
        raw.append((b"content-type", b"application/json"))
    raw += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
