from __future__ import annotations

from worker.cache import LoadedCache


def test_least_recently_used_goes_first_and_room_is_made_before_loading() -> None:
    events: list[str] = []
    cache: LoadedCache[str, str] = LoadedCache(2, on_evict=lambda: events.append("evicted"))

    def loader(key: str):  # type: ignore[no-untyped-def]
        def load() -> str:
            events.append(f"load {key} with {len(cache)} held")
            return key.upper()

        return load

    assert cache.get("a", loader("a")) == "A"
    assert cache.get("b", loader("b")) == "B"
    assert cache.get("a", loader("a")) == "A"  # a hit: no load, and "a" is now the most recent
    assert cache.get("c", loader("c")) == "C"  # "b" goes, before "c" is loaded
    assert events == ["load a with 0 held", "load b with 1 held", "evicted", "load c with 1 held"]
    events.clear()
    assert cache.get("a", loader("a")) == "A" and events == []
    assert cache.get("b", loader("b"), size=1) == "B"  # a smaller limit for this call
    assert events == ["evicted", "evicted", "load b with 0 held"] and len(cache) == 1
    cache.clear()
    assert len(cache) == 0
