"""Who listens to what: (media, resource) → subscribers. No I/O."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator

Key = tuple[str, str]  # (media, resource)


class Routing:
    """A multimap from keys to subscribers, in registration order."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[Key, dict[Hashable, None]] = {}

    def add(self, key: Key, subscriber: Hashable) -> bool:
        """False when the subscriber already holds this key."""
        subs = self._by_key.setdefault(key, {})
        if subscriber in subs:
            return False
        subs[subscriber] = None
        return True

    def remove(self, key: Key, subscriber: Hashable) -> bool:
        subs = self._by_key.get(key)
        if not subs or subscriber not in subs:
            return False
        del subs[subscriber]
        if not subs:
            del self._by_key[key]
        return True

    def subscribers(self, key: Key) -> list[Hashable]:
        subs = self._by_key.get(key)
        return list(subs) if subs else []

    def of(self, key: Key) -> Collection[Hashable]:
        """The subscribers of a key, not copied: do not register or unregister while walking it."""
        return self._by_key.get(key) or ()

    def has(self, key: Key) -> bool:
        return key in self._by_key

    def counts(self) -> Iterator[tuple[Key, int]]:
        for key, subs in self._by_key.items():
            yield key, len(subs)

    def __len__(self) -> int:
        return len(self._by_key)
