"""Domain errors: what services raise when a request cannot be carried out.

Services speak only of the domain; the web layer translates each kind to its HTTP status
(`http_status`, and the app-wide handler in app.main), so a service can be called from a
route, a page, a job or the command line alike.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refused request; `detail` is shown to the client as is."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    """The thing named does not exist (or is not visible to the caller)."""


class Conflict(DomainError):
    """The request clashes with what is stored (a taken name, a job already finished)."""


class Invalid(DomainError):
    """The request names something it may not (an id of another project)."""


_STATUS: dict[type[DomainError], int] = {NotFound: 404, Conflict: 409, Invalid: 422}


def http_status(exc: DomainError) -> int:
    for kind, status in _STATUS.items():
        if isinstance(exc, kind):
            return status
    return 400
