"""Job handlers, one module per kind; importing this package registers them all."""

from worker.tasks import dpo, evaluate, generate, loop, ratings, reward, selftest  # noqa: F401
