"""Job handlers, one module per kind; importing this package registers them all."""

from worker.tasks import generate, ratings, selftest  # noqa: F401
