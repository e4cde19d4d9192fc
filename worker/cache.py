"""One per-process cache for loaded models (pipelines, reward models): least recently used out."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LoadedCache(Generic[K, V]):
    """Thread-safe LRU of loaded objects. Room is made *before* loading, so two large models
    never sit in memory together; `on_evict` runs after each eviction (e.g. to free GPU memory).
    Loading happens under the lock: two threads asking for the same model load it once."""

    def __init__(self, size: int, on_evict: Callable[[], None] | None = None) -> None:
        self.size = size
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], V], *, size: int | None = None) -> V:
        limit = max(self.size if size is None else size, 1)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= limit:
                self._items.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict()
            value = load()
            self._items[key] = value
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            if self._on_evict is not None:
                self._on_evict()

    def __len__(self) -> int:
        return len(self._items)
