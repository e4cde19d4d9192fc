"""Job handlers, one module per kind; importing this package registers them all."""

from worker.tasks import selftest  # noqa: F401
