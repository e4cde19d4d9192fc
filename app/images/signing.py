"""Signed image URLs: the pair's images served without a database lookup.

A pair served to an annotator carries URLs of the form
`/api/v1/images/{id}?u={annotator}&e={expires}&h={sha256}&s={signature}`, the signature an HMAC
(SHA-256, keyed by a key derived from the app secret) over the image id, its content hash, the
annotator and the expiry. The image route checks it and answers from the content-addressed
store: no session, no token lookup, no membership query. Without a valid signature the route
falls back to the member check, so plain `/api/v1/images/{id}` keeps working.

- Annotator-scoped: the annotator's id is signed (a URL copied to someone else still names its
  holder, and is no key to any other image).
- Expiring: expiry times are rounded up to `BUCKET_SECONDS`, so that the same image gets the
  same URL (and the browser's cached copy) for a while; a URL lives between `BUCKET_SECONDS`
  and twice that. Revoking a token or a membership stops new URLs at once; URLs already handed
  out keep working until they expire (at most `2 * BUCKET_SECONDS`), and only for images the
  annotator was already shown.
- Blind: the URL holds the content hash, which the ETag gives away anyway, and an expiry shared
  by every image signed in the same window; nothing about the model or when it was made.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from functools import lru_cache
from urllib.parse import urlencode

from app.core.config import get_settings
from app.images.service import image_url

BUCKET_SECONDS = 600
_HEX = frozenset("0123456789abcdef")


@lru_cache(maxsize=4)
def _key(secret: str) -> bytes:
    # A key of its own, so that a signature is never valid as any other of the app's MACs.
    return hmac.new(secret.encode(), b"prefloop image url v1", hashlib.sha256).digest()


def _signature(image_id: str, sha256: str, annotator_id: int, expires: int) -> str:
    key = _key(get_settings().effective_secret_key())
    msg = f"{image_id}.{sha256}.{annotator_id}.{expires}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]


def expiry(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return (math.floor(now / BUCKET_SECONDS) + 2) * BUCKET_SECONDS


def signed_image_url(
    image_id: str, sha256: str, annotator_id: int, *, now: float | None = None
) -> str:
    expires = expiry(now)
    query = urlencode(
        {
            "u": annotator_id,
            "e": expires,
            "h": sha256,
            "s": _signature(image_id, sha256, annotator_id, expires),
        }
    )
    return f"/api/v1/images/{image_id}?{query}"


def served_image_url(image_id: str, sha256: str, annotator_id: int) -> str:
    """A served pair's image: a signed URL when the content hash is known, else the member URL."""
    return signed_image_url(image_id, sha256, annotator_id) if sha256 else image_url(image_id)


def verified_sha256(
    image_id: str,
    *,
    u: str | None,
    e: str | None,
    h: str | None,
    s: str | None,
    now: float | None = None,
) -> str | None:
    """The image's content hash if the URL's signature holds and has not expired, else None."""
    # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
    if not (u and e and h and s) or not all(x.isascii() and x.isdigit() for x in (u, e)):
        return None
    if len(h) != 64 or not _HEX.issuperset(h) or len(s) != 32:
        return None
    expires = int(e)
    if expires <= (time.time() if now is None else now):
        return None
    if not hmac.compare_digest(_signature(image_id, h, int(u), expires), s):
        return None
    return h
